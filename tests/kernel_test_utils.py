"""Helpers shared by the kernel tests: stand-ins for kernels that must not launch or must launch, and CUDA-graph
capture."""
from __future__ import annotations

import contextlib

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


class LaunchSpy:
    """Stands in for a @triton.jit kernel: counts the launches, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


class LaunchArgs:
    """Stands in for a @triton.jit kernel: records each launch's keyword arguments (its constexprs), then
    launches the kernel: a test sees which variant ran, not only that the kernel did."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def record_calls(monkeypatch, module, calls: list, **ops: str) -> None:
    """Replace module attributes (the registered-op entry points named by the keywords) by wrappers that append
    the keyword's value to `calls`, then call the op: a test sees which registered ops a functional went through."""
    for attr, label in ops.items():
        op = getattr(module, attr)

        def call(*args, _op=op, _label=label):
            calls.append(_label)
            return _op(*args)
        monkeypatch.setattr(module, attr, call)


@contextlib.contextmanager
def must_launch(module, *names: str):
    """Within the block, module's kernels `names` are spied on; after it, each must have launched at least once.
    A test of a backend="triton" functional wraps its calls in this: a silent fallback to the torch or reference
    path would meet the error budget too (it is as accurate as the reference), and prove nothing."""
    old = {n: getattr(module, n) for n in names}
    spies = {n: LaunchSpy(k) for n, k in old.items()}
    for n, spy in spies.items():
        setattr(module, n, spy)
    try:
        yield spies
    finally:
        for n, k in old.items():
            setattr(module, n, k)
    missing = [n for n, spy in spies.items() if spy.launches == 0]
    assert not missing, f"never launched: {missing}"


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
