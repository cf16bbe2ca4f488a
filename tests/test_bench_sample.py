"""bench/bench_sample.py (`fmlm bench sample`): the line that names the CSV the rows went to, --device checks, and
`python -m fmlm.bench.bench_sample`."""
import re

import pytest
import torch

from fmlm.bench import bench_sample
from fmlm.engine.cli import main as fmlm_main

SMALL = ["--vocab", "517", "--seq-len", "8", "--hidden", "32", "--blocks", "1", "--batch-size", "2", "--iters", "1",
         "--device", "cpu"]


def test_the_last_line_names_the_csv_the_rows_went_to(tmp_path, monkeypatch, capsys):
    """Rows whose columns differ from bench_sample.csv's (here a 'note' column, as a GPU run's engine row has) go to
    bench_sample-<date>.csv; the line named bench_sample.csv, which did not hold them."""
    plain = [{"path": "reference", "ms/sample": 1.0}, {"path": "engine (auto)", "ms/sample": 0.5}]
    runs = iter([plain, [*plain[:1], {**plain[1], "note": "x"}], plain])
    monkeypatch.setattr(bench_sample, "bench", lambda args: next(runs))
    args = bench_sample.parser().parse_args(["--out", str(tmp_path)])
    assert bench_sample.cli(args) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"rows appended to {tmp_path / 'bench_sample.csv'}"
    assert bench_sample.cli(args) == 0
    line = capsys.readouterr().out.rstrip().splitlines()[-1]
    m = re.fullmatch(r"rows appended to (.*/bench_sample-\d{4}-\d\d-\d\d\.csv)", line)
    assert m and open(m.group(1)).read().splitlines()[0].split(",")[-1] == "note", line
    assert len((tmp_path / "bench_sample.csv").read_text().splitlines()) == 3
    assert bench_sample.cli(args) == 0                # the first columns again: back to bench_sample.csv
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"rows appended to {tmp_path / 'bench_sample.csv'}"
    assert len((tmp_path / "bench_sample.csv").read_text().splitlines()) == 5


def test_module_main_writes_rows(tmp_path, capsys):
    assert bench_sample.main(SMALL + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| reference |" in out and "| engine (auto) |" in out
    assert len((tmp_path / "bench_sample.csv").read_text().splitlines()) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    """It raised torch's AssertionError 'Torch not compiled with CUDA enabled' with a traceback."""
    assert fmlm_main(["bench", "sample", *SMALL[:-1], "cuda", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == "fmlm: error: --device cuda, but torch sees no CUDA device (use --device cpu or auto)\n"
    assert not any(tmp_path.iterdir())


def test_an_out_that_is_a_file_is_refused_before_the_run(tmp_path, monkeypatch, capsys):
    """--out is the results folder: a file there failed with "File exists" only after the timed run (the table
    survived on stdout only); it is refused first and the file is kept."""
    out = tmp_path / "keep.txt"
    out.write_text("mine\n")
    monkeypatch.setattr(bench_sample, "bench", lambda args: pytest.fail("the run started"))
    assert fmlm_main(["bench", "sample", "--device", "cpu", "--out", str(out)]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err and out.read_text() == "mine\n"
