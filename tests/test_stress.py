"""The stress harness: its chain checker on hand-made logs, and whole runs that
must come out clean, and must come out dirty when a fault is switched on.

Allowed in a clean run: INVALID, CONFLICT, not-open and timeout outcomes
(workers contend for the same slots on purpose).  Forbidden: any violation
(lost, duplicated or misordered commits, counter mismatches, torn reads,
versions going back).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import socket
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from conftest import redis_url

from engine import State, _native
from engine.metrics import OpMetrics, check_alerts
from engine.tools.stress import (
    KINDS,
    PRESETS,
    StressConfig,
    StressResult,
    add_parsers,
    decode_links,
    encode_links,
    links_from_words,
    parse_mix,
    run_stress,
    verify_chains,
)

SHM = pathlib.Path("/dev/shm")
lib = _native.lib


def word(state: int, gen: int, locked: bool = False) -> int:
    """A state word with the C header's bit positions."""
    w = int(state) | ((gen & lib.ENG_SW_GEN_MASK) << lib.ENG_SW_GEN_SHIFT)
    return w | lib.ENG_SW_LOCK if locked else w


#: open, a whole lifecycle, release, reopen: 7 commits from the fresh word
LIFE = [0, State.CREATED, State.MONITORING, State.EXIT_PENDING, State.EXITING, State.CLOSED,
        0, State.CREATED]


def chain(slot: int = 0, states: list[int] = LIFE) -> tuple[list[int], list[int], list[int]]:
    """(slots, old words, new words) of a clean chain through ``states``."""
    olds = [word(states[i], i) for i in range(len(states) - 1)]
    news = [word(states[i + 1], i + 1) for i in range(len(states) - 1)]
    return [slot] * len(olds), olds, news


def check(slots: list[int], olds: list[int], news: list[int], counter: int | None = None,
          final: int | None = None, capacity: int = 2) -> dict[str, int]:
    """Run the checker on one slot's links; the other slots stay fresh."""
    counters = np.zeros(capacity, dtype=np.uint64)
    counters[0] = len(slots) if counter is None else counter
    words = np.zeros(capacity, dtype=np.uint64)
    words[0] = news[-1] if final is None else final
    rep = verify_chains(links_from_words(slots, olds, news), counters, words)
    assert rep.violations == sum(rep.by_category.values())
    return rep.by_category


def assert_gone(res: StressResult) -> None:
    """The run removed its segment and its start gate (also used by the
    order and account workload tests)."""
    assert res.segment and not (SHM / res.segment).exists()
    assert_gone_gate(res)


def assert_gone_gate(res: StressResult) -> None:
    """The run removed its start gate."""
    assert res.gate and not (SHM / ("sem." + res.gate.lstrip("/"))).exists()


def parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed as the ``engine`` command line."""
    parser = argparse.ArgumentParser(prog="engine")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def run_cli(tmp_path: pathlib.Path, argv: list[str]) -> tuple[int, dict[str, Any]]:
    """``engine stress *argv --json FILE --quiet``: its exit code and the JSON."""
    out = tmp_path / "stress.json"
    args = parse(["stress", *argv, "--json", str(out), "--quiet"])
    code = args.func(args)
    return code, json.loads(out.read_text())


class TestParseMix:
    def test_preset(self) -> None:
        """A preset name gives its weights, other kinds weigh 0."""
        assert parse_mix("transitions") == {k: PRESETS["transitions"].get(k, 0) for k in KINDS}

    def test_weights_and_override(self) -> None:
        """kind=weight items set weights, alone or after a preset."""
        assert parse_mix("price=3,read=1") == {k: {"price": 3, "read": 1}.get(k, 0) for k in KINDS}
        assert parse_mix("default,wait=0")["wait"] == 0
        assert parse_mix("default,wait=0")["price"] == PRESETS["default"]["price"]

    @pytest.mark.parametrize("bad", ["nope", "price=-1", "price=x", "bogus=1", "read=0",
                                     "price=1,default"])
    def test_bad_mix(self, bad: str) -> None:
        """Unknown presets or kinds, bad or negative weights and all-zero mixes are refused."""
        with pytest.raises(ValueError):
            parse_mix(bad)


class TestLinkEncoding:
    def test_round_trip(self) -> None:
        """Slot, time, states and generations survive packing; lock/owner bits are dropped."""
        old = word(State.EXITING, 0xFFFF) | (1234 << lib.ENG_SW_OWNER_SHIFT)
        new = word(State.CLOSED, 0)
        raw = np.array([[(77 << 40) | 99, old, new]], dtype=np.uint64)
        (link,) = decode_links(encode_links(raw))
        assert (link["slot"], link["t"]) == (77, 99)
        assert (link["old_state"], link["old_gen"]) == (State.EXITING, 0xFFFF)
        assert (link["new_state"], link["new_gen"]) == (State.CLOSED, 0)


class TestVerifyChains:
    def test_clean_chain(self) -> None:
        """An unbroken chain matching its counter and final word has no violation."""
        assert check(*chain()) == {}

    def test_missing_link(self) -> None:
        """A link dropped from the middle is reported missing (and the count disagrees)."""
        slots, olds, news = chain()
        del slots[3], olds[3], news[3]
        found = check(slots, olds, news, counter=len(LIFE) - 1)
        assert found == {"missing": 1, "counter_mismatch": 1}

    def test_missing_first_and_last(self) -> None:
        """Lost links at either end of the chain are caught too."""
        slots, olds, news = chain()
        assert "missing" in check(slots[1:], olds[1:], news[1:], counter=len(slots))
        assert "final_word" in check(slots[:-1], olds[:-1], news[:-1], counter=len(slots),
                                     final=news[-1])

    def test_duplicated_link(self) -> None:
        """Two links from the same generation are reported as a duplicate.

        Two links from the same generation are reported as a duplicate (even when
        the counter counted both, as a store without CAS would).
        """
        slots, olds, news = chain()
        found = check([*slots, 0], [*olds, olds[2]], [*news, news[2]], counter=len(slots) + 1,
                      final=news[-1])
        assert found == {"duplicate": 1}

    def test_state_mismatch(self) -> None:
        """A link whose to-state is not the next link's from-state is reported."""
        slots, olds, news = chain()
        news[2] = word(State.PAUSED, 3)
        assert check(slots, olds, news) == {"state_mismatch": 1}

    def test_counter_mismatch(self) -> None:
        """A chain shorter than the slot's transitions counter is reported."""
        slots, olds, news = chain()
        assert check(slots, olds, news, counter=len(slots) + 1) == {"counter_mismatch": 1}

    def test_generation_not_advanced(self) -> None:
        """A commit that kept its generation (the skip-gen fault) is reported."""
        slots, olds, news = chain()
        news[2] = word(State.EXIT_PENDING, 2)
        assert "gen_step" in check(slots, olds, news)

    def test_bad_final_words(self) -> None:
        """A locked final word and a final state that is not one-hot are reported."""
        slots, olds, news = chain()
        assert "locked" in check(slots, olds, news, final=word(State.CREATED, 7, locked=True))
        assert "bad_state" in check(slots, olds, news, final=word(0x3, 7))

    def test_activity_on_a_fresh_slot(self) -> None:
        """A slot with no links must still hold the fresh zero word and counter."""
        counters = np.zeros(2, dtype=np.uint64)
        words = np.array([0, word(State.CREATED, 1)], dtype=np.uint64)
        rep = verify_chains(links_from_words([], [], []), counters, words)
        assert rep.by_category == {"final_word": 1}

    def test_wrapped_generations_from_two_processes(self) -> None:
        """70,000 commits from two processes (the generation wraps) verify clean.

        70,000 commits (the 16-bit generation wraps) logged by two processes,
        with their clocks slightly out of order, still verify clean.
        """
        n = 70_000
        states = [0, State.CREATED] + [State.MONITORING if i % 2 == 0 else State.PAUSED
                                       for i in range(n - 1)]
        slots, olds, news = chain(1, states)
        t = np.arange(n, dtype=np.int64) * 10 + 100
        t[1::2] -= 15                     # each odd link stamped before its predecessor
        order = np.r_[np.arange(0, n, 2), np.arange(1, n, 2)]    # "worker 0", then "worker 1"
        links = links_from_words(np.array(slots)[order], np.array(olds, dtype=np.uint64)[order],
                                 np.array(news, dtype=np.uint64)[order], t[order])
        counters = np.array([0, n], dtype=np.uint64)
        words = np.array([0, news[-1]], dtype=np.uint64)
        rep = verify_chains(links, counters, words)
        assert rep.violations == 0, rep.messages
        assert rep.links == n


class TestCheckAlerts:
    @staticmethod
    def op(attempts: int, applied: int, p99_ns: float, samples: int = 10) -> OpMetrics:
        return OpMetrics(attempts=attempts, applied=applied, invalid=attempts - applied,
                         conflicts=0, rejected=0, halted=0, errors=0, retries=0, takeovers=0,
                         rolled_forward=0, rolled_back=0,
                         samples=samples, p50_ns=p99_ns / 2, p99_ns=p99_ns, p999_ns=p99_ns,
                         max_ns=int(p99_ns))

    def test_thresholds(self) -> None:
        """Only operations over the p99 bound or under the success rate alert."""
        metrics = {"transition": self.op(100, 50, 2_000.0), "price": self.op(100, 100, 500.0),
                   "wait": self.op(0, 0, 0.0, samples=0)}
        alerts = check_alerts(metrics, p99_ns=1_000.0, success_rate=0.9)
        assert len(alerts) == 2
        assert all(a.startswith("transition:") for a in alerts)

    def test_disabled(self) -> None:
        """With no thresholds nothing alerts."""
        assert check_alerts({"transition": self.op(100, 0, 1e9)}) == []


class TestRunStress:
    def test_clean_run(self) -> None:
        """Two workers for two seconds: operations happen and nothing is violated."""
        res = run_stress(StressConfig(workers=2, positions=8, seconds=2.0))
        assert res.ops > 0
        assert res.violations == 0, res.violation_messages
        v = res.verification
        assert v["links"] == v["applied"] == v["counters_total"] == v["engine_applied"] > 8
        assert v["reads_checked"] > 0
        assert {row["op"] for row in res.table} >= {"transition", "transition_ctx", "price"}
        assert_gone(res)


class TestFaultsAreCaught:
    def test_skip_gen(self) -> None:
        """Commits that do not advance the generation are reported as violations."""
        res = run_stress(StressConfig(workers=2, positions=4, seconds=1.0, fault="skip-gen"))
        assert res.violations > 0
        assert res.verification["by_category"].get("gen_step", 0) > 0
        assert_gone(res)

    def test_blind_store(self) -> None:
        """The chain check reports commits lost or duplicated by stores without CAS."""
        res = run_stress(StressConfig(workers=4, positions=2, seconds=2.0, mix="transitions",
                                      fault="blind-store"))
        assert res.violations > 0
        cats = res.verification["by_category"]
        assert cats.get("duplicate", 0) + cats.get("missing", 0) > 0, cats
        assert_gone(res)

    def test_tear_price(self) -> None:
        """Price writes that skip the seqlock (ENG_FAULT_TEAR_PRICE) are reported as torn reads."""
        res = run_stress(StressConfig(workers=4, positions=4, seconds=2.0, mix="prices",
                                      fault="tear-price"))
        assert res.violations > 0
        assert res.verification["by_category"].get("torn_price_read", 0) > 0, \
            res.verification["by_category"]
        assert_gone(res)


class TestCommandLine:
    def test_json(self, tmp_path: pathlib.Path) -> None:
        """``stress --json`` writes ops and violations and exits 0 on a clean run."""
        code, data = run_cli(tmp_path, ["--workers", "2", "--positions", "8", "--seconds", "1"])
        assert code == 0
        assert data["ops"] > 0
        assert data["violations"] == 0
        assert {"table", "workload", "verification", "alerts"} <= data.keys()

    def test_fault_exits_nonzero(self, tmp_path: pathlib.Path) -> None:
        """A run with violations exits 1 and says so in the JSON."""
        code, data = run_cli(tmp_path, ["--workers", "2", "--seconds", "1", "--fault", "skip-gen"])
        assert code == 1
        assert data["violations"] > 0

    def test_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--help lists the options and hides the test-only --fault."""
        with pytest.raises(SystemExit) as exc:
            parse(["stress", "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        for opt in ("--workers", "--positions", "--seconds", "--mix", "--seed", "--json",
                    "--quiet", "--sample-every", "--alert-p99-us", "--alert-success"):
            assert opt in text
        assert "--fault" not in text


class TestLayers:
    """The verifier is pure, and the library never loads the tools."""

    @staticmethod
    def fresh(code: str) -> None:
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

    def test_verify_imports_without_multiprocessing(self) -> None:
        """``engine.tools.stress.verify`` (and what it needs) import no process machinery."""
        self.fresh("import sys, engine.tools.stress.verify; "
                   "assert 'multiprocessing' not in sys.modules, 'multiprocessing imported'")

    def test_library_does_not_load_the_tools(self) -> None:
        """``import engine`` loads none of ``engine.tools`` (the peers' clients included)."""
        self.fresh("import sys, engine; "
                   "assert not [m for m in sys.modules if m.startswith('engine.tools')]; "
                   "assert not hasattr(engine, 'tools')")


# -- on Redis ------------------------------------------------------------------------------
def redis_keys_of(url: str, name: str) -> list[bytes]:
    """The keys an engine named ``name`` still has on the server at ``url``."""
    import redis

    with redis.Redis.from_url(url) as r:
        return list(r.scan_iter(match=f"eng:{{{name}:*"))


class TestCommitWords:
    def test_redis_reports_what_c_leaves_in_eng_seg(self, tmp_path: pathlib.Path) -> None:
        """The same commits log the same links on both backends.

        The same commits on both backends (an open, a lifecycle with a field
        update, a release, a reopen of the slot) log the same links, which
        verify against the slot's counter and final word: the server's
        functions report each commit's states and generation as C leaves
        them in ``eng_seg``.
        """
        from engine import Engine, Trigger
        from engine.tools.stress.codec import LinkLog

        steps = [("open", None), ("tx", Trigger.POSITION_OPENED),
                 ("tx", Trigger.EXIT_CONDITION_MET), ("tx", Trigger.EXIT_STARTED),
                 ("tx", Trigger.EXIT_COMPLETED), ("release", None), ("open", None)]
        logged = []
        for url in (None, redis_url()):
            eng = Engine.create(capacity=1, url=url)
            try:
                path = tmp_path / f"{'redis' if url else 'shm'}.bin"
                log = LinkLog(eng, str(path), 0)
                pos = 0
                for what, trigger in steps:
                    if what == "open":
                        pos = eng.open_position(100.0, 1.0)
                    elif what == "release":
                        eng.release_position(pos)
                    else:
                        assert eng.transition(pos, trigger, exit_reason=2) == 0
                    log.record(0)
                log.close()
                links = decode_links(np.fromfile(path, dtype=np.uint64))
                counters = np.array([eng.snapshot()["transitions"][0]], dtype=np.uint64)
                words = np.array([eng.state_word(0)], dtype=np.uint64)
                assert verify_chains(links, counters, words).violations == 0
                logged.append(links)
            finally:
                eng.close()
                eng.unlink()
        cols = ["old_state", "old_gen", "new_state", "new_gen"]
        shm, on_redis = (links[cols].tolist() for links in logged)
        assert shm == on_redis
        assert on_redis[:2] == [(0, 0, State.CREATED, 1), (State.CREATED, 1, State.MONITORING, 2)]
        assert on_redis[5] == (State.CLOSED, 5, 0, 6)          # the release


class TestRunStressOnRedis:
    """``url=``: the same workloads and checks against an engine on Redis (the
    session's server), the workers attached through the handle."""

    @pytest.mark.parametrize("mix", ["default", "orders", "accounts"])
    def test_clean_run(self, mix: str) -> None:
        """A short run of each workload verifies clean and leaves no key behind.

        A short run of each workload verifies clean, with every commit's link
        checked against the server's counters, and leaves no key behind.
        """
        url = redis_url()
        res = run_stress(StressConfig(workers=2, seconds=1.5, mix=mix, url=url,
                                      sample_every=1))
        assert res.ops > 0
        assert res.violations == 0, res.violation_messages
        v = res.verification
        assert v["links"] == v["applied"] == v["counters_total"] == v["engine_applied"] > 0
        assert v["reads_checked"] > 0
        assert res.url == url and res.notes
        assert not redis_keys_of(url, res.segment)
        assert_gone_gate(res)

    def test_a_password_is_not_reported(self) -> None:
        """A url's password reaches neither the result, its JSON nor the report."""
        import redis

        from engine.tools.redis_server import PrivateRedis
        from engine.tools.stress.report import format_report
        with PrivateRedis() as server:
            redis.Redis.from_url(server.url).config_set("requirepass", "pw-secret")
            url = server.url.replace("redis://", "redis://:pw-secret@")
            res = run_stress(StressConfig(workers=1, positions=4, seconds=0.5, url=url,
                                          mix="transitions"))
        assert res.violations == 0 and res.ops > 0
        shown = json.dumps(res.as_dict()) + format_report(res)
        assert "pw-secret" not in shown and ":***@" in shown

    def test_latency_is_the_workers(self) -> None:
        """The latency columns hold the workers' samples, on Redis too.

        The latency columns hold the workers' samples (the parent makes no
        transition): on Redis they come with the workers' summaries.
        """
        res = run_stress(StressConfig(workers=2, positions=4, seconds=1.0, url=redis_url(),
                                      sample_every=1, mix="transitions"))
        assert res.violations == 0, res.violation_messages
        tx = next(r for r in res.table if r["op"] == "transition")
        assert tx["samples"] == tx["attempts"] > 0       # every call timed, by some worker
        assert 0 < tx["p50_us"] <= tx["p99_us"] <= tx["max_us"]

    def test_c_fault_switches_are_refused(self) -> None:
        """The C core's fault switches do not exist on Redis: refused before anything starts."""
        with pytest.raises(ValueError, match="shared-memory C core"):
            run_stress(StressConfig(workers=1, seconds=1.0, url=redis_url(), fault="skip-gen"))

    def test_bad_url(self) -> None:
        """A url that is neither a Redis url nor 'auto' is refused."""
        with pytest.raises(ValueError, match="auto"):
            StressConfig(workers=1, url="http://localhost/").check()


class TestCommandLineOnRedis:
    def test_url(self, tmp_path: pathlib.Path) -> None:
        """``stress --url`` runs on that server and says so in the JSON."""
        url = redis_url()
        code, data = run_cli(tmp_path, ["--url", url, "--workers", "2", "--seconds", "1"])
        assert code == 0, data["violation_messages"]
        assert data["url"] == url and data["violations"] == 0 and data["ops"] > 0
        assert data["config"]["sample_every"] == 1          # the Redis default
        assert data["config"]["alert_p99_us"] == 10_000.0

    def test_url_auto(self, tmp_path: pathlib.Path) -> None:
        """``--url auto`` starts a private redis-server for the run and stops it after."""
        code, data = run_cli(tmp_path, ["--url", "auto", "--workers", "1", "--seconds", "1"])
        assert code == 0, data["violation_messages"]
        url = data["url"]
        assert url.startswith("redis://127.0.0.1:") and url != redis_url()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()

    def test_fault_is_refused(self, tmp_path: pathlib.Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
        """``--fault skip-gen`` with ``--url`` exits 2 and says why."""
        args = parse(["stress", "--url", redis_url(), "--seconds", "1", "--fault", "skip-gen",
                      "--quiet"])
        assert args.func(args) == 2
        assert "C core" in capsys.readouterr().err

    def test_help_documents_url(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--help explains --url and its 'auto'."""
        with pytest.raises(SystemExit):
            parse(["stress", "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--url URL" in text and "'auto'" in text and "persistence off" in text
