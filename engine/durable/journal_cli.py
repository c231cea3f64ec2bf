"""``python -m engine journal DIR``: print the records of a journal directory.

One line per record (``--json``: one JSON object a line), in seq order,
from the files only (no segment needed: after a reboot too).  A torn or
corrupt tail is reported on stderr at the end, never printed as a record.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pickle
import sys
import time
from typing import Any

from engine._native import lib
from engine.durable import frames
from engine.journal import KINDS

_FOLLOW_POLL_S = 0.1
_SLOT_KINDS = (lib.ENG_JK_OPEN, lib.ENG_JK_TRANSITION, lib.ENG_JK_RELEASE)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("journal", help="print the records of a journal directory",
                       description="Print the records of a journal directory (Engine.create("
                                   "journal=DIR)) in seq order; a torn tail is reported on "
                                   "stderr at the end.")
    p.add_argument("dir", help="the journal directory")
    p.add_argument("--since", type=int, default=0, metavar="N",
                   help="only records with seq > N")
    p.add_argument("--follow", action="store_true",
                   help="keep printing records as they are written (Ctrl-C ends)")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    p.set_defaults(func=cmd_journal)


def _spec(path: str) -> Any:
    """The engine's spec from meta.json (None if it cannot be read)."""
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        return pickle.loads(base64.b64decode(meta["spec"]))
    except (OSError, ValueError, KeyError, pickle.UnpicklingError, AttributeError,
            ImportError, TypeError):
        return None


def _state(spec: Any, fr: frames.Frame) -> str | None:
    if fr.kind not in _SLOT_KINDS:
        return None
    onehot = fr.word & lib.ENG_SW_STATE_MASK
    if not onehot:
        return "FREE"
    if spec is None:
        return str(onehot)
    try:
        return str(spec.State(onehot).name)
    except (ValueError, AttributeError):
        return str(onehot)


def _row(spec: Any, fr: frames.Frame) -> dict[str, Any]:
    kind = KINDS[fr.kind] if fr.kind < len(KINDS) else str(fr.kind)
    return {"seq": fr.seq, "ts_ns": fr.ts_ns, "kind": kind, "id": fr.id,
            "state": _state(spec, fr), "trigger": fr.trigger, "word": fr.word,
            "version": fr.version, "w": list(fr.w)}


def _print(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(row) + "\n")
    else:
        sys.stdout.write(f"{row['seq']:>10} {row['ts_ns']} {row['kind']:<10} id={row['id']:#x} "
                         f"state={row['state']} trigger={row['trigger']} "
                         f"version={row['version']}\n")


def cmd_journal(args: argparse.Namespace) -> int:
    path = args.dir
    if not os.path.isdir(path):
        sys.stderr.write(f"journal: {path!r} is not a directory\n")
        return 2
    if args.since < 0:
        sys.stderr.write(f"journal: --since must be >= 0, got {args.since}\n")
        return 2
    spec = _spec(path)
    since = args.since
    while True:
        end = frames.End()
        for fr in frames.read(path, since, end):
            _print(_row(spec, fr), args.json)
            since = fr.seq
        sys.stdout.flush()
        if not args.follow:
            break
        time.sleep(_FOLLOW_POLL_S)   # a torn tail may be a write in progress: read again
    if end.torn is not None:
        later = frames.valid_frame_after(path, end)
        if later is not None:   # valid records follow the bad one: not a torn tail
            sys.stderr.write(f"journal: corrupt record after seq {end.last_seq}: {end.torn} "
                             f"at {end.path} offset {end.offset}; valid records follow it "
                             f"(first at {later[0]} offset {later[1]}): stopped there\n")
            return 1
        sys.stderr.write(f"journal: torn or corrupt tail after seq {end.last_seq}: "
                         f"{end.torn} at {end.path} offset {end.offset} (not printed)\n")
    return 0
