"""Creating and removing an engine on Redis: the claim of its name, the
shards' metas and free lists, the seal; and the removal of every key.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from engine.errors import SegmentError, SegmentNotFoundError, ServerError
from engine.store.redis.connection import _Conn
from engine.store.redis.functions import (
    C_BUSY,
    C_EXISTS,
    C_FOREIGN,
    C_GONE,
    C_OK,
    C_REMAINS,
    REDIS_CREATE_CHUNK,
    REDIS_CREATE_LEASE_MS,
)

_MAGIC = "engine-redis"
_LAYOUT = "2"   # 2: an incarnation ('inc') in every shard's meta, checked by every call


def _how_to_remove(name: str) -> str:
    return (f"to remove it: `python -m engine rm {name} --url URL` "
            "(RedisStore.remove), or unlink() on an Engine attached to it")


_SHARD_OF = re.compile(rb"^eng:\{[^:{}]+:(\d+)\}:")   # the shard of a key of an engine's


class _Creator:
    """The create and remove protocols of a name (``create and remove`` in
    functions.lua), under a fresh random 64-bit number: the new
    engine's incarnation, or the remover's claim.

    create: claim the name in one call (shard 0's meta, not ready, and a
    lease renewed between steps); clear a dead creator's or remover's
    remains; write the other shards' metas; fill the free lists on the
    server, ``ENG_REDIS_CREATE_CHUNK`` entries per call; seal each shard
    ready, shard 0 last.  Every step checks that the shard is still this
    claim's, so a creator that lost its claim builds nothing that counts, and
    a refused or failed create deletes what it wrote (a killed one leaves a
    not-ready name that the next create clears once the lease expired).

    Does not guarantee: progress for a creator stalled past its lease (the
    next create takes the name over and the stalled one gets SegmentError)."""

    def __init__(self, conn: _Conn, name: str, url: str,
                 step: Callable[[str], None] = lambda what: None) -> None:
        self.conn, self.name, self.url = conn, name, url
        #: called with the name of each step once it is on the server (a test hook)
        self._step = step
        self.inc = b"%d" % (secrets.randbits(64) | 1)
        self._renewed = time.monotonic()

    def _meta(self, s: int) -> str:
        return f"eng:{{{self.name}:{s}}}:m"

    def _run(self, s: int, fn: str, *args: Any) -> Any:
        return self.conn.call(self._meta(s), fn, self.inc, *args)

    def _renew(self) -> None:
        """Renew the claim's lease when a quarter of it has passed."""
        now = time.monotonic()
        if now - self._renewed > REDIS_CREATE_LEASE_MS / 4000:
            if int(self._run(0, "renew", REDIS_CREATE_LEASE_MS)) != C_OK:
                raise self._lost()
            self._renewed = now

    def _lost(self) -> SegmentError:
        return SegmentError(
            f"engine {self.name!r} on {self.url}: this create or remove lost its claim on the "
            f"name (it stalled past its {REDIS_CREATE_LEASE_MS / 1000:g} s lease and another "
            "client took the name over, or removed it); nothing it wrote is in use")

    def _foreign(self, key: Any) -> SegmentError:
        k = key.decode() if isinstance(key, bytes) else str(key)
        return SegmentError(
            f"{k} on {self.url} is not an engine's (another kind of key where engine "
            f"{self.name!r} keeps its own): nothing was created or changed; remove that key "
            "or choose another name")

    def _busy(self, ms_left: Any) -> SegmentError:
        return SegmentError(
            f"engine {self.name!r} on {self.url} is being created or removed by another "
            f"client (its lease has {int(ms_left)} ms left; if that client died, a create "
            f"after the lease clears the name); {_how_to_remove(self.name)}")

    def _clear(self, gen: Any, shard: int | None = None) -> int:
        """Delete the remains of older claims: every key of the name (or of
        ``shard``) but this claim's own; each batch by ``wipe`` on its
        shard, which checks there that no newer claim holds it.  The
        number of keys deleted."""
        pattern = f"eng:{{{self.name}:{'*' if shard is None else f'{shard}}}:*'}"
        found: dict[int, list[bytes]] = {}
        own = {self._meta(0).encode(), f"eng:{{{self.name}:0}}:lease".encode()}
        try:
            for k in self.conn.client.scan_iter(match=pattern, count=1000):
                m = _SHARD_OF.match(k)
                if m and k not in own:
                    found.setdefault(int(m.group(1)), []).append(k)
        except self.conn.errors as e:
            raise ServerError(f"{self.url}: {e}") from None
        for s, keys in sorted(found.items(), reverse=True):   # shard metas before shard 0's
            for i in range(0, len(keys), 512):
                self._renew()
                if int(self._run(s, "wipe", gen, *keys[i:i + 512])) != C_OK:
                    raise self._lost()
        return sum(len(k) for k in found.values())

    def create(self, meta: dict[str, Any], n: int, capacity: int, max_accounts: int) -> int:
        """Build the engine; its incarnation."""
        pairs = [x for kv in meta.items() for x in kv]
        r = self._run(0, "claim", REDIS_CREATE_LEASE_MS, _MAGIC, *pairs, "shard", 0)
        code = int(r[0])
        if code == C_EXISTS:
            raise SegmentError(f"an engine named {self.name!r} already exists on {self.url}")
        if code == C_BUSY:
            raise self._busy(r[1])
        if code == C_FOREIGN:
            raise self._foreign(r[1])
        self._renewed = time.monotonic()
        gen, remains = int(r[1]), int(r[3])
        self._step("claim")
        try:
            if remains:   # a dead creator's or remover's: every key of the name goes
                self._clear(gen)
                self._step("clear")
            for s in range(1, n):
                for _ in range(3):
                    r = self._run(s, "binit", gen, _MAGIC, *pairs, "shard", s)
                    if int(r[0]) != C_REMAINS:
                        break
                    self._clear(gen, s)
                if int(r[0]) == C_FOREIGN:
                    raise self._foreign(r[1])
                if int(r[0]) != C_OK:
                    raise self._lost()
                self._step(f"init shard {s}")
            for s in range(n):
                for which, total in (("free", capacity), ("afree", max_accounts)):
                    count = len(range(s, total, n))
                    for i in range(0, count, REDIS_CREATE_CHUNK):
                        self._renew()
                        if int(self._run(s, "fill", which, s, n, i,
                                         min(REDIS_CREATE_CHUNK, count - i))) != C_OK:
                            raise self._lost()
                        self._step(f"fill shard {s} {which} from {i}")
            for s in reversed(range(n)):   # shard 0 last: then attach finds it ready
                if int(self._run(s, "seal", len(range(s, capacity, n)),
                                 len(range(s, max_accounts, n)))) != C_OK:
                    raise self._lost()
                self._step(f"seal shard {s}")
        except BaseException:
            self._abort(n)
            raise
        return int(self.inc)

    def _abort(self, n: int) -> None:
        """Delete what this claim wrote, shard 0 (the claim) last; a server
        that cannot be reached leaves it to the lease's expiry."""
        try:
            for s in reversed(range(n)):
                self._run(s, "abort")
        except ServerError:
            pass

    def remove(self, expect: bytes, force: bool = False) -> int:
        """Claim the name for removal (the incarnation ``expect``, or any
        with b""), delete the other shards' metas (from then on every call
        of the engine is refused), every other key, then the claim; the
        number of keys deleted.  A remover killed between its claim and the
        last shard meta leaves the shards after it answering their attached
        Engines until a create clears the name."""
        r = self._run(0, "drop", expect, REDIS_CREATE_LEASE_MS, _MAGIC, "1" if force else "0")
        code = int(r[0])
        if code == C_GONE:
            raise SegmentNotFoundError(
                f"no engine named {self.name!r} on {self.url}" +
                (" of this incarnation: it was unlinked (or lost) already" if expect else ""))
        if code == C_BUSY:
            raise self._busy(r[1])
        if code == C_FOREIGN:
            raise self._foreign(r[1])
        self._renewed = time.monotonic()
        gen = int(r[2])
        for s in range(1, int(r[1])):   # every shard refuses calls from here on
            if int(self._run(s, "wipe", gen, self._meta(s))) != C_OK:
                raise self._lost()
        self._step("drop")
        n = self._clear(gen)
        self._step("cleared")
        self._run(0, "abort")
        if self.conn.wait:
            self.conn.replicate(self._meta(0))
        return n + 1
