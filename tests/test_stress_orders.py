"""The order workload of the stress harness (``--mix orders``): its mix
parsing, its record checkers on fabricated records and lookups, a whole run
that must come out clean, and a run with a planted order-map bug (lookups
answering another order's id) that must come out dirty.

Allowed in a clean run: lookups that find nothing or an id released before
its record was read, fills that are INVALID (the order closed) or stale.
Forbidden: a lookup reaching another order's record, a fill applied to
another order, an inconsistent record, an open order's key not found, a
released order's key found, KeyExistsError for a unique key, a broken chain.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest
from test_stress import assert_gone, run_cli

from engine import ORDER_SPEC
from engine.tools.stress import (
    KINDS,
    ORDER_KINDS,
    ORDER_PRESETS,
    PRESETS,
    StressConfig,
    is_order_mix,
    parse_mix,
    run_stress,
    verify_orders,
)
from engine.tools.stress.orders import (
    CLIENT_OPS,
    VIOLATIONS,
    check_filled,
    check_reached,
    client_key,
    exchange_key,
    fill_fields,
    qty_for,
    record_problem,
    tag_of,
)

Context = ORDER_SPEC.record.Context

A, B = tag_of(1, 7), tag_of(2, 9)          # two orders of two workers
assert qty_for(A) != qty_for(B)              # so a misapplied fill also breaks the qty sum


def order(tag: int, filled: float = 0.0, account: int | None = None, **more: Any) -> Any:
    """A fabricated context of order ``tag`` after fills totalling ``filled``."""
    qty = qty_for(tag)
    fields = dict.fromkeys(Context._fields, 0)
    fields.update(qty=qty, filled_qty=filled, leaves_qty=qty - filled, position=tag,
                  account=tag if account is None and filled else (account or 0), version=1)
    fields.update(more)
    return Context(**fields)


def misfilled(target: int, meant_for: int) -> Any:
    """Order ``target``'s record after a fill meant for ``meant_for`` landed on it."""
    _, fields = fill_fields(meant_for, 0.0, 2.0)
    return order(target)._replace(**fields)


class TestOrderMix:
    def test_orders_preset(self) -> None:
        """``orders`` selects the order workload with its preset weights."""
        assert is_order_mix("orders") and is_order_mix("orders,ws=5")
        assert parse_mix("orders") == ORDER_PRESETS["orders"]
        assert set(parse_mix("orders")) == set(ORDER_KINDS)
        assert parse_mix("orders,ws=5,peek=0") == {**ORDER_PRESETS["orders"], "ws": 5, "peek": 0}

    def test_position_presets_unchanged(self) -> None:
        """Every position preset still parses to its weights over KINDS."""
        for name, weights in PRESETS.items():
            assert not is_order_mix(name)
            assert parse_mix(name) == {k: weights.get(k, 0) for k in KINDS}

    @pytest.mark.parametrize("bad", ["orders,price=1", "ws=1,orders", "orders,own=-1",
                                     "orders,own=0,ws=0,peek=0", "default,ws=1"])
    def test_bad_order_mix(self, bad: str) -> None:
        """A bad order mix (other kinds, preset after weights, bad weights) is refused."""
        with pytest.raises(ValueError):
            parse_mix(bad)

    def test_positions_default(self) -> None:
        """The order workload defaults to 64 slots, the position workload keeps 16."""
        assert StressConfig(mix="orders").positions == 64
        assert StressConfig().positions == 16
        assert StressConfig(mix="orders", positions=8).positions == 8

    def test_misroute_only_for_orders(self) -> None:
        """The order workload's planted fault is refused for the position workload."""
        StressConfig(mix="orders", fault="misroute").check()
        with pytest.raises(ValueError):
            StressConfig(fault="misroute").check()


class TestRecordCheckers:
    def test_consistent_records_pass(self) -> None:
        """Fresh, partly and fully filled records of the order a key names pass."""
        for rec in (order(A), order(A, 3.0), order(A, qty_for(A))):
            assert record_problem(rec) is None
            assert check_reached(rec, A) == []
            assert check_filled(rec, A) == []

    def test_fill_fields_keep_the_record_consistent(self) -> None:
        """A fill meant for the order it lands on keeps it consistent, and completes at qty."""
        done, fields = fill_fields(A, 1.0, 2.0)
        assert not done and record_problem(order(A)._replace(**fields)) is None
        done, fields = fill_fields(A, qty_for(A) - 1.0, 4.0)
        assert done and fields["leaves_qty"] == 0.0

    def test_lookup_reaching_another_order(self) -> None:
        """A lookup of A's key that reached B's (consistent) record is a wrong lookup."""
        found = check_reached(order(B, 2.0), A)
        assert [c for c, _ in found] == ["wrong_lookup"]
        assert "W1-7" in found[0][1] and "W2-9" in found[0][1]

    def test_fill_applied_to_another_order(self) -> None:
        """A fill read back from another order's record is reported as a wrong fill.

        A fill meant for A read back from B's record: a wrong fill, and B's record
        now carries A's fill (inconsistent for whoever reads it next).
        """
        rec = misfilled(B, meant_for=A)
        assert {c for c, _ in check_filled(rec, A)} == {"wrong_fill", "bad_record"}
        assert [c for c, _ in check_reached(rec, B)] == ["bad_record"]
        assert "meant for order W1-7" in (record_problem(rec) or "")

    @pytest.mark.parametrize("change", [{"position": 0}, {"qty": 99.0},
                                        {"leaves_qty": 1.0}, {"account": B}])
    def test_inconsistent_record(self, change: dict[str, Any]) -> None:
        """No tag, a wrong qty, a filled+leaves sum off, another order's fill: all caught."""
        assert record_problem(order(A, 2.0)._replace(**change)) is not None

    def test_snapshot_rows_too(self) -> None:
        """The checker reads snapshot rows (numpy records) as well as contexts."""
        row = np.zeros(1, dtype=[("id", "<u8"), ("position", "<i8"), ("account", "<i8"),
                                 ("qty", "<f8"), ("filled_qty", "<f8"), ("leaves_qty", "<f8")])[0]
        row["position"], row["qty"], row["leaves_qty"] = A, qty_for(A), qty_for(A)
        assert record_problem(row) is None
        row["account"] = B
        assert record_problem(row) is not None


def scan_input(ids: dict[int, int]) -> tuple[list[dict[str, Any]], dict[int, tuple[int, bool]],
                                             dict[int, list[str]], dict[str, int | None]]:
    """A clean end-of-run scan input: orders (tag -> id) open, held, keyed, found."""
    rows = [{"id": pos, **order(tag, 1.0)._asdict()} for tag, pos in ids.items()]
    held = {tag: (pos, True) for tag, pos in ids.items()}
    keys_of = {pos: [client_key(tag), exchange_key(tag)] for tag, pos in ids.items()}
    lookups: dict[str, int | None] = {}
    for tag, pos in ids.items():
        lookups[client_key(tag)] = lookups[exchange_key(tag)] = pos
    return rows, held, keys_of, lookups


class TestVerifyOrders:
    IDS = {A: 0x1000003, B: 0x2000005}

    def test_clean(self) -> None:
        """Consistent orders and keys verify with no violation and the expected counts."""
        rows, held, keys_of, lookups = scan_input(self.IDS)
        rep = verify_orders(rows, held, keys_of, lookups, released=[tag_of(1, 3)])
        assert rep.by_category == {}, rep.messages
        assert rep.open_orders == 2 and rep.keys_checked == 2 + 4 + 2

    def test_key_finding_another_order(self) -> None:
        """A's exchange key answering B's id (the order-map bug) is reported."""
        rows, held, keys_of, lookups = scan_input(self.IDS)
        lookups[exchange_key(A)] = self.IDS[B]
        assert verify_orders(rows, held, keys_of, lookups).by_category == {"wrong_lookup": 1}

    def test_lost_key_and_lost_order(self) -> None:
        """An open order's key that finds nothing, and a held order that is not open."""
        rows, held, keys_of, lookups = scan_input(self.IDS)
        lookups[client_key(A)] = None
        assert verify_orders(rows, held, keys_of, lookups).by_category == {"lost_lookup": 1}
        rep = verify_orders(rows[1:], held, keys_of, lookups)
        assert rep.by_category == {"lost_order": 1}

    def test_orphan_and_wrong_keys(self) -> None:
        """An open order nobody holds, and keys(id) listing another order's key."""
        rows, held, keys_of, lookups = scan_input(self.IDS)
        del held[B]
        assert verify_orders(rows, held, keys_of, lookups).by_category == {"orphan_order": 1}
        assert verify_orders(rows, held, keys_of, lookups, complete=False).by_category == {}
        rows, held, keys_of, lookups = scan_input(self.IDS)
        keys_of[self.IDS[A]] = [client_key(A), exchange_key(B)]
        assert verify_orders(rows, held, keys_of, lookups).by_category == {"wrong_keys": 1}
        keys_of[self.IDS[A]] = [client_key(A)]
        assert verify_orders(rows, held, keys_of, lookups).by_category == {"wrong_keys": 1}

    def test_keys_out_of_bind_order(self) -> None:
        """The right keys in another order than bound: counted, not a violation."""
        rows, held, keys_of, lookups = scan_input(self.IDS)
        keys_of[self.IDS[A]] = [exchange_key(A), client_key(A)]
        rep = verify_orders(rows, held, keys_of, lookups)
        assert rep.by_category == {} and rep.keys_out_of_order == 1

    def test_released_key_found_and_misfilled_record(self) -> None:
        """A released key that still finds an id, and a misfilled record, are reported.

        A released order's key that still finds an id; an open record carrying a
        fill meant for another order.
        """
        rows, held, keys_of, lookups = scan_input(self.IDS)
        gone = tag_of(1, 3)
        lookups[client_key(gone)] = self.IDS[A]
        rows[1] = {"id": self.IDS[B], **misfilled(B, meant_for=A)._asdict()}
        rep = verify_orders(rows, held, keys_of, lookups, released=[gone])
        assert rep.by_category == {"released_key_found": 1, "bad_record": 1}


class TestOrderRuns:
    def test_clean_run(self) -> None:
        """A short order run violates nothing and its chains verify.

        Four workers for five seconds on 64 slots: orders open, get keys, are
        filled by lookup by their owners and by other workers, close and are
        released; nothing is violated and the chains verify.
        """
        res = run_stress(StressConfig(workers=4, seconds=5.0, mix="orders"))
        assert res.violations == 0, res.violation_messages
        assert res.config["positions"] == 64
        o = res.orders
        assert o is not None
        assert o["violations"] == dict.fromkeys(VIOLATIONS, 0)
        assert o["lookups"]["found"] > 0 and o["lookups"]["none"] > 0
        assert o["fills"]["own"] > 0 and o["fills"]["ws"] > 0
        od = o["orders"]
        assert od["opened"] > 64 and od["released"] > 64     # the slots were reused
        assert od["binds"] > 0 and od["open_at_end"] == od["held_at_end"] > 0
        assert o["final_scan"]["keys_checked"] > od["held_at_end"]
        assert all(o["latency"][op]["samples"] > 0 for op in ("open", "lookup", "fill"))
        v = res.verification
        assert v["links"] == v["applied"] == v["counters_total"] == v["engine_applied"] > 0
        ops = {row["op"]: row for row in res.table}
        assert ops["lookup"]["attempts"] > 0 and ops["key"]["applied"] > 0
        assert_gone(res)

    def test_misrouted_lookups_are_caught(self) -> None:
        """The planted misrouted lookup is reported with the fills it misapplied.

        With the planted bug (one found lookup in eight answers the order open at
        a random slot), wrong lookups and fills applied to the wrong order are reported.
        """
        res = run_stress(StressConfig(workers=2, seconds=2.0, mix="orders", fault="misroute"))
        assert res.violations > 0
        o = res.orders
        assert o is not None
        assert o["wrong_order"]["wrong_lookup"] > 0, o["wrong_order"]
        assert o["wrong_order"]["wrong_fill"] > 0, o["wrong_order"]
        assert o["wrong_order"]["bad_record"] > 0, o["wrong_order"]
        assert res.verification["by_category"]["wrong_lookup"] > 0
        assert_gone(res)


class TestOrderCommandLine:
    def test_json(self, tmp_path: pathlib.Path) -> None:
        """``stress --mix orders --json`` writes the order figures and exits 0 when clean."""
        code, data = run_cli(tmp_path, ["--mix", "orders", "--workers", "2", "--seconds", "1"])
        assert code == 0
        assert data["violations"] == 0 and data["config"]["positions"] == 64
        o = data["orders"]
        assert set(o["latency"]) == set(CLIENT_OPS)
        assert {"p99_us", "p50_us", "samples"} <= o["latency"]["lookup"].keys()
        assert {"found", "none", "stale"} <= o["lookups"].keys()
        assert o["wrong_order"] == {"wrong_lookup": 0, "wrong_fill": 0, "bad_record": 0}
        assert o["key_exists"] == 0

    def test_fault_exits_nonzero(self, tmp_path: pathlib.Path) -> None:
        """stress --fault misroute: wrong lookups are found and the exit code is 1."""
        code, data = run_cli(tmp_path, ["--mix", "orders", "--workers", "2", "--seconds", "1",
                                        "--fault", "misroute"])
        assert code == 1
        assert data["orders"]["wrong_order"]["wrong_lookup"] > 0

    def test_position_json_has_no_order_section(self, tmp_path: pathlib.Path) -> None:
        """The position workload's JSON is as before (no ``orders`` key)."""
        code, data = run_cli(tmp_path, ["--workers", "1", "--seconds", "0.5"])
        assert code == 0
        assert "orders" not in data
