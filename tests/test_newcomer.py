"""What a newcomer trips on (issue 19, item 6): temporary engines, printable
enums, ``Side``, and types a user's type checker can see."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import create_args, segment_path

import engine
from engine import (
    ORDER_SPEC,
    Engine,
    EngineTypeError,
    ExitReason,
    Outcome,
    SegmentNotFoundError,
    Side,
    State,
    Trigger,
)
from engine.store import shm as seg

BACKENDS = ("shm", "redis")


def _gone(eng_name: str, backend: str, handle: engine.Handle) -> bool:
    """True if the engine no longer exists (no segment file; no Redis keys)."""
    if backend == "shm":
        return not segment_path(eng_name).exists()
    try:
        Engine.attach(handle).close()
    except SegmentNotFoundError:
        return True
    return False


def _run(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, check=False)


class TestTemporary:
    """``Engine.create(..., temporary=True)``: removed when its creator closes."""

    def test_removed_on_close(self, backend):
        """close() of the creator removes the engine; a plain create's close does not."""
        eng = Engine.create(capacity=4, temporary=True, **create_args(backend))
        h = eng.handle
        eng.open_position(100.0, 1.0)
        eng.close()
        assert _gone(eng.name, backend, h)
        keep = Engine.create(capacity=4, **create_args(backend))
        keep.close()
        try:
            assert not _gone(keep.name, backend, keep.handle)
        finally:
            with Engine.attach(keep.handle) as again:
                again.unlink()

    def test_with_block(self, backend):
        """``with Engine.create(temporary=True)`` leaves nothing behind."""
        with Engine.create(capacity=4, temporary=True, **create_args(backend)) as eng:
            pos = eng.open_position(100.0, 1.0)
            assert eng.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
        assert _gone(eng.name, backend, eng.handle)

    @pytest.mark.shm_only
    def test_attached_keep_working(self, spawner):
        """A worker attached by handle keeps working after the creator closed; only the name goes.

        The segment follows POSIX unlink semantics.
        """
        eng = Engine.create(capacity=4, temporary=True)
        pos = eng.open_position(100.0, 1.0)
        worker = Engine.attach(eng.handle)
        try:
            eng.close()
            assert not segment_path(eng.name).exists()
            assert worker.transition(pos, Trigger.POSITION_OPENED) is Outcome.APPLIED
            worker.update_price(pos, 101.0)
            assert worker.state(pos) is State.MONITORING and worker.price(pos).price == 101.0
            with pytest.raises(SegmentNotFoundError):
                Engine.attach(eng.name)
        finally:
            worker.close()

    @pytest.mark.shm_only
    def test_creator_exit_without_close(self):
        """A creator process that exits normally without closing removes it."""
        r = _run("""
            from engine import Engine
            eng = Engine.create(capacity=4, temporary=True)
            print(eng.name, flush=True)
        """)
        assert r.returncode == 0, r.stderr
        assert not segment_path(r.stdout.strip()).exists()

    @pytest.mark.shm_only
    def test_garbage_collected(self):
        """An unreferenced temporary Engine removes its segment when collected."""
        eng = Engine.create(capacity=4, temporary=True)
        name = eng.name
        del eng
        assert not segment_path(name).exists()

    @pytest.mark.shm_only
    def test_fork_child_exit_keeps_it(self):
        """A fork child exiting normally never removes its parent's temporary segment.

        Only the creating process removes it.
        """
        r = _run("""
            import os, sys
            from engine import Engine
            eng = Engine.create(capacity=4, temporary=True)
            pid = os.fork()
            if pid == 0:
                sys.exit(0)          # a normal exit: finalizers run in the child
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            print(os.path.exists("/dev/shm/" + eng.name), flush=True)
            eng.close()
            print(os.path.exists("/dev/shm/" + eng.name), flush=True)
        """)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["True", "False"]

    @pytest.mark.shm_only
    def test_sigkilled_creator_leaves_it(self):
        """A temporary segment whose creator is SIGKILLed stays (``rm --stale`` removes it).

        See test_cli_friction for ``rm --stale``.
        """
        r = _run("""
            import os, signal
            from engine import Engine
            eng = Engine.create(capacity=4, temporary=True)
            print(eng.name, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        name = r.stdout.strip()
        try:
            assert r.returncode == -9 and segment_path(name).exists()
        finally:
            with contextlib.suppress(SegmentNotFoundError):
                seg.unlink(name)

    @pytest.mark.shm_only
    def test_never_removes_a_new_segment_of_the_name(self):
        """A temporary creator's close leaves alone a new segment made under its name.

        The segment was removed by someone else and created again under the name.
        """
        eng = Engine.create(capacity=4, temporary=True)
        seg.unlink(eng.name)
        other = Engine.create(capacity=4, name=eng.name)
        try:
            eng.close()
            assert segment_path(other.name).exists()
            other.open_position(100.0, 1.0)
        finally:
            other.close()
            other.unlink()

    @pytest.mark.shm_only
    def test_unlink_then_close(self):
        """A new engine of the name survives a temporary engine's unlink() then close()."""
        eng = Engine.create(capacity=4, temporary=True)
        eng.unlink()
        other = Engine.create(capacity=4, name=eng.name)
        try:
            eng.close()
            assert segment_path(other.name).exists()
        finally:
            other.close()
            other.unlink()

    def test_redis_attached_see_it_gone(self, url):
        """On Redis an Engine attached elsewhere gets SegmentNotFoundError after the close.

        The creator's close deletes the keys; the attached Engine changes nothing.
        """
        eng = Engine.create(capacity=4, temporary=True, url=url)
        pos = eng.open_position(100.0, 1.0)
        worker = Engine.attach(eng.handle)
        try:
            eng.close()
            with pytest.raises(SegmentNotFoundError):
                worker.transition(pos, Trigger.POSITION_OPENED)
        finally:
            worker.close()

    def test_bad_value(self, backend):
        """temporary must be a bool: anything else is refused, nothing created."""
        before = set(os.listdir("/dev/shm"))
        with pytest.raises(EngineTypeError, match="temporary must be a bool"):
            Engine.create(capacity=4, temporary="yes", **create_args(backend))  # type: ignore[call-overload]
        assert set(os.listdir("/dev/shm")) == before


class TestPrinting:
    """``str()`` of every public IntEnum is its name (Python 3.11 gave the number)."""

    def test_str_is_the_name(self):
        """print(State.EXIT_PENDING) shows EXIT_PENDING, Outcome.APPLIED shows APPLIED."""
        for member in (*State, *Trigger, *Outcome, *Side, *ExitReason):
            assert str(member) == member.name and f"{member}" == member.name

    def test_custom_spec_enums(self):
        """A custom spec's State and Trigger print their names too."""
        assert str(ORDER_SPEC.State(1)) == "INITIALIZED"
        assert f"{ORDER_SPEC.Trigger(0)}" == "SUBMIT"

    def test_numbers_unchanged(self):
        """repr, int and formatting with a spec still give the number."""
        assert repr(State.EXIT_PENDING) == "<State.EXIT_PENDING: 4>"
        assert f"{State.ERROR:#x}" == "0x20" and int(Outcome.APPLIED) == 0
        assert f"{Side.SELL:d}" == "-1"

    def test_states_print_from_the_engine(self, engine):
        """What state() and transition() return prints as names."""
        pos = engine.open_position(100.0, 1.0)
        assert str(engine.transition(pos, "POSITION_OPENED")) == "APPLIED"
        assert str(engine.state(pos)) == "MONITORING"


class TestSide:
    """``Side.BUY`` / ``Side.SELL`` name the sides; the ints still work."""

    def test_values(self):
        """BUY is 1, SELL is -1, exported from engine."""
        assert engine.Side is Side and Side.BUY == 1 and Side.SELL == -1

    def test_open_with_side(self, engine):
        """A SELL position's PnL is mirrored; 1 and -1 still accepted."""
        short = engine.open_position(100.0, 2.0, side=Side.SELL)
        long_ = engine.open_position(100.0, 2.0, side=1)
        also_short = engine.open_position(100.0, 2.0, side=-1)
        for pos in (short, long_, also_short):
            engine.update_price(pos, 90.0)
        assert engine.context(short).side == -1 and engine.price(short).pnl_usd == 20.0
        assert engine.price(long_).pnl_usd == -20.0
        assert engine.price(also_short).pnl_usd == 20.0


_USER_SCRIPT = """
    from engine import Engine, Side, State, Trigger

    def desk() -> None:
        with Engine.create(capacity=4, temporary=True) as eng:
            pos = eng.open_position(entry_price=100.0, amount=2.0, side=Side.SELL)
            eng.transition(pos, Trigger.POSITION_OPENED)
            eng.transition(pos, "EXIT_CONDITION_MET")
            eng.transition(pos, 2)
            reveal_type(eng.state(pos))
            reveal_type(eng.context(pos).entry_price)
            reveal_type(eng.wait_for_change(pos, timeout=0.0))
            worker = Engine.attach(eng.handle)
            reveal_type(worker.state(pos))
            eng.transition(pos, "EXIT_CONDITON_MET")  # misspelled
            state: State = eng.state(pos)
            print(state)
"""


@pytest.fixture(scope="module")
def mypy_out(tmp_path_factory):
    """mypy --strict's output on _USER_SCRIPT, run in a directory outside the repo."""
    d = tmp_path_factory.mktemp("user")
    (d / "desk.py").write_text(textwrap.dedent(_USER_SCRIPT))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                        "desk.py"], cwd=d, capture_output=True, text=True, timeout=300,
                       check=False, env=env)
    return r.stdout + r.stderr


class TestTypes:
    """A user's script outside the repo, checked by mypy --strict."""

    def test_package_found(self, mypy_out):
        """The installed package is visible: no import-not-found for engine."""
        assert "import-not-found" not in mypy_out and "import-untyped" not in mypy_out, mypy_out

    def test_state_context_wait_typed(self, mypy_out):
        """state(), context() and wait_for_change() have the default spec's types, not Any.

        An attached Engine has them too.
        """
        revealed = [ln.split("Revealed type is ")[1] for ln in mypy_out.splitlines()
                    if "Revealed type is" in ln]
        assert revealed == ['"engine.spec.State"', '"float"', '"engine.spec.State"',
                            '"engine.spec.State"'], mypy_out

    def test_misspelled_trigger_is_an_error(self, mypy_out):
        """A misspelled trigger is a type error; right names, ints and Trigger members are not."""
        errors = [ln for ln in mypy_out.splitlines() if ": error:" in ln]
        assert len(errors) == 1 and "EXIT_CONDITON_MET" in errors[0], mypy_out
