"""bench/common.py helpers on the CPU: time_fn's iteration cap, git_sha's fallbacks, markdown_table of no rows,
child_json_row (the child process of a compiled reference)."""
import subprocess
import sys
import time

import pytest

from fmlm.bench import common


def test_time_fn_stops_at_ten_times_iters():
    """min_time_s asks for more runs, but never more than 10·iters: a fast fn does not spin for min_time_s."""
    t0 = time.perf_counter()
    r = common.time_fn(lambda: None, warmup=0, iters=2, device="cpu", min_time_s=3.0)
    assert r["n"] == 20 and time.perf_counter() - t0 < 2.5
    assert r["p20_ms"] <= r["ms"] <= r["p80_ms"]
    assert common.time_fn(lambda: None, warmup=1, iters=3, device="cpu")["n"] == 3


@pytest.fixture
def fresh_git_sha():
    common.git_sha.cache_clear()
    yield
    common.git_sha.cache_clear()


def test_git_sha_fallbacks(monkeypatch, fresh_git_sha):
    """FMLM_GIT_SHA wins; without it, git's answer, 'unknown' where git prints nothing or cannot run."""
    monkeypatch.setenv("FMLM_GIT_SHA", "abc1234")
    assert common.git_sha() == "abc1234"
    monkeypatch.delenv("FMLM_GIT_SHA")
    common.git_sha.cache_clear()

    def no_git(*a, **k):
        raise FileNotFoundError("git")
    monkeypatch.setattr(common.subprocess, "run", no_git)
    assert common.git_sha() == "unknown"
    common.git_sha.cache_clear()
    monkeypatch.setattr(common.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "fatal"))
    assert common.git_sha() == "unknown"
    common.git_sha.cache_clear()
    monkeypatch.setattr(common.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "f00ba47\n", ""))
    assert common.git_sha() == "f00ba47"


def test_markdown_table_of_no_rows():
    assert common.markdown_table([]) == ""
    assert common.markdown_table(iter([])) == ""
    assert common.markdown_table([{"a": 1.0, "b": "x|y"}], keys=["b"]) == "| b |\n|---|\n| x/y |\n"


CHILD = '''
import sys
flag = sys.argv[1]
if flag == "--json":
    print("warming up")
    print('{"ms": 1.0}')
    print('{"ms": 2.5, "note": "compiled"}')
    print("done")
else:
    print("no json here")
    sys.stderr.write("x" * 400 + "TAIL")
    sys.exit(3)
'''


def test_child_json_row(monkeypatch, tmp_path):
    """The last JSON line the child prints; a note with the tail of its stderr when it printed none; a note when
    it timed out; none started with under 10 s left."""
    (tmp_path / "fmlm_fake_child.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert common.child_json_row("fmlm_fake_child", "--json", 60) == {"ms": 2.5, "note": "compiled"}
    row = common.child_json_row("fmlm_fake_child", "--fail", 60)
    assert row["note"].startswith("failed: ") and row["note"].endswith("TAIL'") and len(row["note"]) < 320
    calls = []

    def run(cmd, **kw):
        calls.append((cmd, kw.get("timeout")))
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout"))
    monkeypatch.setattr(common.subprocess, "run", run)
    assert common.child_json_row("fmlm_fake_child", "--json", 42.4) == {"note": "did not finish in 42 s"}
    assert calls == [([sys.executable, "-m", "fmlm_fake_child", "--json"], 42.4)]
    assert common.child_json_row("fmlm_fake_child", "--json", 5.0) == {"note": "skipped: 5 s left"}
    assert len(calls) == 1
