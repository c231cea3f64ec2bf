"""The workload: the operation kinds a stress worker mixes and their weights
(``parse_mix``), what each operation can end with, and the parameters
positions are opened with (so that a torn record can be recognised).
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


def parse_mix(text: str | Mapping[str, int]) -> dict[str, int]:
    """Weights per kind from ``"preset"``, ``"kind=w,..."`` or ``"preset,kind=w,..."``.

    Kinds left out weigh 0 (after a preset: the preset's weight).  Raises
    ``ValueError`` for an unknown preset or kind, a negative weight or an all-zero mix.
    """
    if isinstance(text, Mapping):
        items: list[str] = [f"{k}={v}" for k, v in text.items()]
    else:
        items = [p.strip() for p in text.split(",") if p.strip()]
    weights = dict.fromkeys(KINDS, 0)
    if not items:
        items = ["default"]
    if "=" not in items[0]:
        preset = items.pop(0)
        if preset not in PRESETS:
            raise ValueError(f"unknown mix preset {preset!r}; presets: {', '.join(PRESETS)}")
        weights.update(PRESETS[preset])
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"mix item {item!r}: a preset comes first; then kind=weight")
        if key not in weights:
            raise ValueError(f"unknown mix kind {key!r}; kinds: {', '.join(KINDS)}")
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
