#!/usr/bin/env python3
"""Draws delivered rate vs p99 latency (SVG, no dependencies) from the
`max-step` JSON lines of `corecast bench max`, one series per server.

    python3 scripts/chart.py target/bench/results.jsonl docs/fanout-rate-vs-p99.svg
"""
import json
import math
import sys
from collections import defaultdict

COLORS = {"corecast": "#1f77b4", "baseline": "#d62728", "uws": "#2ca02c"}
W, H, L, R, T, B = 760, 440, 80, 170, 40, 60


def main(src, dst):
    series = defaultdict(lambda: defaultdict(list))
    for line in open(src):
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("workload") != "max-step" or r["latency_us"]["samples"] == 0:
            continue
        key = r["server"]
        series[key][r["rate"]].append(
            (r["deliveries_per_s"], max(r["latency_us"]["p99"], 1), r["loss"], r.get("loadgen_bound", False)))
    if not series:
        sys.exit(f"{src}: no max-step results")
    pts = [p for s in series.values() for ps in s.values() for p in ps]
    xmax = max(p[0] for p in pts) * 1.08
    ymin, ymax = 100, max(p[1] for p in pts) * 1.5
    ly0, ly1 = math.log10(ymin), math.log10(ymax)

    def X(v):
        return L + (W - L - R) * v / xmax

    def Y(v):
        v = max(v, ymin)
        return H - B - (H - T - B) * (math.log10(v) - ly0) / (ly1 - ly0)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W/2}" y="22" text-anchor="middle" font-size="15">Fan-out 10 channels x 100 members, one core: delivered rate vs p99 latency</text>']
    # Axes and grid.
    for i in range(6):
        v = xmax * i / 5
        out.append(f'<line x1="{X(v):.1f}" y1="{T}" x2="{X(v):.1f}" y2="{H-B}" stroke="#eee"/>')
        out.append(f'<text x="{X(v):.1f}" y="{H-B+18}" text-anchor="middle">{v/1e6:.2f}M</text>')
    d = 10 ** math.floor(ly0)
    while d <= ymax:
        for m in (1, 2, 5):
            v = d * m
            if ymin <= v <= ymax:
                label = f"{v/1000:g} ms"
                out.append(f'<line x1="{L}" y1="{Y(v):.1f}" x2="{W-R}" y2="{Y(v):.1f}" stroke="#eee"/>')
                out.append(f'<text x="{L-6}" y="{Y(v)+4:.1f}" text-anchor="end">{label}</text>')
        d *= 10
    out.append(f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>')
    out.append(f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>')
    out.append(f'<text x="{(L+W-R)/2}" y="{H-18}" text-anchor="middle">delivered messages per second</text>')
    out.append(f'<text x="18" y="{(T+H-B)/2}" text-anchor="middle" transform="rotate(-90 18 {(T+H-B)/2})">p99 latency (log scale)</text>')
    # Series: the median point per publish rate, joined; every run as a dot.
    ly = T + 10
    for server, by_rate in sorted(series.items()):
        color = COLORS.get(server, "#555")
        line = []
        for rate in sorted(by_rate):
            ps = sorted(by_rate[rate], key=lambda p: p[1])
            mid = ps[len(ps) // 2]
            line.append(f"{X(mid[0]):.1f},{Y(mid[1]):.1f}")
            for p in ps:
                fill = color if p[2] == 0 else "white"
                if p[3]:
                    x, y = X(p[0]), Y(p[1])
                    out.append(f'<rect x="{x-3:.1f}" y="{y-3:.1f}" width="6" height="6" fill="{fill}" stroke="{color}"/>')
                else:
                    out.append(f'<circle cx="{X(p[0]):.1f}" cy="{Y(p[1]):.1f}" r="3" fill="{fill}" stroke="{color}"/>')
        out.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<rect x="{W-R+15}" y="{ly}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{W-R+32}" y="{ly+11}">{server}</text>')
        ly += 20
    out.append(f'<text x="{W-R+15}" y="{ly+11}" font-size="11">hollow: lost messages</text>')
    out.append(f'<text x="{W-R+15}" y="{ly+27}" font-size="11">square: load generator</text>')
    out.append(f'<text x="{W-R+15}" y="{ly+41}" font-size="11">at its limit</text>')
    out.append('</svg>')
    open(dst, "w").write("\n".join(out) + "\n")
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
