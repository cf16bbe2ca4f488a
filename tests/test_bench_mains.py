"""The GPU benchmarks' entry points on a machine without CUDA (`python -m fmlm.bench.bench_e2e_compile`,
`bench_train`, `bench_profile`): a line saying they were skipped and no rows; with rows, main prints the table and
writes it to the results."""
import importlib

import pytest
import torch

from fmlm.bench import common

MODULES = {name: f"{name}: needs CUDA, skipped" for name in ("bench_e2e_compile", "bench_train", "bench_profile")}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
@pytest.mark.parametrize("name", list(MODULES))
def test_without_cuda_each_says_skipped_and_writes_nothing(name, tmp_path, monkeypatch, capsys):
    mod = importlib.import_module(f"fmlm.bench.{name}")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    assert mod.DEVICE == "cuda" and mod.run(quick=True) == []
    assert capsys.readouterr().err == MODULES[name] + "\n"
    mod.main()
    out = capsys.readouterr()
    assert out.out == "" and out.err == MODULES[name] + "\n" and not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", list(MODULES))
def test_main_prints_and_writes_the_rows(name, tmp_path, monkeypatch, capsys):
    mod = importlib.import_module(f"fmlm.bench.{name}")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(mod, "run", lambda quick=False: [{"point": "owt B=32", "ms": 1.25}])
    mod.main()
    assert capsys.readouterr().out == "| point | ms |\n|---|---|\n| owt B=32 | 1.25 |\n\n"
    assert "| owt B=32 | 1.25 |" in (tmp_path / f"{name}.md").read_text()
    assert (tmp_path / f"{name}.csv").read_text().startswith("point,ms,date,")
