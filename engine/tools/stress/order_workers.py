"""The order worker (``--mix orders``): one spawned process that runs its own
orders through their lifecycle by key and, as a WebSocket handler would,
applies fills to other workers' orders found by key; it checks the record
every lookup and every fill reaches (``engine.tools.stress.orders``) and logs
a link per applied commit for the chain verifier, like the position workers.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any

from engine.core import Engine, Handle
from engine.errors import (
    BusyError,
    CapacityError,
    EngineError,
    KeyExistsError,
    NotOpenError,
    StaleIdError,
)
from engine.spec import ORDER_SPEC
from engine.tools.stress.base import (
    BUSY,
    CONFLICT,
    FULL,
    INVALID,
    NOT_OPEN,
    OK,
    SampledWorker,
)
from engine.tools.stress.codec import LinkLog
from engine.tools.stress.mix import ORDER_KINDS
from engine.tools.stress.orders import (
    CLIENT_OPS,
    COUNTERS,
    check_filled,
    check_reached,
    client_key,
    exchange_key,
    fill_fields,
    keys_problem,
    name_of,
    qty_for,
    tag_of,
)

_S: Any = ORDER_SPEC.State
_T: Any = ORDER_SPEC.Trigger
_INITIALIZED, _SUBMITTED, _ACCEPTED = int(_S.INITIALIZED), int(_S.SUBMITTED), int(_S.ACCEPTED)
_PENDING_CANCEL, _PENDING_UPDATE = int(_S.PENDING_CANCEL), int(_S.PENDING_UPDATE)
_CLOSED = sum(int(_S[name]) for name in ORDER_SPEC.closed)
_CANCELS = frozenset(int(_T[t]) for t in ("REQUEST_CANCEL", "CANCEL"))


@dataclass(frozen=True)
class _OrderPlan:
    """Everything a spawned order worker needs (picklable)."""

    index: int
    handle: Handle
    gate: str
    log_path: str
    base_ns: int
    workers: int
    positions: int
    weights: tuple[int, ...]
    seed: int
    sample_every: int
    inflight: int               # own orders kept open at once
    misroute: bool              # the test fault: some lookups answer a wrong id
    max_seconds: float


@dataclass
class _Order:
    tag: int
    id: int
    bound: bool = False         # exchange key bound
    no_x: bool = False          # binding the exchange key failed for good (a violation)


class _OrderWorker(SampledWorker):
    """One process's orders, and its WebSocket handler for everyone's."""

    kinds = ORDER_KINDS
    rng_salt = 0x5EED
    counters = COUNTERS
    client_ops = CLIENT_OPS
    releases_counter = "released"

    def __init__(self, eng: Engine, plan: _OrderPlan, log: LinkLog, published: Any) -> None:
        super().__init__(eng, plan, log)
        self.published = published
        self.orders: list[_Order] = []
        self.cursor = 0
        self.n = 1              # order numbers start at 1: a tag is never 0
        self.released_recent: deque[int] = deque(maxlen=32)
        self.window = 2 * plan.inflight + 2
        self.ops = [self.op_own, self.op_ws, self.op_peek]
        assert len(self.ops) == len(ORDER_KINDS)

    # -- helpers (``note`` and ``call``: ``SampledWorker``) -------------------------
    def drop(self, o: _Order) -> None:
        if o in self.orders:
            self.orders.remove(o)

    def lost(self, o: _Order, what: str, e: BaseException) -> int:
        """The owner's own order is gone though the owner never released it."""
        self.drop(o)
        return self.note("lost_order", f"{name_of(o.tag)} (id {o.id:#x}): {what}: {e!r}")

    # -- lookups and fills: the WebSocket handler's path ---------------------------
    def reach(self, tag: int, key: str, own: _Order | None = None) -> tuple[int, Any] | int:
        """Look up ``key`` (a key of order ``tag``) and read the record it reaches.

        Returns (id, record), or a RESULTS index: not_open (nothing found, or
        released before the read), busy.  Checks the record: it must be order
        ``tag``'s and consistent.  For the owner's own order (``own``) the key
        must find exactly its id."""
        eng, c = self.eng, self.c
        try:
            pos = self.call("lookup", eng.lookup, key)
        except BusyError:
            c["lookup_busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"lookup({key!r}): {e!r}")
        if pos is not None and self.plan.misroute and self.rng.random() < 0.125:
            # the planted bug: a corrupted order map answers another slot's order
            with contextlib.suppress(NotOpenError):
                pos = eng.id_of(self.rng.randrange(self.plan.positions))
        if pos is None:
            c["lookup_none"] += 1
            if own is not None:
                return self.note("lost_lookup", f"lookup({key!r}) of open {name_of(tag)} "
                                 f"(id {own.id:#x}) found nothing")
            return NOT_OPEN
        try:
            rec = self.call("context", eng.context, pos)
        except StaleIdError:
            c["lookup_stale"] += 1
            if own is not None and pos == own.id:
                return self.lost(own, f"context after lookup({key!r})", StaleIdError())
            return NOT_OPEN
        except BusyError:
            c["busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"context({pos:#x}) after lookup({key!r}): {e!r}")
        c["lookup_found"] += 1
        problems = check_reached(rec, tag)
        if own is not None and pos != own.id and not any(p[0] == "wrong_lookup"
                                                        for p in problems):
            problems.append(("wrong_lookup", f"lookup({key!r}) of {name_of(tag)} -> id "
                             f"{pos:#x}, its id is {own.id:#x}"))
        for category, message in problems:
            self.note(category, f"lookup({key!r}) -> id {pos:#x}: {message}")
        return pos, rec

    def fill(self, pos: int, rec: Any, tag: int, counter: str) -> int:
        """Apply a fill meant for order ``tag`` to ``pos`` (the id a lookup gave,
        ``rec`` its record as read); then read the record the fill reached and check it."""
        eng, c = self.eng, self.c
        done, fields = fill_fields(tag, rec.filled_qty, float(1 + self.rng.randrange(4)))
        trigger = _T.FILL if done else _T.PARTIAL_FILL
        try:
            out = int(self.call("fill", eng.transition, pos, trigger, **fields))
        except StaleIdError:
            c["fills_stale"] += 1
            return NOT_OPEN
        except BusyError:
            c["fills_busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"transition({pos:#x}, {trigger.name}): {e!r}")
        if out == OK:
            self.record(eng.slot_of(pos))
            c["fills_applied"] += 1
            c[counter] += 1
            try:
                after = self.call("context", eng.context, pos)
            except (StaleIdError, BusyError):
                after = rec     # released since: the same opening, its position as read
            except EngineError as e:
                return self.note("unexpected", f"context({pos:#x}) after a fill: {e!r}")
            for category, message in check_filled(after, tag):
                self.note(category, f"fill on id {pos:#x}: {message}")
        elif out == INVALID:
            c["fills_invalid"] += 1
        elif out != CONFLICT:
            return self.note("unexpected", f"transition({pos:#x}, {trigger.name}) -> {out}")
        return out

    def pick_foreign(self) -> int:
        """The tag of a recent order of another worker (its own with one worker),
        by deterministic naming from the worker's last published number; -1 if none yet."""
        w, idx = self.plan.workers, self.plan.index
        other = idx if w == 1 else (idx + 1 + self.rng.randrange(w - 1)) % w
        top = int(self.published[other])
        if top < 0:
            return -1
        return tag_of(other, max(1, top - self.rng.randrange(self.window)))

    # -- the owner's path ---------------------------------------------------------------
    def open_order(self) -> int:
        idx = self.plan.index
        tag = tag_of(idx, self.n)
        qty = qty_for(tag)
        try:
            pos = self.call("open", self.eng.open, key=client_key(tag), qty=qty,
                            leaves_qty=qty, position=tag, side=1 if self.n % 2 == 0 else -1,
                            token=idx, order_type=1, limit_px=100.0)
        except CapacityError as e:
            self.c["key_full" if "index buckets" in str(e) else "open_full"] += 1
            return FULL
        except KeyExistsError as e:
            self.n += 1
            return self.note("key_exists", f"open(key={client_key(tag)!r}): {e!r}")
        except BusyError:
            self.c["busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"open(key={client_key(tag)!r}): {e!r}")
        self.record(self.eng.slot_of(pos))
        self.c["opened"] += 1
        self.orders.append(_Order(tag, pos))
        self.published[idx] = self.n
        self.n += 1
        return OK

    def fire(self, o: _Order, trigger: int) -> int:
        """A plain transition of the owner's order (no fields)."""
        try:
            out = int(self.call("step", self.eng.transition, o.id, trigger))
        except NotOpenError as e:
            return self.lost(o, f"transition {_T(trigger).name}", e)
        except BusyError:
            self.c["busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"transition({o.id:#x}, {_T(trigger).name}): {e!r}")
        if out == OK:
            self.record(self.eng.slot_of(o.id))
            self.c["steps_applied"] += 1
            if trigger in _CANCELS:
                self.c["cancels"] += 1
        elif out == INVALID:
            self.c["steps_invalid"] += 1      # a fill by lookup got there first
        elif out != CONFLICT:
            return self.note("unexpected", f"transition({o.id:#x}, {_T(trigger).name}) -> {out}")
        return out

    def bind(self, o: _Order) -> int:
        key = exchange_key(o.tag)
        try:
            self.call("bind", self.eng.bind_key, o.id, key)
        except KeyExistsError as e:
            o.no_x = True
            return self.note("key_exists", f"bind_key({o.id:#x}, {key!r}): {e!r}")
        except CapacityError as e:
            if "index buckets" not in str(e):
                return self.note("unexpected", f"bind_key({o.id:#x}, {key!r}): {e!r}")
            self.c["key_full"] += 1
            return FULL
        except NotOpenError as e:
            return self.lost(o, f"bind_key({key!r})", e)
        except BusyError:
            self.c["busy"] += 1
            return BUSY
        except EngineError as e:        # KeyLimitError included: it has 1 key of 2
            o.no_x = True
            return self.note("unexpected", f"bind_key({o.id:#x}, {key!r}): {e!r}")
        o.bound = True
        self.c["binds"] += 1
        return OK

    def finish(self, o: _Order) -> int:
        """The order is closed: check its final record and keys, release it,
        and make sure its keys find nothing any more."""
        eng, tag = self.eng, o.tag
        try:
            rec = self.call("context", eng.context, o.id)
            keys = list(eng.keys(o.id))
        except NotOpenError as e:
            return self.lost(o, "context/keys", e)
        except BusyError:
            self.c["busy"] += 1
            return BUSY
        for category, message in check_reached(rec, tag):
            self.note("lost_order" if category == "wrong_lookup" else category,
                      f"own id {o.id:#x}: {message}")
        want = [client_key(tag)] + ([exchange_key(tag)] if o.bound else [])
        problem = keys_problem(keys, want)
        if problem == "keys_out_of_order":
            self.c[problem] += 1
        elif problem:
            self.note(problem, f"keys({o.id:#x}) of {name_of(tag)} = {keys}, expected {want}")
        try:
            out = int(self.call("release", eng.release_position, o.id))
        except NotOpenError as e:
            return self.lost(o, "release_position", e)
        except BusyError:
            self.c["busy"] += 1
            return BUSY
        except EngineError as e:
            return self.note("unexpected", f"release_position({o.id:#x}): {e!r}")
        if out != OK:
            return out
        self.record(eng.slot_of(o.id))
        self.c["released"] += 1
        self.drop(o)
        self.released_recent.append(tag)
        for key in want:
            try:
                got = self.call("lookup", eng.lookup, key)
            except BusyError:
                continue
            if got is not None:
                self.note("released_key_found", f"{name_of(tag)} (id {o.id:#x}) released, "
                          f"lookup({key!r}) -> id {got:#x}")
        return OK

    def step(self, o: _Order) -> int:
        """Move one own order a step, by its state."""
        try:
            st = int(self.eng.state(o.id))
        except NotOpenError as e:
            return self.lost(o, "state", e)
        except BusyError:
            self.c["busy"] += 1
            return BUSY
        r = self.rng.random()
        if st & _CLOSED:
            return self.finish(o)
        if st == _INITIALIZED:
            return self.fire(o, _T.DENY if r < 0.01 else _T.SUBMIT)
        if st == _SUBMITTED:
            return self.fire(o, _T.REJECT if r < 0.01 else _T.ACCEPT)
        if not (o.bound or o.no_x):
            return self.bind(o)
        if st == _PENDING_CANCEL:
            return self.fire(o, _T.CANCEL_REJECTED if r < 0.3 else _T.CANCEL)
        if st == _PENDING_UPDATE:
            return self.fire(o, _T.UPDATED if r < 0.5 else _T.UPDATE_REJECTED)
        # live: ACCEPTED, TRIGGERED, PARTIALLY_FILLED
        if r < 0.03:
            return self.fire(o, _T.REQUEST_CANCEL)
        if r < 0.05:
            return self.fire(o, _T.CANCEL)
        if r < 0.06:
            return self.fire(o, _T.REQUEST_UPDATE)
        if r < 0.07 and st == _ACCEPTED:
            return self.fire(o, _T.TRIGGER)
        # an execution report for our own order: by the exchange key, through lookup
        key = client_key(o.tag) if o.no_x else exchange_key(o.tag)
        got = self.reach(o.tag, key, own=o)
        if isinstance(got, int):
            return got
        pos, rec = got
        return self.fill(pos, rec, o.tag, "own_fills")

    # -- the operations: each returns a RESULTS index -----------------------------
    def op_own(self) -> int:
        """Open an order (below ``inflight``), or move one of ours a step."""
        if len(self.orders) < self.plan.inflight:
            out = self.open_order()
            if out != FULL or not self.orders:
                return out
        self.cursor = (self.cursor + 1) % len(self.orders)
        return self.step(self.orders[self.cursor])

    def op_ws(self) -> int:
        """A WebSocket execution report for another worker's order: find it by
        its exchange (or client) key and apply a fill to what the lookup gave."""
        tag = self.pick_foreign()
        if tag < 0:
            return NOT_OPEN
        key = exchange_key(tag) if self.rng.random() < 0.7 else client_key(tag)
        got = self.reach(tag, key)
        if isinstance(got, int):
            return got
        pos, rec = got
        return self.fill(pos, rec, tag, "ws_fills")

    def op_peek(self) -> int:
        """A status query: find another worker's order by key and check its record."""
        tag = self.pick_foreign()
        if tag < 0:
            return NOT_OPEN
        got = self.reach(tag, exchange_key(tag) if self.rng.random() < 0.5 else client_key(tag))
        if isinstance(got, int):
            return got
        self.c["peeks"] += 1
        return OK

    # -- the loop: ``SampledWorker`` --------------------------------------------
    def extra_summary(self) -> dict[str, Any]:
        return {**super().extra_summary(),
                "held": [(o.tag, o.id, o.bound) for o in self.orders],
                "released_recent": list(self.released_recent)}
