"""Segment tools: ``python -m engine {ls,inspect,rm,top}``; with ``--url``, the
engines on a Redis server (``engine.tools.redis_engines``).

They read segments raw, never through ``Engine.attach``: looking at a segment
takes no registry entry and changes nothing in it, and segments of any machine
spec (or of a damaged or half-formatted one) can be shown.  Every size, offset
and constant comes from the compiled module (``ffi.offsetof``,
``ffi.typeof(...).fields``, ``lib.ENG_*``).

Reads are copies.  ``ls`` reads with ``pread`` (a segment truncated under it
gives a short read, not a SIGBUS); ``inspect`` and ``top`` map the segment with
``engine.store.shm.open_existing`` and copy out of short-lived views that are
released before the mapping is closed.

Lock words name their holder by fencing token (registry entry index and that
entry's incarnation, see native/engine.h), not by pid.  Where the tools show
a holder (``inspect``, ``top``) they resolve the token through the registry:
the pid of the entry when its incarnation still matches, otherwise the holder
is gone (its entry was released or claimed again).

Exit codes: 0 done, 1 could not (no such segment, no permission, damaged),
2 refused (not an engine segment, bad name or usage).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import mmap
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import numpy as np

from engine._native import ffi, lib
from engine.accounts import from_units
from engine.errors import EngineError, SegmentError, SegmentNotFoundError
from engine.metrics import OP_CALLS, OP_LEGEND, OPS, Metrics, read_metrics
from engine.records import PROC_DTYPE
from engine.spec import POSITION_SPEC
from engine.store import shm as segment

__all__ = ["Holder", "ProcEntry", "SegmentInfo", "add_parsers", "held", "is_engine_file",
           "main", "price_words", "read_info", "state_counts", "state_words", "token_owner"]

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2

_HEADER_SIZE: int = ffi.sizeof("eng_header")
_MAGIC_SIZE: int = ffi.sizeof("uint64_t")
_REGISTRY_SIZE: int = ffi.sizeof("eng_proc") * lib.ENG_MAX_PROCS
_WORD_OFF: int = ffi.offsetof("eng_slot", "word")
_PWORD_OFF: int = ffi.offsetof("eng_slot", "pword")
#: the scalar header fields, in C order (padding and the rule table left out)
_HEADER_FIELDS: tuple[str, ...] = tuple(
    name for name, f in ffi.typeof("eng_header").fields
    if not name.startswith("pad") and f.type.kind == "primitive")
_ACCOUNT_SIZE: int = ffi.sizeof("eng_account")
_MONEY_FIELDS = ("cash", "reserved", "realized", "opening_cash", "deposits", "withdrawals",
                 "max_exposure", "max_loss")
_PROC_STATES = {lib.ENG_PROC_FREE: "free", lib.ENG_PROC_CLAIMED: "claimed",
                lib.ENG_PROC_ACTIVE: "active"}
_STATUS = {
    0: "ok",
    lib.ENG_EMAGIC: "not an engine segment (bad magic number)",
    lib.ENG_ELAYOUT: f"another layout version (this build reads version "
                     f"{lib.ENG_LAYOUT_VERSION})",
    lib.ENG_ESIZE: "truncated, or its sizes disagree with its header",
    lib.ENG_ENOTREADY: "not ready: its creator has not finished formatting it "
                       "(or died doing so)",
    lib.ENG_ECORRUPT: "a header field is out of range (corrupt)",
}


# -- reading ------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcEntry:
    """One used entry of a segment's process registry."""

    index: int
    pid: int
    state: str
    alive: bool
    start_time: int
    attached_ns: int
    incarnation: int
    token: int                     # the fencing token its Engine holds locks with


@dataclass(frozen=True)
class Holder:
    """A transition lock or price latch held in a slot (or the segment's
    recovery flag), with its holder resolved."""

    slot: int                      # -1 for the recovery flag
    what: str                      # "lock" (transition lock), "latch" (price writer latch)
                                   # or "recovery"
    token: int
    pid: int | None                # None: no registry entry has that token any more
    alive: bool


@dataclass
class SegmentInfo:
    """What a raw read of one segment found."""

    name: str
    size: int
    status: int                    # 0 or the lib.ENG_E* code eng_validate gave
    header: dict[str, int] = field(default_factory=dict)   # empty if too short
    rules: int = 0                 # transition table entries in use
    guarded_rules: int = 0
    procs: list[ProcEntry] = field(default_factory=list)   # only when status is 0
    recovering: Holder | None = None   # who holds the recovery flag, if anyone

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def is_engine(self) -> bool:
        return bool(self.status != lib.ENG_EMAGIC)

    @property
    def problem(self) -> str:
        return _STATUS.get(self.status, f"refused by eng_validate (code {self.status})")

    @property
    def age_s(self) -> float | None:
        created = self.header.get("created_ns", 0)
        return (time.time_ns() - int(created)) / 1e9 if created else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(ok=self.ok, problem=None if self.ok else self.problem, age_s=self.age_s)
        return d


def is_engine_file(path: str) -> bool:
    """True if the file's first 8 bytes are the engine magic (little-endian u64).

    Raises ``OSError`` (``PermissionError``, ``FileNotFoundError``) if it
    cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(_MAGIC_SIZE)
    return len(head) == _MAGIC_SIZE and int.from_bytes(head, "little") == lib.ENG_MAGIC


def _parse_header(data: bytes, size: int) -> tuple[int, dict[str, int], int, int]:
    """Validate ``data`` (the segment's first bytes) for a segment of ``size``
    bytes; return (status, scalar header fields, rules, guarded rules)."""
    if len(data) < _HEADER_SIZE:   # eng_validate reads no further than it may
        size = min(size, len(data))
    with ffi.from_buffer(data) as buf:
        status = lib.eng_validate(buf, size, 0)
        if len(data) < _HEADER_SIZE:
            return status, {}, 0, 0
        hdr = ffi.cast("eng_header *", buf)
        fields = {name: int(getattr(hdr, name)) for name in _HEADER_FIELDS}
        table = bytes(ffi.buffer(hdr.table))
    targets = [b & lib.ENG_RULE_TARGET_MASK for b in table]
    rules = sum(1 for t in targets if t)
    guarded = sum(1 for b in table if b & lib.ENG_RULE_GUARDED and b & lib.ENG_RULE_TARGET_MASK)
    return status, fields, rules, guarded


def _parse_registry(data: bytes, probe_fd: int | None, registry_off: int) -> list[ProcEntry]:
    """The used entries.  ``alive`` is the engine's own verdict (the entry's
    liveness lock, asked through ``probe_fd``, any descriptor of the segment);
    without one, pid and start time as this pid namespace sees them."""
    entries = np.frombuffer(data, dtype=PROC_DTYPE, count=lib.ENG_MAX_PROCS)
    out = []
    for i in np.flatnonzero(entries["pid"]):
        e = entries[i]
        pid, start, inc = int(e["pid"]), int(e["start_time"]), int(e["incarnation"])
        alive = segment.entry_alive(probe_fd, registry_off, int(i), pid, start)
        out.append(ProcEntry(index=int(i), pid=pid,
                             state=_PROC_STATES.get(int(e["state"]), f"?{int(e['state'])}"),
                             alive=alive, start_time=start,
                             attached_ns=int(e["attached_ns"]), incarnation=inc,
                             token=(inc << lib.ENG_TOKEN_ENTRY_BITS) | int(i)))
    return out


def token_owner(token: int, procs: Sequence[ProcEntry]) -> ProcEntry | None:
    """The registry entry a fencing token names, if that entry is still in the
    token's incarnation (otherwise the holder is gone)."""
    for p in procs:
        if p.token == token:
            return p
    return None


def _holder(slot: int, what: str, token: int, procs: Sequence[ProcEntry]) -> Holder:
    p = token_owner(token, procs)
    return Holder(slot, what, token, None if p is None else p.pid, p is not None and p.alive)


Reader = Callable[[int, int], bytes]   # (offset, n) -> a copy of up to n bytes


def read_info(name: str, read: Reader, size: int, probe_fd: int | None = None) -> SegmentInfo:
    """Read a segment through ``read(offset, n) -> bytes`` (a copy, possibly
    short); ``probe_fd``, a descriptor of the segment file, lets registry
    entries be judged alive as the engine judges them."""
    status, header, rules, guarded = _parse_header(read(0, _HEADER_SIZE), size)
    info = SegmentInfo(name, size, status, header, rules, guarded)
    if status == 0:
        data = read(header["registry_off"], _REGISTRY_SIZE)
        if len(data) == _REGISTRY_SIZE:
            info.procs = _parse_registry(data, probe_fd, header["registry_off"])
        if header.get("recovering"):
            info.recovering = _holder(-1, "recovery", header["recovering"], info.procs)
    return info


def _info_from_fd(name: str, fd: int) -> SegmentInfo:
    return read_info(name, lambda off, n: os.pread(fd, n, off), os.fstat(fd).st_size, fd)


def info_from_mmap(name: str, mm: mmap.mmap) -> SegmentInfo:
    """The segment's info (registry entries with liveness) from a mapping of
    it, liveness probed through a descriptor of its own."""
    try:
        probe = os.open(os.path.join(segment.SHM_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return read_info(name, lambda off, n: mm[off:off + n], len(mm))
    try:
        return read_info(name, lambda off, n: mm[off:off + n], len(mm), probe)
    finally:
        os.close(probe)


def _slot_words(mm: mmap.mmap, header: dict[str, int], field_off: int) -> np.ndarray:
    view = np.ndarray(shape=(header["capacity"],), dtype="<u8", buffer=mm,
                      offset=header["slots_off"] + field_off, strides=(header["slot_size"],))
    try:
        return view.copy()
    finally:
        del view   # the mmap cannot close while a view of it lives


def state_words(mm: mmap.mmap, header: dict[str, int]) -> np.ndarray:
    """A copy of every slot's state word (the header must have validated)."""
    return _slot_words(mm, header, _WORD_OFF)


def price_words(mm: mmap.mmap, header: dict[str, int]) -> np.ndarray:
    """A copy of every slot's price word (sequence << 24 | writer token)."""
    return _slot_words(mm, header, _PWORD_OFF)


def account_books(mm: mmap.mmap, header: dict[str, int]) -> list[dict[str, Any]]:
    """The published books of every open account (money in Decimal), read
    seqlock-style (a row whose word moved is read again, a few times), plus
    whether a holder had the latch."""
    n, off, size = header.get("max_accounts", 0), header.get("accounts_off", 0), _ACCOUNT_SIZE
    rows: list[dict[str, Any]] = []
    if not n or off + n * size > len(mm):
        return rows
    shift = lib.ENG_AW_VERSION_SHIFT
    with ffi.from_buffer(mm) as buf:
        for i in range(n):
            a = ffi.cast("eng_account *", buf + off + i * size)
            for _ in range(16):
                w = int(a.word)
                b = a.books[(w >> shift) & 1]
                row = {"index": i, "id": (int(b.opening) << lib.ENG_ID_SLOT_BITS) | i,
                       "open": bool(b.open), "version": w >> shift,
                       "latched": w & lib.ENG_TOKEN_MASK,
                       **{k: from_units(int(getattr(b, k))) for k in _MONEY_FIELDS},
                       "open_positions": int(b.open_positions), "halted": bool(b.halted)}
                if int(a.word) == w:
                    break
            if row["open"]:
                rows.append(row)
    return rows


def _fmt_books(rows: Sequence[dict[str, Any]]) -> str:
    latched = sum(1 for r in rows if r["latched"])
    halted = sum(1 for r in rows if r["halted"])
    cash = sum((r["cash"] for r in rows), from_units(0))
    reserved = sum((r["reserved"] for r in rows), from_units(0))
    realized = sum((r["realized"] for r in rows), from_units(0))
    return (f"accounts {len(rows)} open  cash {cash:f}  reserved {reserved:f}  "
            f"realized {realized:f}  "
            f"positions {sum(r['open_positions'] for r in rows)}  "
            f"halted accounts {halted}  latched {latched}")


def held(words: np.ndarray, pwords: np.ndarray, procs: Sequence[ProcEntry]) -> list[Holder]:
    """Every transition lock and price latch held, by slot, holders resolved."""
    out = []
    mask = np.uint64(lib.ENG_TOKEN_MASK)
    owners = (words >> np.uint64(lib.ENG_SW_OWNER_SHIFT)) & mask
    for s in np.flatnonzero(words & np.uint64(lib.ENG_SW_LOCK)):
        out.append(_holder(int(s), "lock", int(owners[s]), procs))
    writers = pwords & mask
    for s in np.flatnonzero(writers):
        out.append(_holder(int(s), "latch", int(writers[s]), procs))
    out.sort(key=lambda h: (h.slot, h.what))
    return out


def _state_name(index: int, header: dict[str, int]) -> str:
    if header.get("fingerprint") == POSITION_SPEC.fingerprint:
        return POSITION_SPEC.states[index]
    return f"S{index}"


def state_counts(words: np.ndarray, header: dict[str, int]) -> dict[str, int]:
    """Slots per state (open slots only; named for the default lifecycle,
    ``S<index>`` otherwise), plus ``locked``, ``rolled_back`` (error flag) and
    ``free``."""
    onehot = words & lib.ENG_SW_STATE_MASK
    out: dict[str, int] = {}
    for index in range(header["n_states"]):
        out[_state_name(index, header)] = int(np.count_nonzero(onehot == (1 << index)))
    valid = np.uint64(sum(1 << i for i in range(header["n_states"])))
    single = (onehot & (onehot - np.uint64(1))) == 0     # at most one bit set
    out["invalid"] = int(np.count_nonzero((onehot != 0) & ~(single & ((onehot & ~valid) == 0))))
    out["locked"] = int(np.count_nonzero(words & lib.ENG_SW_LOCK))
    out["rolled_back"] = int(np.count_nonzero(words & lib.ENG_SW_ERROR))
    out["free"] = int(np.count_nonzero(onehot == 0))
    return out


@contextlib.contextmanager
def _mapped(name: str) -> Iterator[mmap.mmap]:
    mm = segment.open_existing(name)
    try:
        yield mm
    finally:
        mm.close()


# -- formatting ------------------------------------------------------------------------
def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 120:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _fmt_size(n: int) -> str:
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if v < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"


def _fmt_engine_halt(h: dict[str, int]) -> str:
    """The engine-wide emergency stop (``halt()``), named apart from accounts' halts."""
    return f"engine halted (halt()): {'YES' if h['halted'] else 'no'}"


def _fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.1f}ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f}us"
    return f"{ns:.0f}ns"


def _fmt_procs(procs: Sequence[ProcEntry]) -> str:
    return ",".join(f"{p.pid}" + ("" if p.alive else "(dead)") for p in procs) or "-"


def _fmt_holder(h: Holder) -> str:
    """``pid 123`` / ``pid 123 (dead)`` / ``gone``, and the token."""
    who = "gone" if h.pid is None else f"pid {h.pid}" + ("" if h.alive else " (dead)")
    return f"{who}, token {h.token:#x}"


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _err(msg: str) -> None:
    sys.stderr.write(msg + "\n")


# -- ls ---------------------------------------------------------------------------------
def list_segments() -> tuple[list[SegmentInfo], list[str]]:
    """Every engine segment in /dev/shm, and the names that could not be read."""
    found: list[SegmentInfo] = []
    unreadable: list[str] = []
    for name in segment.list_names():
        path = os.path.join(segment.SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue                     # removed while we looked
        except PermissionError:
            unreadable.append(name)
            continue
        try:
            head = os.pread(fd, _MAGIC_SIZE, 0)
            if len(head) < _MAGIC_SIZE or int.from_bytes(head, "little") != lib.ENG_MAGIC:
                continue                 # not ours: skipped silently
            found.append(_info_from_fd(name, fd))
        except OSError:
            unreadable.append(name)
        finally:
            os.close(fd)
    return found, unreadable


def cmd_ls(args: argparse.Namespace) -> int:
    """List engine segments."""
    if getattr(args, "url", None) is not None:
        return _on_redis("cmd_ls", args)
    found, unreadable = list_segments()
    out = sys.stdout
    if args.json:
        json.dump([i.as_dict() for i in found], out, indent=2)
        out.write("\n")
    elif found:
        rows = [["NAME", "CREATOR", "PROCESSES", "CAPACITY", "AGE", "SIZE", "STATUS"]]
        for i in found:
            h = i.header
            creator = str(h.get("creator_pid", "-"))
            if h.get("creator_pid"):
                creator += "" if lib.eng_proc_alive(h["creator_pid"], 0) else "(exited)"
            rows.append([i.name, creator, _fmt_procs(i.procs), str(h.get("capacity", "-")),
                         _fmt_age(i.age_s), _fmt_size(i.size), "ok" if i.ok else i.problem])
        _table(rows, out)
    else:
        out.write(f"no engine segments in {segment.SHM_DIR}\n")
    if unreadable:
        _err(f"ls: {len(unreadable)} entries of {segment.SHM_DIR} could not be read "
             f"(permission denied): {', '.join(unreadable)}")
    return EXIT_OK


# -- inspect ----------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    """Show a segment's header, state counts and registry."""
    if getattr(args, "url", None) is not None:
        return _on_redis("cmd_inspect", args)
    name = args.name
    holders: list[Holder] = []
    try:
        with _mapped(name) as mm:
            info = info_from_mmap(name, mm)
            counts: dict[str, int] = {}
            books: list[dict[str, Any]] = []
            if info.ok:
                words = state_words(mm, info.header)
                counts = state_counts(words, info.header)
                holders = held(words, price_words(mm, info.header), info.procs)
                books = account_books(mm, info.header)
    except SegmentNotFoundError as e:
        _err(f"inspect: {e.strerror or e}")
        return EXIT_FAILED
    except SegmentError as e:
        if e.errno == errno.EACCES:
            _err(f"inspect: {e.strerror or e}")
            return EXIT_FAILED
        _err(f"inspect: segment {name!r} is not an engine segment ({e.strerror or e})")
        return EXIT_REFUSED
    except EngineError as e:
        _err(f"inspect: {e}")
        return EXIT_REFUSED
    if not info.is_engine:
        _err(f"inspect: segment {name!r} is not an engine segment (its first "
             f"{_MAGIC_SIZE} bytes are not the engine magic {lib.ENG_MAGIC:#x})")
        return EXIT_REFUSED
    if args.json:
        json.dump({**info.as_dict(), "states": counts,
                   "held": [asdict(h) for h in holders],
                   "accounts": [{k: str(v) if k in _MONEY_FIELDS else v for k, v in r.items()}
                                for r in books]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK if info.ok else EXIT_FAILED
    out = sys.stdout
    out.write(f"segment {name}: {_fmt_size(info.size)} ({info.size} bytes), "
              f"status: {'ok' if info.ok else info.problem}\n")
    if info.header:
        h = info.header
        out.write("header:\n")
        for key, value in h.items():
            if key in ("magic", "fingerprint"):
                shown = f"{value:#018x}"
                if key == "fingerprint" and value == POSITION_SPEC.fingerprint:
                    shown += " (default position lifecycle)"
            elif key in ("closed_mask", "sample_mask", "fault_flags"):
                shown = f"{value:#x}"
            elif key == "created_ns":
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value / 1e9))
                shown = f"{value} ({when}, {_fmt_age(info.age_s)} ago)"
            elif key == "recovering" and value:
                shown = (f"{value:#x} ({_fmt_holder(info.recovering)})" if info.recovering
                         else f"{value:#x}")
            else:
                shown = str(value)
            out.write(f"  {key:<15} {shown}\n")
        out.write(f"  {'rules':<15} {info.rules} ({info.guarded_rules} guarded)\n")
        out.write(f"metrics: {'on' if h['metrics_on'] else 'off'}, latency sampled every "
                  f"{h['sample_mask'] + 1} operations; {_fmt_engine_halt(h)}\n")
    if not info.ok:
        return EXIT_FAILED
    out.write("states:\n")
    for key, value in counts.items():
        out.write(f"  {key:<15} {value}\n")
    out.write(f"registry ({len(info.procs)} of {lib.ENG_MAX_PROCS} entries used):\n")
    if info.procs:
        rows = [["ENTRY", "PID", "TOKEN", "STATE", "ALIVE", "ATTACHED"]]
        for p in info.procs:
            age = (time.time_ns() - p.attached_ns) / 1e9 if p.attached_ns else None
            rows.append([str(p.index), str(p.pid), f"{p.token:#x}", p.state,
                         "yes" if p.alive else "DEAD", f"{_fmt_age(age)} ago"])
        _table(rows, out)
    dead = sum(1 for p in info.procs if not p.alive)
    if dead:
        out.write(f"{dead} dead entries: an attached process's recover() removes them\n")
    if holders:
        out.write(f"held ({len(holders)}; lock = transition lock, latch = price writer "
                  "latch):\n")
        rows = [["SLOT", "WHAT", "TOKEN", "HOLDER"]]
        for hold in holders:
            who = "gone" if hold.pid is None else f"{hold.pid}" + ("" if hold.alive else " DEAD")
            rows.append([str(hold.slot), hold.what, f"{hold.token:#x}", who])
        _table(rows, out)
    out.write(f"{_fmt_books(books)} (of {info.header.get('max_accounts', 0)})\n")
    if books:
        rows = [["ID", "CASH", "RESERVED", "REALIZED", "OPEN", "HALTED", "VERSION", "LATCHED"]]
        for r in books:
            rows.append([f"{r['id']:#x}", f"{r['cash']:f}", f"{r['reserved']:f}",
                         f"{r['realized']:f}",
                         str(r["open_positions"]), "yes" if r["halted"] else "no",
                         str(r["version"]), f"{r['latched']:#x}" if r["latched"] else "-"])
        _table(rows, out)
    return EXIT_OK


# -- rm -----------------------------------------------------------------------------------
def live_holders(info: SegmentInfo, probe_fd: int) -> list[int]:
    """The pids of the live processes that hold the segment: its attached
    Engines (each holds its registry entry's liveness lock), and its creator
    while it is still making it (not ready yet, or ready but never attached:
    between format and attach).  ``probe_fd``: a descriptor of the segment."""
    pids = [p.pid for p in info.procs if p.alive]
    creator = info.header.get("creator_pid", 0)
    if creator and lib.eng_proc_alive(creator, 0) and creator not in pids and (
            info.status == lib.ENG_ENOTREADY or (info.ok and not _ever_attached(info, probe_fd))):
        pids.append(creator)
    return pids


def _ever_attached(info: SegmentInfo, fd: int) -> bool:
    """True once any Engine attached (a claim bumps its entry's incarnation
    for good)."""
    data = os.pread(fd, _REGISTRY_SIZE, info.header["registry_off"])
    if len(data) < _REGISTRY_SIZE:
        return True   # cannot tell: count it as used
    return bool(np.frombuffer(data, dtype=PROC_DTYPE, count=lib.ENG_MAX_PROCS)["incarnation"].any())


def _flush_journal(name: str, force: bool) -> bool:
    """rm: a segment whose journal is written to files has its records not yet
    on disk written and fdatasynced first.  False: that failed, refuse."""
    from engine.durable.writer import flush_segment
    try:
        flush_segment(name)
    except EngineError as e:
        _err(f"rm: the journal of {name!r} could not be written to its files ({e}); "
             + ("removing it anyway (--force)" if force else
                "refusing (--force removes it anyway: its records not on disk are lost)"))
        return force
    return True


def _rm_stale(args: argparse.Namespace) -> int:
    """Remove every engine segment no live process holds (of ``args.names``
    if given: the others are left alone, held ones kept without an error).

    Each candidate is opened and the whole registry locked for writing (an
    fcntl record lock, which conflicts with the Engines' OFD liveness locks):
    granted, it proves no Engine holds an entry, and no attach can claim one
    until the segment is unlinked; refused, a live process holds it."""
    code = EXIT_OK
    removed = 0
    for name in args.names or segment.list_names():
        try:
            segment.check_name(name)
        except EngineError as e:
            _err(f"rm: {e}")
            code = max(code, EXIT_REFUSED)
            continue
        path = os.path.join(segment.SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue                     # removed while we looked
        except PermissionError:
            continue                     # not ours to remove
        try:
            head = os.pread(fd, _MAGIC_SIZE, 0)
            if len(head) < _MAGIC_SIZE or int.from_bytes(head, "little") != lib.ENG_MAGIC:
                continue                 # not an engine segment: never touched
            info = _info_from_fd(name, fd)
            if not info.ok and info.status != lib.ENG_ENOTREADY:
                if not args.quiet:
                    sys.stdout.write(f"kept {name}: {info.problem} (rm {name} removes it)\n")
                continue
            held = live_holders(info, fd)
            if info.ok and not held:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _REGISTRY_SIZE,
                                info.header["registry_off"])
                except OSError:          # an Engine attached since we looked
                    held = [p.pid for p in _info_from_fd(name, fd).procs if p.alive] or [0]
            if held:
                if args.names and not args.quiet:
                    sys.stdout.write(f"kept {name}: held by live pids "
                                     f"{', '.join(map(str, held))}\n")
                continue
            segment.unlink(name)
            removed += 1
            if not args.quiet:
                sys.stdout.write(f"removed {name} (stale: no live process held it)\n")
        except SegmentNotFoundError:
            continue
        except OSError as e:
            _err(f"rm: {name}: {e}")
            code = max(code, EXIT_FAILED)
        finally:
            os.close(fd)                 # drops the registry lock
    if not args.quiet and removed == 0:
        sys.stdout.write("no stale engine segments\n")
    return code


def cmd_rm(args: argparse.Namespace) -> int:
    """Unlink segments (engine segments no live process holds, unless
    --force); ``--stale``: every engine segment no live process holds."""
    if not args.stale and not args.names:
        _err("rm: give segment NAMEs, or --stale")
        return EXIT_REFUSED
    if getattr(args, "url", None) is not None:
        if args.stale:
            _err("rm: --stale is for shared-memory segments: a Redis server keeps no record "
                 "of which clients are alive (remove engines there by name)")
            return EXIT_REFUSED
        return _on_redis("cmd_rm", args)
    if args.stale:
        return _rm_stale(args)
    code = EXIT_OK
    for name in args.names:
        try:
            segment.check_name(name)
        except EngineError as e:
            _err(f"rm: {e}")
            code = max(code, EXIT_REFUSED)
            continue
        path = os.path.join(segment.SHM_DIR, name)
        live: list[int] = []
        try:
            if not is_engine_file(path):
                if not args.force:
                    _err(f"rm: {name!r} is not an engine segment; refusing "
                         "(use --force to remove it anyway)")
                    code = max(code, EXIT_REFUSED)
                    continue
            else:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    live = live_holders(_info_from_fd(name, fd), fd)
                finally:
                    os.close(fd)
                if live and not args.force:
                    _err(f"rm: segment {name!r} is held by {len(live)} live process(es), "
                         f"pids {', '.join(map(str, live))}; refusing (--force removes it "
                         "anyway: they keep their mappings until they exit)")
                    code = max(code, EXIT_REFUSED)
                    continue
                if not _flush_journal(name, args.force):
                    code = max(code, EXIT_REFUSED)
                    continue
        except FileNotFoundError:
            _err(f"rm: no segment named {name!r}")
            code = max(code, EXIT_FAILED)
            continue
        except PermissionError:
            if not args.force:
                _err(f"rm: cannot read {name!r} to check it is an engine segment "
                     "(permission denied); use --force to remove it anyway")
                code = max(code, EXIT_FAILED)
                continue
        try:
            segment.unlink(name)
        except SegmentNotFoundError:
            _err(f"rm: no segment named {name!r}")
            code = max(code, EXIT_FAILED)
            continue
        except OSError as e:   # posix_ipc.PermissionsError is an OSError too
            _err(f"rm: cannot remove {name!r}: {e}")
            code = max(code, EXIT_FAILED)
            continue
        note = (f" ({len(live)} live processes keep their mappings until they exit: pids "
                f"{', '.join(map(str, live))})" if live else "")
        if not args.quiet:
            sys.stdout.write(f"removed {name}{note}\n")
    return code


# -- top ------------------------------------------------------------------------------------
@dataclass
class _Frame:
    at: float
    counts: dict[str, int]
    metrics: Metrics
    procs: list[ProcEntry]
    header: dict[str, int]
    holders: list[Holder]
    recovering: Holder | None
    books: list[dict[str, Any]]


def _sample(name: str, mm: mmap.mmap) -> _Frame:
    info = info_from_mmap(name, mm)
    if not info.ok:
        raise SegmentError(f"segment {name!r}: {info.problem}")
    h = info.header
    words = state_words(mm, h)
    return _Frame(time.monotonic(), state_counts(words, h), read_metrics(mm, h["shards_off"]),
                  info.procs, h, held(words, price_words(mm, h), info.procs), info.recovering,
                  account_books(mm, h))


def _render(name: str, cur: _Frame, prev: _Frame | None, out: TextIO) -> None:
    h = cur.header
    alive = sum(1 for p in cur.procs if p.alive)
    opened = h["capacity"] - cur.counts["free"]
    out.write(f"segment {name}  capacity {h['capacity']}  open {opened}  processes {alive} alive"
              f" / {len(cur.procs) - alive} dead  {_fmt_engine_halt(h)}  "
              f"metrics {'on' if h['metrics_on'] else 'off'}\n")
    out.write("  ".join(f"{k} {v}" for k, v in cur.counts.items()
                        if v or k not in ("invalid", "locked", "rolled_back")) + "\n")
    if h.get("max_accounts"):
        out.write(_fmt_books(cur.books) + "\n")
    if cur.recovering is not None:
        out.write(f"recovering: {_fmt_holder(cur.recovering)}\n")
    if cur.holders:
        shown = [f"slot {h.slot} {h.what} {_fmt_holder(h)}" for h in cur.holders[:6]]
        more = f" (+{len(cur.holders) - 6} more)" if len(cur.holders) > 6 else ""
        out.write(f"held: {'; '.join(shown)}{more}\n")
    out.write("\n")
    rows = [["OP", "OPS/S", "ATTEMPTS", "APPLIED", "INVALID", "CONFLICTS", "REFUSED", "ERRORS",
             "RETRIES", "TAKEOVERS", "P50", "P99", "MAX"]]
    dt = cur.at - prev.at if prev else 0.0
    for op in OPS:
        m = cur.metrics[op]
        rate = "-"
        if prev and dt > 0:
            rate = f"{(m.attempts - prev.metrics[op].attempts) / dt:,.0f}"
        rows.append([OP_CALLS[op], rate, str(m.attempts), str(m.applied), str(m.invalid),
                     str(m.conflicts), str(m.rejected + m.halted), str(m.errors),
                     str(m.retries), str(m.takeovers),
                     _fmt_ns(m.p50_ns) if m.samples else "-",
                     _fmt_ns(m.p99_ns) if m.samples else "-",
                     _fmt_ns(m.max_ns) if m.samples else "-"])
    _table(rows, out)
    out.write(OP_LEGEND)


def cmd_top(args: argparse.Namespace) -> int:
    """Refresh state counts and per-operation metrics every --interval seconds."""
    if getattr(args, "url", None) is not None:
        return _on_redis("cmd_top", args)
    if not (args.interval > 0):
        _err(f"top: --interval must be > 0, got {args.interval}")
        return EXIT_REFUSED
    out = sys.stdout
    clear = out.isatty() and not args.once
    try:
        with _mapped(args.name) as mm:
            info = info_from_mmap(args.name, mm)
            if not info.ok:
                _err(f"top: segment {args.name!r}: {info.problem}")
                return EXIT_FAILED if info.is_engine else EXIT_REFUSED
            prev = _sample(args.name, mm)
            while True:
                time.sleep(args.interval)
                cur = _sample(args.name, mm)
                if clear:
                    out.write("\x1b[H\x1b[2J")
                _render(args.name, cur, prev, out)
                out.flush()
                if args.once:
                    return EXIT_OK
                prev = cur
    except SegmentNotFoundError as e:
        _err(f"top: {e.strerror or e}")
        return EXIT_FAILED
    except SegmentError as e:
        _err(f"top: {e.strerror or e}")
        return EXIT_FAILED if e.errno == errno.EACCES else EXIT_REFUSED
    except EngineError as e:
        _err(f"top: {e}")
        return EXIT_REFUSED


# -- wiring -----------------------------------------------------------------------------------
def _on_redis(cmd: str, args: argparse.Namespace) -> int:
    """The command on a Redis server (``--url``): engine.tools.redis_engines."""
    from engine.tools import redis_engines
    return int(getattr(redis_engines, cmd)(args))


def _url_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", metavar="URL", default=None,
                   help="the engines on this Redis server (redis://host:port/db, "
                        "redis+cluster://..., unix://...) instead of /dev/shm")


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``ls``, ``inspect``, ``rm`` and ``top``; each sets ``func(args) -> exit code``."""
    p = subparsers.add_parser("ls", help="list engine segments in /dev/shm",
                              description="List engine segments: creator, attached processes "
                                          "(alive or dead), capacity, age and size.")
    p.add_argument("--json", action="store_true", help="print JSON")
    _url_option(p)
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser("inspect", help="show a segment's header, states and registry",
                              description="Read a segment raw (no attach): header, state "
                                          "counts and process registry.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="print JSON")
    _url_option(p)
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser("rm", help="remove engine segments",
                              description="Unlink segments.  A segment live processes hold "
                                          "is refused unless --force (they keep their "
                                          "mappings until they exit).")
    p.add_argument("names", metavar="NAME", nargs="*")
    p.add_argument("--stale", action="store_true",
                   help="remove every engine segment (of the NAMEs, if given) no live process "
                        "holds: left by processes that were killed")
    p.add_argument("--force", action="store_true",
                   help="remove even what is not an engine segment, or what live processes "
                        "hold")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    _url_option(p)
    p.set_defaults(func=cmd_rm)

    p = subparsers.add_parser("top", help="watch a segment's states and metrics",
                              description="Refresh state counts, per-operation metrics and "
                                          "ops/s (Ctrl-C to stop).")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="refresh period (default 1)")
    p.add_argument("--once", action="store_true",
                   help="print one frame (rates over one interval) and exit")
    _url_option(p)
    p.set_defaults(func=cmd_top)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.tools.segments``: these four commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m engine.tools.segments",
                                     description="Inspect and manage engine segments.")
    add_parsers(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    from engine.cli import run
    return run(parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
