"""The segment tools: ls, inspect, rm, top (``engine.tools.segments``); and
the bench's scaling sweep and one-worker breakdown (``engine.tools.bench``).

They are driven through their own argparse wiring (``add_parsers``), the way
``python -m engine`` drives them, and once end to end through a subprocess.
The bench tests check plans, counts, arithmetic and outputs, never timings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import posix_ipc
import pytest

from engine import Engine, MachineSpec, Rule, State, Trigger
from engine._native import ffi, lib
from engine.errors import BusyError
from engine.spec import POSITION_SPEC
from engine.store import shm as segment
from engine.tools import bench, segments
from engine.tools.bench import floor, report, runner, scaling
from engine.tools.bench.peers import C_BATCH, CONNECT, N_SLOTS, EngineHost, Ops
from engine.tools.bench.runner import SCALING_WORKLOADS, Case, Plan, Probe, Results

CTX = mp.get_context("spawn")
JOIN_TIMEOUT = 30.0


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Parse ``argv`` with the tools' parsers, run it; (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="engine")
    segments.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


def attach_and_wait(name: str, ready: Any) -> None:
    """Attach, say so, then wait to be killed."""
    eng = Engine.attach(name)
    ready.set()
    signal.pause()
    eng.close()


def hold_and_wait(name: str, what: int, pos: int, ready: Any) -> None:
    """Attach, take a lock through the C test helper (1 price latch, 2
    transition lock, 3 recovery flag), say so, then wait to be killed."""
    eng = Engine.attach(name)
    rc = lib.eng_test_hold(eng._seg, what, pos)
    assert rc == 0, rc
    ready.set()
    signal.pause()
    eng.close()


@pytest.fixture
def eng(names: Callable[[], str]) -> Iterator[Engine]:
    """An engine with positions in a few states."""
    e = Engine.create(capacity=32, name=names())
    try:
        for i in range(6):
            s = e.open_position(100.0, 1.0)
            if i >= 2:
                e.transition(s, Trigger.POSITION_OPENED)
            if i >= 4:
                e.transition(s, Trigger.EXIT_CONDITION_MET, exit_reason=2)
        yield e
    finally:
        e.close()


@pytest.fixture
def foreign(names: Callable[[], str]) -> str:
    """A plain shm segment of random bytes (not an engine segment)."""
    name = names()
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=8192)
    try:
        with mmap.mmap(shm.fd, 8192) as mm:
            mm[:] = os.urandom(8192)
    finally:
        shm.close_fd()
    return name


@pytest.fixture
def dead_holder(eng: Engine) -> Iterator[Callable[[int, int], int]]:
    """``kill(what, pos)``: a process that attached, took the transition lock
    (what=2), price latch (1) or recovery flag (3) and was SIGKILLed; its pid."""
    procs: list[Any] = []

    def kill(what: int, pos: int) -> int:
        ready = CTX.Event()
        p = CTX.Process(target=hold_and_wait, args=(eng.name, what, pos, ready), daemon=True)
        p.start()
        procs.append(p)
        assert ready.wait(JOIN_TIMEOUT)
        os.kill(p.pid, signal.SIGKILL)
        p.join(JOIN_TIMEOUT)
        return int(p.pid)

    yield kill
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(JOIN_TIMEOUT)


@pytest.fixture
def dead_attached(eng: Engine) -> Iterator[int]:
    """The pid of a process that attached to ``eng`` and was SIGKILLed."""
    ready = CTX.Event()
    p = CTX.Process(target=attach_and_wait, args=(eng.name, ready), daemon=True)
    p.start()
    try:
        assert ready.wait(JOIN_TIMEOUT)
        os.kill(p.pid, signal.SIGKILL)
        p.join(JOIN_TIMEOUT)
        yield p.pid
    finally:
        if p.is_alive():
            p.kill()
        p.join(JOIN_TIMEOUT)


class TestLs:
    """``ls`` lists engine segments and nothing else."""

    def test_lists_segment_with_details(self, capsys, eng):
        """The segment appears with its creator, capacity and attached pid."""
        code, out, _ = run(capsys, "ls")
        assert code == 0
        line = next(ln for ln in out.splitlines() if ln.startswith(eng.name))
        assert str(os.getpid()) in line and " 32 " in line and "ok" in line

    def test_json(self, capsys, eng):
        """--json gives creator pid, processes (alive or dead), capacity, age, size."""
        code, out, _ = run(capsys, "ls", "--json")
        assert code == 0
        row = next(r for r in json.loads(out) if r["name"] == eng.name)
        assert row["header"]["creator_pid"] == os.getpid()
        assert row["header"]["capacity"] == 32
        assert row["size"] == lib.eng_segment_size_journal(32, POSITION_SPEC.record.n_words, 2, 64,
                                                           lib.ENG_JOURNAL_DEFAULT_RECORDS)
        assert 0 <= row["age_s"] < 600 and row["ok"]
        assert [(p["pid"], p["alive"]) for p in row["procs"]] == [(os.getpid(), True)]

    def test_dead_process_is_shown_dead(self, capsys, eng, dead_attached):
        """A SIGKILLed attached process is listed as dead until recover()."""
        _, out, _ = run(capsys, "ls", "--json")
        row = next(r for r in json.loads(out) if r["name"] == eng.name)
        assert {p["pid"]: p["alive"] for p in row["procs"]} == {os.getpid(): True,
                                                                dead_attached: False}
        _, text, _ = run(capsys, "ls")
        assert f"{dead_attached}(dead)" in text
        assert eng.recover().removed_pids == (dead_attached,)

    def test_skips_foreign_segments(self, capsys, eng, foreign):
        """A non-engine segment is skipped silently."""
        code, out, err = run(capsys, "ls", "--json")
        names = {r["name"] for r in json.loads(out)}
        assert code == 0 and eng.name in names and foreign not in names
        assert foreign not in err

    def test_shows_damaged_engine_segment(self, capsys, names):
        """An engine segment truncated under its header sizes is listed with its problem."""
        name = names()
        Engine.create(capacity=32, name=name).close()   # detached: truncating is safe
        size = lib.eng_segment_size(32, POSITION_SPEC.record.n_words, 2, 64)
        os.truncate(os.path.join(segment.SHM_DIR, name), size // 2)
        code, out, _ = run(capsys, "ls", "--json")
        row = next(r for r in json.loads(out) if r["name"] == name)
        assert code == 0 and not row["ok"] and "truncated" in row["problem"]

    def test_unreadable_entries_are_reported_not_fatal(self, capsys, monkeypatch, eng):
        """An entry that cannot be opened (permission) is named on stderr; ls goes on."""
        real_open = os.open

        def deny(path: str, *a: Any, **kw: Any) -> int:
            if path.endswith(eng.name):
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *a, **kw)

        monkeypatch.setattr(os, "open", deny)
        code, out, err = run(capsys, "ls")
        assert code == 0 and eng.name not in out and eng.name in err


class TestInspect:
    """``inspect`` reads a segment raw: header, states, registry."""

    def test_header_states_registry(self, capsys, eng):
        """Prints the header fields, per-state counts and the registry."""
        code, out, _ = run(capsys, "inspect", eng.name)
        assert code == 0
        assert f"layout_version  {lib.ENG_LAYOUT_VERSION}" in out
        assert "capacity        32" in out and "default position lifecycle" in out
        counts = dict(ln.split() for ln in out.split("states:\n")[1].split("registry (")[0]
                      .strip().splitlines())
        assert counts["CREATED"] == "2" and counts["MONITORING"] == "2"
        assert counts["EXIT_PENDING"] == "2" and counts["free"] == "26"
        assert str(os.getpid()) in out.split("registry (")[1]

    def test_counts_match_snapshot(self, capsys, eng):
        """--json state counts agree with Engine.snapshot()."""
        code, out, _ = run(capsys, "inspect", eng.name, "--json")
        doc = json.loads(out)
        snap = eng.snapshot()
        for st in State:
            assert doc["states"][st.name] == int((snap["state"] == st).sum())
        assert doc["header"]["n_states"] == len(State) and code == 0

    def test_does_not_attach(self, capsys, eng):
        """Inspecting takes no registry entry and changes no byte of the segment."""
        path = os.path.join(segment.SHM_DIR, eng.name)
        with open(path, "rb") as f:
            before = f.read()
        assert run(capsys, "inspect", eng.name)[0] == 0
        with open(path, "rb") as f:
            assert f.read() == before

    def test_custom_spec(self, capsys, names):
        """A segment of another machine spec is inspected too (states by index)."""
        spec = MachineSpec(states=["IDLE", "BUSY"], triggers=["GO"],
                           rules=[Rule.of("GO", "IDLE", "BUSY")], initial="IDLE", name="c")
        with Engine.create(capacity=4, name=names(), spec=spec) as e:
            e.transition(e.open_position(1.0, 1.0), "GO")
            code, out, _ = run(capsys, "inspect", e.name, "--json")
        doc = json.loads(out)
        assert code == 0 and doc["states"]["S0"] == 0 and doc["states"]["S1"] == 1
        assert doc["header"]["fingerprint"] == spec.fingerprint

    def test_refuses_foreign(self, capsys, foreign):
        """A non-engine segment: a clear message and exit code 2."""
        code, out, err = run(capsys, "inspect", foreign)
        assert code == 2 and "not an engine segment" in err and out == ""

    def test_refuses_empty(self, capsys, names):
        """A 0-byte segment: refused with exit code 2."""
        name = names()
        posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600).close_fd()
        code, _, err = run(capsys, "inspect", name)
        assert code == 2 and "not an engine segment" in err

    def test_nonexistent(self, capsys, names):
        """No such segment: exit code 1 and a message."""
        code, _, err = run(capsys, "inspect", names())
        assert code == 1 and "no segment" in err

    def test_damaged_shows_header_and_problem(self, capsys, eng):
        """An engine segment of another layout version: header shown, problem named, exit 1."""
        with contextlib.closing(segment.open_existing(eng.name)) as mm:
            off = ffi.offsetof("eng_header", "layout_version")
            mm[off:off + 4] = (lib.ENG_LAYOUT_VERSION + 1).to_bytes(4, "little")
        code, out, _ = run(capsys, "inspect", eng.name)
        assert code == 1 and "another layout version" in out
        assert f"layout_version  {lib.ENG_LAYOUT_VERSION + 1}" in out and "registry (" not in out

    def test_dead_entries(self, capsys, eng, dead_attached):
        """A SIGKILLed attached process shows as DEAD in the registry."""
        code, out, _ = run(capsys, "inspect", eng.name)
        line = next(ln for ln in out.splitlines() if f" {dead_attached} " in ln)
        assert code == 0 and "DEAD" in line and "1 dead entries" in out

    def test_registry_shows_tokens(self, capsys, eng):
        """Each registry entry shows the fencing token its Engine locks with."""
        code, out, _ = run(capsys, "inspect", eng.name, "--json")
        [me] = json.loads(out)["procs"]
        assert code == 0 and me["pid"] == os.getpid() and me["token"] == eng._seg.token
        assert me["token"] & lib.ENG_TOKEN_ENTRY_MASK == me["index"]

    def test_held_locks_resolve_tokens_to_pids(self, capsys, eng, dead_holder):
        """inspect and top name a lock's holder by pid (and say when it is dead)."""
        lock_pos, latch_pos = eng.id_of(2), eng.id_of(3)
        locker = dead_holder(2, lock_pos)
        latcher = dead_holder(1, latch_pos)
        code, out, _ = run(capsys, "inspect", eng.name, "--json")
        held = {(h["slot"], h["what"]): h for h in json.loads(out)["held"]}
        assert code == 0 and set(held) == {(2, "lock"), (3, "latch")}
        assert (held[2, "lock"]["pid"], held[2, "lock"]["alive"]) == (locker, False)
        assert (held[3, "latch"]["pid"], held[3, "latch"]["alive"]) == (latcher, False)
        _, text, _ = run(capsys, "inspect", eng.name)
        rows = text.split("held (")[1].splitlines()[1:]
        assert any(r.split()[:2] == ["2", "lock"] and f"{locker} DEAD" in r for r in rows)
        assert any(r.split()[:2] == ["3", "latch"] and f"{latcher} DEAD" in r for r in rows)
        _, frame, _ = run(capsys, "top", eng.name, "--once", "--interval", "0.01")
        assert f"slot 2 lock pid {locker} (dead)" in frame
        assert f"slot 3 latch pid {latcher} (dead)" in frame
        report = eng.recover()
        assert sorted(report.removed_pids) == sorted([locker, latcher])
        _, out, _ = run(capsys, "inspect", eng.name, "--json")
        assert json.loads(out)["held"] == []

    def test_recovery_flag_holder(self, capsys, eng, dead_holder):
        """The header's recovering field is a token: inspect shows its holder's pid."""
        pid = dead_holder(3, 0)
        code, out, _ = run(capsys, "inspect", eng.name)
        line = next(ln for ln in out.splitlines() if ln.strip().startswith("recovering"))
        assert code == 0 and f"pid {pid} (dead)" in line
        code, out, _ = run(capsys, "inspect", eng.name, "--json")
        assert json.loads(out)["recovering"]["pid"] == pid
        assert pid in eng.recover().removed_pids


class TestRm:
    """``rm`` unlinks engine segments, and others only with --force."""

    def test_removes(self, capsys, eng):
        """rm --force removes a segment this process holds; attached processes keep working."""
        pos = eng.id_of(0)
        code, out, _ = run(capsys, "rm", "--force", eng.name)
        assert code == 0 and f"removed {eng.name}" in out and "1 live" in out
        assert not os.path.exists(os.path.join(segment.SHM_DIR, eng.name))
        assert eng.state(pos) is State.CREATED

    def test_refuses_foreign_without_force(self, capsys, foreign):
        """A non-engine segment is kept, exit code 2; --force removes it."""
        code, _, err = run(capsys, "rm", foreign)
        assert code == 2 and "not an engine segment" in err
        assert os.path.exists(os.path.join(segment.SHM_DIR, foreign))
        assert run(capsys, "rm", "--force", foreign)[0] == 0
        assert not os.path.exists(os.path.join(segment.SHM_DIR, foreign))

    def test_several_and_missing(self, capsys, names):
        """Several names: the existing are removed, a missing one gives exit code 1."""
        a, b, missing = names(), names(), names()
        for n in (a, b):
            Engine.create(capacity=1, name=n).close()
        code, _, err = run(capsys, "rm", a, missing, b)
        assert code == 1 and missing in err
        assert not any(os.path.exists(os.path.join(segment.SHM_DIR, n)) for n in (a, b))

    def test_bad_name(self, capsys):
        """A name that cannot be a segment is refused (exit code 2), nothing removed."""
        code, _, err = run(capsys, "rm", "../etc/passwd")
        assert code == 2 and "segment name" in err


class TestTop:
    """``top`` shows states, per-operation metrics and rates."""

    def test_once(self, capsys, eng):
        """--once prints one frame: states, every operation's counters, ops/s."""
        pos = eng.id_of(0)
        for _ in range(50):
            eng.update_price(pos, 101.0)
        code, out, _ = run(capsys, "top", eng.name, "--once", "--interval", "0.05")
        assert code == 0 and eng.name in out
        assert "CREATED 2" in out and "EXIT_PENDING 2" in out
        rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip()}
        for op in ("transition", "transition(fields/guard)", "open_position/open",
                   "update_price", "recover"):
            assert op in rows
        assert rows["update_price"][2] == "50" and rows["open_position/open"][2] == "6"
        assert rows["OP"][:3] == ["OP", "OPS/S", "ATTEMPTS"]

    def test_refuses_foreign(self, capsys, foreign):
        """A non-engine segment is refused with exit code 2."""
        code, _, err = run(capsys, "top", foreign, "--once", "--interval", "0.01")
        assert code == 2 and "not an engine segment" in err

    def test_bad_interval(self, capsys, eng):
        """A non-positive interval is refused."""
        assert run(capsys, "top", eng.name, "--once", "--interval", "0")[0] == 2


class TestCommandLine:
    """The tools as a program."""

    def test_subprocess_end_to_end(self, eng):
        """``python -m engine.tools.segments`` ls / inspect / top --once / rm in a fresh process."""
        base = [sys.executable, "-m", "engine.tools.segments"]

        def call(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(base + list(argv), capture_output=True, text=True,
                                  timeout=60, check=False)

        assert eng.name in call("ls").stdout
        assert "registry" in call("inspect", eng.name).stdout
        assert "transition" in call("top", eng.name, "--once", "--interval", "0.01").stdout
        r = call("rm", "--force", eng.name)
        assert r.returncode == 0 and eng.name not in call("ls").stdout

    def test_parsers_have_funcs(self):
        """add_parsers adds ls, inspect, rm and top, each with a func."""
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers(dest="command", required=True)
        segments.add_parsers(sub)
        for argv in (["ls"], ["inspect", "x"], ["rm", "x"], ["top", "x"]):
            assert callable(parser.parse_args(argv).func)


class TestOnRedis:
    """ls / inspect / top / rm --url: the engines on a Redis server, read raw."""

    @pytest.fixture
    def on_redis(self) -> Iterator[Engine]:
        from conftest import redis_url
        e = Engine.create(32, url=redis_url(), shards=3)
        try:
            yield e
        finally:
            e.close()
            with contextlib.suppress(Exception), Engine.attach(e.handle) as again:
                again.unlink()

    def test_ls_lists_the_engine(self, capsys, on_redis):
        """ls --url shows the engine with its shards, capacity and open count."""
        for _ in range(4):
            on_redis.open_position(100.0, 1.0)
        code, out, _ = run(capsys, "ls", "--url", on_redis.url)
        assert code == 0
        row = next(r for r in out.splitlines() if r.startswith(on_redis.name))
        assert row.split()[1:4] == ["3", "32", "4"]
        code, out, _ = run(capsys, "ls", "--json", "--url", on_redis.url)
        got = next(d for d in json.loads(out) if d["name"] == on_redis.name)
        assert got["capacity"] == 32 and got["halted_shards"] == []

    def test_inspect_counts_match_snapshot_and_shows_a_partial_halt(self, capsys, on_redis):
        """inspect --url counts states as the snapshot does and names a partial halt's shard."""
        import redis
        ids = [on_redis.open_position(100.0, 1.0) for _ in range(7)]
        for i in ids[:3]:
            on_redis.transition(i, Trigger.POSITION_OPENED)
        redis.Redis.from_url(on_redis.url).hset(on_redis._seg.meta_keys[1], "halted", "1")
        code, out, _ = run(capsys, "inspect", on_redis.name, "--json", "--url", on_redis.url)
        assert code == 0
        got = json.loads(out)
        assert got["halted_shards"] == [1]
        counts: dict[str, int] = {}
        for s in got["shards"]:
            for k, v in s["states"].items():
                counts[k] = counts.get(k, 0) + v
        snap = on_redis.snapshot()
        assert counts == {State(int(st)).name: int((snap["state"] == st).sum())
                          for st in set(snap["state"].tolist())}
        code, out, _ = run(capsys, "inspect", on_redis.name, "--url", on_redis.url)
        assert "PARTIAL (1 of 3 shards: [1])" in out

    def test_top_once(self, capsys, on_redis):
        """top --url --once prints one frame with the server's counts."""
        on_redis.open_position(100.0, 1.0)
        code, out, _ = run(capsys, "top", on_redis.name, "--once", "--interval", "0.05",
                           "--url", on_redis.url)
        assert code == 0
        assert next(r for r in out.splitlines() if r.startswith("open")).split()[2] == "1"

    def test_rm_removes_every_key(self, capsys, on_redis):
        """rm --url deletes every key of the engine; a second rm finds nothing (1)."""
        import redis
        on_redis.open_position(100.0, 1.0, key="K")
        code, out, _ = run(capsys, "rm", on_redis.name, "--url", on_redis.url)
        assert code == 0 and "removed" in out
        r = redis.Redis.from_url(on_redis.url)
        assert list(r.scan_iter(match=f"eng:{{{on_redis.name}:*")) == []
        code, _, err = run(capsys, "rm", on_redis.name, "--url", on_redis.url)
        assert code == 1 and "no engine" in err

    def test_rm_removes_a_half_made_engine(self, capsys, on_redis):
        """inspect reports a half-made Redis engine (exit 1) and rm removes it."""
        import redis
        r = redis.Redis.from_url(on_redis.url)
        r.delete(on_redis._seg.meta_keys[0])
        code, _, _ = run(capsys, "inspect", on_redis.name, "--url", on_redis.url)
        assert code == 1
        code, _, _ = run(capsys, "rm", on_redis.name, "--url", on_redis.url)
        assert code == 0
        assert list(r.scan_iter(match=f"eng:{{{on_redis.name}:*")) == []

    def test_foreign_keys_are_refused(self, capsys):
        """inspect and rm refuse foreign keys in an engine's place; rm --force removes them."""
        import redis
        from conftest import redis_url
        r = redis.Redis.from_url(redis_url())
        r.set("eng:{not_ours:0}:m", "x")
        try:
            assert run(capsys, "inspect", "not_ours", "--url", redis_url())[0] == 2
            assert run(capsys, "rm", "not_ours", "--url", redis_url())[0] == 2
            assert r.exists("eng:{not_ours:0}:m")
            assert run(capsys, "rm", "not_ours", "--force", "--url", redis_url())[0] == 0
            assert not r.exists("eng:{not_ours:0}:m")
        finally:
            r.delete("eng:{not_ours:0}:m")

    def test_python_dash_m_engine(self, on_redis):
        """``python -m engine ls --url`` and ``inspect NAME --url`` end to end."""
        for argv in (["ls"], ["inspect", on_redis.name]):
            r = subprocess.run([sys.executable, "-m", "engine", *argv, "--url", on_redis.url],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert on_redis.name in r.stdout

    def test_unreachable_server_and_password_not_shown(self, capsys):
        """A server that does not answer: exit 1, and the url's password is not printed."""
        code, out, err = run(capsys, "ls", "--url", "redis://u:hunter2@127.0.0.1:1/0")
        assert code == 1
        assert "hunter2" not in out + err and "***" in err


# ==============================================================================

class TestPrivateRedis:
    def test_starts_answers_and_stops(self):
        """A private redis-server listens on loopback without persistence and goes at stop()."""
        import redis

        from engine.tools.redis_server import PrivateRedis

        with PrivateRedis() as server:
            assert server.url == f"redis://127.0.0.1:{server.port}/0"
            with redis.Redis.from_url(server.url) as r:
                assert r.ping()
                assert r.config_get("save")["save"] == ""
                assert r.config_get("appendonly")["appendonly"] == "no"
            workdir = server.tmp.name
        assert not os.path.exists(workdir)
        with pytest.raises(redis.ConnectionError), redis.Redis.from_url(server.url) as r:
            r.ping()
        server.stop()


class TestBenchOnRedis:
    def test_engine_on_redis_row_and_costs(self, tmp_path, capsys):
        """The bench's engine-on-Redis rows report each workload's cost against the peer.

        The bench runs the engine on the Redis peer's server: a row per
        workload, its cost per call against the peer, and the probe of one
        call against a raw EVALSHA round trip (client CPU, server time) in the
        report and the JSON; the server is stopped at the end.
        """
        import json

        from engine.tools.bench import peers
        from engine.tools.bench.report import print_report, write_json
        from engine.tools.bench.runner import Plan, Probe, run_cases

        plan = Plan(seconds=0.2, warmup=0.05, repeat=1, quick=True, workers=[],
                    systems=["redis", "engine_redis"], workloads=["transition", "update_price"],
                    layout=[(1, "single")])
        res = run_cases(plan)
        assert peers._server is None                        # stopped
        assert not res.skipped, res.skipped
        cases = {(c.system, c.workload): c for c in res.cases}
        for w in plan.workloads:
            c = cases["engine_redis", w]
            assert c.error is None and c.ops > 0, c.error
        assert cases["engine_redis", "transition"].committed_fraction == 1.0
        costs = res.redis_costs
        assert costs is not None and "error" not in costs, costs
        for k in ("evalsha_raw", "evalsha", "peer_transition", "engine_transition"):
            m = costs["kinds"][k]
            assert m["wall_us"] > 0 and m["client_cpu_us"] > 0 and m["server_us"] > 0, (k, m)
        assert set(costs["ratios"]) >= {"transition_vs_evalsha", "transition_vs_evalsha_raw"}
        summary = print_report(plan, res)
        out = capsys.readouterr().out
        assert "engine on Redis" in out and "raw EVALSHA round trip" in out
        assert set(summary["engine_redis_vs_redis"]) == set(plan.workloads)
        write_json(tmp_path / "bench.json", plan, Probe(None, 0.0), res, summary)
        doc = json.loads((tmp_path / "bench.json").read_text())
        assert doc["redis_costs"]["kinds"]["engine_transition"]["wall_us"] > 0
        assert any("EVALSHA" in t["target"] for t in doc["targets"])
# ==== python -m engine bench: the scaling sweep and the one-worker breakdown ====================
def bench_args(*argv: str) -> argparse.Namespace:
    """``argv`` parsed by the bench subcommand's own parser."""
    parser = argparse.ArgumentParser(prog="engine")
    bench.add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def fake_case(system: str, workload: str, workers: int, sharing: str, ops_per_s: float,
              cpu: float = 1.0) -> Case:
    """A measured case with round numbers (what the report side is fed)."""
    return Case(system, workload, workers, sharing, ops=int(ops_per_s), seconds=1.0,
                ops_per_s=ops_per_s, per_worker_ops_per_s=[ops_per_s / workers] * workers,
                p50_ns=500.0, p99_ns=2000.0, samples=10, cpu_share=cpu,
                per_worker_cpu_share=[cpu] * workers,
                committed_fraction=1.0 if workload in ("transition", "transition_c") else None,
                latencies=np.array([400, 500, 2000]))


def fake_sweep(plan: Plan) -> Results:
    """Every case of ``plan``: disjoint scales linearly, shared stays at one worker's rate."""
    base = {"transition": 4e6, "update_price": 5e6, "transition_c": 40e6, "update_price_c": 20e6}
    res = Results(elapsed=1.0)
    for s in plan.systems:
        for w in plan.workloads_of(s):
            for n, sharing in plan.layout:
                rate = base[w] * (n if sharing == "disjoint" else 1) / (1 + (s != "engine"))
                res.cases.append(fake_case(s, w, n, sharing, rate))
    return res


class TestBenchScaling:
    """``bench --scaling``: the sweep's plan, its C batch workloads, table,
    predictions, JSON and plots (no timing is asserted)."""

    def test_sweep_plan(self):
        """--scaling plans 1..8 workers, disjoint and shared, C fast paths on the engine only."""
        args = bench_args("--scaling", "--quick")
        sweep = bench._scaling_plan(args, bench._plan(args))
        assert sweep is not None and sweep.title == "scaling sweep"
        assert sweep.layout == [(1, "single")] + [(n, s) for n in range(2, 9)
                                                  for s in ("disjoint", "shared")]
        assert sweep.systems == ["engine", "value_lock_tuned", "atomicshm"]
        assert sweep.workloads_of("engine") == list(SCALING_WORKLOADS)
        assert sweep.workloads_of("atomicshm") == ["transition", "update_price"]
        assert sweep.total == (4 + 2 + 2) * 15
        assert bench._scaling_plan(bench_args(), bench._plan(bench_args())) is None

    def test_sweep_arguments_checked(self, capsys):
        """Worker counts outside 2..16 are refused with exit code 2."""
        for n in ("1", "17"):
            assert bench.run(bench_args("--scaling", "--scaling-workers", n)) == 2
            assert "--scaling-workers" in capsys.readouterr().err

    def test_slots_of_a_sweep(self):
        """Every case gets fresh slots; a shared case puts every worker on one."""
        args = bench_args("--scaling-only", "--scaling-workers", "4")
        sweep = bench._scaling_plan(args, bench._plan(args))
        assert sweep is not None
        seen: set[int] = set()
        for w, sharing, slots in runner._assignments(sweep, "engine"):
            assert not seen & set(slots), (w, sharing)
            seen |= set(slots)
            assert len(set(slots)) == (1 if sharing in ("single", "shared") else len(slots))
        assert max(seen) < N_SLOTS

    def test_c_batch_ops(self):
        """The C batch operations apply C_BATCH calls on the id per call."""
        host = EngineHost()
        host.setup()
        try:
            ops = CONNECT["engine"](host.payload())
            try:
                assert ops.transition_c is not None and ops.update_price_c is not None
                pos = ops.key(3)
                before = host.committed([3])
                ops.transition_c(pos, 0)
                assert host.committed([3]) - before == C_BATCH
                assert host.eng.state(pos) == State.MONITORING     # PAUSE, RESUME, ...
                v = host.eng.price(pos).version
                ops.update_price_c(pos, 0.0)
                snap = host.eng.price(pos)
                assert snap.version - v == C_BATCH and snap.price == 99.5
            finally:
                ops.close()
        finally:
            host.teardown()

    def test_c_workload_counts_every_op(self):
        """A C batch case counts C_BATCH ops per call and its commits.

        A C batch case counts C_BATCH ops per call and its commits (two
        spawned workers on one slot, a short budget).
        """
        host = EngineHost()
        host.setup()
        try:
            c = runner._run_case(host, "engine", "transition_c", [5, 5], "shared", 0.05, 0.02)
        finally:
            host.teardown()
        assert c.error is None, c.error
        assert c.ops > 0 and c.ops % C_BATCH == 0
        assert c.committed_fraction is not None and 0 < c.committed_fraction <= 1
        assert len(c.per_worker_ops_per_s) == 2

    def test_table_and_predictions(self):
        """The table's rows and the model's arithmetic, on known numbers."""
        args = bench_args("--scaling-only", "--scaling-workers", "3")
        sweep = bench._scaling_plan(args, bench._plan(args))
        assert sweep is not None
        tab = scaling.table(sweep, fake_sweep(sweep).cases)
        rows = tab["transition"]["engine"]
        assert [r["workers"] for r in rows["disjoint"]] == [1, 2, 3]
        assert rows["disjoint"][2]["speedup"] == pytest.approx(3.0)
        assert rows["shared"][2]["per_worker_mean"] == pytest.approx(4e6 / 3)
        assert rows["shared"][0] == rows["disjoint"][0]          # one worker heads both
        assert "transition_c" not in tab or "atomicshm" not in tab["transition_c"]
        pr = scaling.predict(tab)
        assert "PREDICTION" in pr["label"]
        t = pr["workloads"]["transition"]
        assert t["measured"]["per_core_rate_used"] == pytest.approx(4e6)   # 2 disjoint, per worker
        p16 = t["predicted"]["16"]
        lo, hi = scaling.ALL_CORE_CLOCK
        assert p16["disjoint_ops_per_s"] == pytest.approx([16 * 4e6 * lo, 16 * 4e6 * hi])
        c_ns = 1e9 / 40e6
        lo_move, hi_move = scaling.LINE_MOVE_NS[16]
        assert p16["shared_ops_per_s"] == pytest.approx(
            [scaling.shared_rate(16, hi_move, 1, 250.0, c_ns),
             scaling.shared_rate(16, lo_move, 1, 250.0, c_ns)])
        assert p16["shared_ops_per_s"][1] <= scaling.line_rate(lo_move, 1, c_ns)
        # C rows: 2 shared at 40M total = 50 ns per op per worker, 2 disjoint 25 ns
        assert t["measured"]["c_line_move_ns_here"] == pytest.approx(25.0)
        assert pr["workloads"]["update_price"]["predicted"]["64"]["shared_ops_per_s"][1] \
            <= scaling.line_rate(scaling.LINE_MOVE_NS[64][0], 2, 1e9 / 20e6)

    def test_rates_per_cpu_second(self):
        """Per-core rates are taken per CPU-second, and such C rows' line moves are flagged.

        A case whose workers got half a CPU each: the per-core rate is
        taken per CPU-second, and a line move from such C rows is flagged.
        """
        args = bench_args("--scaling-only", "--scaling-workers", "2")
        sweep = bench._scaling_plan(args, bench._plan(args))
        assert sweep is not None
        res = fake_sweep(sweep)
        for c in res.cases:
            if c.workers == 2:
                c.ops_per_s /= 2
                c.per_worker_ops_per_s = [r / 2 for r in c.per_worker_ops_per_s]
                c.cpu_share, c.per_worker_cpu_share = 0.5, [0.5, 0.5]
        tab = scaling.table(sweep, res.cases)
        row = tab["transition"]["engine"]["disjoint"][1]
        assert row["per_worker_mean"] == pytest.approx(2e6)
        assert row["per_worker_per_cpu_second"] == pytest.approx(4e6)
        m = scaling.predict(tab)["workloads"]["transition"]["measured"]
        assert m["per_core_rate_used"] == pytest.approx(4e6)
        assert not m["two_disjoint_ran_together"] and not m["c_line_move_measured"]
        text = "\n".join(scaling.prediction_lines(scaling.predict(tab)))
        assert "unreliable" in text and "not both on a CPU" in text

    def test_busy_calls_are_counted(self):
        """A call raising one of Ops.busy is counted and the loop goes on; others propagate."""
        calls = []

        def flaky(slot: int, price: float) -> None:
            calls.append(price)
            if len(calls) % 3 == 0:
                raise BusyError("held past the bound")

        ops = Ops(transition=lambda s, t: None, update_price=flaky, read_price=lambda s: None,
                  busy=(BusyError,))
        batch, single = runner._loops("update_price", ops, 0)
        assert batch(6) == 4 and len(calls) == 12
        assert single()[2] == 0 and len(calls) == 14
        strict = Ops(transition=lambda s, t: None, update_price=flaky, read_price=lambda s: None)
        with pytest.raises(BusyError):
            runner._loops("update_price", strict, 0)[0](6)

    def test_ratio_per_cpu_second(self):
        """The one-worker ratios are also given per CPU-second of each side's worker."""
        cases = [fake_case("engine", "transition", 1, "single", 1e6, cpu=0.5),
                 fake_case("value_lock_tuned", "transition", 1, "single", 1e6, cpu=1.0),
                 fake_case("redis", "transition", 1, "single", 1e3, cpu=0.3)]
        summary = report._summary(cases, ["engine", "value_lock_tuned", "redis"], [2], {})
        assert summary["ratios"]["value_lock_tuned"] == pytest.approx(1.0)
        assert summary["ratios_per_cpu_second"]["value_lock_tuned"] == pytest.approx(2.0)
        assert summary["ratios_per_cpu_second"]["redis"] is None
        # the engine's worker got half a CPU: the verdict is judged per CPU-second
        t = next(t for t in summary["targets"] if "(tuned)" in t["target"])
        assert t["value"] == pytest.approx(2.0) and "judged per CPU-second" in t["note"]

    def test_model(self):
        """shared_rate is the line's rate or the workers' demand, the lower."""
        assert scaling.line_rate(100.0, 1, 0.0) == pytest.approx(1e7)
        assert scaling.shared_rate(1, 100.0, 1, 900.0, 0.0) == pytest.approx(1e6)
        assert scaling.shared_rate(64, 100.0, 1, 900.0, 0.0) == pytest.approx(1e7)
        assert scaling.shared_rate(64, 100.0, 2, 900.0, 0.0) == pytest.approx(5e6)

    def test_run_writes_json_and_plots(self, capsys, monkeypatch, tmp_path):
        """--scaling-only writes the table, the notes, the JSON section and three PNGs."""
        monkeypatch.setattr(bench, "run_cases", fake_sweep)
        monkeypatch.setattr(bench, "probe_host", lambda plan: Probe(0.99, 20.0))
        path, plots = tmp_path / "b.json", tmp_path / "plots"
        code = bench.run(bench_args("--scaling-only", "--scaling-workers", "3", "--json",
                                    str(path), "--plots", str(plots)))
        out = capsys.readouterr().out
        assert code == 0
        assert "transition_c on engine" in out and "one Lock for all slots" in out
        assert "What a" in out and "cannot show" in out and "predicted" in out
        doc = json.loads(path.read_text())
        sw = doc["scaling_sweep"]
        assert sw["workers"] == [1, 2, 3] and sw["c_batch"] == C_BATCH
        assert set(sw["table"]) == set(SCALING_WORKLOADS)
        assert "PREDICTION" in sw["predictions"]["label"] and "cannot show" in sw["host_note"]
        assert len(sw["results"]) == 8 * 5 and doc["results"] == []
        assert sorted(p.name for p in plots.iterdir()) == [
            "scaling_c_fast_path.png", "scaling_transition.png", "scaling_update_price.png"]


class TestBenchFloor:
    """The one-worker breakdown: layers of the engine's call beside the peers."""

    def test_measure_and_layers(self):
        """Every layer and peer is timed; the layers subtract as documented."""
        b = floor.measure(peers=["value_lock_tuned"], rounds=2, iterations=1)
        assert set(b.ns) == {"transition", "update_price"}
        for ns in b.ns.values():
            assert set(ns) == {"empty", "shape", "raw", "method", "value_lock_tuned"}
            assert all(v > 0 for v in ns.values())
        lay = floor.layers(b.ns["transition"])
        assert lay["wrapper_ns"] == pytest.approx(lay["engine_method_ns"] - lay["raw_call_ns"])
        p = lay["peers"]["value_lock_tuned"]
        assert p["ratio_method"] == pytest.approx(p["ns"] / lay["engine_method_ns"])
        text = "\n".join(floor.report_lines(b, {"value_lock_tuned": 3.0}))
        assert "C work" in text and "RawArray+Lock (tuned)" in text and "3x needs" in text
        assert json.dumps(b.as_dict())

    def test_layers_from_known_numbers(self):
        """The cost layers are the differences of the measured rows; ratios are peer / engine.

        wrapper = method - raw; C work = raw - same-shape; argument passing
        = same-shape - empty; ratios are peer ns / engine ns.
        """
        lay = floor.layers({"empty": 20.0, "shape": 100.0, "raw": 120.0, "method": 250.0,
                            "atomicshm": 500.0})
        assert (lay["wrapper_ns"], lay["c_work_ns"], lay["argument_passing_ns"]) == (
            130.0, 20.0, 80.0)
        a = lay["peers"]["atomicshm"]
        assert (a["ratio_method"], a["ratio_raw_call"], a["ratio_empty_call_plus_c_work"]) == (
            2.0, 500.0 / 120.0, 12.5)
