"""Adversary of durability (issue 22): the journal on disk and its restore,
attacked as power failures, torn and corrupt files, races and kills leave it.

Forbidden outcomes, each named by its test: a restore that loses what
flush() reported durable, or brings back anything past a valid prefix of
the journal; a torn tail replayed or refused; corruption in the middle
skipped in silence (the error must name the file and offset); a restore
that clobbers an existing engine; a half-restored segment seen by attach;
a commit the engine made but could not journal; files other than 0600 in a
0700 directory; a released id alive again after a restore.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from durable_helpers import (
    CKPT_RE,
    FRAME,
    FRAME_MAGIC,
    HDR,
    Workload,
    books_invariant,
    check_lookups,
    check_stale,
    checkpoint_files,
    copy_dir,
    crc32c,
    diff,
    dump,
    first_seq,
    journal_files,
    locate,
    power_cut,
    valid_records,
)

from engine import Engine, EngineError, SegmentNotFoundError

pytestmark = pytest.mark.skipif(
    not (hasattr(Engine, "restore") and hasattr(Engine, "flush")),
    reason="durability (issue 22: Engine.flush, Engine.restore) is not in this build")

FLUSH_TIMEOUT = 10.0


# -- fixtures -------------------------------------------------------------------------------
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


@pytest.fixture
def made(names: Callable[[], str], tmp_path: pathlib.Path) -> Iterator[Made]:
    m = Made(names, tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


def same(want: dict[str, Any], got: dict[str, Any]) -> None:
    """Two dumps are equal but for the segment's name."""
    got = {**got, "name": want["name"]}
    assert want == got, "restored engine differs:\n" + diff(want, got)


def tree(d: pathlib.Path) -> dict[str, str]:
    """Every file of a directory and the hash of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def run(w: Workload, steps: int) -> None:
    for _ in range(steps):
        w.step()


def flushed(eng: Engine) -> int:
    """flush(), checked against what was committed before the call."""
    before = eng.journal_seq
    d = int(eng.flush(timeout=FLUSH_TIMEOUT))
    assert d >= before, f"flush() returned {d}, below the seq {before} committed before it"
    assert int(eng.durable_seq) >= d
    return d


def segment_exists(name: str) -> bool:
    try:
        Engine.attach(name).close()
        return True
    except SegmentNotFoundError:
        return False


# -- power loss -----------------------------------------------------------------------------
class TestPowerLoss:
    def test_every_flush_point_restores_exactly(self, made: Made) -> None:
        """A power cut right after flush() returned D restores the engine as it was at D."""
        eng = made.create()
        w = Workload(eng, 11)
        cuts = []
        for i in range(8):
            run(w, 60)
            d = flushed(eng)
            assert d == eng.journal_seq
            cut = power_cut(made.jdir(eng), made.dir("cut"), d,
                            drop_files=bool(i % 2))
            cuts.append((cut, dump(eng), set(w.released)))
        for cut, want, released in cuts:
            got = made.restore(cut)
            same(want, dump(got))
            check_lookups(got, want, w.acct_keys)
            check_stale(got, released)

    def test_unflushed_bytes_of_the_last_file(self, made: Made) -> None:
        """Any prefix of the unflushed bytes restores the whole frames in it, no more, no less."""
        eng = made.create(journal_prices=True)
        w = Workload(eng, 12, halts=False)
        run(w, 80)
        d0 = flushed(eng)
        at: dict[int, dict[str, Any]] = {d0: dump(eng)}
        for _ in range(6):
            w.step()
            at[eng.journal_seq] = dump(eng)
        flushed(eng)
        top = eng.journal_seq
        src = made.jdir(eng)
        offsets = sorted({b for k in range(top - d0 + 1)
                          for b in (k * FRAME - 1, k * FRAME, k * FRAME + 1, k * FRAME + 131)
                          if 0 <= b <= (top - d0) * FRAME})
        for extra in offsets:
            cut = power_cut(src, made.dir("cut"), d0, extra=extra)
            whole = d0 + extra // FRAME
            got = made.restore(cut)
            if whole in at:
                same(at[whole], dump(got))
            got.close()
            got.unlink()

    @pytest.mark.slow
    def test_unflushed_bytes_every_offset(self, made: Made) -> None:
        """Every byte offset of the last three frames: a torn frame is cut, the whole ones kept."""
        eng = made.create()
        w = Workload(eng, 13, halts=False)
        run(w, 50)
        d0 = flushed(eng)
        at: dict[int, dict[str, Any]] = {d0: dump(eng)}
        while eng.journal_seq < d0 + 3:
            w.step()
            at[eng.journal_seq] = dump(eng)
        flushed(eng)
        src = made.jdir(eng)
        for extra in range(3 * FRAME + 1):
            cut = power_cut(src, made.dir("cut"), d0, extra=extra)
            got = made.restore(cut)
            whole = d0 + extra // FRAME
            if whole in at:
                same(at[whole], dump(got))
            got.close()
            got.unlink()


# -- torn tails and corruption --------------------------------------------------------------
def frozen(made: Made, seed: int, steps: int = 150, **kw: Any) -> tuple[Engine, pathlib.Path]:
    """An engine after a workload and a flush, and a copy of its directory."""
    eng = made.create(**kw)
    run(Workload(eng, seed, halts=False), steps)
    flushed(eng)
    return eng, copy_dir(made.jdir(eng), made.dir("copy"))


def names_place(msg: str, path: pathlib.Path, frame_off: int, byte_off: int) -> bool:
    """The message names the file and the frame's (or the byte's) offset."""
    offs = {str(frame_off), hex(frame_off), str(byte_off), hex(byte_off)}
    return path.name in msg and any(o in msg for o in offs)


def refused_mid_file(made: Made, d: pathlib.Path, path: pathlib.Path, frame_off: int,
                     byte_off: int) -> None:
    """Restore of ``d`` raises an EngineError naming the place; nothing is created or cut."""
    before = tree(d)
    name = made.names()
    with pytest.raises(EngineError) as exc:
        made.restore(d, name=name)
    assert names_place(str(exc.value), path, frame_off, byte_off), (
        f"the error does not name {path.name} at {frame_off} (frame) / {byte_off} (byte): "
        f"{exc.value}")
    assert not segment_exists(name), "a failed restore left a segment behind"
    assert tree(d) == before, "a failed restore changed the journal directory"


class TestTornTail:
    def test_garbage_after_the_last_record_is_cut(self, made: Made) -> None:
        """Random bytes after the last frame are cut, never replayed, and the rest restores."""
        eng, d = frozen(made, 21)
        p, off = locate(d, eng.journal_seq)
        data = bytearray(p.read_bytes())
        data[off + FRAME: off + 3 * FRAME] = os.urandom(2 * FRAME)
        data[off + FRAME] |= 1   # a magic that is not 0
        p.write_bytes(bytes(data))
        same(dump(eng), dump(made.restore(d)))

    def test_a_copy_of_the_last_frame_is_not_replayed(self, made: Made) -> None:
        """A whole, checksummed frame repeated after the tail (its seq not the next) is not replayed."""
        eng, _ = frozen(made, 22)
        a = eng.accounts()[0]["id"]
        eng.deposit(int(a), 777)    # the last record: applied twice would show in cash
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        p, off = locate(d, eng.journal_seq)
        data = bytearray(p.read_bytes())
        data[off + FRAME: off + 2 * FRAME] = data[off: off + FRAME]
        p.write_bytes(bytes(data))
        same(dump(eng), dump(made.restore(d)))

    def test_an_old_frame_after_the_tail_is_not_replayed(self, made: Made) -> None:
        """A valid frame of an earlier seq after the tail (a recycled file's leftover) is not replayed."""
        eng, d = frozen(made, 23)
        p, off = locate(d, eng.journal_seq)
        q, old = locate(d, eng.journal_seq // 2)
        data = bytearray(p.read_bytes())
        data[off + FRAME: off + 2 * FRAME] = q.read_bytes()[old: old + FRAME]
        p.write_bytes(bytes(data))
        same(dump(eng), dump(made.restore(d)))

    def test_a_torn_last_frame_is_cut(self, made: Made) -> None:
        """The last frame's checksum failing: it is cut and the engine before it comes back."""
        eng, _ = frozen(made, 24)
        want = dump(eng)
        eng.deposit(int(eng.accounts()[0]["id"]), 5)
        flushed(eng)
        d = copy_dir(made.jdir(eng), made.dir("copy"))
        p, off = locate(d, eng.journal_seq)
        data = bytearray(p.read_bytes())
        data[off + FRAME - 3] ^= 0x40
        p.write_bytes(bytes(data))
        same(want, dump(made.restore(d)))


class TestCorruption:
    def test_a_flipped_byte_mid_file_names_file_and_offset(self, made: Made) -> None:
        """A flipped byte in a frame with whole frames after it stops the restore, naming the place."""
        eng, d = frozen(made, 31)
        p, off = locate(d, eng.journal_seq // 2)
        data = bytearray(p.read_bytes())
        data[off + 8 + 40] ^= 0x01
        p.write_bytes(bytes(data))
        refused_mid_file(made, d, p, off, off + 8 + 40)

    def test_a_zeroed_frame_mid_file_is_not_an_end(self, made: Made) -> None:
        """A frame of zeros with whole frames after it is corruption, not the end of the records."""
        eng, d = frozen(made, 32)
        p, off = locate(d, eng.journal_seq // 2)
        data = bytearray(p.read_bytes())
        data[off: off + FRAME] = bytes(FRAME)
        p.write_bytes(bytes(data))
        refused_mid_file(made, d, p, off, off)

    def test_a_flipped_magic_mid_file_names_file_and_offset(self, made: Made) -> None:
        """A frame whose magic is wrong, mid-file, stops the restore, naming the place."""
        eng, d = frozen(made, 33)
        p, off = locate(d, eng.journal_seq // 3)
        data = bytearray(p.read_bytes())
        data[off] ^= 0x10
        p.write_bytes(bytes(data))
        refused_mid_file(made, d, p, off, off)

    def test_a_swapped_frame_order_is_refused(self, made: Made) -> None:
        """Two whole frames swapped mid-file (each checksum right, the seqs out of order) are refused."""
        eng, d = frozen(made, 34)
        p, off = locate(d, eng.journal_seq // 2)
        data = bytearray(p.read_bytes())
        a, b = data[off: off + FRAME], data[off + FRAME: off + 2 * FRAME]
        data[off: off + 2 * FRAME] = b + a
        p.write_bytes(bytes(data))
        refused_mid_file(made, d, p, off, off)
