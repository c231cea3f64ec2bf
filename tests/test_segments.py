"""Segments: create, attach, close and unlink, the per-process registry, and
whatever else sits under a name.

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
import pickle
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable

import numpy as np
import posix_ipc
import pytest
from api_helpers import opened
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import (
    CapacityError,
    ClosedError,
    Engine,
    EngineError,
    Handle,
    MachineSpec,
    Outcome,
    Rule,
    SegmentError,
    SegmentNotFoundError,
    SpecMismatchError,
    State,
    Trigger,
)
from engine._native import ffi, lib
from engine.spec import POSITION_SPEC
from engine.store import shm as segment

BACKENDS = ("shm", "redis")   # the public API runs on both (conftest)

HEADER_SIZE = ffi.sizeof("eng_header")
SIZE_16 = lib.eng_segment_size_journal(16, POSITION_SPEC.record.n_words, 2, 64,
                                      lib.ENG_JOURNAL_DEFAULT_RECORDS)   # the default journal
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
        """A randomly edited header is refused by attach or every call works or raises."""
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


class TestCreateAttach:
    @pytest.mark.shm_only
    def test_create_gives_empty_engine_of_requested_capacity(self, make_engine):
        """create() makes a segment with `capacity` slots and no open position."""
        eng = make_engine(capacity=5)
        assert eng.capacity == 5
        assert not eng.closed
        assert len(eng.snapshot()) == 0
        assert os.path.exists(shm_path(eng.name))

    @pytest.mark.shm_only
    def test_create_with_explicit_name(self, make_engine):
        """create(name=...) uses exactly that segment name."""
        name = f"test_{os.urandom(6).hex()}"
        eng = make_engine(capacity=2, name=name)
        assert eng.name == name
        assert os.path.exists(shm_path(name))

    def test_create_refuses_existing_name_and_leaves_it_intact(self, engine):
        """create() on a name in use raises SegmentError and does not touch the segment."""
        pos = opened(engine)
        with pytest.raises(SegmentError, match="already exists"):
            Engine.create(capacity=4, name=engine.name, url=engine.url)
        assert engine.state(pos) is State.MONITORING
        with Engine.attach(engine.name, url=engine.url) as other:
            assert other.capacity == engine.capacity
            assert other.state(pos) is State.MONITORING

    @pytest.mark.shm_only
    def test_segment_mode_is_0600(self, engine):
        """The segment file is readable and writable by its owner only."""
        mode = stat.S_IMODE(os.stat(shm_path(engine.name)).st_mode)
        assert mode == 0o600

    def test_attach_by_name_shares_state(self, engine):
        """An Engine attached by name sees and changes the same slots."""
        pos = opened(engine)
        with Engine.attach(engine.name, url=engine.url) as other:
            assert other.state(pos) is State.MONITORING
            assert other.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        assert engine.state(pos) is State.PAUSED

    def test_attach_by_handle_shares_state(self, engine):
        """An Engine attached by handle sees the same segment."""
        pos = opened(engine)
        with Engine.attach(engine.handle) as other:
            assert other.name == engine.name
            assert other.context(pos) == engine.context(pos)

    def test_handle_is_small_and_picklable(self, engine):
        """The handle survives a pickle round trip and still attaches."""
        h = engine.handle
        assert isinstance(h, Handle)
        assert h.spec is None            # default lifecycle travels as None
        h2 = pickle.loads(pickle.dumps(h))
        assert h2 == h
        with Engine.attach(h2) as other:
            assert other.spec == POSITION_SPEC

    def test_engine_itself_is_not_picklable(self, engine):
        """Pickling an Engine is refused with a pointer to the handle."""
        with pytest.raises(TypeError, match="handle"):
            pickle.dumps(engine)

    def test_attach_missing_segment(self):
        """attach() of a name that does not exist raises SegmentNotFoundError."""
        with pytest.raises(SegmentNotFoundError) as info:
            Engine.attach(f"no_such_{os.urandom(6).hex()}")
        assert isinstance(info.value, FileNotFoundError)

    def test_attach_foreign_segment_is_refused(self):
        """attach() of a shm object that is not an engine raises SegmentError."""
        name = f"foreign_{os.urandom(6).hex()}"
        shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=65536)
        shm.close_fd()
        try:
            with pytest.raises(SegmentError, match="not an engine segment"):
                Engine.attach(name)
        finally:
            posix_ipc.unlink_shared_memory("/" + name)

    def test_repr_names_segment(self, engine):
        """repr says the segment name and capacity, or closed."""
        assert engine.name in repr(engine) and "capacity=16" in repr(engine)
        engine.close()
        assert "closed" in repr(engine)


class TestCloseUnlink:
    @pytest.mark.shm_only
    def test_close_detaches_but_segment_lives(self, engine):
        """close() detaches this view only; the segment and its data remain."""
        pos = opened(engine)
        engine.close()
        assert engine.closed
        assert os.path.exists(shm_path(engine.name))
        with Engine.attach(engine.name, url=engine.url) as other:
            assert other.state(pos) is State.MONITORING

    def test_close_twice_is_harmless(self, engine):
        """A second close() does nothing."""
        engine.close()
        engine.close()
        assert engine.closed

    def test_calls_after_close_raise_closed_error(self, engine):
        """Every operation on a closed Engine raises ClosedError."""
        pos = opened(engine)
        slot = engine.slot_of(pos)
        engine.close()
        calls = [
            lambda: engine.state(pos), lambda: engine.state_word(slot),
            lambda: engine.price(pos), lambda: engine.context(pos),
            lambda: engine.transition(pos, Trigger.PAUSE),
            lambda: engine.transition(pos, Trigger.PAUSE, exit_reason=1),
            lambda: engine.update_price(pos, 1.0),
            lambda: engine.update_prices(np.array([pos]), np.array([1.0])),
            lambda: engine.update_token_price(7, 1.0),
            lambda: engine.open_position(1.0, 1.0),
            lambda: engine.release_position(pos),
            lambda: engine.wait_for_change(pos, 0.01),
            engine.snapshot, engine.metrics, engine.recover, engine.halt,
        ]
        for call in calls:
            with pytest.raises(ClosedError):
                call()

    def test_unlink_removes_segment(self, engine):
        """unlink() removes the segment name; a later attach finds nothing."""
        engine.unlink()
        assert not os.path.exists(shm_path(engine.name))
        with pytest.raises(SegmentNotFoundError):
            Engine.attach(engine.name, url=engine.url)

    @pytest.mark.shm_only
    def test_unlink_keeps_existing_mappings_working(self, engine):
        """After unlink() an attached Engine keeps working on its mapping."""
        pos = opened(engine)
        engine.unlink()
        assert engine.transition(pos, Trigger.PAUSE) is Outcome.APPLIED
        assert engine.state(pos) is State.PAUSED

    def test_context_manager_closes_and_keeps_segment(self):
        """`with Engine.create(...)` closes on exit but does not unlink."""
        with Engine.create(capacity=2) as eng:
            name = eng.name
            pos = opened(eng)
        try:
            assert eng.closed
            with Engine.attach(name) as other:
                assert other.state(pos) is State.MONITORING
        finally:
            eng.unlink()

    def test_context_manager_closes_on_exception(self):
        """An exception inside `with` still closes the Engine."""
        eng = None
        try:
            with pytest.raises(RuntimeError), Engine.create(capacity=2) as eng:
                raise RuntimeError("boom")
            assert eng.closed
        finally:
            if eng is not None:
                eng.unlink()


class TestIndependentInterpreter:
    @pytest.mark.shm_only
    @pytest.mark.parametrize("close", [True, False], ids=["close", "no-close"])
    def test_attach_and_exit_leaves_segment(self, engine, child_env, close):
        """Another interpreter attaching and exiting keeps the segment; stderr stays clean."""
        pos = opened(engine)
        code = textwrap.dedent(f"""
            from engine import Engine, Trigger
            eng = Engine.attach({engine.name!r})
            print(eng.state({pos}).name)
            eng.transition({pos}, Trigger.PAUSE)
            eng.update_price({pos}, 123.0)
            {"eng.close()" if close else "pass"}
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=child_env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "MONITORING"
        assert r.stderr == "", r.stderr          # no resource_tracker leak warning
        assert os.path.exists(shm_path(engine.name))
        with Engine.attach(engine.name, url=engine.url) as again:
            assert again.state(pos) is State.PAUSED
            assert again.price(pos).price == 123.0
        assert engine.recover().changed is False   # the child left the registry

    def test_segment_outlives_its_creator(self, child_env):
        """A segment created by a process that exits without unlink() remains."""
        code = textwrap.dedent("""
            from engine import Engine
            eng = Engine.create(capacity=4)
            eng.open_position(100.0, 1.0, token=3)
            print(eng.name)
        """)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=child_env, timeout=120)
        name = r.stdout.strip()
        try:
            assert r.returncode == 0, r.stderr
            assert r.stderr == "", r.stderr
            assert os.path.exists(shm_path(name))
            with Engine.attach(name) as eng:
                rows = eng.snapshot()
                assert len(rows) == 1 and rows["token"][0] == 3
        finally:
            if name and os.path.exists(shm_path(name)):
                posix_ipc.unlink_shared_memory("/" + name)


class TestRegistry:
    @pytest.mark.shm_only
    def test_registry_full_raises_capacity_error(self, make_engine):
        """Attach past ENG_MAX_PROCS raises CapacityError; closing one frees an entry."""
        eng = make_engine(capacity=1)
        views = []
        try:
            for _ in range(lib.ENG_MAX_PROCS - 1):
                views.append(Engine.attach(eng.name, url=eng.url))
            with pytest.raises(CapacityError, match=str(lib.ENG_MAX_PROCS)):
                Engine.attach(eng.name, url=eng.url)
            views.pop().close()
            views.append(Engine.attach(eng.name, url=eng.url))
        finally:
            for v in views:
                v.close()
