"""`fmlm demo --quick`: the whole pipeline (tokenizer, FLM, FMLM, sampling, scoring, report) in seconds."""
import json

import pytest
import torch

import fmlm


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_demo_quick(tmp_path, capsys):
    from fmlm.engine.cli import main

    out = tmp_path / "demo_out"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "FMLM 1" in printed and "report:" in printed
    for f in ("report.md", "metrics.json", "samples.jsonl", "loss_curves.png", "quality_vs_steps.png",
              "flm/tokenizer.json", "fmlm/tokenizer.json"):
        assert (out / f).is_file(), f
    assert not (out / "cache").exists()
    m = json.loads((out / "metrics.json").read_text())
    steps = m["config"]["sample_steps"]
    assert steps == [1, 2, 4, 32]
    for model in ("flm", "fmlm"):
        for k in steps:
            r = m["results"][model][str(k)]
            assert 0 <= r["word_pairs"] <= 1 and r["entropy"] >= 0 and r["ms_per_sample"] > 0
    assert m["corpus"]["word_pairs"] > 0.7                      # held-out corpus blocks: real word pairs
    assert m["random"]["entropy"] > m["corpus"]["entropy"] * 0.9
    assert m["flm_val_ce"] > 0 and set(m["checks"]) >= {"beats_flm", "entropy_ok", "above_random", "margin"}
    flm = fmlm.load_checkpoint(out / "flm")
    fm = fmlm.load_checkpoint(out / "fmlm")
    assert not flm.cfg.two_time and fm.cfg.two_time and fm.cfg.vocab_size == m["vocab_size"]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(steps) * m["config"]["n_samples"]
    assert {r["model"] for r in rows} == {"flm", "fmlm"} and all(len(r["tokens"]) == m["config"]["seq_len"] for r in rows)
    report = (out / "report.md").read_text()
    assert "![loss_curves.png](loss_curves.png)" in report and "| FMLM | 1 |" in report


def test_demo_out_dir_is_never_someone_elses(tmp_path):
    """--out is replaced only when it holds nothing but a demo's outputs (the demo used to delete whatever directory
    it named, e.g. --out . or a folder of the user's files)."""
    from fmlm.engine.demo import _fresh_out_dir

    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(FileExistsError, match="thesis.txt"):
        _fresh_out_dir(mine)
    assert (mine / "thesis.txt").read_text() == "years of work"
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        _fresh_out_dir(a_file)
    earlier = tmp_path / "demo_out"                          # an earlier run's outputs: replaced
    (earlier / "runs" / "flm").mkdir(parents=True)
    (earlier / "report.md").write_text("old")
    assert _fresh_out_dir(earlier) == earlier and not any(earlier.iterdir())
    assert _fresh_out_dir(tmp_path / "new" / "dir").is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _fresh_out_dir(empty).is_dir()
