"""Helpers shared by the kernel tests: a stand-in for a kernel that must not launch, and CUDA-graph capture."""
from __future__ import annotations

import torch


class Forbidden:
    """Stands in for a Triton kernel that must not launch (kernel[grid](...) raises), so a test proves which of
    two interchangeable kernels ran."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} launched")


def forbid(monkeypatch, module, name: str) -> None:
    monkeypatch.setattr(module, name, Forbidden(name))


def capture(fn):
    """One warm-up call of fn on a side stream, then fn captured in a CUDA graph → (graph, fn's output inside
    the graph's pool): replaying the graph rewrites that output from the current contents of fn's inputs."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out
