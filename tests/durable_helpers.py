"""Helpers for the durability adversary tests: an independent reader of the
on-disk journal format (native/engine.h, "The journal on disk"), power cuts
simulated on a copy of a journal directory, a workload over every kind of
change, and a comparable dump of everything a restore must bring back."""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine import (
    CapacityError,
    Engine,
    KeyExistsError,
    KeyLimitError,
    NotOpenError,
    Outcome,
    RiskLimitError,
    StaleIdError,
    State,
    Trigger,
)
from engine._native import ffi, lib
from engine.errors import MoneyError

HDR = lib.ENG_DJ_FILE_HDR
FRAME = lib.ENG_DJ_FRAME_BYTES
REC = lib.ENG_JREC_SIZE
FRAME_MAGIC = lib.ENG_DJ_FRAME_MAGIC
FILE_MAGIC = lib.ENG_DJ_FILE_MAGIC
CKPT_MAGIC = lib.ENG_DJ_CKPT_MAGIC
JOURNAL_RE = re.compile(r"journal-(\d{20})\.log$")
CKPT_RE = re.compile(r"checkpoint-(\d{20})\.ckpt$")


# -- CRC-32C (Castagnoli), reflected, as the frames use -------------------------------------
def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c_py(data: bytes) -> int:
    """CRC-32C in plain Python (the reference the C one is checked against)."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    """CRC-32C: the engine's C function when it has one (fast), checked once
    against the plain Python one."""
    fn = getattr(lib, "eng_crc32c", None)
    if fn is None:
        return crc32c_py(data)
    from engine._native import ffi
    return int(fn(0, ffi.from_buffer(data), len(data)))


assert crc32c(b"123456789") == crc32c_py(b"123456789") == 0xE3069283


# -- the files ------------------------------------------------------------------------------
def journal_files(d: pathlib.Path) -> list[pathlib.Path]:
    """The journal files of ``d`` in seq order."""
    return sorted(p for p in d.iterdir() if JOURNAL_RE.search(p.name))


def checkpoint_files(d: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in d.iterdir() if CKPT_RE.search(p.name))


def first_seq(path: pathlib.Path) -> int:
    with path.open("rb") as f:
        magic, fmt, fb, _, seq = struct.unpack("<IIIIQ", f.read(24))
    assert (magic, fmt, fb) == (FILE_MAGIC, lib.ENG_DJ_FORMAT, FRAME), (path, hex(magic), fmt, fb)
    return int(seq)


def frame_seq(frame: bytes) -> int:
    return int(struct.unpack_from("<Q", frame, 8)[0])


def frames(path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
    """(offset, frame bytes) of every frame of a journal file up to the
    first whose magic is 0 (valid or not)."""
    data = path.read_bytes()
    off = HDR
    while off + FRAME <= len(data):
        fr = data[off:off + FRAME]
        if struct.unpack_from("<I", fr, 0)[0] == 0:
            return
        yield off, fr
        off += FRAME


def frame_valid(fr: bytes) -> bool:
    magic, crc = struct.unpack_from("<II", fr, 0)
    return bool(magic == FRAME_MAGIC and crc == crc32c(fr[8:]))


def valid_records(d: pathlib.Path) -> list[tuple[pathlib.Path, int, int]]:
    """(file, offset, seq) of every valid frame, in order, stopping at the
    first invalid one or a break in the seq order."""
    out: list[tuple[pathlib.Path, int, int]] = []
    for p in journal_files(d):
        want = first_seq(p)
        for off, fr in frames(p):
            if not frame_valid(fr) or frame_seq(fr) != want:
                return out
            out.append((p, off, want))
            want += 1
    return out


def locate(d: pathlib.Path, seq: int) -> tuple[pathlib.Path, int]:
    """The file and byte offset of the frame of ``seq``."""
    for p, off, s in valid_records(d):
        if s == seq:
            return p, off
    raise AssertionError(f"seq {seq} is not in {d}")


def _copy_if_there(src: str, dst: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.copy2(src, dst)


def copy_dir(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """A copy of a journal directory, as a backup of a live one takes it: a
    file gone between the listing and its copy (a reservation's .tmp the
    writer dropped to retry on a full disk) is not in the copy."""
    shutil.copytree(src, dst, copy_function=_copy_if_there)
    os.chmod(dst, 0o700)
    return dst


def power_cut(src: pathlib.Path, dst: pathlib.Path, durable: int, extra: int = 0,
              drop_files: bool = False) -> pathlib.Path:
    """A copy of ``src`` as a power failure could leave it when ``durable``
    was the last seq flush() reported: every byte of a frame past it is
    zeroed (the preallocated file's content), except the first ``extra``
    bytes past the durable frames (a write the page cache had pushed out).
    ``drop_files``: journal files whose first seq is past ``durable`` + 1
    are gone (their creation was never synced).  Checkpoints whose start
    is past ``durable`` are dropped (their rename was never synced)."""
    copy_dir(src, dst)
    for c in checkpoint_files(dst):
        if int(CKPT_RE.search(c.name).group(1)) > durable:   # type: ignore[union-attr]
            c.unlink()
    for p in journal_files(dst):
        f0 = first_seq(p)
        if drop_files and f0 > durable + 1:
            p.unlink()
            continue
        keep = HDR + max(0, durable - f0 + 1) * FRAME
        data = bytearray(p.read_bytes())
        if keep >= len(data):
            continue
        if f0 <= durable + 1:
            keep += extra
        data[keep:] = bytes(len(data) - keep) if keep < len(data) else b""
        p.write_bytes(bytes(data))
    return dst


def fill(eng: Engine, n: int) -> None:
    """``n`` more journal records, fast: price writes of one position (the
    engine journals prices)."""
    try:
        pid = eng.open_position(100.0, 1.0)
    except CapacityError:
        pid = int(eng.snapshot()[0]["id"])
    for i in range(n - 1):
        eng.update_price(pid, 100.0 + (i % 1000) / 100)


class Cutter:
    """Power cuts at many offsets past one durable seq without copying the
    directory each time: one copy, whose unflushed bytes are rewritten in
    place (the original's bytes up to the cut, zeros after) before each
    restore."""

    def __init__(self, src: pathlib.Path, dst: pathlib.Path, durable: int) -> None:
        self.src, self.durable = src, durable
        self.dir = power_cut(src, dst, durable)
        p, off = locate(src, durable) if durable else (journal_files(src)[0], HDR - FRAME)
        self.file, self.start = p.name, off + FRAME
        self.orig = p.read_bytes()

    def cut(self, extra: int) -> pathlib.Path:
        data = self.orig[self.start:]
        region = data[:extra] + bytes(len(data) - min(extra, len(data)))
        with (self.dir / self.file).open("r+b") as f:
            f.seek(self.start)
            f.write(region)
        return self.dir


def whole_after_cut(src: pathlib.Path, cut: pathlib.Path, durable: int) -> int:
    """The last seq whose frame a power cut left byte for byte as written
    (a frame whose lost bytes were zeros anyway is whole), counting on from
    ``durable``."""
    seq = durable
    for p, off, s in valid_records(src):
        if s <= durable:
            continue
        q = cut / p.name
        if not q.exists():
            break
        with p.open("rb") as a, q.open("rb") as b:
            a.seek(off)
            b.seek(off)
            if a.read(FRAME) != b.read(FRAME):
                break
        seq = s
    return seq


def riders_by_seq(src: pathlib.Path) -> dict[int, int]:
    """Each valid record's seq and its riders count (eng_jrec.riders: the
    records after a slot's record that ride on its commit), in one pass."""
    riders_at = FRAME - lib.ENG_JREC_SIZE + int(ffi.offsetof("eng_jrec", "riders"))
    out: dict[int, int] = {}
    for p, off, s in valid_records(src):
        with p.open("rb") as f:
            f.seek(off + riders_at)
            out[s] = int.from_bytes(f.read(4), "little")
    return out


def whole_commits(src: pathlib.Path, seq: int, durable: int = 0) -> int:
    """The last seq <= ``seq`` that ends a commit: a restore keeps a commit
    whole or cuts it (the slot's record counts its riders, eng_jrec.riders),
    so records kept of a commit that continues past ``seq`` are cut with it.
    ``durable``: a seq known to end a commit (what flush() reported)."""
    riders = riders_by_seq(src)
    for s in sorted(riders):
        if durable < s <= seq and s + riders[s] > seq:
            return s - 1
    return seq


# -- a comparable dump ----------------------------------------------------------------------
ACCOUNT_COLS = ("cash", "reserved", "realized", "opening_cash", "deposits", "withdrawals",
                "max_exposure", "max_loss", "max_positions", "open_positions", "halted")
SKIP_ROW = {"generation", "locked", "transitions", "price_ts_ns", "price_version",
            "context_version", "pnl_pct"}


def dump(eng: Engine) -> dict[str, Any]:
    """Everything a restore must bring back, as plain values."""
    rows = eng.snapshot()
    names = [n for n in rows.dtype.names if n not in SKIP_ROW]
    positions = {int(r["id"]): tuple((n, r[n].item() if hasattr(r[n], "item") else r[n])
                                     for n in names) for r in rows}
    keys = {}
    for pid in positions:
        for k in eng.keys(pid):
            keys[k] = pid
    accounts = {int(a["id"]): tuple((c, int(a[c])) for c in ACCOUNT_COLS)
                for a in eng.accounts()}
    return {"name": eng.name, "capacity": eng.capacity, "spec": eng.spec.name,
            "keys_per_position": eng.keys_per_position, "max_accounts": eng.max_accounts,
            "halted": int(eng._seg.hdr.halted), "positions": positions, "keys": keys,
            "accounts": accounts}


def diff(want: dict[str, Any], got: dict[str, Any]) -> str:
    """Where two dumps differ, in words (empty: equal)."""
    out = []
    for k in want:
        a, b = want[k], got.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for i in sorted(set(a) | set(b), key=str):
                if a.get(i) != b.get(i):
                    out.append(f"{k}[{i!r}]: lost engine {a.get(i)} restored {b.get(i)}")
        else:
            out.append(f"{k}: lost engine {a!r} restored {b!r}")
    return "\n".join(out[:20])


def check_lookups(eng: Engine, want: dict[str, Any], acct_keys: dict[str, int]) -> None:
    """lookup finds every key of the lost engine, lookup_account every account key."""
    for k, pid in want["keys"].items():
        assert eng.lookup(k) == pid, (k, eng.lookup(k), pid)
    for k, a in acct_keys.items():
        if a in want["accounts"]:
            assert eng.lookup_account(k) == a, (k, eng.lookup_account(k), a)


def check_stale(eng: Engine, released: set[int]) -> None:
    """Every released id is stale, and stays so when every free slot is
    opened again (a restore that forgot a slot's openings reuses an id)."""
    for pid in released:
        with contextlib.suppress(StaleIdError):
            st = eng.state(pid)
            raise AssertionError(f"released id {pid:#x} is alive after restore: {st}")
    halted = int(eng._seg.hdr.halted)
    fresh = []
    with contextlib.suppress(CapacityError):
        for _ in range(eng.capacity):
            fresh.append(eng.open_position(100.0, 1.0))
    reused = sorted(set(fresh) & released)
    assert not reused, f"restored engine reissued released ids {[hex(i) for i in reused]}"
    assert int(eng._seg.hdr.halted) == halted


def books_invariant(eng: Engine) -> None:
    """Every account: reserved and open_positions are its open positions'
    notionals and count; cash = opening + deposits - withdrawals + realized."""
    from engine.accounts import money_of
    rows = eng.snapshot()
    open_states = {int(State.CREATED), int(State.MONITORING), int(State.EXIT_PENDING),
                   int(State.EXITING), int(State.PAUSED), int(State.ERROR)}
    for a in eng.accounts():
        aid = int(a["id"])
        mine = [r for r in rows if int(r["account"]) == aid and int(r["state"]) in open_states]
        reserved = sum(money_of(float(r["entry_price"]), float(r["amount"])) for r in mine)
        assert int(a["reserved"]) == reserved, (aid, int(a["reserved"]), reserved)
        assert int(a["open_positions"]) == len(mine), (aid, int(a["open_positions"]), len(mine))
        assert int(a["cash"]) == (int(a["opening_cash"]) + int(a["deposits"])
                                  - int(a["withdrawals"]) + int(a["realized"])), a


# -- the workload ---------------------------------------------------------------------------
ALLOWED = (RiskLimitError, CapacityError, NotOpenError, KeyExistsError, KeyLimitError,
           MoneyError)
STEPS = {State.CREATED: Trigger.POSITION_OPENED, State.MONITORING: Trigger.EXIT_CONDITION_MET,
         State.EXIT_PENDING: Trigger.EXIT_STARTED, State.EXITING: Trigger.EXIT_COMPLETED}


#: open_position(key=) in the workload; off: keys are bound right after the
#: open (bind_key), so the one break found (keys given at open are not
#: journaled) shows in its own test and does not hide the others
OPEN_KEYS = False


class Workload:
    """Random changes of every kind the journal records (opens with keys and
    accounts, transitions with fields, prices, keys, releases, deposits,
    withdrawals, account halts and limits, the engine's halt), one at a
    time; ``released`` and ``acct_keys`` remember what a restore is checked
    against."""

    def __init__(self, eng: Engine, seed: int, halts: bool = True,
                 open_keys: bool = OPEN_KEYS) -> None:
        self.eng = eng
        self.rng = random.Random(seed)
        self.seed = seed
        self.released: set[int] = set()
        self.acct_keys: dict[str, int] = {}
        self.accounts: list[int] = []
        self.halts = halts
        self.open_keys = open_keys
        self.n = 0

    def new_account(self) -> None:
        k = f"acct-{self.seed}-{self.n}"
        a = self.eng.open_account(10**6 + self.rng.randrange(10**5), 5 * 10**5, 50, 10**5, key=k)
        self.accounts.append(a)
        self.acct_keys[k] = a

    def step(self) -> None:
        eng, r = self.eng, self.rng
        self.n += 1
        x = r.random()
        try:
            if len(self.accounts) < 3 or x < 0.003:
                self.new_account()
                return
            if self.halts and x < 0.04:
                eng.halt(bool(r.random() < 0.5) and not int(eng._seg.hdr.halted))
                return
            if x < 0.07:
                a = r.choice(self.accounts)
                if r.random() < 0.6:
                    eng.deposit(a, r.randrange(1, 1000))
                else:
                    eng.withdraw(a, r.randrange(1, 100))
                return
            if x < 0.08:
                eng.halt_account(r.choice(self.accounts), r.random() < 0.3)
                return
            if x < 0.09:
                eng.update_account(r.choice(self.accounts),
                                   lambda acc: {"max_positions": r.randrange(20, 60)})
                return
            rows = eng.snapshot()
            if len(rows) == 0 or x < 0.25:
                key = f"k-{self.seed}-{self.n}" if r.random() < 0.5 else None
                acct = r.choice(self.accounts) if r.random() < 0.6 else None
                pid = eng.open_position(round(r.uniform(50, 150), 2),
                                        round(r.uniform(0.5, 3), 2), r.choice((1, -1)),
                                        token=r.randrange(4),
                                        key=key if self.open_keys else None, account=acct)
                if key is not None and not self.open_keys:
                    eng.bind_key(pid, key)
                return
            row = rows[r.randrange(len(rows))]
            pid, st = int(row["id"]), State(int(row["state"]))
            if x < 0.32:
                eng.bind_key(pid, f"b-{self.seed}-{self.n}")
            elif x < 0.55:
                eng.update_price(pid, round(r.uniform(50, 150), 3))
            elif x < 0.60:
                eng.update_token_price(r.randrange(4), round(r.uniform(50, 150), 3))
            elif st is State.CLOSED:
                if eng.release_position(pid) is Outcome.APPLIED:
                    self.released.add(pid)
            elif st in STEPS:
                trig = STEPS[st]
                if trig is Trigger.EXIT_COMPLETED:
                    eng.transition(pid, trig, exit_price=round(r.uniform(50, 150), 3))
                elif trig is Trigger.EXIT_CONDITION_MET:
                    eng.transition(pid, trig, exit_reason=r.randrange(1, 9))
                else:
                    eng.transition(pid, trig)
            else:
                eng.transition(pid, Trigger.RECOVER if st is State.ERROR else Trigger.RESUME)
        except ALLOWED:
            pass


# -- engines a test makes ------------------------------------------------------------------
class Made:
    """Engines made or restored by a test; closed and unlinked at teardown."""

    def __init__(self, names: Callable[[], str], tmp: pathlib.Path) -> None:
        self.names = names
        self.tmp = tmp
        self.engines: list[Engine] = []
        self.dirs: dict[str, pathlib.Path] = {}
        self.n = 0

    def dir(self, what: str = "j") -> pathlib.Path:
        self.n += 1
        return self.tmp / f"{what}{self.n}"

    def create(self, capacity: int = 32, journal: pathlib.Path | None = None,
               **kw: Any) -> Engine:
        d = journal if journal is not None else self.dir()
        kw.setdefault("journal_prices", True)
        eng = Engine.create(capacity, name=self.names(), journal=str(d), **kw)
        self.dirs[eng.name] = d
        self.engines.append(eng)
        return eng

    def jdir(self, eng: Engine) -> pathlib.Path:
        """The journal directory ``eng`` was created with."""
        return self.dirs[eng.name]

    def restore(self, d: pathlib.Path, name: str | None = None) -> Engine:
        eng = Engine.restore(str(d), name=name if name is not None else self.names())
        self.engines.append(eng)
        return eng

    def cleanup(self) -> None:
        for eng in self.engines:
            with contextlib.suppress(Exception):
                eng.close()
            with contextlib.suppress(Exception), Engine.attach(eng.name) as e:
                e.unlink()


@pytest.fixture(name="made")
def made_engines(names: Callable[[], str], tmp_path: pathlib.Path) -> Iterator[Made]:
    """A Made for the test (a test module imports it to use it)."""
    m = Made(names, tmp_path)
    try:
        yield m
    finally:
        m.cleanup()
