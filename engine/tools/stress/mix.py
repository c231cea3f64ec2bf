"""The workload: the operation kinds a stress worker mixes and their weights
(``parse_mix``), what each operation can end with, and the parameters
positions are opened with (so that a torn record can be recognised).

Two workloads: the position workload (``KINDS``, the presets in
``PRESETS``) and the order workload (``ORDER_KINDS``, switched on by the
``orders`` preset of ``ORDER_PRESETS``; see ``engine.tools.stress.orders``).
"""

from __future__ import annotations

from collections.abc import Mapping

from engine._native import lib

#: Operation kinds of the mix, in the order workers publish their counts.
KINDS = ("lifecycle", "pause", "error", "price", "batch", "token", "read", "wait")

#: Named mixes; ``--mix`` also takes ``kind=weight,...``, optionally after a preset.
PRESETS: dict[str, dict[str, int]] = {
    "default": {"lifecycle": 4, "pause": 2, "error": 1, "price": 6, "batch": 1, "token": 1,
                "read": 4, "wait": 1},
    "transitions": {"lifecycle": 8, "pause": 4, "error": 1, "read": 1},
    "prices": {"lifecycle": 1, "price": 8, "batch": 2, "token": 1, "read": 4},
    "reads": {"lifecycle": 2, "price": 2, "read": 10, "wait": 1},
}

#: The order workload's kinds: ``own`` advances one of the worker's own orders
#: a step (open with a client key, SUBMIT, ACCEPT, bind the exchange key,
#: fills by lookup, cancels, release); ``ws`` is a WebSocket handler: look up
#: another worker's recent order by key and apply a fill to what it reaches;
#: ``peek`` looks one up and checks the record it reaches, without a fill.
ORDER_KINDS = ("own", "ws", "peek")

#: Presets that switch the whole run to the order workload (weights over ORDER_KINDS).
ORDER_PRESETS: dict[str, dict[str, int]] = {
    "orders": {"own": 6, "ws": 3, "peek": 1},
}

#: What one operation of the mix ended with.  The first three equal the C
#: outcome codes APPLIED / INVALID / CONFLICT, so a transition maps directly.
RESULTS = ("ok", "invalid", "conflict", "not_open", "busy", "full", "timeout", "unexpected")

#: Positions are opened with one of these (entry_price, amount, side) sets,
#: picked by token.  A price record's PnL must match the formula for its own
#: price and one of them: a record whose price and PnL come from two writes is
#: torn.  (The context alone cannot decide it: a reopen publishes the new
#: context just before the opening price, so a reader can briefly see the new
#: context next to the previous position's last price.)
N_TOKENS = 4
TOKEN_PARAMS: tuple[tuple[float, float, int], ...] = tuple(
    (100.0 + 10.0 * t, 1.0 + t, 1 if t % 2 == 0 else -1) for t in range(N_TOKENS))

#: Context updates carry stop_loss and take_profit derived from exit_reason,
#: so a context record mixing two updates is detectable too.
STOP_PER_REASON = 0.25
TAKE_PER_REASON = 0.75

FAULTS = {"skip-gen": lib.ENG_FAULT_SKIP_GEN, "blind-store": lib.ENG_FAULT_BLIND_STORE}

#: Faults of the order workload's workers (tests only): ``misroute`` makes one
#: found lookup in eight answer with the id open at a random slot instead, as
#: a corrupted order map would; the checks must report it.
ORDER_FAULTS = ("misroute",)


def is_order_mix(text: str | Mapping[str, int]) -> bool:
    """Does this mix select the order workload (an ``ORDER_PRESETS`` preset first)?"""
    if isinstance(text, Mapping):
        return bool(text) and set(text) <= set(ORDER_KINDS)
    first = next((p.strip() for p in text.split(",") if p.strip()), "")
    return first in ORDER_PRESETS


def parse_mix(text: str | Mapping[str, int]) -> dict[str, int]:
    """Weights per kind from ``"preset"``, ``"kind=w,..."`` or ``"preset,kind=w,..."``.

    Kinds left out weigh 0 (after a preset: the preset's weight).  An order
    preset (``"orders"``, ``"orders,ws=5"``) gives weights over ``ORDER_KINDS``
    instead (and a mapping of ORDER_KINDS is taken as such).  Raises
    ``ValueError`` for an unknown preset or kind, a negative weight or an all-zero mix.
    """
    orders = is_order_mix(text)
    if isinstance(text, Mapping):
        items: list[str] = [f"{k}={v}" for k, v in text.items()]
    else:
        items = [p.strip() for p in text.split(",") if p.strip()]
    kinds = ORDER_KINDS if orders else KINDS
    weights = dict.fromkeys(kinds, 0)
    if not items:
        items = ["default"]
    if "=" not in items[0]:
        preset = items.pop(0)
        presets = ORDER_PRESETS if orders else PRESETS
        if preset not in presets:
            raise ValueError(f"unknown mix preset {preset!r}; presets: "
                             f"{', '.join([*PRESETS, *ORDER_PRESETS])}")
        weights.update(presets[preset])
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"mix item {item!r}: a preset comes first; then kind=weight")
        if key not in weights:
            raise ValueError(f"unknown mix kind {key!r}; kinds: {', '.join(kinds)}"
                             + (" (of the order workload)" if orders else ""))
        try:
            w = int(value)
        except ValueError:
            raise ValueError(f"mix weight of {key!r} must be an int, got {value!r}") from None
        if w < 0:
            raise ValueError(f"mix weight of {key!r} must be >= 0, got {w}")
        weights[key] = w
    if not any(weights.values()):
        raise ValueError("the mix has no operation with a weight > 0")
    return weights
