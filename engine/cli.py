"""`fmlm` command line. Subcommands are contributed by modules through `register_cli(sub, bench_sub)`:
`sub` holds top-level commands (sample, info, ...), `bench_sub` the `fmlm bench <what>` commands."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# Each module adds its own subcommands; the CLI imports nothing heavy until a command runs.
CLI_MODULES = (
    "fmlm.engine.commands",      # sample, info, convert, bench sample
    "fmlm.engine.train",         # train, distill, demo, bench train
    "fmlm.engine.profile",       # profile sample
    "fmlm.bench.bench_e2e",      # bench e2e
    "fmlm.bench.ncu_kernels",    # bench ncu
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fmlm", description="Flow (map) language models: sample, train, convert, benchmark.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser("bench", help="benchmarks, each beside the reference in one process")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    bench.set_defaults(func=lambda a: bench.print_help() or 2)
    for name in CLI_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        mod = importlib.import_module(name)
        if hasattr(mod, "register_cli"):
            mod.register_cli(sub, bench_sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, TypeError) as e:   # OSError: a path the OS refused (permissions,
        if getattr(args, "debug", False):                        # a directory, disk full): the user's to fix
            raise
        print(f"fmlm: error: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
