"""Command line: python -m dqgemm {info,bench,demo} [options]."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dqgemm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, extension, GPUs and usable kernels")
    commands = {"info": "dqgemm.info"}
    # Optional commands register their own options (each module defines add_arguments).
    for name, module, help_text in (
            ("bench", "dqgemm.bench.cli", "benchmark kernels against FP16 and peers"),
            ("demo", "dqgemm.demo", "quantize a real model and report quality and speed")):
        try:
            mod = __import__(module, fromlist=["add_arguments"])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("dqgemm"):
                continue
            raise
        mod.add_arguments(sub.add_parser(name, help=help_text))
        commands[name] = module
    args = parser.parse_args(argv)
    mod = __import__(commands[args.command], fromlist=["main"])
    return mod.main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
