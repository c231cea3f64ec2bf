"""The workload: the operation kinds a stress worker mixes and their weights
(``parse_mix``), what each operation can end with, and the parameters
positions are opened with (so that a torn record can be recognised).

Three workloads: the position workload (``KINDS``, the presets in
``PRESETS``), the order workload (``ORDER_KINDS``, switched on by the
``orders`` preset of ``ORDER_PRESETS``; see ``engine.tools.stress.orders``)
and the account workload (``ACCOUNT_KINDS``, switched on by the ``accounts``
preset of ``ACCOUNT_PRESETS``; see ``engine.tools.stress.accounts``).
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

#: The account workload's kinds: ``trade`` advances one of the worker's own
#: positions a step (open with ``account=`` on a random shared account, the
#: lifecycle to CLOSED, which books its realized PnL, release); ``mark``
#: updates the price of one of its open positions; ``cash`` deposits or
#: withdraws a small amount (journaled); ``limits`` is an optimistic
#: ``update_account`` (move a limit within its band, an emergency halt, a
#: resume); ``books`` reads an account and checks the read.  An opening or a
#: withdrawal refused by a risk limit (RiskLimitError) counts as ``invalid``.
ACCOUNT_KINDS = ("trade", "mark", "cash", "limits", "books")

#: Presets that switch the whole run to the account workload (weights over ACCOUNT_KINDS).
ACCOUNT_PRESETS: dict[str, dict[str, int]] = {
    "accounts": {"trade": 10, "mark": 3, "cash": 1, "limits": 1, "books": 2},
}

#: The exits workload's kinds (``--mix exits``; see ``engine.tools.stress.exits``):
#: ``tick`` / ``batch`` / ``token`` write prices that cross the positions'
#: levels (update_price, update_prices of all, update_token_price); ``pause``
#: pauses one, writes it crossing prices, resumes it; ``rearm`` checks a fired
#: one and cancels its exit (armed again).
EXIT_KINDS = ("tick", "batch", "token", "pause", "rearm")

#: Presets that switch the whole run to the exits workload (weights over EXIT_KINDS).
EXIT_PRESETS: dict[str, dict[str, int]] = {
    "exits": {"tick": 4, "batch": 1, "token": 4, "pause": 2, "rearm": 3},
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

#: Context updates carry trailing_stop and exit_price derived from
#: exit_reason, so a context record mixing two updates is detectable too.
#: The trailing stop is TRAIL_BASE and more, so no price write of the run
#: fires it (the exits workload, ``--mix exits``, is the one that fires).
STOP_PER_REASON = 0.25
TAKE_PER_REASON = 0.75
TRAIL_BASE = 1e6

FAULTS = {"skip-gen": lib.ENG_FAULT_SKIP_GEN, "blind-store": lib.ENG_FAULT_BLIND_STORE,
          "tear-price": lib.ENG_FAULT_TEAR_PRICE}

#: Faults of the order workload's workers (tests only): ``misroute`` makes one
#: found lookup in eight answer with the id open at a random slot instead, as
#: a corrupted order map would; the checks must report it.
ORDER_FAULTS = ("misroute",)

#: Faults of the account workload's workers (tests only): ``leak`` makes one
#: successful withdrawal in eight take one more unit (1e-8) that the worker
#: does not journal, as an engine booking off by one unit would look; the
#: books check must report it.
ACCOUNT_FAULTS = ("leak",)

#: Faults of every workload's link log (tests only): ``drop-link`` makes each
#: worker leave its 100th applied commit out of its log, as a worker that
#: lost a commit would; the chain check and the journal cross-check must
#: report it.
LINK_FAULTS = ("drop-link",)
DROP_LINK_AT = 100

#: The workloads: name -> (kinds, presets).
WORKLOADS: dict[str, tuple[tuple[str, ...], dict[str, dict[str, int]]]] = {
    "positions": (KINDS, PRESETS),
    "orders": (ORDER_KINDS, ORDER_PRESETS),
    "accounts": (ACCOUNT_KINDS, ACCOUNT_PRESETS),
    "exits": (EXIT_KINDS, EXIT_PRESETS),
}


def workload_of(text: str | Mapping[str, int]) -> str:
    """Which workload a mix selects: ``"orders"`` or ``"accounts"`` when it
    starts with one of their presets (a mapping: when all its kinds are of
    that workload), else ``"positions"``."""
    if isinstance(text, Mapping):
        for name in ("orders", "accounts", "exits"):
            if text and set(text) <= set(WORKLOADS[name][0]):
                return name
        return "positions"
    first = next((p.strip() for p in text.split(",") if p.strip()), "")
    for name in ("orders", "accounts", "exits"):
        if first in WORKLOADS[name][1]:
            return name
    return "positions"


def is_order_mix(text: str | Mapping[str, int]) -> bool:
    """Does this mix select the order workload (an ``ORDER_PRESETS`` preset first)?"""
    return workload_of(text) == "orders"


def is_account_mix(text: str | Mapping[str, int]) -> bool:
    """Does this mix select the account workload (an ``ACCOUNT_PRESETS`` preset first)?"""
    return workload_of(text) == "accounts"


def parse_mix(text: str | Mapping[str, int]) -> dict[str, int]:
    """Weights per kind from ``"preset"``, ``"kind=w,..."`` or ``"preset,kind=w,..."``.

    Kinds left out weigh 0 (after a preset: the preset's weight).  An order
    preset (``"orders"``, ``"orders,ws=5"``) gives weights over ``ORDER_KINDS``
    instead (and a mapping of ORDER_KINDS is taken as such); so does an
    account preset (``"accounts"``, ``"accounts,cash=3"``) over
    ``ACCOUNT_KINDS``.  Raises
    ``ValueError`` for an unknown preset or kind, a negative weight or an all-zero mix.
    """
    workload = workload_of(text)
    if isinstance(text, Mapping):
        items: list[str] = [f"{k}={v}" for k, v in text.items()]
    else:
        items = [p.strip() for p in text.split(",") if p.strip()]
    kinds, presets = WORKLOADS[workload]
    weights = dict.fromkeys(kinds, 0)
    if not items:
        items = ["default"]
    if "=" not in items[0]:
        preset = items.pop(0)
        if preset not in presets:
            known = ", ".join([*PRESETS, *ORDER_PRESETS, *ACCOUNT_PRESETS, *EXIT_PRESETS])
            raise ValueError(f"unknown mix preset {preset!r}; presets: {known}")
        weights.update(presets[preset])
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"mix item {item!r}: a preset comes first; then kind=weight")
        if key not in weights:
            raise ValueError(f"unknown mix kind {key!r}; kinds: {', '.join(kinds)}"
                             + ("" if workload == "positions" else
                                f" (of the {workload[:-1]} workload)"))
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
