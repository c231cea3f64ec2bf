"""Command line: ``python -m engine {stress,bench,top,inspect,ls,rm,serve,journal}``.

Each subcommand lives in its own module, which adds its parser with
``add_parsers(subparsers)`` and sets ``func(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from engine.durable import journal_cli
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
    journal_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command's ``func``; its exit code.  Ctrl-C:
    130.  A reader that went away (``ls --json | head``): no traceback, as
    Python's documentation of SIGPIPE advises -- stdout goes to /dev/null so
    the interpreter's last flush cannot fail again, exit code 1."""
    try:
        try:
            args = parser.parse_args(argv)
            return int(args.func(args))
        finally:   # what is still buffered fails here, not at interpreter exit
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
