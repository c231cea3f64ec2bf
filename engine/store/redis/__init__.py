"""The Redis backend: the C library's calls, answered by server-side functions.

``RedisStore`` implements the ``eng_*`` functions of the compiled module (the
store interface, see ``engine.store``), each as one round trip that runs one
function of ``functions.lua`` on the server.  So a public method is written
once in ``Engine``, and twice below it: in C and in Lua.

The modules, by concern: ``store`` (``RedisStore``: the ``eng_*`` calls, the
request numbers, the keys each call declares), ``connection`` (``_Conn``:
packing, resends, cluster redirections, replicas), ``create`` (``_Creator``:
the create and remove protocols of a name), ``functions`` (the Lua library,
its prelude of the header's numbers, and what the client knows of each
function).

Sharding: an engine's keys are grouped in ``shards`` hash tags ``{name:s}``;
slot ``i`` lives in shard ``i % shards`` and every call touches one shard,
so on a Redis Cluster each call runs on one node.  Each shard keeps a copy of
the engine's meta (transition table, fingerprint, roles, halt flag).  A
position booked on an account opens in the account's shard; a position opened
with a key opens in the key's shard; a key bound later to a position of
another shard is refused (``ArgumentError``) on a sharded engine.

Money and ids stay exact: doubles cross as 8 bytes, ids as (slot, opening),
money as decimal int64 strings added on the server (``HINCRBY``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from engine.spec import MachineSpec
from engine.store import Attached, check_name
from engine.store.redis.connection import check_url
from engine.store.redis.store import RedisStore

__all__ = ["RedisBackend", "RedisStore", "check_url"]


class RedisBackend:
    """The Redis backend on one server (``engine.store.backend(url)``)."""

    def __init__(self, url: str) -> None:
        self.url: str | None = url
        self._url = url

    def create(self, owner: object, name: str, spec: MachineSpec, capacity: int,
               keys_per_position: int, max_accounts: int, shards: int | None) -> Attached:
        return _attached(owner, RedisStore.create(self._url, name, spec, capacity,
                                                  keys_per_position, max_accounts, shards))

    def attach(self, owner: object, name: str, spec: MachineSpec,
               incarnation: int | None) -> Attached:
        return _attached(owner, RedisStore.attach(self._url, check_name(name), spec,
                                                  incarnation))

    def unlink(self, name: str, seg: Any) -> None:
        seg.destroy()

    def remover(self, name: str, seg: Any) -> Callable[[], None]:
        """Deletes this incarnation's keys (never an engine created again
        under the name): Engines attached elsewhere get SegmentNotFoundError
        from then on (Redis keeps nothing alive for them)."""
        def remove() -> None:
            seg.destroy()
        return remove


def _attached(owner: object, store: RedisStore) -> Attached:
    """The store is also the first argument of its calls (the ``eng_seg``)."""
    return Attached(store, store, weakref.finalize(owner, store.eng_detach, store))
