"""engine/nvtx.py's backends without a GPU: which one _impl picks (the nvtx package, torch.cuda.nvtx, none), that
each range is pushed and popped (also when the body raises), that record_functions adds torch.profiler ranges, and
that nothing is emitted while torch.compile traces."""
import sys
import types

import pytest
import torch

from fmlm.engine import nvtx


@pytest.fixture
def fresh_impl():
    nvtx._impl.cache_clear()
    yield
    nvtx._impl.cache_clear()


class _TorchNvtx:
    """torch.cuda.nvtx's interface: range_push / range_pop."""

    def __init__(self):
        self.log = []

    def range_push(self, name):
        self.log.append(("push", name))

    def range_pop(self):
        self.log.append(("pop",))


def test_impl_prefers_the_nvtx_package_then_torch_then_none(fresh_impl, monkeypatch):
    pkg = types.ModuleType("nvtx")
    monkeypatch.setitem(sys.modules, "nvtx", pkg)
    assert nvtx._impl() == ("nvtx", pkg) and nvtx.backend() == "nvtx"
    nvtx._impl.cache_clear()
    monkeypatch.setitem(sys.modules, "nvtx", None)            # not installed: `import nvtx` raises
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert nvtx._impl() == ("torch", torch.cuda.nvtx) and nvtx.backend() == "torch"
    nvtx._impl.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert nvtx._impl() == ("none", None) and nvtx.backend() == "none"


def test_torch_nvtx_ranges_push_and_pop_even_on_error(monkeypatch):
    mod = _TorchNvtx()
    monkeypatch.setattr(nvtx, "_impl", lambda: ("torch", mod))
    with nvtx.range("outer"):
        with pytest.raises(ValueError):
            with nvtx.range("inner"):
                raise ValueError("boom")
    assert mod.log == [("push", "outer"), ("push", "inner"), ("pop",), ("pop",)]


def test_nvtx_package_ranges_are_annotations_in_the_fmlm_domain(monkeypatch):
    seen = []

    class _Annotate:
        def __init__(self, message, domain=None):
            self.message, self.domain = message, domain

        def __enter__(self):
            seen.append(("enter", self.message, self.domain))

        def __exit__(self, *exc):
            seen.append(("exit", self.message))
    monkeypatch.setattr(nvtx, "_impl", lambda: ("nvtx", types.SimpleNamespace(annotate=_Annotate)))
    with nvtx.range("block3"):
        pass
    assert seen == [("enter", "block3", "fmlm"), ("exit", "block3")]


def test_record_functions_adds_profiler_ranges_and_restores(monkeypatch):
    mod = _TorchNvtx()
    monkeypatch.setattr(nvtx, "_impl", lambda: ("torch", mod))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with nvtx.range("plain"):
            pass
        with nvtx.record_functions():
            with nvtx.range("recorded"):
                with nvtx.record_functions(False):
                    with nvtx.range("off_again"):
                        pass
        with nvtx.range("plain_after"):
            pass
    names = {e.name for e in prof.events()}
    assert "recorded" in names and not names & {"plain", "off_again", "plain_after"}
    assert [x[1] for x in mod.log if x[0] == "push"] == ["plain", "recorded", "off_again", "plain_after"]
    assert nvtx._record == [False]


def test_no_ranges_while_torch_compile_traces(monkeypatch):
    mod = _TorchNvtx()
    monkeypatch.setattr(nvtx, "_impl", lambda: ("torch", mod))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with nvtx.record_functions():
        with nvtx.range("traced"):
            pass
    assert mod.log == []
