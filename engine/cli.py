"""Command line: ``python -m engine {stress,bench,top,inspect,ls,rm,serve,journal,restore}``.

Each subcommand lives in its own module, which adds its parser with
``add_parsers(subparsers)`` and sets ``func(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any


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
    add_restore_parser(sub)
    return parser


def add_restore_parser(sub: Any) -> None:
    """``restore DIR [--name N]``: Engine.restore from a journal directory."""
    p = sub.add_parser("restore", help="restore an engine from its journal directory",
                       description="Create the engine again from the journal directory DIR "
                                   "(meta.json, checkpoints, journal files) and print what "
                                   "the restore did.  Refused if the name exists.")
    p.add_argument("dir", metavar="DIR", help="the engine's journal directory")
    p.add_argument("--name", default=None, help="restore under this name (default: meta.json's)")
    p.set_defaults(func=_restore)


def _restore(args: argparse.Namespace) -> int:
    from engine.core import Engine
    from engine.errors import EngineError

    try:
        eng = Engine.restore(args.dir, name=args.name)
    except EngineError as e:
        print(f"restore failed: {e}", file=sys.stderr)
        return 1
    try:
        print(eng.restore_report)
    finally:
        eng.close()
    return 0


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
