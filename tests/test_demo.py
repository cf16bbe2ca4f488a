"""engine/demo.py's paths that the quick demo (tests/test_demo_quick.py) does not take: the refusals before any work,
the time budget and thread count, a machine without matplotlib, and `python -m fmlm.engine.demo`."""
import dataclasses

import pytest
import torch

from fmlm.engine import data, demo, train


class _Stop(Exception):
    """Raised where the corpus would be loaded: what run_demo did before that is what these tests check."""


@pytest.fixture
def stop_at_corpus(monkeypatch):
    def load_corpus(*args, **kwargs):
        raise _Stop
    monkeypatch.setattr(data, "load_corpus", load_corpus)


def test_demo_under_torchrun_is_refused_before_any_work(tmp_path, monkeypatch, stop_at_corpus):
    monkeypatch.setattr(train, "setup_distributed", lambda device: train.Dist(rank=0, world=2))
    out = tmp_path / "demo_out"
    with pytest.raises(RuntimeError, match="fmlm demo runs in one process; use fmlm train / distill under torchrun"):
        demo.run_demo(out, quick=True, progress=False)
    assert not out.exists()


def test_demo_time_budget_and_threads_are_applied(tmp_path, monkeypatch, capsys, stop_at_corpus):
    """time_budget (fmlm demo --time-budget) replaces the configuration's, as the first progress line says; a
    configuration's threads set torch's intra-op threads (0 leaves them)."""
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    cfg = dataclasses.replace(demo.QUICK, threads=3)
    with pytest.raises(_Stop):
        demo.run_demo(tmp_path / "a", device="cpu", time_budget=7, config=cfg)
    assert "configuration, budget 7 s" in capsys.readouterr().err and threads == [3]
    with pytest.raises(_Stop):
        demo.run_demo(tmp_path / "b", device="cpu", quick=True)
    assert f"quick configuration, budget {demo.QUICK.time_budget:.0f} s" in capsys.readouterr().err
    assert threads == [3] and (tmp_path / "b").is_dir()


def _metrics(steps=(1, 2)):
    r = dict(word_pairs=0.5, word_pairs_se=0.01, entropy=2.0, ms_per_sample=1.5, samples_per_s=600.0)
    c = dict(word_pairs=0.8, word_pairs_se=0.02, entropy=3.0)
    return {"config": dict(sample_steps=list(steps), hidden=32, blocks=1, tokenizer="words:256", seq_len=16,
                           flm_batch=8, distill_batch=8),
            "device": "cpu", "time_s": dict(total=10.0, flm=5.0, distill=3.0), "vocab_size": 256,
            "flm_steps_done": 6, "distill_steps_done": 4, "flm_val_ce": 4.2,
            "results": {m: {str(k): r for k in steps} for m in ("flm", "fmlm")}, "corpus": c, "random": c,
            "checks": dict(fmlm1_word_pairs=0.5, flm1_word_pairs=0.4, margin=0.1, margin_se=0.02,
                           required_margin=0.06, beats_flm=True, fmlm1_entropy=2.0, entropy_ok=True,
                           above_random=False)}


def test_without_matplotlib_the_demo_writes_no_plots_and_links_none(tmp_path, monkeypatch):
    """matplotlib is optional (the `plot` extra): without it _plot writes no PNG and the report links no image."""
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)      # `import matplotlib` raises ImportError
    m = _metrics()
    hist = [{"step": 1, "loss": 5.0}, {"step": 2, "val_loss": 4.0}]
    assert demo._plot(tmp_path, hist, hist, m["results"], m["corpus"], m["random"], [1, 2]) == []
    assert not any(tmp_path.iterdir())
    samples = {"FLM, 1 step": [{"text": "in the beginning"}]}
    text = demo._report(tmp_path, m, samples, [])
    assert "![" not in text and (tmp_path / "report.md").read_text() == text
    assert "| FMLM | 2 | 0.500 ± 0.010 | 2.000 | 1.500 | 600 |" in text and "> in the beginning" in text
    assert "far above random tokens (0.800): **no**" in text


def test_module_main_runs_the_demo(monkeypatch):
    """`python -m fmlm.engine.demo [--out DIR] [--quick]` runs run_demo with those."""
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, quick=False: calls.append((out, quick)))
    assert demo.main(["--out", "d", "--quick"]) == 0 and demo.main([]) == 0
    assert calls == [("d", True), ("demo_out", False)]
