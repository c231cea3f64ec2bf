"""Command line: ``python -m engine {stress,bench,top,inspect,ls,rm,serve}``.

Each subcommand lives in its own module, which adds its parser with
``add_parsers(subparsers)`` and sets ``func(args) -> exit code``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from engine.tools import bench, segments, serve, stress

    parser = argparse.ArgumentParser(
        prog="python -m engine",
        description="Multiprocess shared-memory state engine: stress, benchmark and inspect "
                    "engine segments.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stress.add_parsers(sub)
    bench.add_parsers(sub)
    segments.add_parsers(sub)
    serve.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
