"""The order workload's rules and checkers (``--mix orders``): who an order is,
what its record must look like, and the end-of-run scan.

The bug this reproduces (an order map and per-slot records updated under two
locks in inconsistent order: WebSocket order updates lost, or applied to the
wrong slot) shows up here as a key that reaches another order's record, a
fill that lands on another order, or an open order whose key is not found.
Nothing is taken on trust: every order carries its identity in its record,
so a check reads the record a lookup or a fill reached and compares.

An order of worker ``w`` numbered ``n`` (from 1) has the tag ``w << 32 | n``; it is
opened with ``position=tag``, ``qty=qty_for(tag)``, ``leaves_qty=qty``, under
the client key ``client_key(tag)``; its exchange key ``exchange_key(tag)`` is
bound after ACCEPT.  Every fill sets ``filled_qty``, ``leaves_qty`` (the two
add up to ``qty_for`` of the order the fill was meant for), ``last_qty`` and
``account=tag`` of the order the fill was meant for.  So a record is
self-consistent (``record_problem``) exactly when ``qty == qty_for(position)``,
``filled_qty + leaves_qty == qty`` and ``account`` is 0 or ``position``: a fill
meant for another order breaks the last two (the first only if the qtys
happen to agree), whoever reads the record next.

Pure: no processes, no segment (the parent gathers what ``verify_orders`` needs).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.tools.stress.verify import Violations

_N_BITS = 32
_N_MASK = (1 << _N_BITS) - 1

#: Latencies the workers sample (client side: the Python call, time.perf_counter_ns):
#: open (with the client key), bind (bind_key), lookup, fill (a PARTIAL_FILL /
#: FILL transition with fields), step (SUBMIT, ACCEPT, cancels: no fields),
#: context (a record read), release.
CLIENT_OPS = ("open", "bind", "lookup", "fill", "step", "context", "release")

#: Counters the workers keep (summed over workers); the violations among them
#: are those in VIOLATIONS.
COUNTERS = (
    "opened", "open_full", "key_full", "released", "binds",
    "lookup_found", "lookup_none", "lookup_stale", "lookup_busy",
    "fills_applied", "own_fills", "ws_fills", "fills_invalid", "fills_stale", "fills_busy",
    "steps_applied", "steps_invalid", "cancels", "peeks", "busy",
    "wrong_lookup", "wrong_fill", "bad_record", "lost_lookup", "released_key_found",
    "key_exists", "wrong_keys", "lost_order", "unexpected", "keys_out_of_order",
)

#: Violation categories (any count > 0 fails the run) and what each means.
VIOLATIONS: dict[str, str] = {
    "wrong_lookup": "a key's lookup reached another order's record",
    "wrong_fill": "a fill was applied to another order than the one it was meant for",
    "bad_record": "a record that is not self-consistent (a fill meant for another order, "
                  "or a torn read)",
    "lost_lookup": "the key of an open order was not found",
    "released_key_found": "the key of a released order was still found",
    "key_exists": "KeyExistsError for a key no other order ever had",
    "wrong_keys": "keys(id) are not the keys given to that order (as a set)",
    "lost_order": "an order its owner had not released is gone",
    "orphan_order": "an open order that no worker holds",
    "unexpected": "an engine call failed in a way the workload does not allow",
    "stall": "a worker published no progress for a long time (a deadlock?)",
}


def tag_of(worker: int, n: int) -> int:
    """The tag (identity) of order ``n`` of ``worker``."""
    return worker << _N_BITS | n


def split_tag(tag: int) -> tuple[int, int]:
    """(worker, n) of a tag."""
    return tag >> _N_BITS, tag & _N_MASK


def name_of(tag: int) -> str:
    """``order W<worker>-<n>`` (for messages)."""
    if tag <= 0:
        return f"no order (position={tag})"
    return "order W{}-{}".format(*split_tag(tag))


def client_key(tag: int) -> str:
    """The client order id, given at open: ``C<worker>-<n>``."""
    return f"C{tag >> _N_BITS}-{tag & _N_MASK}"


def exchange_key(tag: int) -> str:
    """The exchange order id, bound after ACCEPT: ``X<worker>-<n>``."""
    return f"X{tag >> _N_BITS}-{tag & _N_MASK}"


def qty_for(tag: int) -> float:
    """The order's quantity (a whole number from 5 to 36), a function of its tag."""
    return float(5 + ((tag * 2654435761) >> 7) % 32)


def fill_fields(tag: int, filled_before: float, last_qty: float) -> tuple[bool, dict[str, Any]]:
    """(complete?, fields) of a fill of ``last_qty`` meant for order ``tag``
    whose record showed ``filled_before``."""
    qty = qty_for(tag)
    filled = min(qty, max(0.0, float(filled_before)) + last_qty)
    return filled >= qty, {"filled_qty": filled, "leaves_qty": qty - filled,
                           "last_qty": last_qty, "last_px": 100.0 + last_qty,
                           "account": tag}


def _get(rec: Any, name: str) -> Any:
    if isinstance(rec, (Mapping, np.void)):
        return rec[name]
    return getattr(rec, name)


def record_problem(rec: Any) -> str | None:
    """What is wrong with an order record on its own (None: consistent).

    ``rec``: a context (named tuple), a snapshot row or a mapping with the
    order fields.  See the module doc for the invariants."""
    tag = int(_get(rec, "position"))
    qty, filled = float(_get(rec, "qty")), float(_get(rec, "filled_qty"))
    leaves, account = float(_get(rec, "leaves_qty")), int(_get(rec, "account"))
    if tag <= 0:
        return f"record without an order tag (position={tag})"
    who = name_of(tag)
    if qty != qty_for(tag):
        return f"{who}: qty {qty:g}, its qty is {qty_for(tag):g}"
    if account not in (0, tag):
        return (f"{who} carries a fill meant for {name_of(account)} (filled {filled:g} + "
                f"leaves {leaves:g}, qty {qty:g})")
    if filled + leaves != qty or not 0 <= filled <= qty:
        return f"{who}: filled {filled:g} + leaves {leaves:g} != qty {qty:g}"
    return None


def check_reached(rec: Any, tag: int) -> list[tuple[str, str]]:
    """Check the record a lookup of order ``tag``'s key reached: [(category,
    message)], empty when it is that order's record and consistent."""
    found: list[tuple[str, str]] = []
    got = int(_get(rec, "position"))
    if got != tag:
        found.append(("wrong_lookup",
                      f"a key of {name_of(tag)} reached the record of {name_of(got)}"))
    problem = record_problem(rec)
    if problem:
        found.append(("bad_record", problem))
    return found


def check_filled(rec: Any, tag: int) -> list[tuple[str, str]]:
    """Check the record a fill meant for order ``tag`` was applied to (read
    after the fill through the same id): [(category, message)]."""
    found: list[tuple[str, str]] = []
    got = int(_get(rec, "position"))
    if got != tag:
        found.append(("wrong_fill",
                      f"a fill meant for {name_of(tag)} was applied to {name_of(got)}"))
    problem = record_problem(rec)
    if problem:
        found.append(("bad_record", problem))
    return found


def keys_problem(have: Collection[str | bytes], want: list[str]) -> str | None:
    """``"wrong_keys"`` when ``keys(id)`` are not the order's keys as a set;
    ``"keys_out_of_order"`` when they are, but not in bind order (not a
    violation: the key records of a reused slot can be claimed in another
    order while the previous opening's are still being cleared); else None."""
    have = list(have)
    if have == want:
        return None
    if sorted(map(str, have)) == sorted(want) and len(have) == len(want):
        return "keys_out_of_order"
    return "wrong_keys"


@dataclass
class OrderReport(Violations):
    """What ``verify_orders`` found at the end of a run."""

    open_orders: int = 0                        # open records scanned
    keys_checked: int = 0                       # lookups and keys() compared
    keys_out_of_order: int = 0                  # keys() right, but not in bind order
    by_category: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def verify_orders(rows: Iterable[Any], held: Mapping[int, tuple[int, bool]],
                  keys_of: Mapping[int, Collection[str | bytes]],
                  lookups: Mapping[str, int | None],
                  released: Collection[int] = (), *, complete: bool = True) -> OrderReport:
    """The end-of-run scan, after every worker stopped.

    ``rows``: the open records (``eng.snapshot()`` rows, or mappings with
    ``id`` and the order fields).  ``held``: tag -> (id, exchange key bound?)
    of every order a worker still holds.  ``keys_of``: id -> ``eng.keys(id)``
    for every row.  ``lookups``: key -> ``eng.lookup(key)`` for the keys of
    ``held`` and of ``released`` (tags of orders released during the run).
    ``complete``: every worker reported (else open orders nobody claims are
    not counted as orphans).

    Each open record must be consistent and held by a worker, with exactly
    its own keys; each held order must be open under its id, and its keys
    must find it; a released order's keys must find nothing.
    """
    rep = OrderReport()
    by_id: dict[int, int] = {}
    for row in rows:
        rep.open_orders += 1
        pos, tag = int(_get(row, "id")), int(_get(row, "position"))
        by_id[pos] = tag
        problem = record_problem(row)
        if problem:
            rep.add("bad_record", f"id {pos:#x}: {problem}")
        if complete and tag not in held:
            rep.add("orphan_order", f"id {pos:#x} (position={tag:#x}) is open, no worker "
                    "holds it")
        if tag in held:
            want = [client_key(tag)] + ([exchange_key(tag)] if held[tag][1] else [])
            have = list(keys_of.get(pos, ()))
            rep.keys_checked += 1
            problem = keys_problem(have, want)
            if problem == "keys_out_of_order":
                rep.keys_out_of_order += 1
            elif problem:
                rep.add("wrong_keys", f"id {pos:#x}: keys {have}, {name_of(tag)} was given "
                        f"{want}")
    for tag, (pos, bound) in held.items():
        who = name_of(tag)
        if by_id.get(pos) != tag:
            rep.add("lost_order", f"{who} (id {pos:#x}) is held but not open"
                    + (f" (id {pos:#x} holds position {by_id[pos]:#x})" if pos in by_id else ""))
            continue
        for key in [client_key(tag)] + ([exchange_key(tag)] if bound else []):
            rep.keys_checked += 1
            got = lookups.get(key)
            if got is None:
                rep.add("lost_lookup", f"{who}: lookup({key!r}) found nothing")
            elif got != pos:
                rep.add("wrong_lookup", f"{who}: lookup({key!r}) -> id {got:#x}, its id is "
                        f"{pos:#x}" + (f" (position {by_id[got]:#x})" if got in by_id else ""))
    for tag in released:
        for key in (client_key(tag), exchange_key(tag)):
            rep.keys_checked += 1
            got = lookups.get(key)
            if got is not None:
                rep.add("released_key_found",
                        f"{name_of(tag)} was released, lookup({key!r}) -> id {got:#x}")
    return rep

