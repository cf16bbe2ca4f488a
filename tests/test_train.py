"""Trainer: exact resume, atomic checkpoints, EMA ramp, LR schedule, the CLI, and DDP on gloo with 2 processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fmlm
from fmlm.engine import train as T
from fmlm.engine.data import PackedBlocks
from fmlm.engine.losses import init_student


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread (spin-waiting threads cost 50x on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _blocks(V=131, L=9, n=600, seed=0):
    stream = np.random.default_rng(seed).integers(5, V, n).astype(np.uint16)
    return PackedBlocks(stream, L, bos=2, eos=3).split(val_every=10)


def _model(tiny_cfg, seed=0, **kw):
    torch.manual_seed(seed)
    return fmlm.FlowLM(tiny_cfg(**kw), init="published")


def _tc(**kw):
    base = dict(steps=6, batch_size=4, accum=2, lr=3e-3, warmup=3, ema=0.9, log_every=1, ckpt_every=3,
                val_every=0, val_batches=1, keep_ckpts=2, backend="torch")
    return T.TrainConfig(**{**base, **kw})


def test_lr_schedule_and_ema_ramp(tiny_cfg):
    tc = _tc(lr=1.0, warmup=4)
    assert [T.lr_at(s, tc) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    m = _model(tiny_cfg)
    ema = T.EMA(m, 0.9999)
    p0 = m.embed.detach().clone()
    with torch.no_grad():
        m.embed.add_(1.0)
    ema.update(m)                  # first update: decay = min(0.9999, 2/11)
    torch.testing.assert_close(ema.model.embed, p0 + (1 - 2 / 11))
    assert not any(p.requires_grad for p in ema.model.parameters())


@pytest.mark.parametrize("kind", ["flm", "fmlm"])
def test_resume_is_exact(tmp_path, tiny_cfg, kind):
    """2N steps in one run == N steps, then a fresh process state resumed for N more: identical weights,
    EMA and optimizer state, bit for bit (CPU)."""
    train, val = _blocks()
    teacher = _model(tiny_cfg, seed=7) if kind == "fmlm" else None
    if teacher is not None:
        teacher.reset_parameters(seed=7)

    def fresh(seed):
        m = _model(tiny_cfg, seed=seed)
        return init_student(teacher) if kind == "fmlm" else m

    a = T.train_loop(fresh(0), kind, train, _tc(), tmp_path / "a", val, teacher=teacher, progress=False)
    T.train_loop(fresh(0), kind, train, _tc(steps=3), tmp_path / "b", val, teacher=teacher, progress=False)
    b = T.train_loop(fresh(123), kind, train, _tc(), tmp_path / "b", val, teacher=teacher, progress=False)
    assert a.steps_done == b.steps_done == 6
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k
    for (k, x), y in zip(a.ema_model.state_dict().items(), b.ema_model.state_dict().values()):
        assert torch.equal(x, y), k
    init = fresh(0).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in a.model.state_dict().items())   # it did train
    la = [r["loss"] for r in a.history if "loss" in r][3:]
    lb = [r["loss"] for r in b.history if "loss" in r]
    assert la == lb                                       # the resumed half replays the same losses


def test_checkpoints_are_atomic_and_loadable(tmp_path, tiny_cfg):
    train, val = _blocks()
    tok = None
    r = T.train_loop(_model(tiny_cfg), "flm", train, _tc(steps=9, ckpt_every=2, keep_ckpts=2), tmp_path, val,
                     tokenizer=tok, progress=False)
    root = tmp_path / T.CKPT_DIR
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step_00000008", "step_00000009"], names          # 2 kept, no temporaries
    assert (root / "latest").read_text() == "step_00000009"
    ck = T.latest_checkpoint(tmp_path)
    st = torch.load(ck / "train_state.pt", weights_only=False)
    assert st["step"] == 9 and st["kind"] == "flm" and len(st["rng"]) == 1
    m = fmlm.load_checkpoint(ck / T.MODEL_DIR)
    for k, v in r.ema_model.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    final = fmlm.load_checkpoint(tmp_path / T.MODEL_DIR)
    assert torch.equal(final.embed, r.ema_model.embed)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if "loss" in x] == list(range(1, 10))
    assert any("val_loss" in x for x in recs)
    assert all(np.isfinite(x["loss"]) and x["tok_s"] > 0 for x in recs if "loss" in x)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        T.train_loop(_model(tiny_cfg), "flm", train, _tc(steps=12), tmp_path, val, resume=False, progress=False)
    with pytest.raises(ValueError, match="'flm' run"):
        T.train_loop(init_student(_model(tiny_cfg)), "fmlm", train, _tc(steps=12), tmp_path, val,
                     teacher=_model(tiny_cfg), progress=False)
    # a resume must not change what the weights compute or which data comes next (found by review: both went on)
    with pytest.raises(ValueError, match="another model config.*logit_cap"):
        T.train_loop(_model(tiny_cfg, logit_cap=None), "flm", train, _tc(steps=12), tmp_path, val, progress=False)
    with pytest.raises(ValueError, match="same --batch-size"):
        T.train_loop(_model(tiny_cfg), "flm", train, _tc(steps=12, batch_size=8), tmp_path, val, progress=False)


def test_training_reduces_loss(tiny_cfg):
    """A repetitive corpus (one block repeated): the FLM loss must fall well below its start."""
    stream = np.tile(np.arange(10, 17, dtype=np.uint16), 200)
    train = PackedBlocks(stream, 9, 2, 3)
    tc = _tc(steps=60, batch_size=8, accum=1, lr=5e-3, warmup=5, ckpt_every=1000)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        r = T.train_loop(_model(tiny_cfg), "flm", train, tc, d, progress=False)
    losses = [x["loss"] for x in r.history if "loss" in x]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), (losses[:5], losses[-10:])


def test_bad_configs():
    with pytest.raises(ValueError, match="divisible by accum"):
        T.TrainConfig(batch_size=6, accum=4)
    with pytest.raises(ValueError, match="path"):
        T.TrainConfig(path="fast")
    # values that used to turn a feature off without a word, or failed only at the first step
    for kw, msg in ((dict(grad_clip=-1.0), "grad_clip"), (dict(grad_clip=float("nan")), "grad_clip"),
                    (dict(warmup=-100), "warmup"), (dict(log_every=0), "log_every"), (dict(lr=float("nan")), "lr"),
                    (dict(lr=float("inf")), "lr"), (dict(diag_fraction=2.0), "diag_fraction"),
                    (dict(time_budget=-1.0), "time_budget"), (dict(beta2=1.0), "beta2")):
        with pytest.raises(ValueError, match=msg):
            T.TrainConfig(**kw)
    T.TrainConfig(grad_clip=0.0, warmup=0, time_budget=0.0)          # 0 = off stays allowed
    # counts must be ints: steps=2.5 ran 3 steps and never reached `step == steps` (no final checkpoint)
    for kw in (dict(steps=2.5), dict(batch_size=8.0), dict(accum=True), dict(n_samples="2"), dict(accum=0)):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be an int"):
            T.TrainConfig(**kw)
    assert T.TrainConfig(steps=np.int64(5)).steps == 5


def test_fmlm_micro_batch_must_hold_the_split(tmp_path, tiny_cfg):
    """The diagonal/off-diagonal split is drawn per micro-batch: one row with diag_fraction 0.5 would never be a
    diagonal (teacher) row, so the trainer refuses it instead of dropping the teacher term."""
    train, val = _blocks()
    teacher = _model(tiny_cfg, seed=7)
    with pytest.raises(ValueError, match="micro-batch of 1 rows"):
        T.train_loop(init_student(teacher), "fmlm", train, _tc(batch_size=4, accum=4), tmp_path, val,
                     teacher=teacher, progress=False)
    T.train_loop(init_student(teacher), "fmlm", train, _tc(steps=1, batch_size=4, accum=2),
                 tmp_path / "ok", val, teacher=teacher, progress=False)


def test_student_drops_the_teacher_loss_weighting(tiny_cfg):
    """The distillation loss is unweighted; a student that kept the teacher's learnable loss weighting would hold
    parameters no loss uses, which DistributedDataParallel refuses at its second step."""
    teacher = _model(tiny_cfg, learnable_loss_weighting=True)
    st = init_student(teacher)
    assert not st.cfg.learnable_loss_weighting and not hasattr(st, "learnable_loss_weighting")
    assert teacher.cfg.learnable_loss_weighting                      # the teacher's own config is untouched
    for k, v in st.state_dict().items():
        if not k.startswith("sigma_map_prime."):
            assert torch.equal(v, teacher.state_dict()[k]), k


def test_dropout_is_not_applied_and_says_so(tmp_path, tiny_cfg):
    train, val = _blocks()
    with pytest.warns(UserWarning, match="dropout 0.1 is not applied"):
        T.train_loop(_model(tiny_cfg, dropout=0.1), "flm", train, _tc(steps=1), tmp_path, val, progress=False)


def _write_corpus(path: Path):
    from fmlm.engine.data import iter_texts
    lines = [ln for _, ln in zip(range(400), iter_texts("bundled"))]
    path.write_text("\n".join(lines) + "\n")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", FMLM_CACHE="")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


TINY = ["--tokenizer", "train:200", "--seq-len", "12", "--hidden", "32", "--blocks", "1", "--heads", "2",
        "--cond-dim", "16", "--batch-size", "4", "--warmup", "2", "--log-every", "1", "--val-every", "3",
        "--val-batches", "1", "--ckpt-every", "3", "--device", "cpu", "--no-progress", "--backend", "torch"]


def test_cli_train_distill_and_errors(tmp_path, capsys):
    from fmlm.engine.cli import main
    text = tmp_path / "corpus.txt"
    _write_corpus(text)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["train", "--data", str(text), "--out", str(tmp_path / "flm"), "--steps", "3", *TINY, *cache]) == 0
    teacher = tmp_path / "flm" / T.MODEL_DIR
    assert (teacher / "tokenizer.json").is_file() and not fmlm.load_checkpoint(teacher).cfg.two_time
    distill = ["distill", "--teacher", str(teacher), "--data", str(text), "--steps", "2", "--batch-size", "4",
               "--warmup", "1", "--device", "cpu", "--no-progress", "--backend", "torch", "--val-batches", "1", *cache]
    assert main([*distill, "--out", str(tmp_path / "fmlm")]) == 0
    fm = fmlm.load_checkpoint(tmp_path / "fmlm" / T.MODEL_DIR)
    assert fm.cfg.two_time and (tmp_path / "fmlm" / T.MODEL_DIR / "tokenizer.json").is_file()
    # the same command again: the same student (init_student's fresh layers came from an unseeded global RNG)
    torch.manual_seed(12345)
    assert main([*distill, "--out", str(tmp_path / "fmlm_again")]) == 0
    again = fmlm.load_checkpoint(tmp_path / "fmlm_again" / T.MODEL_DIR).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in fm.state_dict().items())
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x"), *TINY]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(tmp_path / "fmlm" / T.MODEL_DIR), "--data", str(text), "--out",
                 str(tmp_path / "y"), "--device", "cpu"]) == 1
    assert "two-time" in capsys.readouterr().err
    for cmd in (["train", "--help"], ["distill", "--help"], ["demo", "--help"], ["bench", "train", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
    assert "--batch-size" in capsys.readouterr().out


def test_ddp_gloo_two_processes(tmp_path):
    """torchrun --nproc_per_node 2 -m fmlm train on CPU (gloo): trains, ranks stay in step (train_loop checks
    a parameter checksum across ranks at the end), per-rank RNG states are checkpointed, and a resumed
    2-process run continues from them."""
    text = tmp_path / "corpus.txt"
    _write_corpus(text)
    out = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "fmlm", "train", "--data", str(text), "--out", str(out), *TINY,
            "--cache-dir", str(tmp_path / "cache")]
    for steps in ("3", "6"):
        p = subprocess.run([*base, "--steps", steps], capture_output=True, text=True, env=_env(), timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    st = torch.load(T.latest_checkpoint(out) / "train_state.pt", weights_only=False)
    assert st["step"] == 6 and len(st["rng"]) == 2
    assert not torch.equal(st["rng"][0]["loss_gen"], st["rng"][1]["loss_gen"])   # ranks draw their own noise
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["world"] == 2
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if "loss" in x] == [1, 2, 3, 4, 5, 6]
    fmlm.load_checkpoint(out / T.MODEL_DIR)


def test_bench_train_rows():
    """fmlm bench train: both paths measured in one run; the engine path holds no (B, L, V) tensor."""
    B, L, V = 8, 32, 16411
    rows = T.bench_train(vocab=V, seq_len=L, batch=B, hidden=32, blocks=1, heads=2, iters=1, device="cpu")
    assert [r["path"] for r in rows] == ["reference", "engine"]
    assert all(r["peak_MiB"] > 0 and r["tok_s"] > 0 for r in rows)
    # the reference path materializes one-hot, noise, x_γ and logits at (B, L, V) fp32, 8 MiB each
    assert rows[0]["peak_MiB"] > 4 * (B * L * V * 4) / 2**20
    assert rows[1]["mem_ratio_vs_ref"] > 3


@pytest.mark.gpu
def test_train_loop_cuda_bf16(tmp_path, tiny_cfg):
    """A few FLM and FMLM steps on CUDA with bf16 autocast and the Triton ops; EMA samples at the end."""
    train, val = _blocks(V=1000, L=16, n=3000)
    kw = dict(vocab_size=1000, seq_len=16, hidden=64, n_blocks=2, n_heads=2, cond_dim=32)
    d = T.setup_distributed("cuda")
    tc = _tc(steps=6, batch_size=8, backend="auto", amp="auto", sample_every=3)
    flm = T.train_loop(_model(tiny_cfg, **kw), "flm", train, tc, tmp_path / "flm", val, dist=d, progress=False)
    fm = T.train_loop(init_student(flm.ema_model), "fmlm", train, tc, tmp_path / "fmlm", val,
                      teacher=flm.ema_model, dist=d, progress=False)
    for r in (flm, fm):
        losses = [x["loss"] for x in r.history if "loss" in x]
        assert len(losses) == 6 and all(np.isfinite(losses))
        assert any("samples" in x for x in r.history)
    assert fmlm.load_checkpoint(tmp_path / "fmlm" / T.MODEL_DIR).cfg.two_time


def test_bench_train_module_cpu_smoke(monkeypatch):
    """bench/bench_train.py (make gpu-check's training-step row) at a tiny shape on the CPU."""
    from fmlm.bench import bench_train as bench

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "SHAPE", dict(vocab=1031, seq_len=16, batch=4, hidden=32, blocks=1, heads=2,
                                             cond_dim=32))
    rows = bench.run(quick=True)
    assert [r["path"] for r in rows] == ["reference", "engine"] and rows[1]["speedup_vs_ref"] > 0
    assert all(r["amp"] == "none" for r in rows)         # auto: bf16 autocast on CUDA only


# -- branches the tests above do not reach (coverage review) ---------------------------------------------------

def test_more_bad_configs(tiny_cfg):
    with pytest.raises(ValueError, match=r"ema must be in \[0, 1\)"):
        T.TrainConfig(ema=1.0)
    with pytest.raises(ValueError, match="amp must be auto, bf16 or none"):
        T.TrainConfig(amp="fp16")
    m = _model(tiny_cfg)
    with pytest.raises(ValueError, match="kind must be 'flm' or 'fmlm', got 'mdlm'"):
        T.LossModule(m, "mdlm", _tc())
    with pytest.raises(ValueError, match="FMLM distillation needs a teacher"):
        T.LossModule(m, "fmlm", _tc())


def test_setup_distributed_single_process(monkeypatch):
    """No torchrun variables: one process, rank 0; 'auto' picks CUDA when there is one, else the CPU."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = T.setup_distributed("auto")
    assert (d.rank, d.world, d.local_rank) == (0, 1, 0) and d.main and not d.on
    assert d.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    d.barrier()                                              # a no-op without a process group


def test_batch_must_split_over_the_world_size(tmp_path, tiny_cfg):
    """Under torchrun the global batch is split over ranks × accumulation steps; refused before any collective."""
    train, val = _blocks()
    with pytest.raises(ValueError, match=r"batch_size 4 must be divisible by world size × accum = 3"):
        T.train_loop(_model(tiny_cfg), "flm", train, _tc(accum=1), tmp_path, val, dist=T.Dist(world=3),
                     progress=False)


def test_time_budget_stops_checkpoints_and_resumes_exactly(tmp_path, tiny_cfg):
    """time_budget: the run stops after the step that exceeds it, validates, checkpoints and writes model/; a
    later run resumes from that step and ends where an uninterrupted run ends. on_log sees every record."""
    train, val = _blocks()
    full = T.train_loop(_model(tiny_cfg), "flm", train, _tc(ckpt_every=0), tmp_path / "full", val, progress=False)
    seen = []
    cut = T.train_loop(_model(tiny_cfg), "flm", train, _tc(ckpt_every=0, time_budget=1e-9), tmp_path / "cut", val,
                       progress=False, on_log=seen.append)
    assert cut.stopped_early and cut.steps_done == 1 and not full.stopped_early
    assert seen == cut.history and [r["step"] for r in seen if "loss" in r] == [1]
    assert any("val_loss" in r for r in seen)
    assert T.latest_checkpoint(tmp_path / "cut").name == "step_00000001"
    assert fmlm.load_checkpoint(tmp_path / "cut" / T.MODEL_DIR).cfg == full.model.cfg
    rest = T.train_loop(_model(tiny_cfg, seed=5), "flm", train, _tc(ckpt_every=0), tmp_path / "cut", val,
                        progress=False)
    assert rest.steps_done == 6 and not rest.stopped_early
    for (k, x), y in zip(full.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.equal(x, y), k
    for (k, x), y in zip(full.ema_model.state_dict().items(), rest.ema_model.state_dict().values()):
        assert torch.equal(x, y), k


def test_resume_after_a_crash_before_latest_was_updated(tmp_path, tiny_cfg):
    """A crash after checkpoints/step_6 was written but before `latest` named it: the resumed run trains steps
    4-6 again and replaces the stale step_6 directory as a whole (no leftovers)."""
    train, val = _blocks()
    T.train_loop(_model(tiny_cfg), "flm", train, _tc(), tmp_path, val, progress=False)
    root = tmp_path / T.CKPT_DIR
    want = torch.load(root / "step_00000006" / "train_state.pt", weights_only=False)["model"]
    (root / "latest").write_text("step_00000003")
    (root / "step_00000006" / "stale").write_text("from the crashed run")
    r = T.train_loop(_model(tiny_cfg, seed=9), "flm", train, _tc(), tmp_path, val, progress=False)
    assert r.steps_done == 6 and [x["step"] for x in r.history if "loss" in x] == [4, 5, 6]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000006"]
    assert (root / "latest").read_text() == "step_00000006" and not (root / "step_00000006" / "stale").exists()
    got = torch.load(root / "step_00000006" / "train_state.pt", weights_only=False)["model"]
    assert all(torch.equal(got[k], v) for k, v in want.items())


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_out_dir_is_refused_before_any_work(tmp_path, tiny_cfg):
    """--out holding unrelated files, or a run that stopped before its first checkpoint, or a resumable run whose
    model/ holds files the final save would replace: refused before the first step, with nothing in it changed
    (the first case used to append to metrics.jsonl and fail only at the end, when model/ was saved)."""
    train, val = _blocks()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "model").mkdir()
    (mine / "model" / "weights.bin").write_bytes(b"\x00\x01")
    before = _listing(mine)
    with pytest.raises(FileExistsError, match="'model', 'notes.txt' but no checkpoint to resume; give a new"):
        T.train_loop(_model(tiny_cfg), "flm", train, _tc(), mine, val, progress=False)
    assert _listing(mine) == before
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(FileExistsError, match="stopped before its first checkpoint: delete it"):
        T.train_loop(_model(tiny_cfg), "flm", train, _tc(), stale, val, progress=False)
    assert (stale / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        T.train_loop(_model(tiny_cfg), "flm", train, _tc(), a_file, val, progress=False)
    run = tmp_path / "run"
    T.train_loop(_model(tiny_cfg), "flm", train, _tc(steps=3), run, val, progress=False)
    (run / T.MODEL_DIR / "mine.txt").write_text("keep me")
    before = _listing(run)
    with pytest.raises(FileExistsError, match="holds 'mine.txt', not an fmlm checkpoint's files"):
        T.train_loop(_model(tiny_cfg), "flm", train, _tc(steps=6), run, val, progress=False)
    assert _listing(run) == before
    (run / T.MODEL_DIR / "mine.txt").unlink()
    r = T.train_loop(_model(tiny_cfg), "flm", train, _tc(steps=6), run, val, progress=False)
    assert r.steps_done == 6
    empty = tmp_path / "empty"
    empty.mkdir()
    assert T.train_loop(_model(tiny_cfg), "flm", train, _tc(steps=1), empty, val, progress=False).steps_done == 1


def test_cli_refuses_out_before_building_the_tokenizer(tmp_path, monkeypatch, capsys):
    """`fmlm train` / `fmlm distill` check --out before the corpus is read and a tokenizer trained (minutes on a
    large corpus): exit 1, one line, the directory as it was."""
    from fmlm.engine import data as D
    from fmlm.engine.cli import main

    def no_corpus(*a, **k):
        raise AssertionError("load_corpus ran before --out was checked")

    monkeypatch.setattr(D, "load_corpus", no_corpus)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    for argv in (["train", "--steps", "1", "--device", "cpu", "--out", str(out)],
                 ["distill", "--teacher", str(tmp_path / "no_teacher"), "--steps", "1", "--device", "cpu",
                  "--out", str(out)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"fmlm: error: --out {out}: holds 'thesis.tex' but no checkpoint"), err
        assert err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["thesis.tex"] and (out / "thesis.tex").read_text() == "keep me"


def test_resume_refuses_another_world_size(tmp_path, tiny_cfg):
    """A checkpoint holds one RNG state per rank: a 2-process run cannot be resumed by one process."""
    train, val = _blocks()
    T.train_loop(_model(tiny_cfg), "flm", train, _tc(steps=3), tmp_path, val, progress=False)
    f = T.latest_checkpoint(tmp_path) / "train_state.pt"
    st = torch.load(f, weights_only=False)
    st["rng"] = st["rng"] * 2                                # as `torchrun --nproc_per_node 2` writes it
    torch.save(st, f)
    with pytest.raises(ValueError, match="written by 2 processes; resume with the same world size"):
        T.train_loop(_model(tiny_cfg), "flm", train, _tc(), tmp_path, val, progress=False)


def test_validation_loss_with_fewer_blocks_than_batches(tiny_cfg):
    """3 validation blocks, batches of 2, val_batches 4: the last batch is partial and the loop stops there."""
    _, val = _blocks()
    val = PackedBlocks(val.stream, val.L, val.bos, val.eos, val.index[:3])
    m = _model(tiny_cfg)
    a = T.validation_loss(m, "flm", val, _tc(val_batches=4), torch.device("cpu"), batch_size=2)
    b = T.validation_loss(m, "flm", val, _tc(val_batches=2), torch.device("cpu"), batch_size=2)
    assert a == b and np.isfinite(a)


def _cli_train(tmp_path, out, *extra, steps="3"):
    from fmlm.engine.cli import main
    text = tmp_path / "corpus.txt"
    if not text.exists():
        _write_corpus(text)
    return main(["train", "--data", str(text), "--out", str(out), "--steps", steps, *TINY,
                 "--cache-dir", str(tmp_path / "cache"), *extra])


def test_cli_resume_uses_the_checkpoints_tokenizer(tmp_path, monkeypatch):
    """A resumed `train:<V>` run reads the vocabulary from its checkpoint (model/tokenizer.json), not from a
    retrained or re-cached tokenizer; --no-resume into that run is refused before any corpus is read."""
    from fmlm.engine import data as D
    assert _cli_train(tmp_path, tmp_path / "run") == 0
    specs, real = [], D.load_corpus

    def spy(source, tokenizer, *args, **kwargs):
        specs.append(tokenizer)
        return real(source, tokenizer, *args, **kwargs)
    monkeypatch.setattr(D, "load_corpus", spy)
    assert _cli_train(tmp_path, tmp_path / "run", steps="4") == 0
    ck = tmp_path / "run" / T.CKPT_DIR / "step_00000003" / T.MODEL_DIR / "tokenizer.json"
    assert specs == [str(ck)]
    assert _cli_train(tmp_path, tmp_path / "run", "--no-resume", steps="5") == 1
    assert specs == [str(ck)]            # refused before the corpus is read (check_run_dir), not by train_loop


def test_cli_init_from_and_distill_errors(tmp_path, capsys):
    """--init-from starts from a checkpoint's weights and config (its V must be the tokenizer's); distill needs
    the teacher's tokenizer.json (or --tokenizer) and a vocabulary of the teacher's size."""
    from fmlm.engine.cli import main
    from ckpt_builders import small_model
    assert _cli_train(tmp_path, tmp_path / "base") == 0
    base = tmp_path / "base" / T.MODEL_DIR
    init = fmlm.load_checkpoint(base)
    assert _cli_train(tmp_path, tmp_path / "ft", "--init-from", str(base), "--hidden", "64", "--lr", "1e-12",
                      steps="1") == 0
    cfg = json.loads((tmp_path / "ft" / "train_config.json").read_text())["model"]
    assert cfg == init.cfg.to_dict() and cfg["hidden"] == 32                  # --hidden is the checkpoint's
    raw = torch.load(T.latest_checkpoint(tmp_path / "ft") / "train_state.pt", weights_only=False)["model"]
    for k, v in init.state_dict().items():
        torch.testing.assert_close(raw[k], v, rtol=0, atol=1e-9)            # one step at lr 1e-12 from init
    other = fmlm.save_checkpoint(small_model(vocab_size=131), tmp_path / "v131")
    capsys.readouterr()
    assert _cli_train(tmp_path, tmp_path / "bad", "--init-from", str(other)) == 1
    assert "--init-from model has V=131, the tokenizer 200" in capsys.readouterr().err
    common = ["--data", str(tmp_path / "corpus.txt"), "--device", "cpu", "--no-progress", "--steps", "1",
              "--cache-dir", str(tmp_path / "cache")]
    assert main(["distill", "--teacher", str(other), "--out", str(tmp_path / "d1"), *common]) == 1
    assert "carries no tokenizer" in capsys.readouterr().err
    assert main(["distill", "--teacher", str(other), "--tokenizer", "train:200", "--out", str(tmp_path / "d2"),
                 *common]) == 1
    assert "tokenizer vocabulary 200 != teacher's 131" in capsys.readouterr().err


def test_distill_uses_the_tokenizer_a_reference_checkpoint_carries(tmp_path, capsys):
    """A reference .ckpt teacher (the released FLM's form) carries its pickled fast tokenizer: distillation without
    --tokenizer tokenizes the data with it (written once to the token cache under its content hash), so the
    student sees the teacher's ids."""
    pytest.importorskip("tokenizers")
    from fmlm.engine.cli import main
    from ckpt_builders import small_model, write_reference_ckpt
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {**{f"w{i}": i for i in range(128)}, "<|endoftext|>": 128, "[UNK]": 129, "[PAD]": 130}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    teacher = write_reference_ckpt(tmp_path / "flm.ckpt", small_model(vocab_size=131, seq_len=8),
                                   edit=lambda ck: setattr(ck["hyper_parameters"]["tokenizer"], "_tokenizer", backend))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(f"w{(7 * i + j) % 128}" for j in range(40)) for i in range(60)) + "\n")
    common = ["--data", str(corpus), "--device", "cpu", "--no-progress", "--steps", "1", "--batch-size", "4",
              "--style", "owt",
              "--cache-dir", str(tmp_path / "cache")]
    assert main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "d"), *common]) == 0, \
        capsys.readouterr().err
    written = sorted((tmp_path / "cache").glob("teacher-tokenizer-*.json"))
    assert len(written) == 1
    tok = T.teacher_tokenizer(str(teacher), fmlm.load_checkpoint(teacher), str(tmp_path / "cache"))
    assert tok == str(written[0])
    from fmlm.engine.tokenizer import load_tokenizer
    assert load_tokenizer(tok).encode("w5 w127 zz <|endoftext|>").ids == [5, 127, 129, 128]   # the teacher's ids


def test_cli_bench_train(tmp_path, monkeypatch, capsys):
    from fmlm.bench import common
    from fmlm.engine.cli import main
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    args = ["bench", "train", "--vocab", "257", "--seq-len", "8", "--batch", "2", "--hidden", "32", "--blocks", "1",
            "--heads", "2", "--iters", "1", "--device", "cpu"]
    assert main([*args, "--no-write"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| op |") and out.count("train_step_flm") == 2 and "| reference |" in out
    assert not (tmp_path / "results").exists()
    assert main(args) == 0
    assert "rows written to" in capsys.readouterr().err
    assert len((tmp_path / "results" / "train.csv").read_text().splitlines()) == 3      # header + 2 rows
