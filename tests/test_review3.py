"""Breaks found by the adversarial review of the issue 18 fixes (a close
interrupted after its gate is shut, ...).  Each test failed on the merged
fixes first."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import pytest

import engine.core as core
from engine import Engine, EngineError, EngineTypeError
from engine._native import ffi

pytestmark = pytest.mark.skipif(core._fastpath is None, reason="the C fast path is not built")


class Interrupt(BaseException):
    """Stands for what a signal handler raises (KeyboardInterrupt & co.)."""


class _FastpathRaisingOnUnbind:
    """engine.core._fastpath whose bind(eng, 0, None) -- the step of close()
    right after the gate is shut -- raises, as a signal handler would there."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def bind(self, eng: Any, addr: int, seg: Any) -> Any:
        if addr == 0:
            raise Interrupt("signal handler during close()")
        return self.real.bind(eng, addr, seg)


class _LibRaisingOnDetach:
    """The engine's C library whose eng_detach raises before detaching."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def eng_detach(self, seg: Any) -> None:
        raise Interrupt("signal handler during close()")


@pytest.fixture
def eng() -> Iterator[Engine]:
    e = Engine.create(8)
    try:
        yield e
    finally:
        e.close()
        e.unlink()


def _usable(e: Engine, pos: int) -> None:
    """Every kind of call answers: a GIL-keeping one, a gated one, the fast path."""
    e.update_price(pos, 11.0)
    assert e.update_prices([pos], [12.0]) == 1
    assert len(e.snapshot()) == 1
    e.recover()
    assert e.price(pos).price == 12.0


class TestCloseInterrupted:
    """close() interrupted (a signal handler's exception) between shutting the
    close gate and detaching: nothing is closed, and nothing is half-closed."""

    def test_interrupted_after_the_gate_shut_leaves_the_engine_usable(
            self, eng: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        """Forbidden: an Engine that says it is open while its gated calls
        (update_prices, snapshot, recover) raise ClosedError for good."""
        pos = eng.open_position(10.0, 1.0)
        monkeypatch.setattr(core, "_fastpath", _FastpathRaisingOnUnbind(core._fastpath))
        with pytest.raises(Interrupt):
            eng.close()
        monkeypatch.undo()
        assert not eng.closed
        _usable(eng, pos)

    def test_interrupted_just_before_detach_leaves_the_engine_usable(
            self, eng: Engine) -> None:
        """The same with the exception at the detach call itself: gated calls
        and the fast path work, a second close() closes."""
        pos = eng.open_position(10.0, 1.0)
        real = eng._lib
        eng._lib = _LibRaisingOnDetach(real)
        with pytest.raises(Interrupt):
            eng.close()
        eng._lib = real
        assert not eng.closed
        _usable(eng, pos)
        eng.close()
        assert eng.closed


class TestMoneyOfAnyType:
    """Money conversion of a value of a type it refuses: a typed error whatever
    the value, never an error raised while writing the message."""

    @pytest.mark.parametrize("call", [
        lambda e, a, v: e.deposit(a, v),
        lambda e, a, v: e.withdraw(a, v),
        lambda e, a, v: e.open_account(v, 1000, 8, 1000),
    ], ids=["deposit", "withdraw", "open_account"])
    def test_a_fraction_too_long_to_print_is_a_type_error(
            self, eng: Engine, call: Callable[[Engine, int, Any], Any]) -> None:
        """A Fraction whose numerator has more digits than int->str allows:
        EngineTypeError naming its type (was ValueError from its repr)."""
        a = eng.open_account(1000, 1000, 8, 1000)
        before = eng.account(a)
        with pytest.raises(EngineTypeError, match="Fraction"):
            call(eng, a, Fraction(10**5000, 3))
        assert eng.account(a) == before


_HUGE = 10**5000   # more digits than int->str allows (sys.get_int_max_str_digits())


class TestHugeIntArguments:
    """An int argument too long to print: the typed error of its range, never a
    ValueError raised while writing that error's message."""

    @pytest.mark.parametrize("call", [
        lambda e, p, v: e.price(v),
        lambda e, p, v: e.transition(v, 0),
        lambda e, p, v: e.update_price(p, v),
        lambda e, p, v: e.open_position(10.0, 1.0, token=v),
        lambda e, p, v: e.account(v),
        lambda e, p, v: e.wait_for_change(p, v),
        lambda e, p, v: Engine.create(v),
    ], ids=["price", "transition", "update_price", "open_token", "account", "wait_timeout",
            "create"])
    def test_an_int_too_long_to_print_is_a_range_error(
            self, eng: Engine, call: Callable[[Engine, int, int], Any]) -> None:
        """10**5000 as an id, a price, a field, an account, a timeout, a capacity:
        an EngineError, nothing changed (was ValueError from the message)."""
        p = eng.open_position(10.0, 1.0)
        before = eng.snapshot().tobytes()
        with pytest.raises(EngineError):
            call(eng, p, _HUGE)
        assert eng.snapshot().tobytes() == before


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
        """SIGSEGV/SIGBUS before the fix: attach validated the live header,
        then read the word again to place its views."""
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
        """shards_off crafted after attach: metrics() answers as before (was
        ValueError from an offset past the mapping)."""
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
