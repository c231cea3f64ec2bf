"""Hostile segments: whatever sits under a name, attach refuses it cleanly.

Allowed outcome for a segment that is not a well-formed engine segment of the
expected spec: ``SegmentError`` (or its subclasses ``SegmentNotFoundError``,
``SpecMismatchError``) with a message naming the segment and the reason, the
segment left byte-for-byte as it was, no registry entry taken.  Forbidden: a
crash (SIGSEGV/SIGBUS would end this test run), any other exception, an
attach that succeeds on a segment it cannot use.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable

import posix_ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import (
    Engine,
    EngineError,
    MachineSpec,
    Rule,
    SegmentError,
    SegmentNotFoundError,
    SpecMismatchError,
    Trigger,
)
from engine._native import ffi, lib
from engine.spec import POSITION_SPEC
from engine.store import shm as segment

HEADER_SIZE = ffi.sizeof("eng_header")
SIZE_16 = lib.eng_segment_size(16, POSITION_SPEC.record.n_words, 2, 64)
_HEADER_FIELDS = dict(ffi.typeof("eng_header").fields)


def shm_path(name: str) -> str:
    return os.path.join(segment.SHM_DIR, name)


def patch_field(name: str, fld: str, value: int) -> None:
    """Overwrite one header field of segment ``name`` through a raw mapping."""
    off = ffi.offsetof("eng_header", fld)
    size = ffi.sizeof(_HEADER_FIELDS[fld].type)
    mm = segment.open_existing(name)
    try:
        mm[off:off + size] = value.to_bytes(size, "little")
    finally:
        mm.close()


def read_bytes(name: str) -> bytes:
    with open(shm_path(name), "rb") as f:
        return f.read()


@pytest.fixture
def raw(names: Callable[[], str]) -> Callable[[bytes], str]:
    """Create a plain POSIX shm segment holding exactly ``data``."""

    def make(data: bytes) -> str:
        name = names()
        shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=len(data))
        try:
            if data:
                with mmap.mmap(shm.fd, len(data)) as mm:
                    mm[:] = data
        finally:
            shm.close_fd()
        return name

    return make


@pytest.fixture
def engine_segment(names: Callable[[], str]) -> Callable[..., str]:
    """A real engine segment (creator detached) to damage."""

    def make(spec: MachineSpec | None = None) -> str:
        name = names()
        with Engine.create(capacity=16, name=name, spec=spec) as eng:
            eng.open_position(100.0, 1.0)
        return name

    return make


def refused(name: str, exc: type[EngineError] = SegmentError, *words: str) -> str:
    """Attach must raise ``exc`` naming the segment (and ``words``), changing nothing."""
    before = read_bytes(name) if os.path.exists(shm_path(name)) else None
    with pytest.raises(exc) as info:
        Engine.attach(name)
    msg = str(info.value)
    assert name in msg, msg
    for w in words:
        assert w in msg, msg
    if before is not None:
        assert read_bytes(name) == before, "a refused attach changed the segment"
    return msg


class TestForeignSegments:
    """Segments that were never engine segments."""

    def test_zero_filled(self, raw):
        """A zero-filled segment of an engine's size is refused as not an engine segment."""
        refused(raw(bytes(SIZE_16)), SegmentError, "not an engine segment")

    def test_random_bytes(self, raw):
        """Random bytes are refused as not an engine segment."""
        refused(raw(os.urandom(SIZE_16)), SegmentError, "not an engine segment")

    def test_random_bytes_behind_the_magic(self, raw):
        """The right magic followed by random bytes is still refused."""
        data = lib.ENG_MAGIC.to_bytes(8, "little") + os.urandom(SIZE_16 - 8)
        refused(raw(data), SegmentError)

    def test_zero_bytes(self, raw):
        """A 0-byte segment is refused (it cannot even be mapped)."""
        refused(raw(b""), SegmentError, "empty")

    def test_shorter_than_the_magic(self, raw):
        """A 5-byte segment is refused as not an engine segment."""
        refused(raw(b"EENGI"), SegmentError, "not an engine segment")

    def test_magic_only(self, raw):
        """Just the magic, nothing after it, is refused as truncated."""
        refused(raw(lib.ENG_MAGIC.to_bytes(8, "little")), SegmentError, "truncated")

    def test_nonexistent(self, names):
        """A name with no segment raises SegmentNotFoundError (a FileNotFoundError)."""
        name = names()
        with pytest.raises(SegmentNotFoundError) as info:
            Engine.attach(name)
        assert isinstance(info.value, FileNotFoundError) and name in str(info.value)


class TestDamagedEngineSegments:
    """Real engine segments, damaged after their creator left."""

    def test_intact_segment_attaches(self, engine_segment):
        """Control: the undamaged segment attaches and works."""
        with Engine.attach(engine_segment()) as eng:
            assert len(eng.snapshot()) == 1

    def test_truncated_to_half(self, engine_segment):
        """Truncated to half its size: refused as truncated, no SIGBUS."""
        name = engine_segment()
        os.truncate(shm_path(name), SIZE_16 // 2)
        refused(name, SegmentError, "truncated")

    def test_truncated_inside_the_header(self, engine_segment):
        """Truncated to less than a header: refused as truncated."""
        name = engine_segment()
        os.truncate(shm_path(name), HEADER_SIZE // 2)
        refused(name, SegmentError, "truncated")

    def test_grown(self, engine_segment):
        """Grown past its size: the header's sizes still describe it, so it attaches."""
        name = engine_segment()
        os.truncate(shm_path(name), SIZE_16 + 4096)
        with Engine.attach(name) as eng:
            assert eng.capacity == 16

    def test_other_layout_version(self, engine_segment):
        """Another layout version is refused as such."""
        name = engine_segment()
        patch_field(name, "layout_version", lib.ENG_LAYOUT_VERSION + 1)
        refused(name, SegmentError, "layout version")

    def test_not_ready(self, engine_segment):
        """A segment whose ready flag is 0 (creator died formatting it) is refused."""
        name = engine_segment()
        patch_field(name, "ready", 0)
        refused(name, SegmentError, "not ready")

    def test_bad_magic(self, engine_segment):
        """One flipped bit of the magic makes it foreign."""
        name = engine_segment()
        patch_field(name, "magic", lib.ENG_MAGIC ^ 1)
        refused(name, SegmentError, "not an engine segment")

    @pytest.mark.parametrize("fld, value", [
        ("capacity", 0), ("capacity", lib.ENG_MAX_CAPACITY + 1), ("capacity", 17),
        ("slot_size", 128), ("segment_size", SIZE_16 * 2), ("registry_off", 0),
        ("shards_off", 8), ("slots_off", SIZE_16), ("n_states", 0),
        ("n_states", lib.ENG_MAX_STATES + 1), ("n_triggers", 0),
        ("n_triggers", lib.ENG_MAX_TRIGGERS + 1), ("initial_index", lib.ENG_MAX_STATES),
    ])
    def test_header_field_out_of_range(self, engine_segment, fld, value):
        """A size, offset or count that disagrees with the layout is refused."""
        name = engine_segment()
        patch_field(name, fld, value)
        refused(name, SegmentError)

    def test_rule_pointing_past_the_states(self, engine_segment):
        """A transition table entry whose target is not a state is refused as corrupt."""
        name = engine_segment()
        off = ffi.offsetof("eng_header", "table")
        mm = segment.open_existing(name)
        try:
            mm[off] = lib.ENG_MAX_STATES        # state 0, trigger 0 -> index 15: > n_states
        finally:
            mm.close()
        refused(name, SegmentError, "corrupt")

    def test_other_machine_spec(self, engine_segment):
        """A segment of another machine spec raises SpecMismatchError."""
        spec = MachineSpec(states=["A", "B"], triggers=["GO"], rules=[Rule.of("GO", "A", "B")],
                           initial="A", name="other")
        name = engine_segment(spec)
        refused(name, SpecMismatchError, "another machine spec")
        with Engine.attach(name, spec=spec) as eng:   # with its own spec it attaches
            assert eng.capacity == 16

    def test_refusal_takes_no_registry_entry(self, engine_segment):
        """A refused attach (spec mismatch) leaves the process registry as it was."""
        spec = MachineSpec(states=["A"], triggers=["T"], rules=[], initial="A", name="tiny")
        name = engine_segment(spec)
        for _ in range(lib.ENG_MAX_PROCS + 1):   # more refusals than registry entries
            with pytest.raises(SpecMismatchError):
                Engine.attach(name)
        with Engine.attach(name, spec=spec) as eng:
            assert eng.recover().removed_pids == ()

    def test_existing_name_is_not_overwritten(self, engine_segment):
        """create() on a name that exists raises SegmentError and leaves it intact."""
        name = engine_segment()
        before = read_bytes(name)
        with pytest.raises(SegmentError):
            Engine.create(capacity=16, name=name)
        assert read_bytes(name) == before

    def test_unlinked_while_attached_keeps_working(self, names):
        """Unlinking a segment under an attached Engine does not break it."""
        name = names()
        with Engine.create(capacity=4, name=name) as eng:
            pos = eng.open_position(100.0, 1.0)
            eng.unlink()
            assert eng.transition(pos, Trigger.POSITION_OPENED).name == "APPLIED"
            eng.update_price(pos, 101.0)
            assert eng.price(pos).price == 101.0
            with pytest.raises(SegmentNotFoundError):
                Engine.attach(name)


class TestMutatedHeaders:
    """Property: any mutation of a valid header's identity part (lines 0-1) or
    rule table is refused or harmless.  Lines 2-3 are run-time controls (halt,
    metrics, test faults) that attached processes write by design."""

    @settings(max_examples=100, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(edits=st.lists(
        st.tuples(st.one_of(st.integers(0, ffi.offsetof("eng_header", "halted") - 1),
                            st.integers(ffi.offsetof("eng_header", "table"), HEADER_SIZE - 1)),
                  st.integers(0, 255)),
        min_size=1, max_size=6))
    def test_mutated_header_is_refused_or_usable(self, engine_segment, edits):
        """Random byte edits: attach raises SegmentError, or attaches and every
        call either works or raises an EngineError."""
        name = engine_segment()
        try:
            mm = segment.open_existing(name)
            try:
                for off, byte in edits:
                    mm[off] = byte
            finally:
                mm.close()
            try:
                eng = Engine.attach(name)
            except SegmentError:
                return
            with eng:
                for call in (eng.snapshot, eng.metrics, eng.recover,
                             lambda: eng.open_position(100.0, 1.0),
                             lambda: eng.transition(eng.id_of(0), 0),
                             lambda: eng.update_price(eng.id_of(0), 99.0),
                             lambda: eng.price(eng.id_of(0)), lambda: eng.context(eng.id_of(0)),
                             lambda: eng.state_word(0)):
                    with contextlib.suppress(EngineError):
                        call()
        finally:
            posix_ipc.unlink_shared_memory("/" + name)
