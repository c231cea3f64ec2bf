"""Report: the human-readable tables of a stress run."""

from __future__ import annotations

from typing import Any

from engine.tools.stress.config import StressResult
from engine.tools.stress.mix import RESULTS


def _us(x: float) -> str:
    return f"{x:,.2f}" if x < 100 else f"{x:,.0f}"


#: what the engine-op columns mean: the workload provokes INVALID (random
#: triggers), CONFLICT, wait timeouts and stale ids on purpose, so "applied"
#: well below 1 is normal; a failure shows as "unexpected" in the workload table
STRESS_LEGEND = (
    "applied: share of calls that changed something (wait: saw a change)\n"
    "expected: share that ended in an outcome the API defines and the workload provokes on "
    "purpose:\n"
    "  INVALID (a random trigger not allowed from the state), CONFLICT, REJECTED, HALTED, "
    "wait timed out\n"
    "errors: calls that raised (here: ids released under them, a full table: the not_open "
    "and full\n"
    "  columns below); a failure shows as 'unexpected' in the workload table, and as "
    "violations")


def format_report(res: StressResult) -> str:
    """The human-readable tables."""
    where = f", engine on Redis at {res.url}" if res.url else ""
    lines = [f"{res.ops:,} ops in {res.seconds:.2f} s = {res.ops_per_s:,.0f} ops/s "
             f"({res.config['workers']} workers, {res.config['positions']} slots{where})",
             *[f"note: {n}" for n in res.notes], ""]
    hdr = (f"{'engine op':<15}{'ops/s':>11}{'applied':>9}{'expected':>9}{'errors':>8}"
           f"{'p50 us':>9}{'p99 us':>9}{'p99.9 us':>10}{'max us':>9}{'retries':>10}"
           f"{'conflicts':>10}")
    lines += [hdr, "-" * len(hdr)]
    for row in res.table:
        if not row["attempts"]:
            lines.append(f"{row['op']:<15}{'-':>11}  (no calls metered)")
            continue
        lat = (f"{_us(row['p50_us']):>9}{_us(row['p99_us']):>9}{_us(row['p999_us']):>10}"
               f"{_us(row['max_us']):>9}") if row["samples"] else f"{'-':>9}" * 3 + f"{'-':>10}"
        expected = 1.0 - row["success_rate"] - row["errors"] / row["attempts"]
        lines.append(f"{row['op']:<15}{row['ops_per_s']:>11,.0f}{row['success_rate']:>9.3f}"
                     f"{max(expected, 0.0):>9.3f}{row['errors']:>8,}{lat}"
                     f"{row['retries']:>10,}{row['conflicts']:>10,}")
    lines += [STRESS_LEGEND, ""]
    hdr = f"{'workload':<11}{'ops/s':>11}" + "".join(f"{r:>11}" for r in RESULTS)
    lines += [hdr, "-" * len(hdr)]
    for kind, c in res.workload.items():
        n = sum(c.values())
        if n:
            rate = n / res.seconds if res.seconds else 0.0
            lines.append(f"{kind:<11}{rate:>11,.0f}" + "".join(f"{c[r]:>11,}" for r in RESULTS))
    v = res.verification
    lines += ["", f"verified: {v['links']:,} chain links on {v['slots']} slots "
              f"({v['applied']:,} applied commits, transitions counters {v['counters_total']:,}, "
              f"engine metrics {v['engine_applied']:,}); {v['reads_checked']:,} reads checked, "
              f"torn {v['torn_price_reads'] + v['torn_context_reads']}, "
              f"version regressions {v['version_regressions']}"]
    j = v.get("journal")
    if j is not None:
        lines += [f"journal cross-check: {j['checked']:,} records"
                  + (" (per shard: states, no generations)" if j["per_shard"] else "")
                  + " against the commits, counters and final words"
                  + (f", books of {j['accounts']} accounts" if j["accounts"] else "")
                  + (f"; LAPPED: {j['lapped']}" if j["lapped"] else "")
                  + (f"; {sum(j['violations'].values())} violations" if j["violations"]
                     else "; agrees")]
        lines += [f"  {k}: {text}" for k, text in j.get("meaning", {}).items()]
    if res.orders is not None:
        lines += ["", *_order_lines(res.orders)]
    if res.accounts is not None:
        lines += ["", *_account_lines(res.accounts)]
    if res.exits is not None:
        e = res.exits
        lines += ["", f"exits: {e['fires']:,} fires ({e['fires_counted']:,} counted by the "
                      f"engine), {e['fires_checked']:,} checked for reason and price, "
                      f"{e['pauses']:,} pauses, {e['cancels']:,} re-arms; at the end "
                      f"{e['armed_at_end']} armed, {e['pending_at_end']} fired"]
    for a in res.alerts:
        lines.append(f"ALERT {a}")
    if res.violations:
        cats = ", ".join(f"{k} {n:,}" for k, n in sorted(v["by_category"].items()))
        lines.append(f"VIOLATIONS: {res.violations:,} ({cats})")
        lines += [f"  {m}" for m in res.violation_messages[:40]]
    else:
        lines.append("violations: 0")
    return "\n".join(lines)


def _order_lines(o: dict[str, Any]) -> list[str]:
    """The order workload's section: client-side latency per op, lookup and
    fill outcomes, wrong-order counts."""
    hdr = f"{'client op':<11}{'samples':>9}{'p50 us':>9}{'p99 us':>9}{'p99.9 us':>10}{'max us':>9}"
    lines = [hdr, "-" * len(hdr)]
    for op, m in o["latency"].items():
        if m["samples"]:
            lines.append(f"{op:<11}{m['samples']:>9,}{_us(m['p50_us']):>9}{_us(m['p99_us']):>9}"
                         f"{_us(m['p999_us']):>10}{_us(m['max_us']):>9}")
        else:
            lines.append(f"{op:<11}{0:>9}  (none sampled)")
    lk, f, od, w = o["lookups"], o["fills"], o["orders"], o["wrong_order"]
    fs = o["final_scan"]
    lines += [
        "",
        f"orders: {od['opened']:,} opened, {od['released']:,} released, {od['binds']:,} "
        f"exchange keys bound, {od['cancels']:,} cancels; open at the end {od['open_at_end']} "
        f"(held {od['held_at_end']}); table full {od['open_full']:,}, key index full "
        f"{od['key_full']:,}; keys() not in bind order {od['keys_out_of_order']:,}",
        f"lookups: {lk['total']:,} ({lk['per_s']:,.0f}/s): found {lk['found']:,}, "
        f"none {lk['none']:,}, stale {lk['stale']:,}, busy {lk['busy']:,}",
        f"fills by lookup: {f['applied']:,} applied (own {f['own']:,}, ws {f['ws']:,}), "
        f"invalid {f['invalid']:,}, stale {f['stale']:,}, busy {f['busy']:,}",
        f"wrong order: lookups {w['wrong_lookup']}, fills {w['wrong_fill']}, bad records "
        f"{w['bad_record']}; KeyExistsError {o['key_exists']}; end-of-run scan: "
        f"{fs['open_orders']} open orders, {fs['keys_checked']} keys checked; "
        f"longest stall {o['max_stall_s']:.1f} s",
    ]
    return lines


def _account_lines(a: dict[str, Any]) -> list[str]:
    """The account workload's section: client-side latency per op, openings
    and refusals by limit, money moved, the books per account, the bar."""
    hdr = f"{'client op':<11}{'samples':>9}{'p50 us':>9}{'p99 us':>9}{'p99.9 us':>10}{'max us':>9}"
    lines = [hdr, "-" * len(hdr)]
    for op, m in a["latency"].items():
        if m["samples"]:
            lines.append(f"{op:<11}{m['samples']:>9,}{_us(m['p50_us']):>9}{_us(m['p99_us']):>9}"
                         f"{_us(m['p999_us']):>10}{_us(m['max_us']):>9}")
        else:
            lines.append(f"{op:<11}{0:>9}  (none sampled)")
    o, c, r, m, u = a["opens"], a["closes"], a["refused"], a["money"], a["updates"]
    bar, fs = a["bar"], a["final_scan"]
    lines += [
        "",
        f"positions: {o['attempts']:,} opens tried ({o['per_s']:,.0f}/s), {o['opened']:,} "
        f"opened, {o['refused']:,} refused ({o['refused_rate']:.1%}: "
        + ", ".join(f"{k} {n:,}" for k, n in r["open"].items())
        + f"), table full {o['full']:,}, busy {o['busy']:,}; {c['closed']:,} closed with "
        f"booked PnL ({c['per_s']:,.0f}/s), {c['released']:,} released",
        f"money: {m['n_deposits']:,} deposits {m['deposits']}, {m['n_withdrawals']:,} "
        f"withdrawals {m['withdrawals']} ({r['withdraw']['cash']:,} refused: cash), realized "
        f"{m['realized']}" + (f"; LEAKED (fault) {m['leaked']:,} units" if m["leaked"] else ""),
        f"limits: {u['applied']:,} update_account ({u['halts']:,} halts, {u['resumes']:,} "
        f"resumes; busy {u['busy']:,}; engine: {u['conflicts']:,} version conflicts, "
        f"{u['retries']:,} retries)",
        "",
        f"{'account':>10}{'cash':>22}{'reserved':>20}{'realized':>20}{'open':>6}  books",
    ]
    for b in a["books"]:
        ok = (b["cash"] == b["want_cash"] and b["reserved"] == b["want_reserved"]
              and b["realized"] == b["want_realized"]
              and b["open_positions"] == b["want_open_positions"])
        lines.append(f"{b['id']:>10}{b['cash']:>22}{b['reserved']:>20}{b['realized']:>20}"
                     f"{b['open_positions']:>6}  " + ("exact" if ok else
                                                     f"OFF: want cash {b['want_cash']}, "
                                                     f"reserved {b['want_reserved']}, realized "
                                                     f"{b['want_realized']}, open "
                                                     f"{b['want_open_positions']}"))
    lines += [
        f"books verified on {fs['accounts']} accounts against {fs['open_positions']} open "
        f"positions ({fs['positions']} rows, {fs['held_at_end']} held by workers); longest "
        f"stall {a['max_stall_s']:.1f} s",
        f"seed 003's bar (1000 ops/s at p99 < 10 ms): {bar['ops_per_s']:,.0f} ops/s, p99 open "
        f"{_us(bar['p99_open_us'])} us, close {_us(bar['p99_close_us'])} us -> "
        + (f"factor {bar['factor']:,.0f} (opens + closes alone: {bar['booked_ops_per_s']:,.0f}/s,"
           f" factor {bar['booked_factor']:,.0f})" if bar["p99_met"] else "p99 NOT met"),
    ]
    return lines
