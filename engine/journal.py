"""The journal's public record and the seam each backend implements.

Every committed change is recorded once, in commit order, and any process
can follow it with ``Engine.events()`` / ``Engine.events_async()``.  This
module holds what both backends share: the ``Event`` a reader gets, the
kinds, and ``JournalSource``, the interface a backend's journal reader
implements (shared memory: the ring in the segment; Redis: a stream per
shard).  ``Engine`` iterates any ``JournalSource`` the same way.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

__all__ = ["KINDS", "Event", "JournalSource"]

#: what a record says happened (``price`` only with ``journal_prices=True``)
KINDS: tuple[str, ...] = ("open", "transition", "release", "key", "account", "halt", "price")


class Event(NamedTuple):
    """One committed change.

    ``seq``: its place in the journal's total order (1, 2, ...; on Redis the
    order holds per id and per account).  ``ts_ns``: the engine clock at the
    commit.  ``kind``: one of ``KINDS``.  ``id``: the position id (the
    account id for ``account``, 0 for ``halt``).  ``state``: the state after
    the change, as ``Engine.state()`` returns it (None where the kind has
    none).  ``trigger``: the trigger fired (a ``transition``; else None).
    ``record``: the record after the change, as ``Engine.context()`` returns
    it (for ``account``, the ``Account``; for ``key``, the key bytes; for
    ``halt``, the new flag as a bool).
    """

    seq: int
    ts_ns: int
    kind: str
    id: int
    state: Any
    trigger: Any
    record: Any


class JournalSource(Protocol):
    """What a backend provides for ``Engine.events()``.

    ``read`` returns up to ``limit`` events with seq > ``after``, in seq
    order, or raises ``JournalLappedError`` (with ``resume_seq``) when a
    record after ``after`` is no longer retained: never a silent gap.
    ``wait`` blocks until the journal holds a seq > ``after`` or ``timeout``
    seconds pass (bounded, interruptible by signals); True when there is
    something to read.
    """

    def seq(self) -> int: ...

    def read(self, after: int, limit: int) -> list[Event]: ...

    def wait(self, after: int, timeout: float) -> bool: ...
