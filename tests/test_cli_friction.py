"""The command line as a newcomer meets it (issue 19, item 6): rm refuses what
live processes hold and rm --stale removes what nobody holds; top names
operations as the API does; inspect tells the engine's halt from accounts';
stress says what its columns mean; a closed pipe ends any command quietly."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import REPO_ROOT, segment_path
from procs import JOIN_TIMEOUT, READY_TIMEOUT, sigkill
from test_tools import attach_and_wait, run

from engine import Engine, RiskLimitError, SegmentNotFoundError
from engine._native import lib
from engine.metrics import OPS, OpMetrics
from engine.spec import POSITION_SPEC
from engine.store import shm as segment
from engine.tools.stress.config import StressResult
from engine.tools.stress.report import format_report
from engine.tools.stress.runner import _metrics_table

CTX = multiprocessing.get_context("spawn")


@pytest.fixture
def names() -> Iterator[Callable[[], str]]:
    """Random segment names; whatever exists under them is removed at teardown."""
    made: list[str] = []

    def name() -> str:
        made.append(segment.random_name())
        return made[-1]

    yield name
    for n in made:
        with contextlib.suppress(SegmentNotFoundError):
            segment.unlink(n)


@pytest.fixture
def holder() -> Iterator[Callable[[str], Any]]:
    """``hold(name)``: a spawned process attached to ``name``; killed at teardown."""
    procs: list[Any] = []

    def hold(name: str) -> Any:
        ready = CTX.Event()
        p = CTX.Process(target=attach_and_wait, args=(name, ready), daemon=True)
        p.start()
        procs.append(p)
        assert ready.wait(READY_TIMEOUT)
        return p

    yield hold
    for p in procs:
        if p.is_alive():
            sigkill(p)


def _formatted_unattached(name: str, creator_pid: int) -> None:
    """A segment formatted by ``creator_pid`` that nobody attached yet (a
    creator between format and attach)."""
    spec = POSITION_SPEC
    size = lib.eng_segment_size(4, spec.record.n_words, 2, 0)
    mm, _ = segment.create_mapped(name, size)
    from engine._native import ffi
    with ffi.from_buffer(mm) as buf:
        assert lib.eng_format(buf, size, 4, spec.table_bytes(), len(spec.states),
                              len(spec.triggers), spec.state_index[spec.initial],
                              spec.closed_mask, spec.fingerprint, creator_pid,
                              spec.record.c_layout(2), 0, 0, 0) == 0
    mm.close()


def _dead_pid() -> int:
    """The pid of a child that exited and was reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(JOIN_TIMEOUT)
    return p.pid


def _killed_temporary_creator() -> str:
    """The name of a temporary engine whose creator was SIGKILLed."""
    r = subprocess.run([sys.executable, "-c",
                        "import os, signal\nfrom engine import Engine\n"
                        "e = Engine.create(capacity=4, temporary=True)\n"
                        "print(e.name, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr
    return r.stdout.strip()


class TestRmRefusesHeld:
    """``rm NAME`` refuses a segment live processes hold, unless --force."""

    def test_refuses_naming_the_pids(self, capsys, names, holder):
        """A segment another live process holds is kept, exit 2, its pid named."""
        name = names()
        Engine.create(capacity=4, name=name).close()
        p = holder(name)
        code, out, err = run(capsys, "rm", name)
        assert code == 2 and str(p.pid) in err and "--force" in err and out == ""
        assert segment_path(name).exists()
        code, out, _ = run(capsys, "rm", "--force", name)
        assert code == 0 and f"removed {name}" in out and str(p.pid) in out
        assert not segment_path(name).exists()

    def test_refuses_in_process_holder(self, capsys, names):
        """An Engine of this very process counts as a live holder."""
        name = names()
        with Engine.create(capacity=4, name=name):
            code, _, err = run(capsys, "rm", name)
            assert code == 2 and str(os.getpid()) in err and segment_path(name).exists()

    def test_refuses_a_segment_being_created(self, capsys, names):
        """Formatted, not yet attached, by a live creator: held by the creator."""
        name = names()
        _formatted_unattached(name, os.getpid())
        code, _, err = run(capsys, "rm", name)
        assert code == 2 and str(os.getpid()) in err and segment_path(name).exists()

    def test_removes_what_nobody_holds(self, capsys, names):
        """Closed by everyone: rm removes it without --force."""
        name = names()
        Engine.create(capacity=4, name=name).close()
        code, out, _ = run(capsys, "rm", name)
        assert code == 0 and f"removed {name}" in out and not segment_path(name).exists()


class TestRmStale:
    """``rm --stale`` removes engine segments no live process holds."""

    def test_sigkilled_temporary_creator(self, capsys, names):
        """A temporary engine whose creator was SIGKILLed is removed."""
        name = _killed_temporary_creator()
        try:
            code, out, _ = run(capsys, "rm", "--stale", name)
            assert code == 0 and f"removed {name}" in out and not segment_path(name).exists()
        finally:
            with contextlib.suppress(SegmentNotFoundError):
                segment.unlink(name)

    def test_keeps_held(self, capsys, names, holder):
        """A segment a live process holds is kept, exit 0; the stale one beside it goes."""
        held, stale = names(), names()
        Engine.create(capacity=4, name=held).close()
        Engine.create(capacity=4, name=stale).close()
        p = holder(held)
        code, out, _ = run(capsys, "rm", "--stale", held, stale)
        assert code == 0 and f"kept {held}: held by live pids {p.pid}" in out
        assert segment_path(held).exists() and not segment_path(stale).exists()

    def test_holder_killed(self, capsys, names, holder):
        """Its only holder SIGKILLed, the segment is stale."""
        name = names()
        Engine.create(capacity=4, name=name).close()
        sigkill(holder(name))
        code, out, _ = run(capsys, "rm", "--stale", name)
        assert code == 0 and f"removed {name}" in out and not segment_path(name).exists()

    def test_being_created_is_kept(self, capsys, names):
        """Formatted but not attached yet by a live creator: kept; by a dead one: removed."""
        alive, dead = names(), names()
        _formatted_unattached(alive, os.getpid())
        _formatted_unattached(dead, _dead_pid())
        code, out, _ = run(capsys, "rm", "--stale", alive, dead)
        assert code == 0 and f"kept {alive}" in out and f"removed {dead}" in out
        assert segment_path(alive).exists() and not segment_path(dead).exists()

    def test_never_touches_foreign(self, capsys, names):
        """A shm object that is not an engine segment is never removed."""
        name = names()
        with open(segment_path(name), "wb") as f:
            f.write(b"\0" * 4096)
        code, _, _ = run(capsys, "rm", "--stale", name)
        assert code == 0 and segment_path(name).exists()

    def test_usage(self, capsys):
        """No NAME and no --stale: refused (2); --stale with --url: refused (2)."""
        code, _, err = run(capsys, "rm")
        assert code == 2 and "--stale" in err
        code, _, err = run(capsys, "rm", "--stale", "--url", "redis://127.0.0.1:1/0")
        assert code == 2 and "Redis" in err


def _top_rows(out: str) -> dict[str, list[str]]:
    return {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip()}


class TestTopNames:
    """``top`` names each operation by the API calls it counts."""

    def test_api_names(self, capsys, names):
        """update_token_price and update_prices show under their own names, not price_batch."""
        with Engine.create(capacity=8, name=names()) as eng:
            pos = eng.open_position(100.0, 1.0, token=7)
            for _ in range(3):
                eng.update_token_price(7, 101.0)
            eng.update_price(pos, 102.0)
            code, out, _ = run(capsys, "top", eng.name, "--once", "--interval", "0.01")
            rows = _top_rows(out)
            assert code == 0 and "price_batch" not in out
            assert rows["update_prices/update_token_price"][2] == "3"
            assert rows["update_price"][2] == "1" and "wait_for_change" in rows
            assert rows["OP"][6:8] == ["REFUSED", "ERRORS"] and "REFUSED:" in out
            eng.unlink()

    def test_api_names_on_redis(self, capsys, url):
        """The Redis top uses the same names and columns."""
        eng = Engine.create(8, url=url)
        try:
            eng.open_position(100.0, 1.0, token=7)
            eng.update_token_price(7, 101.0)
            code, out, _ = run(capsys, "top", eng.name, "--once", "--interval", "0.05",
                               "--url", url)
            rows = _top_rows(out)
            assert code == 0 and "price_batch" not in out
            assert rows["open_position/open"][2] == "1"
            assert rows["update_prices/update_token_price"][2] == "1"
            assert rows["OP"][6:8] == ["REFUSED", "ERRORS"]
        finally:
            eng.unlink()
            eng.close()


class TestInspectHalt:
    """inspect tells the engine-wide halt from accounts' halts."""

    def test_header_and_accounts_agree(self, capsys, names):
        """An account halted, the engine not: each line says which it is about."""
        with Engine.create(capacity=8, name=names()) as eng:
            acct = eng.open_account(1000, 1000, 10, 100)
            eng.halt_account(acct)
            code, out, _ = run(capsys, "inspect", eng.name)
            assert code == 0
            assert "engine halted (halt()): no" in out and "halted accounts 1" in out
            assert "halted: no" not in out and "halted 1 " not in out
            eng.halt()
            _, out, _ = run(capsys, "inspect", eng.name)
            assert "engine halted (halt()): YES" in out
            _, out, _ = run(capsys, "top", eng.name, "--once", "--interval", "0.01")
            assert "engine halted (halt()): YES" in out and "halted accounts 1" in out
            eng.unlink()


def _metrics(**ops: dict[str, int]) -> dict[str, OpMetrics]:
    zero = dict.fromkeys(("attempts", "applied", "invalid", "conflicts", "rejected", "halted",
                          "errors", "retries", "takeovers", "rolled_forward", "rolled_back",
                          "samples"), 0)
    return {op: OpMetrics(**{**zero, **ops.get(op, {})}, p50_ns=0.0, p99_ns=0.0,
                          p999_ns=0.0, max_ns=0) for op in OPS}


class TestStressColumns:
    """The stress table counts expected outcomes as such and says what columns mean."""

    def test_expected_outcomes(self):
        """Timed-out waits and INVALID transitions read as expected, not as a low success rate.

        The rates 0.000 (waits) and 0.731 (transitions) are not shown as success rates.
        """
        table = _metrics_table(_metrics(
            wait={"attempts": 100, "conflicts": 100},
            transition={"attempts": 1000, "applied": 731, "invalid": 269}), 1.0)
        res = StressResult(ops=1100, seconds=1.0, violations=0, violation_messages=[],
                           workload={}, table=table, alerts=[],
                           verification={"links": 0, "slots": 0, "applied": 0,
                                         "counters_total": 0, "engine_applied": 0,
                                         "reads_checked": 0, "torn_price_reads": 0,
                                         "torn_context_reads": 0, "version_regressions": 0},
                           config={"workers": 1, "positions": 1})
        text = format_report(res)
        header = next(ln for ln in text.splitlines() if ln.startswith("engine op"))
        assert "success" not in header and "expected" in header and "errors" in header
        wait = next(ln for ln in text.splitlines() if ln.startswith("wait ")).split()
        assert wait[2:5] == ["0.000", "1.000", "0"]
        tr = next(ln for ln in text.splitlines() if ln.startswith("transition ")).split()
        assert tr[2:5] == ["0.731", "0.269", "0"]
        assert "wait timed out" in text and "INVALID" in text


#: (argparse's own --help already ignores a write error: not listed)
_PIPE_COMMANDS = (
    ["-m", "engine", "ls"], ["-m", "engine", "ls", "--json"],
    ["-m", "engine", "inspect", "{name}"], ["-m", "engine", "inspect", "{name}", "--json"],
    ["-m", "engine", "top", "{name}", "--once", "--interval", "0.01"],
    ["-m", "engine.tools.segments", "ls", "--json"],
)


class TestBrokenPipe:
    """A reader that went away (``| head``) ends a command without a traceback."""

    @pytest.mark.parametrize("argv", _PIPE_COMMANDS,
                             ids=[" ".join(a[1:]) for a in _PIPE_COMMANDS])
    def test_no_traceback(self, argv, names):
        """stdout a pipe whose reader is gone: nothing on stderr, exit code 1."""
        with Engine.create(capacity=4, name=names()) as eng:
            r, w = os.pipe()
            os.close(r)   # every write gets EPIPE, whenever it comes
            try:
                p = subprocess.run([sys.executable, *(a.format(name=eng.name) for a in argv)],
                                   stdout=w, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                                   timeout=120, check=False)
            finally:
                os.close(w)
            eng.unlink()
        assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr
        assert p.returncode == 1, p.stderr
class TestRiskRefusalCounted:
    """A risk-limit refusal is a refusal in metrics() and top, not an error."""

    def test_open_refused_by_limit(self, capsys, names):
        """An opening over max_positions counts as rejected; errors stay 0."""
        with Engine.create(capacity=8, name=names()) as eng:
            acct = eng.open_account(1_000_000, 1_000_000, 1, 1_000_000)
            eng.open_position(100.0, 1.0, account=acct)
            with pytest.raises(RiskLimitError):
                eng.open_position(100.0, 1.0, account=acct)
            m = eng.metrics()["open"]
            assert (m.attempts, m.applied, m.rejected, m.errors) == (2, 1, 1, 0)
            _, out, _ = run(capsys, "top", eng.name, "--once", "--interval", "0.01")
            row = _top_rows(out)["open_position/open"]
            assert row[6:8] == ["1", "0"]
            eng.unlink()

    def test_withdraw_refused_by_cash(self, names):
        """A withdrawal below what is reserved counts as rejected, not as an error."""
        with Engine.create(capacity=8, name=names()) as eng:
            acct = eng.open_account(1000, 1000, 10, 1000)
            eng.open_position(100.0, 5.0, account=acct)
            with pytest.raises(RiskLimitError):
                eng.withdraw(acct, 600)
            m = eng.metrics()["account"]
            assert m.rejected == 1 and m.errors == 0
            eng.unlink()

    def test_refusal_on_redis(self, url):
        """On Redis too: an opening over max_positions counts as rejected, not as an error."""
        eng = Engine.create(8, url=url)
        try:
            acct = eng.open_account(1_000_000, 1_000_000, 1, 1_000_000)
            eng.open_position(100.0, 1.0, account=acct)
            with pytest.raises(RiskLimitError):
                eng.open_position(100.0, 1.0, account=acct)
            m = eng.metrics()["open"]
            assert (m.applied, m.rejected, m.errors) == (1, 1, 0)
        finally:
            eng.unlink()
            eng.close()
