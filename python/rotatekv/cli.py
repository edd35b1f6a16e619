"""The ``rotatekv`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand; returns the exit status."""
    parser = argparse.ArgumentParser(prog="rotatekv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="memory and speed of the packed store against fp16, on synthetic data"
    )
    demo.add_argument("--context", type=int, default=16384)
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(context=args.context, batch=args.batch, repeats=args.repeats)
        return 0
    parser.print_help(sys.stderr)
    return 2
