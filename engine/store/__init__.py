"""The store under an Engine: the seam between ``Engine`` and its two backends.

``Engine`` talks to its store through one interface: the ``eng_*`` functions
of the compiled module, with their arguments, out-parameters and status
codes.  On shared memory (``engine.store.shm``) the store is
``engine._native.lib`` itself, so a hot call is one C call with no wrapper
frame; on Redis (``engine.store.redis``) a ``RedisStore`` implements the
same functions, each as one round trip.  A public method is written once,
in ``Engine``, above this seam.

``backend(url)`` is the one place that chooses: None is shared memory, a
``redis://``, ``rediss://``, ``unix://`` or ``redis+cluster://`` url is
Redis.  ``engine.core`` imports nothing else from here.
"""

from __future__ import annotations

import mmap
import re
import secrets
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from engine.errors import ArgumentError

if TYPE_CHECKING:
    from engine.spec import MachineSpec

__all__ = ["Attached", "Backend", "backend", "check_name", "random_name"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise ArgumentError(
            f"segment name must be 1-200 characters of [A-Za-z0-9_.-], got {name!r}")
    return name


def random_name() -> str:
    return "eng_" + secrets.token_hex(8)


class Attached(NamedTuple):
    """What a backend hands the Engine it created or attached."""

    #: answers the ``eng_*`` calls: ``engine._native.lib``, or a RedisStore
    store: Any
    #: their first argument: this attachment's ``eng_seg *``, or the RedisStore
    seg: Any
    #: detaches, once: called by ``close()``, or run when the Engine is collected
    finalizer: Any   # weakref.finalize
    #: shared memory: the segment's mapping and the cffi buffer over it
    mm: mmap.mmap | None = None
    buf: Any = None


class Backend(Protocol):
    """How an engine is made, reached and destroyed on one kind of store.

    ``owner`` is the Engine being built: the finalizer is registered on it
    before anything is attached, so an exception at any point later (a
    signal handler's included) still detaches."""

    #: None for shared memory, else the server's url
    url: str | None

    def create(self, owner: object, name: str, spec: MachineSpec, capacity: int,
               keys_per_position: int, max_accounts: int, shards: int | None) -> Attached: ...

    def attach(self, owner: object, name: str, spec: MachineSpec,
               incarnation: int | None) -> Attached: ...

    def unlink(self, name: str, seg: Any) -> None: ...


def backend(url: str | None) -> Backend:
    """The backend for ``url``: shared memory for None, else Redis (an
    ``ArgumentError`` for a url of another scheme)."""
    if url is None:
        from engine.store.shm import SHARED_MEMORY
        return SHARED_MEMORY
    from engine.store.redis import RedisBackend, check_url
    return RedisBackend(check_url(url))
