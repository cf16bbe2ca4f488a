"""Training: `fmlm train` (FLM), `fmlm distill` (FMLM v2 from an FLM), `fmlm demo`, `fmlm bench train`.

A plain loop (no framework): AdamW, linear warm-up then constant LR, gradient clipping, EMA of the weights
(0.9999 with the warm-up ramp min(decay, (1+n)/(10+n))), bf16 autocast on CUDA, gradient accumulation,
periodic validation loss and few-step samples, atomic checkpoints (temporary directory + rename) holding
the optimizer, EMA, step, sampler position and every RNG state, so a resumed run continues bit for bit.

Multi-GPU: `torchrun --nproc_per_node N -m fmlm train …` runs DistributedDataParallel (NCCL on CUDA, gloo
on CPU); every rank reads its slice of each global batch (ShardedSampler) and draws its own noise.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import operator
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

CKPT_DIR = "checkpoints"
MODEL_DIR = "model"          # the final EMA model: model.safetensors + config.json + tokenizer.json


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 64            # global: all ranks and accumulation micro-batches together
    accum: int = 1
    lr: float = 3e-4
    warmup: int = 1000
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    ema: float = 0.9999
    seed: int = 0
    path: str = "engine"            # loss path: "engine" (hidden space, chunked CE) | "reference" (V-space)
    backend: str = "auto"           # fmlm.kernels backend for the engine path
    amp: str = "auto"               # "auto" = bf16 autocast on CUDA, none on CPU | "bf16" | "none"
    log_every: int = 10
    val_every: int = 0              # 0: only at the end
    val_batches: int = 4
    sample_every: int = 0
    sample_steps: tuple = (1, 4)
    n_samples: int = 2
    ckpt_every: int = 0             # 0: only at the end
    keep_ckpts: int = 2
    time_budget: float = 0.0        # seconds; > 0 stops early (and checkpoints) once exceeded
    # FMLM distillation (DESIGN.md §1)
    diag_fraction: float = 0.5
    boundary_fraction: float = 1 / 32

    def __post_init__(self):
        problems = []
        for name in ("steps", "batch_size", "accum", "val_batches", "n_samples", "keep_ckpts", "log_every"):
            v = getattr(self, name)
            try:
                iv = None if isinstance(v, bool) else operator.index(v)     # ints, numpy ints
            except TypeError:                                               # steps=2.5 ran 3 and never finished
                iv = None
            if iv is None or iv < 1:
                problems.append(f"{name} must be an int >= 1, got {v!r}")
        for name in ("warmup", "val_every", "sample_every", "ckpt_every", "weight_decay", "grad_clip", "time_budget"):
            v = float(getattr(self, name))
            if not v >= 0 or math.isinf(v):          # not v >= 0 is also true for NaN
                problems.append(f"{name} must be a finite number >= 0 (0: off), got {getattr(self, name)!r}")
        for name in ("diag_fraction", "boundary_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1]")
        if not problems and self.batch_size % self.accum:            # (accum 0 is already a problem above)
            problems.append(f"batch_size ({self.batch_size}) must be divisible by accum ({self.accum})")
        if not 0 < self.lr < math.inf:
            problems.append("lr must be a finite number > 0")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            problems.append("beta1 and beta2 must be in [0, 1)")
        if not 0.0 <= self.ema < 1.0:
            problems.append("ema must be in [0, 1)")
        if self.path not in ("engine", "reference"):
            problems.append("path must be 'engine' or 'reference'")
        if self.amp not in ("auto", "bf16", "none"):
            problems.append("amp must be auto, bf16 or none")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))
        self.sample_steps = tuple(int(s) for s in self.sample_steps)


# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def barrier(self):
        if self.on:
            torch.distributed.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():    # one line, not torch's assertion
        raise ValueError(f"--device {device}, but torch sees no CUDA device (use --device cpu or auto)")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def _all_mean(x: float, d: Dist) -> float:
    if not d.on:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=d.device)
    torch.distributed.all_reduce(t)
    return float(t) / d.world


def _check_ranks_agree(model: nn.Module, d: Dist):
    """DDP keeps every rank's weights identical (same all-reduced gradients, same optimizer); a checksum
    compared across ranks catches a rank that trained on something else."""
    cs = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).to(d.device)
    lo, hi = cs.clone(), cs.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    if float(lo) != float(hi):
        raise RuntimeError(f"DDP ranks diverged: parameter checksums range over [{float(lo)!r}, {float(hi)!r}]")


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the parameters in a full model copy (used for validation, samples
    and export, as the published evaluation uses the EMA weights)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = list(self.model.parameters())
        cur = [p.detach() for p in model.parameters()]
        if hasattr(torch, "_foreach_lerp_"):      # one fused call: the per-tensor loop cost ~3 ms/step on CPU
            torch._foreach_lerp_(ema, cur, 1.0 - d)
        else:
            for pe, p in zip(ema, cur):
                pe.lerp_(p, 1.0 - d)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "params": self.model.state_dict()}

    def load_state_dict(self, d: dict):
        self.updates = d["updates"]
        self.model.load_state_dict(d["params"])


class LossModule(nn.Module):
    """The trained model plus its loss, so DistributedDataParallel wraps the whole forward. The frozen
    teacher stays outside the module tree: not synchronised, not in the state dict, not optimised."""

    def __init__(self, model: nn.Module, kind: str, cfg: TrainConfig, teacher: Optional[nn.Module] = None):
        super().__init__()
        if kind not in ("flm", "fmlm"):
            raise ValueError(f"kind must be 'flm' or 'fmlm', got {kind!r}")
        if kind == "fmlm" and teacher is None:
            raise ValueError("FMLM distillation needs a teacher")
        self.model, self.kind, self.tc = model, kind, cfg
        self._teacher = [teacher]

    def forward(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return compute_loss(self.model, self.kind, tokens, generator, self.tc, self._teacher[0])


def compute_loss(model, kind: str, tokens, generator, tc: TrainConfig, teacher=None, weighting: bool = True):
    from . import losses  # noqa: PLC0415

    if kind == "flm":
        return losses.flm_loss(model, tokens, generator, tc.path, backend=tc.backend, weighting=weighting)
    return losses.fmlm_distill_loss(model, teacher, tokens, generator, tc.path, diag_fraction=tc.diag_fraction,
                                    boundary_fraction=tc.boundary_fraction, backend=tc.backend)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then constant (the reference's schedule)."""
    return tc.lr * min(1.0, (step + 1) / max(1, tc.warmup))


def _amp_enabled(tc: TrainConfig, device: torch.device) -> bool:
    return tc.amp == "bf16" or (tc.amp == "auto" and device.type == "cuda")


def _autocast(tc: TrainConfig, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=_amp_enabled(tc, device))


def _rng_state(gen: torch.Generator, device: torch.device) -> dict:
    st = {"loss_gen": gen.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, gen: torch.Generator, device: torch.device):
    gen.set_state(st["loss_gen"])
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Model directories and checkpoints
# ---------------------------------------------------------------------------------------------
def save_model_dir(model: nn.Module, path, tokenizer=None) -> Path:
    """A loadable model directory (fmlm.save_checkpoint, atomic): model.safetensors + config.json
    [+ tokenizer.json, the tokenizer the model was trained with]."""
    import fmlm

    if tokenizer is not None:
        model.tokenizer_json = tokenizer.to_str()
    try:
        return fmlm.save_checkpoint(model, path)
    finally:
        if tokenizer is not None:
            del model.tokenizer_json


def _replace_dir(tmp: Path, path: Path):
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def latest_checkpoint(out_dir) -> Optional[Path]:
    p = Path(out_dir) / CKPT_DIR / "latest"
    if not p.is_file():
        return None
    d = Path(out_dir) / CKPT_DIR / p.read_text().strip()
    return d if (d / "train_state.pt").is_file() else None


RUN_FILES = ("metrics.jsonl", "train_config.json", CKPT_DIR, MODEL_DIR)


def check_run_dir(out_dir, resume: bool = True) -> Optional[Path]:
    """Refuse a run directory before any work (tokenizer training, packing, the first step), not when the run
    ends: `out_dir` must be new, empty, or a run with a checkpoint to continue (resume=True). Anything else would be
    mixed into (metrics.jsonl appended to, train_config.json replaced) or refused only hours later, when the
    final model/ is saved beside files that are not an fmlm checkpoint's. Returns the latest checkpoint or None."""
    from .checkpoint import _OUR_FILES, _names  # noqa: PLC0415

    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"--out {p}: exists and is not a directory")
    if not p.exists():
        return None
    ck = latest_checkpoint(p)
    if ck is None:
        held = sorted(f.name for f in p.iterdir())
        if held:
            ours = all(n in RUN_FILES for n in held)
            raise FileExistsError(
                f"--out {p}: holds {_names(held)} but no checkpoint to resume" +
                ("; it looks like a run stopped before its first checkpoint: delete it, or give a new or empty "
                 "directory" if ours else "; give a new or empty directory"))
        return None
    if not resume:
        raise FileExistsError(f"{p} already holds checkpoints ({ck.name}); resume, or choose another --out")
    model_dir = p / MODEL_DIR
    if model_dir.exists():        # replaced when the run ends: refused now, not after the last step
        foreign = (sorted(f.name for f in model_dir.iterdir() if f.name not in _OUR_FILES) if model_dir.is_dir()
                   else [MODEL_DIR])
        if foreign:
            raise FileExistsError(f"--out {p}: {model_dir} holds {_names(foreign)}, not an fmlm checkpoint's "
                                  f"files; the run's final model would replace it: move them first")
    return ck


def save_train_checkpoint(out_dir, step: int, model, ema: EMA, opt, sampler, rng_states: list, tc: TrainConfig,
                          kind: str, tokenizer=None, extra: Optional[dict] = None) -> Path:
    """checkpoints/step_<N>/ = model/ (the EMA weights, loadable by fmlm.load_checkpoint) + train_state.pt (raw
    weights, optimizer, EMA, step, sampler, per-rank RNG states). Written under a temporary name and renamed;
    then `latest` is replaced (write + rename), so a crash leaves the previous checkpoint intact."""
    root = Path(out_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model_dir(ema.model, tmp / MODEL_DIR, tokenizer)
    state = {"step": step, "kind": kind, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "ema": ema.state_dict(), "sampler": sampler.state_dict(), "rng": rng_states,
             "train_config": dataclasses.asdict(tc), "model_config": model.cfg.to_dict(), **(extra or {})}
    torch.save(state, tmp / "train_state.pt")
    _replace_dir(tmp, root / name)
    lt = root / f".latest.tmp{os.getpid()}"
    lt.write_text(name)
    os.replace(lt, root / "latest")
    olds = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != name)
    for p in olds[:max(0, len(olds) - (tc.keep_ckpts - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return root / name


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    model: nn.Module            # raw weights
    ema_model: nn.Module
    history: list               # metrics records (this process's run only)
    steps_done: int
    out_dir: Path
    stopped_early: bool = False


def _log(path: Optional[Path], rec: dict):
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


@torch.no_grad()
def validation_loss(model, kind: str, val, tc: TrainConfig, device, teacher=None, batch_size: Optional[int] = None,
                    seed: int = 1234) -> float:
    """Mean per-token loss over the first val_batches batches of the validation blocks, with a fixed
    generator (same τ and noise every time, so successive values compare). FLM: unweighted cross-entropy."""
    bs = batch_size or tc.batch_size
    g = torch.Generator(device=device).manual_seed(seed)
    tot, n = 0.0, 0
    model.eval()
    for i in range(tc.val_batches):
        idx = list(range(i * bs, min(len(val), (i + 1) * bs)))
        if not idx:
            break
        tok = val.batch(idx).to(device)
        with _autocast(tc, device):
            loss = compute_loss(model, kind, tok, g, tc, teacher, weighting=False)
        tot += float(loss.float().sum())
        n += loss.numel()
    return tot / max(n, 1)


@torch.no_grad()
def few_step_samples(model, kind: str, steps, n: int, tokenizer, device, seed: int = 0) -> list[dict]:
    import fmlm
    from fmlm.engine.tokenizer import decode

    out = []
    model.eval()
    for k in steps:
        g = torch.Generator(device=device).manual_seed(seed)
        ids = fmlm.sample(model, n, k, method=kind, generator=g).cpu()
        for row in ids.tolist():
            out.append({"steps": k, "text": decode(tokenizer, row) if tokenizer is not None else row})
    return out


def train_loop(model: nn.Module, kind: str, train, tc: TrainConfig, out_dir, val=None, teacher=None,
               tokenizer=None, dist: Optional[Dist] = None, resume: bool = True, progress: bool = True,
               desc: Optional[str] = None, on_log: Optional[Callable[[dict], None]] = None) -> RunResult:
    """Train `model` (kind 'flm': FLM loss; 'fmlm': distillation from `teacher`) on PackedBlocks `train`.

    Writes <out_dir>/metrics.jsonl, checkpoints/, and model/ (the EMA weights) at the end. With resume=True
    and a checkpoint in out_dir, continues from it exactly; another kind, model config, global batch or world
    size is refused. kind 'fmlm': a micro-batch's rows × diag_fraction must be whole."""
    from tqdm import tqdm

    from .data import ShardedSampler

    d = dist or Dist()
    dev = d.device
    out_dir = Path(out_dir)
    ck = check_run_dir(out_dir, resume)     # every rank: all refuse together, none waits at a barrier
    if tc.batch_size % (d.world * tc.accum):
        raise ValueError(f"batch_size {tc.batch_size} must be divisible by world size × accum = {d.world * tc.accum}")
    rows = tc.batch_size // (d.world * tc.accum)
    if kind == "fmlm" and abs(tc.diag_fraction * rows - round(tc.diag_fraction * rows)) > 1e-9:
        # the split is drawn per micro-batch: 1 row with diag_fraction 0.5 would never hold a diagonal row
        raise ValueError(f"a micro-batch of {rows} rows (batch_size / (world size × accum)) cannot hold "
                         f"diag_fraction {tc.diag_fraction} of diagonal rows: choose sizes that make "
                         f"diag_fraction × {rows} whole")
    d.barrier()                             # every rank has looked at out_dir before rank 0 writes into it
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    model.to(dev).train()
    if model.cfg.dropout and d.main:    # e.g. a released model's config; both trunks compute the network without it
        warnings.warn(f"the model config's dropout {model.cfg.dropout} is not applied: fmlm trains without dropout",
                      stacklevel=2)
    if teacher is not None:
        teacher.to(dev).eval().requires_grad_(False)
    start = 0
    state = None
    if ck is not None:
        state = torch.load(ck / "train_state.pt", map_location="cpu", weights_only=False)
        if state["kind"] != kind:
            raise ValueError(f"{ck} is a '{state['kind']}' run, not '{kind}'")
        saved = state.get("model_config", {})
        changed = {k: (v, getattr(model.cfg, k, None)) for k, v in saved.items() if getattr(model.cfg, k, None) != v}
        if changed:     # caps, softcaps, the schedule: no weight shape tells them apart
            raise ValueError(f"{ck} was trained with another model config; resume with the same one "
                             f"(saved → given: {changed})")
        model.load_state_dict(state["model"])
        start = int(state["step"])
    loss_mod = LossModule(model, kind, tc, teacher)
    wrapped = loss_mod
    if d.on:
        wrapped = nn.parallel.DistributedDataParallel(loss_mod, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach on CPU too: the per-parameter loop measured ~12 ms/step for a 2-block model on 2 cores
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay, foreach=True)
    ema = EMA(model, tc.ema)
    sampler = ShardedSampler(len(train), tc.batch_size, d.rank, d.world, tc.seed)
    gen = torch.Generator(device=dev).manual_seed(tc.seed * 1000 + d.rank)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        if len(rng) != d.world:
            raise ValueError(f"checkpoint was written by {len(rng)} processes; resume with the same world size")
        _set_rng_state(rng[d.rank], gen, dev)
    metrics_path = out_dir / "metrics.jsonl" if d.main else None
    if d.main:
        (out_dir / "train_config.json").write_text(json.dumps({"kind": kind, "train": dataclasses.asdict(tc),
                                                               "model": model.cfg.to_dict(), "world": d.world}, indent=1))
    history: list = []

    def log(rec):
        history.append(rec)
        _log(metrics_path, rec)
        if on_log:
            on_log(rec)

    def checkpoint(step):
        rng = [_rng_state(gen, dev)]
        if d.on:
            rng = [None] * d.world
            torch.distributed.all_gather_object(rng, _rng_state(gen, torch.device("cpu")) if dev.type != "cuda"
                                                else {k: v.cpu() for k, v in _rng_state(gen, dev).items()})
        if d.main:
            save_train_checkpoint(out_dir, step, model, ema, opt, sampler, rng, tc, kind, tokenizer)
        d.barrier()

    rows_per_rank = tc.batch_size // d.world
    tokens_per_step = tc.batch_size * model.cfg.seq_len
    bar = tqdm(total=tc.steps, initial=start, desc=desc or f"train {kind}", unit="step", dynamic_ncols=True,
               disable=not (progress and d.main), file=sys.stderr)
    t_run = time.perf_counter()
    t_last, step_last = t_run, start
    stopped = False
    step = start
    while step < tc.steps:
        lr = lr_at(step, tc)
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = sampler.next()
        tokens = train.batch(idx).to(dev, non_blocking=True)
        assert tokens.shape[0] == rows_per_rank
        opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=dev)
        for i, mb in enumerate(tokens.chunk(tc.accum)):
            sync_ctx = wrapped.no_sync() if (d.on and i < tc.accum - 1) else contextlib.nullcontext()
            with sync_ctx:
                with _autocast(tc, dev):
                    loss = wrapped(mb, gen).float().mean()
                (loss / tc.accum).backward()
            loss_sum += loss.detach() / tc.accum
        gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        opt.step()
        ema.update(model)
        step += 1
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            now = time.perf_counter()
            tok_s = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
            lval = _all_mean(float(loss_sum), d)
            rec = {"step": step, "loss": lval, "lr": lr, "grad_norm": float(gnorm), "tok_s": tok_s,
                   "time": now - t_run}
            log(rec)
            bar.set_postfix(loss=f"{lval:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
            t_last, step_last = now, step
        if tc.time_budget > 0:
            over = float(time.perf_counter() - t_run > tc.time_budget)
            if d.on:
                flag = torch.tensor([over], device=dev)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                over = float(flag)
            if over and step < tc.steps:
                stopped = True
                bar.write(f"time budget {tc.time_budget:.0f}s reached at step {step}/{tc.steps}")
        last = step == tc.steps or stopped
        if val is not None and d.main and ((tc.val_every and step % tc.val_every == 0) or last):
            v = validation_loss(ema.model, kind, val, tc, dev, teacher, rows_per_rank)
            log({"step": step, "val_loss": v})
            bar.set_postfix(loss=f"{float(loss_sum):.4f}", val=f"{v:.4f}")
        if d.main and ((tc.sample_every and step % tc.sample_every == 0) or last):
            smp = few_step_samples(ema.model, kind, tc.sample_steps, tc.n_samples, tokenizer, dev)
            log({"step": step, "samples": smp})
            for s in smp[: len(tc.sample_steps)]:
                bar.write(f"[step {step}, {s['steps']}-step sample] {str(s['text'])[:160]}")
        if (tc.ckpt_every and step % tc.ckpt_every == 0) or last:
            checkpoint(step)
        if stopped:
            break
    bar.close()
    if d.on:
        _check_ranks_agree(model, d)
    if d.main:
        save_model_dir(ema.model, out_dir / MODEL_DIR, tokenizer)
    d.barrier()
    return RunResult(model, ema.model, history, step, out_dir, stopped)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _add_train_args(p, distill: bool):
    g = p.add_argument_group("data")
    g.add_argument("--data", default="bundled",
                   help="'bundled' (the packaged KJV Bible), a text file (plain or gzip; a binary file is refused) "
                        "or a directory of .txt/.gz/.text/.md files (one text per line), or 'hf:<name>[:<config>]' "
                        "via the optional `datasets` package")
    g.add_argument("--tokenizer", default=None,
                   help="'train:<V>' (train a WordPiece of size V on the data), 'words:<V>' (word-level), a tokenizer.json / "
                        "directory, or "
                        "'bert-base-uncased' / 'gpt2'. Default: train:2048 for train; the teacher's for distill")
    g.add_argument("--style", choices=("lm1b", "owt"), default="lm1b",
                   help="packing: lm1b = [CLS] … [CLS] blocks, texts separated by [CLS] (the reference's ids); "
                        "owt = EOS-separated")
    g.add_argument("--cache-dir", default=None,
                   help="where token ids are cached (default $FMLM_CACHE/tokens, else ~/.cache/fmlm/tokens)")
    g.add_argument("--val-every-block", type=int, default=50, help="hold out every N-th block for validation")
    if not distill:
        m = p.add_argument_group("model")
        m.add_argument("--seq-len", type=int, default=128)
        m.add_argument("--hidden", type=int, default=256)
        m.add_argument("--blocks", type=int, default=4)
        m.add_argument("--heads", type=int, default=4)
        m.add_argument("--cond-dim", type=int, default=128)
        m.add_argument("--logit-cap", type=float, default=30.0, help="0 = no cap (v1)")
        m.add_argument("--attn-softcap", type=float, default=50.0, help="0 = none")
        m.add_argument("--learnable-loss-weighting", action="store_true")
        m.add_argument("--init-from", default=None, help="start from this checkpoint's weights (fine-tuning)")
    else:
        p.add_argument("--teacher", required=True, help="the FLM teacher: a model directory or a reference .ckpt")
    t = p.add_argument_group("optimisation")
    d = TrainConfig()
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (all GPUs, all micro-batches)")
    t.add_argument("--accum", type=int, default=d.accum, help="gradient accumulation micro-batches per step")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--warmup", type=int, default=d.warmup)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 = off")
    t.add_argument("--ema", type=float, default=d.ema)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--path", choices=("engine", "reference"), default=d.path,
                   help="loss path: engine (hidden space, chunked CE) or reference (V-space, as published)")
    t.add_argument("--backend", default="auto", help="fmlm.kernels backend: auto, torch, triton, reference")
    t.add_argument("--amp", choices=("auto", "bf16", "none"), default="auto")
    t.add_argument("--time-budget", type=float, default=0.0, help="stop (and checkpoint) after this many seconds")
    if distill:
        t.add_argument("--diag-fraction", type=float, default=d.diag_fraction,
                       help="fraction of each micro-batch's rows that are diagonal (teacher) rows; diag-fraction × "
                            "rows per micro-batch (batch-size / (GPUs × accum)) must be whole")
        t.add_argument("--boundary-fraction", type=float, default=d.boundary_fraction)
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="run directory (new, empty, or a run with a checkpoint to resume): "
                                                 "metrics.jsonl, checkpoints/, model/")
    o.add_argument("--log-every", type=int, default=d.log_every)
    o.add_argument("--val-every", type=int, default=500)
    o.add_argument("--val-batches", type=int, default=d.val_batches)
    o.add_argument("--sample-every", type=int, default=0, help="print few-step samples every N steps (0 = at the end)")
    o.add_argument("--ckpt-every", type=int, default=1000)
    o.add_argument("--keep-ckpts", type=int, default=d.keep_ckpts)
    o.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run in --out")
    o.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _train_config(a, distill: bool) -> TrainConfig:
    kw = dict(steps=a.steps, batch_size=a.batch_size, accum=a.accum, lr=a.lr, warmup=a.warmup,
              weight_decay=a.weight_decay, grad_clip=a.grad_clip, ema=a.ema, seed=a.seed, path=a.path,
              backend=a.backend, amp=a.amp, log_every=a.log_every, val_every=a.val_every,
              val_batches=a.val_batches, sample_every=a.sample_every, ckpt_every=a.ckpt_every,
              keep_ckpts=a.keep_ckpts, time_budget=a.time_budget)
    if distill:
        kw.update(diag_fraction=a.diag_fraction, boundary_fraction=a.boundary_fraction)
    return TrainConfig(**kw)


def cmd_train(a) -> int:
    import fmlm
    from .config import ModelConfig
    from .data import load_corpus
    from .model import FlowLM

    tc = _train_config(a, False)
    d = setup_distributed(a.device)
    tok_spec = a.tokenizer or "train:2048"
    ck = check_run_dir(a.out, not a.no_resume)
    if ck is not None and not a.no_resume and tok_spec.split(":")[0] in ("train", "words") and (ck / MODEL_DIR / "tokenizer.json").is_file():
        tok_spec = str(ck / MODEL_DIR / "tokenizer.json")      # resume with the vocabulary it was trained on
    corpus = load_corpus(a.data, tok_spec, a.seq_len, a.style, a.cache_dir, a.val_every_block,
                         is_builder=d.main, barrier=d.barrier)
    if a.init_from:
        model = fmlm.load_checkpoint(a.init_from)
        if model.cfg.vocab_size != corpus.vocab_size:
            raise ValueError(f"--init-from model has V={model.cfg.vocab_size}, the tokenizer {corpus.vocab_size}")
    else:
        cfg = ModelConfig(vocab_size=corpus.vocab_size, seq_len=a.seq_len, hidden=a.hidden, n_blocks=a.blocks,
                          n_heads=a.heads, cond_dim=a.cond_dim, logit_cap=a.logit_cap, attn_softcap=a.attn_softcap,
                          learnable_loss_weighting=a.learnable_loss_weighting)
        torch.manual_seed(tc.seed)
        model = FlowLM(cfg, init="published")
    if d.main:
        n = sum(p.numel() for p in model.parameters())
        print(f"FLM {n / 1e6:.2f}M parameters, V={model.cfg.vocab_size}, L={model.cfg.seq_len}; "
              f"{len(corpus.train)} train / {len(corpus.val)} val blocks; device {d.device}, world {d.world}",
              file=sys.stderr)
    res = train_loop(model, "flm", corpus.train, tc, a.out, corpus.val, tokenizer=corpus.tokenizer, dist=d,
                     resume=not a.no_resume, progress=not a.no_progress)
    if d.main:
        print(f"done: {res.steps_done} steps; model in {res.out_dir / MODEL_DIR}", file=sys.stderr)
    return 0


def load_teacher(spec: str, device="cpu"):
    import fmlm

    teacher = fmlm.load_checkpoint(spec, device=device)
    if teacher.cfg.two_time:
        raise ValueError(f"{spec} is a two-time FMLM; distillation needs the one-time FLM teacher")
    return teacher


def teacher_tokenizer(spec: str, teacher, cache_dir: Optional[str] = None) -> str:
    """The tokenizer spec distillation uses without --tokenizer: the tokenizer.json beside the teacher (a checkpoint
    directory), else the one its checkpoint carries (`load_checkpoint`'s `tokenizer_json`: a reference .ckpt's
    pickled fast tokenizer), written once to the token cache under its content hash. The student must see the
    teacher's token ids, so no tokenizer is guessed from the vocabulary size."""
    import hashlib  # noqa: PLC0415

    from .data import tokens_cache  # noqa: PLC0415

    beside = Path(spec) / "tokenizer.json"
    if beside.is_file():
        return str(beside)
    text = getattr(teacher, "tokenizer_json", None)
    if not text:
        raise FileNotFoundError(f"the teacher {spec} carries no tokenizer (no tokenizer.json beside it, none in its "
                                f"checkpoint): pass --tokenizer")
    path = tokens_cache(cache_dir) / f"teacher-tokenizer-{hashlib.sha1(text.encode()).hexdigest()[:20]}.json"
    if not path.is_file():        # every DDP rank may write it: same bytes, atomic rename
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return str(path)


def cmd_distill(a) -> int:
    from .data import load_corpus
    from .losses import init_student

    tc = _train_config(a, True)
    d = setup_distributed(a.device)
    check_run_dir(a.out, not a.no_resume)
    teacher = load_teacher(a.teacher, d.device)
    tok_spec = a.tokenizer if a.tokenizer is not None else teacher_tokenizer(a.teacher, teacher, a.cache_dir)
    corpus = load_corpus(a.data, tok_spec, teacher.cfg.seq_len, a.style, a.cache_dir, a.val_every_block,
                         is_builder=d.main, barrier=d.barrier)
    if corpus.vocab_size != teacher.cfg.vocab_size:
        raise ValueError(f"tokenizer vocabulary {corpus.vocab_size} != teacher's {teacher.cfg.vocab_size}")
    torch.manual_seed(tc.seed)        # init_student draws sigma_map_prime's fresh layers from the global RNG
    student = init_student(teacher)
    res = train_loop(student, "fmlm", corpus.train, tc, a.out, corpus.val, teacher=teacher, tokenizer=corpus.tokenizer,
                     dist=d, resume=not a.no_resume, progress=not a.no_progress, desc="distill fmlm")
    if d.main:
        print(f"done: {res.steps_done} steps; FMLM in {res.out_dir / MODEL_DIR}", file=sys.stderr)
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    run_demo(out=a.out, device=a.device, quick=a.quick, seed=a.seed, time_budget=a.time_budget,
             progress=not a.no_progress)
    return 0


def cmd_bench_train(a) -> int:
    from fmlm.bench.common import markdown_table, write_rows

    rows = bench_train(vocab=a.vocab, seq_len=a.seq_len, batch=a.batch, hidden=a.hidden, blocks=a.blocks,
                       heads=a.heads, device=a.device, iters=a.iters)
    print(markdown_table(rows))
    if not a.no_write:
        print(f"rows written to {write_rows('train', rows)}", file=sys.stderr)
    return 0


def bench_train(vocab: int = 30522, seq_len: int = 128, batch: int = 16, hidden: int = 128, blocks: int = 2,
                heads: int = 4, device: str = "auto", iters: int = 5, kind: str = "flm", amp: str = "auto",
                cond_dim: int = 128) -> list[dict]:
    """One FLM training step (loss forward + backward), reference path vs engine path, random weights, under
    the training loop's autocast (amp: "auto" = bf16 on CUDA, none on CPU).

    Peak memory: bytes of tensors allocated during the step above those live before it (weights and
    inputs excluded): on CUDA the allocator's peak; on CPU the profiler's allocation events summed in time
    order (fmlm.bench.common.peak_memory_bytes), measured in a separate untimed run."""
    from fmlm.bench.common import peak_memory_bytes, time_fn

    from .config import ModelConfig
    from .model import FlowLM

    from .commands import _device  # noqa: PLC0415
    dev = _device(device)             # --device cuda without CUDA: one line, not torch's assertion
    cfg = ModelConfig(vocab_size=vocab, seq_len=seq_len, hidden=hidden, n_blocks=blocks, n_heads=heads,
                      cond_dim=min(cond_dim, hidden))
    model = FlowLM(cfg).to(dev)
    model.reset_parameters(seed=0)
    g = torch.Generator(device=dev).manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=g, device=dev)
    tc = TrainConfig(amp=amp)
    rows = []
    for path in ("reference", "engine"):
        tcp = dataclasses.replace(tc, path=path)

        def step():
            model.zero_grad(set_to_none=True)
            with _autocast(tcp, torch.device(dev)):
                loss = compute_loss(model, kind, tokens, g, tcp).mean()
            loss.backward()

        step()
        model.zero_grad(set_to_none=True)
        peak = peak_memory_bytes(step, dev)
        model.zero_grad(set_to_none=True)
        t = time_fn(step, warmup=1, iters=iters, device=dev)
        rows.append({"op": f"train_step_{kind}", "path": path, "V": vocab, "L": seq_len, "B": batch, "hidden": hidden,
                     "blocks": blocks, "amp": "bf16" if _amp_enabled(tcp, torch.device(dev)) else "none",
                     "ms": t["ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                     "tok_s": batch * seq_len / (t["ms"] / 1e3), "peak_MiB": peak / 2**20})
    ref_peak = rows[0]["peak_MiB"]
    for r in rows:
        r["mem_ratio_vs_ref"] = ref_peak / r["peak_MiB"] if r["peak_MiB"] else math.nan
    return rows


def register_cli(sub, bench_sub) -> None:
    from .commands import _positive_float, _positive_int  # noqa: PLC0415
    p = sub.add_parser("train", help="train a flow language model (FLM) on text",
                       description="Train an FLM: per-token cross-entropy of the capped denoiser at x_γ(τ). "
                                   "Multi-GPU: torchrun --nproc_per_node N -m fmlm train …")
    _add_train_args(p, distill=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="distill an FLM into a one-step flow-map model (FMLM)",
                       description="FMLM v2 semigroup distillation with cross-entropy (DESIGN.md §1): the student "
                                   "starts as the teacher with a zeroed second time embedding.")
    _add_train_args(p, distill=True)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("demo", help="train an FLM and distill an FMLM on the bundled corpus, compare samples",
                       description="Trains a small FLM on the bundled KJV corpus, distills it into an FMLM, samples "
                                   "both at 1, 2, 4 and 32 steps and writes a report (demo_out/report.md). About "
                                   "6 minutes on a 2-core CPU; a larger model and more steps on a GPU.")
    p.add_argument("--out", default="demo_out",
                   help="a new directory, or one holding only what an earlier demo wrote (it is replaced); a "
                        "file, a link or a directory holding anything else is refused")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (smoke test)")
    p.add_argument("--time-budget", type=_positive_float, default=None,
                   help="seconds for the whole demo (default: 420 on CPU, 540 on a GPU, 120 with --quick); "
                        "training phases stop early to fit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = bench_sub.add_parser("train", help="training step: reference vs engine loss path (memory, tokens/s)",
                             description="One FLM training step (forward + backward) on random weights with the "
                                         "reference (V-space) and engine (hidden-space, chunked CE) loss paths: "
                                         "peak memory and tokens/s side by side.")
    p.add_argument("--vocab", type=_positive_int, default=30522)
    p.add_argument("--seq-len", type=_positive_int, default=128)
    p.add_argument("--batch", type=_positive_int, default=16)
    p.add_argument("--hidden", type=_positive_int, default=128)
    p.add_argument("--blocks", type=_positive_int, default=2)
    p.add_argument("--heads", type=_positive_int, default=4)
    p.add_argument("--iters", type=_positive_int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-write", action="store_true", help="do not append rows to train.csv in the results folder "
                   "($FMLM_RESULTS_DIR, else bench/results in a source checkout, ./fmlm_results when installed)")
    p.set_defaults(func=cmd_bench_train)
