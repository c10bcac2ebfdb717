#!/usr/bin/env python3
"""Medians per server and workload from `corecast bench` JSON lines (as
written by scripts/bench-compare.sh), as Markdown tables.

    python3 scripts/summarize.py target/bench/results.jsonl
"""
import json
import statistics
import sys
from collections import defaultdict


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, nd=0):
    if v is None:
        return "-"
    if isinstance(v, float) and nd:
        return f"{v:,.{nd}f}"
    return f"{v:,.0f}"


def header(*cols):
    """A Markdown table's first two lines."""
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))


def main(path):
    runs = [json.loads(l) for l in open(path) if l.strip()]
    if not runs:
        sys.exit(f"{path}: no results")
    groups = defaultdict(list)
    for r in runs:
        groups[(r["label"], r["server"], r["workload"])].append(r)

    header("load", "server", "runs", "deliveries/s", "server µs/delivery", "p50 µs", "p99 µs", "loss", "load generator bound")
    for (label, server, w), rs in sorted(groups.items()):
        if w != "fanout":
            continue
        print(
            f"| {label} | {server} | {len(rs)} | {fmt(med(r['deliveries_per_s'] for r in rs))} "
            f"| {fmt(med(r['server_cpu_us_per_delivery'] for r in rs), 2)} "
            f"| {fmt(med(r['latency_us']['p50'] for r in rs))} | {fmt(med(r['latency_us']['p99'] for r in rs))} "
            f"| {fmt(med(r['loss'] for r in rs))} | {sum(1 for r in rs if r['loadgen_bound'])} of {len(rs)} |"
        )
    print()
    header("load", "server", "runs", "sustained deliveries/s (p99 ≤ bound, no loss)", "p99 µs there", "p99 µs at half", "stopped by")
    for (label, server, w), rs in sorted(groups.items()):
        if w != "max":
            continue
        print(
            f"| {label} | {server} | {len(rs)} | {fmt(med(r.get('sustained_deliveries_per_s') for r in rs))} "
            f"| {fmt(med(r.get('latency_us', {}).get('p99') for r in rs))} "
            f"| {fmt(med(r.get('half_rate_latency_us', {}).get('p99') for r in rs))} "
            f"| {'; '.join(sorted(set(r['stopped_by'] for r in rs)))} |"
        )
    print()
    print("Every `max` step, by server and publish rate (medians over the runs that tried that rate):")
    print()
    header("server", "publishes/s", "runs", "deliveries/s", "server µs/delivery", "server core", "p50 µs", "p99 µs", "loss", "load generator core")
    steps = defaultdict(list)
    for r in runs:
        if r["workload"] == "max-step":
            steps[(r["server"], round(r["rate"]))].append(r)
    for (server, rate), rs in sorted(steps.items()):
        print(
            f"| {server} | {rate:,} | {len(rs)} | {fmt(med(r['deliveries_per_s'] for r in rs))} "
            f"| {fmt(med(r['server_cpu_us_per_delivery'] for r in rs), 2)} "
            f"| {fmt(med(100 * (r.get('server_core_share') or 0) for r in rs))}% "
            f"| {fmt(med(r['latency_us']['p50'] for r in rs))} | {fmt(med(r['latency_us']['p99'] for r in rs))} "
            f"| {fmt(med(r['loss'] for r in rs))} | {fmt(med(100 * r['loadgen_core_share'] for r in rs))}% |"
        )
    print()
    header("load", "server", "runs", "round trips/s", "server µs/round trip", "p50 µs", "p99 µs", "connections closed")
    for (label, server, w), rs in sorted(groups.items()):
        if w != "echo":
            continue
        print(
            f"| {label} | {server} | {len(rs)} | {fmt(med(r['round_trips_per_s'] for r in rs))} "
            f"| {fmt(med(r['server_cpu_us_per_round_trip'] for r in rs), 2)} "
            f"| {fmt(med(r['latency_us']['p50'] for r in rs))} | {fmt(med(r['latency_us']['p99'] for r in rs))} "
            f"| {fmt(med(r['closed_connections'] for r in rs))} |"
        )
    print()
    header("load", "server", "runs", "server RSS bytes/connection", "connects/s",
           "server µs/connection opened", "load generator core while opening")
    for (label, server, w), rs in sorted(groups.items()):
        if w != "idle":
            continue
        # Runs recorded before these figures existed have none ("-").
        share = med(r.get("open_loadgen_core_share") for r in rs)
        print(
            f"| {label} | {server} | {len(rs)} | {fmt(med(r['server_rss_bytes_per_connection'] for r in rs))} "
            f"| {fmt(med(r['connects_per_s'] for r in rs))} "
            f"| {fmt(med(r.get('server_cpu_us_per_open') for r in rs), 1)} "
            f"| {'-' if share is None else f'{share * 100:.0f}%'} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/bench/results.jsonl")
