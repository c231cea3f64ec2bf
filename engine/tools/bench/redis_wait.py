"""What ``?wait=1`` costs: a mutating call that returns only once a replica
holds it, against the same call without.

A private primary and one replica (``PrivateRedis``, loopback, persistence
off); one engine; in interleaved rounds (so a change of the host's load
moves both alike) a block of ``transition`` (PAUSE, RESUME) and of
``deposit`` through an Engine attached with the plain url and through one
attached with ``?wait=1``.  Prints the median over rounds of the wall time
per call, in microseconds, and the ratio.  A figure, not a test:

    python -m engine.tools.bench.redis_wait [--rounds 20] [--block 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import redis

from engine import Engine, Trigger
from engine.tools.redis_server import PrivateRedis


def _timed(call: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - t0) / n * 1e6


def _flipper(eng: Engine, pos: int, flip: list[Trigger]) -> Callable[[], object]:
    n = [0]

    def call() -> object:
        n[0] += 1
        return eng.transition(pos, flip[n[0] & 1])
    return call


def _depositor(eng: Engine, acct: int) -> Callable[[], object]:
    return lambda: eng.deposit(acct, 1)


def measure(rounds: int, block: int) -> dict[str, float]:
    """Median us per call: {kind: us} for kind in (transition, deposit) x (plain, wait=1)."""
    with PrivateRedis() as primary, PrivateRedis(replicaof=primary.port) as replica:
        rep = redis.Redis.from_url(replica.url)
        deadline = time.monotonic() + 30
        while rep.info("replication")["master_link_status"] != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync within 30 s")
            time.sleep(0.05)
        e = Engine.create(16, url=primary.url)
        pos = e.open_position(100.0, 1.0)
        e.transition(pos, Trigger.POSITION_OPENED)
        acct = e.open_account(cash=0, max_exposure=0, max_positions=0, max_loss=0)
        waited = Engine.attach(e.name, url=primary.url + "?wait=1")
        times: dict[str, list[float]] = {}
        flip = [Trigger.PAUSE, Trigger.RESUME]
        for _ in range(rounds):
            for label, eng in (("plain", e), ("wait=1", waited)):
                times.setdefault(f"transition {label}", []).append(
                    _timed(_flipper(eng, pos, flip), block))
                times.setdefault(f"deposit {label}", []).append(
                    _timed(_depositor(eng, acct), block))
        waited.close()
        e.unlink()
        e.close()
        return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--block", type=int, default=200)
    args = ap.parse_args(argv)
    got = measure(args.rounds, args.block)
    for op in ("transition", "deposit"):
        plain, waited = got[f"{op} plain"], got[f"{op} wait=1"]
        print(f"{op:10s} plain {plain:7.1f} us   wait=1 {waited:7.1f} us   "
              f"x{waited / plain:.2f}  (+{waited - plain:.1f} us)")


if __name__ == "__main__":
    main()
