"""A crafted segment header: attach refuses it (SegmentError naming the word)
or the engine behaves; never a crash, a hang, or a test hook honoured.

The test fault words (fault_flags, test_pause_ns) are honoured only by a
process whose own switch is on (ENGINE_TEST_FAULTS=1, eng_test_faults(1));
nothing in a segment turns it on.  The suite runs with it on (conftest); the
children here turn it off, as a process of a release deployment has it.

Every header word is crafted by writing bytes into the segment file
directly, in a spawned child (a crash there fails the test, not the run).
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from engine import Engine, EngineError, SegmentError, Trigger
from engine._native import ffi, lib

if TYPE_CHECKING:   # not imported at run time: it switches test faults on (children import us)
    from conftest import Spawner

CLOSE = (Trigger.POSITION_OPENED, Trigger.EXIT_CONDITION_MET, Trigger.EXIT_STARTED,
         Trigger.EXIT_COMPLETED)
CHILD_TIMEOUT = 120.0   # a spawned child imports numpy and cffi, then runs the sweep


def segment_path(name: str) -> str:
    return os.path.join("/dev/shm", name)


def _field(name: str) -> tuple[int, int]:
    """(offset, size) of a header word."""
    f = dict(ffi.typeof("eng_header").fields)[name]
    return f.offset, ffi.sizeof(f.type)


def _poke(name: str, offset: int, data: bytes) -> bytes:
    """Write ``data`` at ``offset`` of the segment file; returns what was there."""
    with open(segment_path(name), "r+b") as f:
        f.seek(offset)
        old = f.read(len(data))
        f.seek(offset)
        f.write(data)
    return old


def _workload(name: str) -> str:
    """Attach and use every path a header word steers: an account, a booked
    opening (the fault sites DIE_AFTER_LOCK, DIE_IN_TINDEX_ADD), prices, a
    slow transition with fields (test_pause), a booked close, keys, snapshot,
    metrics, recover.  Engine errors are answers; anything else propagates."""
    e = Engine.attach(name)
    try:
        a = e.open_account(1000, 1000, 8, 1000)
        p = e.open_position(10.0, 2.0, side=1, token=7, account=a, key=os.urandom(16))
        e.update_price(p, 11.0)
        e.update_token_price(7, 12.0)
        outs = [e.transition(p, t).name for t in CLOSE[:2]]
        outs.append(e.transition(p, CLOSE[2], exit_reason=3).name)
        outs.append(e.transition(p, CLOSE[3]).name)
        e.snapshot()
        e.metrics()
        e.recover()
        e.release_position(p)
        return "ok " + ",".join(outs)
    finally:
        e.close()


def _sweep_child(name: str, cases: list[tuple[str, int, bytes]], q: Any) -> None:
    """For each (word, offset, bytes): write it, attach and use, put back."""
    lib.eng_test_faults(0)   # a release process: fault words are not honoured
    for word, offset, data in cases:
        old = _poke(name, offset, data)
        try:
            try:
                res = _workload(name)
            except SegmentError as exc:
                res = f"refused {type(exc).__name__}: {exc}"
            except EngineError as exc:
                res = f"engine-error {type(exc).__name__}: {exc}"
            except Exception as exc:   # a non-engine error is a defect: report it
                res = f"DEFECT {type(exc).__name__}: {exc}"
        finally:
            _poke(name, offset, old)
        q.put((word, data.hex(), res))
    q.put(None)


def _values(size: int, orig: int) -> list[int]:
    top = (1 << (8 * size)) - 1
    return sorted({0, 1, 2, 3, 0x40, top, top >> 1, 1 << (8 * size - 1), orig + 1} - {orig})


def _scalar_cases(name: str) -> list[tuple[str, int, bytes]]:
    """Every scalar word and every pad word of the header, crafted."""
    with open(segment_path(name), "rb") as f:
        head = f.read(lib.ENG_HEADER_SIZE)
    cases = []
    for word, f in ffi.typeof("eng_header").fields:
        if word in ("table", "rec"):
            continue
        if f.type.kind == "array":
            n, size = f.type.length, ffi.sizeof(f.type.item)
        else:
            n, size = 1, ffi.sizeof(f.type)
        for i in range(n):
            off = f.offset + i * size
            orig = int.from_bytes(head[off:off + size], "little")
            label = f"{word}[{i}]" if n > 1 else word
            cases += [(label, off, v.to_bytes(size, "little")) for v in _values(size, orig)]
    return cases


def _layout_cases(eng: Engine) -> list[tuple[str, int, bytes]]:
    """The transition table and the record layout, crafted entry by entry."""
    table, _ = _field("table")
    rec, _ = _field("rec")
    n = len(eng.spec.states)
    closed = next(i for i, s in enumerate(eng.spec.states) if eng.spec.closed_mask >> i & 1)
    cases = [
        ("table", table + 0, bytes([0x40 | 1])),                    # a stray flag bit
        ("table", table + 1, bytes([n + 1])),                       # target past n_states
        ("table", table + 255, bytes([1])),                         # trigger past n_triggers
        ("table", table + n * lib.ENG_MAX_TRIGGERS, bytes([1])),   # state past n_states
        ("table", table + closed * lib.ENG_MAX_TRIGGERS, bytes([1])),   # closed -> open
    ]
    rl = ffi.typeof("eng_rec_layout")
    for word, f in rl.fields:
        off = rec + f.offset
        if f.type.kind == "array":
            cases += [(f"rec.{word}[{i}]", off + i, bytes([v]))
                      for i in (0, 1, 2, f.type.length - 1) for v in (0, 0x7, 0xFE, 0xFF)]
        else:
            cases += [(f"rec.{word}", off, v.to_bytes(4, "little")) for v in (0, 9, 25, 0xFFFFFFFF)]
    return cases


def _run_sweep(spawner: Spawner, name: str, cases: list[tuple[str, int, bytes]]) -> list[Any]:
    q = spawner.ctx.Queue()
    p = spawner.start(_sweep_child, name, cases, q)
    out = []
    while True:
        item = q.get(timeout=CHILD_TIMEOUT)
        if item is None:
            break
        out.append(item)
    spawner.join_all(CHILD_TIMEOUT)
    assert p.exitcode == 0
    return out


@pytest.fixture
def segment() -> Iterator[Engine]:
    eng = Engine.create(capacity=512, max_accounts=512, keys_per_position=2)
    try:
        yield eng
    finally:
        eng.close()
        eng.unlink()


class TestTestFaultWords:
    """fault_flags and test_pause_ns are test hooks a segment cannot switch on."""

    @pytest.mark.parametrize("word,value", [("fault_flags", lib.ENG_FAULT_DIE_AFTER_LOCK),
                                            ("fault_flags", lib.ENG_FAULT_DIE_IN_BOOKING),
                                            ("test_pause_ns", 30_000_000_000)])
    def test_a_release_process_refuses_a_segment_with_a_fault_word_set(
            self, segment: Engine, child_env: dict[str, str], word: str, value: int) -> None:
        """A process without the fault switch refuses a segment with a fault word set."""
        off, size = _field(word)
        _poke(segment.name, off, value.to_bytes(size, "little"))
        env = {k: v for k, v in child_env.items() if k != "ENGINE_TEST_FAULTS"}
        code = (f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                "from test_header import _workload\n"
                "from engine import SegmentError\n"
                f"try:\n    print(_workload({segment.name!r}))\n"
                "except SegmentError as e:\n    print('refused', e)\n")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=CHILD_TIMEOUT)
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        assert done.stdout.startswith("refused"), done.stdout
        assert f"header word {word} = {value}" in done.stdout, done.stdout

    def test_fault_words_written_after_attach_are_not_honoured(
            self, segment: Engine, spawner: Spawner) -> None:
        """With the switch off, fault words written after attach are ignored everywhere."""
        flags = sum(getattr(lib, n) for n in dir(lib) if n.startswith("ENG_FAULT_"))
        q = spawner.ctx.Queue()
        spawner.start(_after_attach_child, segment.name, flags, q)
        assert q.get(timeout=CHILD_TIMEOUT).startswith("ok"), "the child's workload failed"
        spawner.join_all(CHILD_TIMEOUT)

    def test_set_fault_is_refused_while_the_switch_is_off(self, segment: Engine) -> None:
        """eng_set_faults refuses to set a fault word while the switch is off."""
        lib.eng_test_faults(0)
        try:
            with pytest.raises(EngineError, match="ENGINE_TEST_FAULTS=1"):
                segment._set_fault(lib.ENG_FAULT_SKIP_GEN)
            with pytest.raises(EngineError, match="ENGINE_TEST_FAULTS=1"):
                segment._set_fault(0, 1000)
            segment._set_fault(0, 0)
            assert segment._seg.hdr.fault_flags == 0 and segment._seg.hdr.test_pause_ns == 0
        finally:
            lib.eng_test_faults(1)

    @pytest.mark.parametrize("word,value", [("fault_flags", 1 << 20),
                                            ("test_pause_ns", lib.ENG_TEST_PAUSE_MAX_NS + 1)])
    def test_out_of_range_fault_words_are_refused_even_with_the_switch_on(
            self, segment: Engine, word: str, value: int) -> None:
        """An unknown fault bit or a pause past the bound raises SegmentError, switch on too."""
        assert lib.eng_test_faults(-1) == 1
        off, size = _field(word)
        _poke(segment.name, off, value.to_bytes(size, "little"))
        with pytest.raises(SegmentError, match=f"header word {word} = {value}"):
            Engine.attach(segment.name)

    def test_the_switch_on_attaches_a_segment_with_faults_set(self, segment: Engine) -> None:
        """With the switch on, a segment whose faults another test process set attaches."""
        segment._set_fault(lib.ENG_FAULT_SKIP_GEN, 1000)
        try:
            Engine.attach(segment.name).close()
        finally:
            segment._set_fault(0)


def _after_attach_child(name: str, flags: int, q: Any) -> None:
    lib.eng_test_faults(0)
    e = Engine.attach(name)   # clean at attach
    try:
        _poke(name, _field("fault_flags")[0], flags.to_bytes(4, "little"))
        _poke(name, _field("test_pause_ns")[0], (50 * 10**9).to_bytes(8, "little"))
        signal.alarm(int(CHILD_TIMEOUT))   # a honoured 50 s pause per slow step ends here
        a = e.open_account(1000, 1000, 8, 1000)
        p = e.open_position(10.0, 2.0, side=1, token=7, account=a, key="after")
        outs = [e.transition(p, t, exit_reason=1).name for t in CLOSE]
        gens = {int(e.snapshot()[0]["generation"])}
        q.put(f"ok {outs} {gens}" if outs == ["APPLIED"] * 4 else f"bad {outs}")
    finally:
        _poke(name, _field("fault_flags")[0], bytes(4))
        _poke(name, _field("test_pause_ns")[0], bytes(8))
        e.close()


class TestHeaderWords:
    """Each header word crafted: refused at attach, or the engine behaves."""

    def test_every_scalar_word_is_refused_or_harmless(self, segment: Engine,
                                                      spawner: Spawner) -> None:
        """Every corrupted scalar header word is refused naming it, or harmless; never a crash.

        Every scalar and pad word at 0, 1, 2, 3, 0x40, all ones, the top
        bit, its value + 1: SegmentError naming the word, or a workload that
        answers with engine outcomes; never a crash or a non-engine error.
        """
        results = _run_sweep(spawner, segment.name, _scalar_cases(segment.name))
        defects = [r for r in results if r[2].startswith("DEFECT")]
        assert not defects, defects
        by_word: dict[str, list[tuple[int, str]]] = {}
        for w, value, res in results:
            by_word.setdefault(w.split("[")[0], []).append(
                (int.from_bytes(bytes.fromhex(value), "little"), res))
        # words that decide where things are or what runs: every crafted value refused
        for word in ("magic", "layout_version", "segment_size", "capacity", "slot_size",
                     "fingerprint", "n_states", "n_triggers", "initial_index", "closed_mask",
                     "registry_off", "shards_off", "slots_off", "fault_flags", "test_pause_ns",
                     "rec_size", "keyrecs_off", "keyidx_off", "stripes_off", "key_buckets",
                     "tindex_buckets", "tindex_off", "accounts_off", "max_accounts"):
            for value, res in by_word[word]:
                assert res.startswith("refused"), (word, value, res)
        # the controls: only what their C setters store
        for word, ok in (("halted", lambda v: v <= 1), ("metrics_on", lambda v: v <= 1),
                         ("sample_mask", lambda v: v & (v + 1) == 0)):
            for value, res in by_word[word]:
                assert res.startswith("ok") == ok(value), (word, value, res)
                assert ok(value) or f"header word {word} = {value}" in res, (word, value, res)
        # words without meaning to attach and use: any value runs the workload
        for word in ("creator_pid", "pad0", "created_ns", "pad1", "pad2", "alloc_hint",
                     "recovering", "pad3", "pad4", "key_seed", "pad7", "account_hint",
                     "pad8", "ready"):
            for value, res in by_word[word]:
                assert res.startswith("ok APPLIED") or (word == "ready" and value == 0), (
                    word, value, res)

    def test_every_table_and_record_layout_entry_is_refused_or_harmless(
            self, segment: Engine, spawner: Spawner) -> None:
        """Every corrupted table or record-layout entry is refused as a corrupt header.

        Stray rule bits, targets or sources past the machine, a rule out of
        a closed state (booked twice), bad word types and roles: refused as
        a corrupt header naming table or rec; never a crash.
        """
        results = _run_sweep(spawner, segment.name, _layout_cases(segment))
        defects = [r for r in results if r[2].startswith("DEFECT")]
        assert not defects, defects
        for w, value, res in results:
            if w == "table":
                assert res.startswith("refused") and "header word table" in res, (w, value, res)


@pytest.fixture
def eng() -> Iterator[Engine]:
    e = Engine.create(8)
    try:
        yield e
    finally:
        e.close()
        e.unlink()


# A process that attaches, uses and closes the segment in a loop with the test
# fault switch off; a crash shows as its exit code.
_ATTACHER = r"""
import json, sys
from engine import Engine, EngineError
from engine._native import lib
lib.eng_test_faults(0)
ok = refused = 0
for _ in range(int(sys.argv[2])):
    try:
        e = Engine.attach(sys.argv[1])
    except EngineError:
        refused += 1
        continue
    try:
        p = e.open_position(10.0, 1.0)
        e.snapshot()
        e.release_position(p)
    except EngineError:
        pass
    e.close()
    ok += 1
print(json.dumps({"ok": ok, "refused": refused}))
"""


ATTACHES = 3000      # attaches while the word flips (crashed within ~100 before the fix)


FLIP_TIMEOUT = 300.0


class TestHeaderWordFlippedDuringAttach:
    """Another process flips a layout word of the header between a valid and a
    crafted value while a process attaches in a loop: each attach is refused
    or works; forbidden: a crash (the word checked, then read again)."""

    @pytest.mark.parametrize("word", ["capacity", "registry_off", "slots_off", "accounts_off",
                                      "max_accounts"])
    def test_attach_never_crashes(self, eng: Engine, word: str) -> None:
        """attach never crashes on a header that changes while it attaches.

        SIGSEGV/SIGBUS before the fix: attach validated the live header,
        then read the word again to place its views.
        """
        f = dict(ffi.typeof("eng_header").fields)[word]
        off, size = f.offset, ffi.sizeof(f.type)
        env = {k: v for k, v in os.environ.items() if k != "ENGINE_TEST_FAULTS"}
        fd = os.open(os.path.join("/dev/shm", eng.name), os.O_RDWR)
        mm = mmap.mmap(fd, 0)
        os.close(fd)
        orig = mm[off:off + size]
        bad = (int.from_bytes(orig, "little") | 1 << (8 * size - 2)).to_bytes(size, "little")
        child = subprocess.Popen([sys.executable, "-c", _ATTACHER, eng.name, str(ATTACHES)],
                                 stdout=subprocess.PIPE, text=True, env=env)
        try:
            while child.poll() is None:
                for _ in range(1000):
                    mm[off:off + size] = bad
                    mm[off:off + size] = orig
            out = child.communicate(timeout=FLIP_TIMEOUT)[0]
        finally:
            mm[off:off + size] = orig
            mm.close()
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, f"the attacher died: exit {child.returncode}"
        got = json.loads(out)
        assert got["ok"] + got["refused"] == ATTACHES, got


class TestHeaderWordWrittenAfterAttach:
    """A layout word of the header written by another process after attach:
    the attached Engine keeps the layout it checked."""

    def test_metrics_read_the_shards_where_attach_placed_them(self, eng: Engine) -> None:
        """metrics() reads the shards where attach placed them, whatever shards_off says later.

        shards_off crafted after attach: metrics() answers as before (was
        ValueError from an offset past the mapping).
        """
        eng.open_position(10.0, 1.0)
        before = eng.metrics()
        f = dict(ffi.typeof("eng_header").fields)["shards_off"]
        fd = os.open(os.path.join("/dev/shm", eng.name), os.O_RDWR)
        mm = mmap.mmap(fd, 0)
        os.close(fd)
        orig = mm[f.offset:f.offset + 8]
        try:
            mm[f.offset:f.offset + 8] = (1 << 40).to_bytes(8, "little")
            assert eng.metrics() == before
        finally:
            mm[f.offset:f.offset + 8] = orig
            mm.close()
