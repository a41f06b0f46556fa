#!/usr/bin/env python3
"""Summarise a bench/run.sh results directory.

    python3 bench/report.py bench/results/<run> [--benchmarks BENCHMARKS.md] [--plots docs/bench]

Reads one JSON file per run (written by switchboard-bench --json) and
meta.json, takes the median over repetitions, and
  * writes <run>/summary.json,
  * replaces the part of BENCHMARKS.md between the GENERATED markers,
  * writes docs/bench/latency-cdf.svg and docs/bench/memory-per-connection.svg.
A cluster run (bench/run.sh --cluster) is handed to bench/report_cluster.py.
Standard library only.
"""

import argparse
import glob
import json
import math
import os
import re
import statistics
import sys

SERVERS = ("switchboard", "node")
NAMES = {"switchboard": "Switchboard", "node": "Node (tutorial)"}
COLORS = {"switchboard": "#1f77b4", "node": "#d62728"}
BEGIN = "<!-- BEGIN GENERATED (bench/report.py) -->"
END = "<!-- END GENERATED -->"


def load(run_dir):
    runs = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "*.json"))):
        base = os.path.basename(path)[:-5]
        if base in ("meta", "summary"):
            continue
        m = re.match(r"(.+)-(switchboard|node)-r(\d+)$", base)
        if not m:
            continue
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError:
                continue
        runs.setdefault((m.group(1), m.group(2)), []).append(data)
    with open(os.path.join(run_dir, "meta.json")) as f:
        meta = json.load(f)
    return runs, meta


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def med(runs, scenario, server, key):
    return median([key(r) for r in runs.get((scenario, server), [])])


def fmt(v, digits=0, unit=""):
    if v is None:
        return "n/a"
    if digits == 0:
        return f"{v:,.0f}{unit}"
    return f"{v:,.{digits}f}{unit}"


def ratio(a, b, digits=1):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.{digits}f}×"


def adv(sb, node, higher_better):
    """How many times better Switchboard is (>1: better, <1: worse)."""
    return ratio(sb, node) if higher_better else ratio(node, sb)


def summarize(runs, meta):
    s = {"meta": meta, "idle": {}, "rate": {}, "sat": {}, "channel": {}}
    for n in meta["idle_ns"]:
        sc = f"idle-{n}"
        s["idle"][n] = {
            srv: {
                "kib_per_conn": med(runs, sc, srv, lambda r: r["server_bytes_per_conn"] / 1024
                                    if r.get("server_bytes_per_conn") is not None else None),
                "handshakes_per_sec": med(runs, sc, srv, lambda r: r["handshakes_per_sec"]),
                "cpu_us_per_handshake": med(runs, sc, srv, lambda r: r.get("server_cpu_us_per_handshake")),
                "tool_cpu_us_per_handshake": med(runs, sc, srv, lambda r: r.get("tool_cpu_us_per_handshake")),
                "connected": med(runs, sc, srv, lambda r: r["connected"]),
                "failed": max([r["failed"] for r in runs.get((sc, srv), [])] or [0]),
                "reps": len(runs.get((sc, srv), [])),
            }
            for srv in SERVERS
        }

    def fan(sc, srv):
        rs = runs.get((sc, srv), [])
        return {
            "reps": len(rs),
            "deliveries_per_sec": median([r["deliveries_per_sec"] for r in rs]),
            "p50_us": median([r["latency"]["p50_us"] for r in rs]),
            "p99_us": median([r["latency"]["p99_us"] for r in rs]),
            "p999_us": median([r["latency"]["p999_us"] for r in rs]),
            "max_us": median([r["latency"]["max_us"] for r in rs]),
            "server_cpu_us": median([r.get("server_cpu_us_per_delivery") for r in rs]),
            "server_util": median([r.get("server_cpu_util") for r in rs]),
            "tool_cpu_us": median([r["tool_cpu_us_per_delivery"] for r in rs]),
            "tool_util": median([r["tool_cpu_seconds"] / r["measured_seconds"]
                                 if r["measured_seconds"] else None for r in rs]),
            "lost_total": sum(r["lost"] for r in rs),
            "expected_total": sum(r["expected"] for r in rs),
            "out_of_order_total": sum(r["out_of_order"] for r in rs),
            "send_lag_p99_us": median([r.get("send_lag_p99_us") for r in rs]),
            "closes": sorted({c for r in rs for c, _ in r.get("closes", [])}),
            "disconnects": sorted({d for r in rs for d, _ in r.get("disconnects", [])}),
            "stalls": sum(r.get("stalls", 0) for r in rs),
            "error_frames": sorted({e for r in rs for e, _ in r.get("error_frames", [])}),
        }

    rate_sc = f"rate-{meta['rate_subs']}"
    s["rate"] = {srv: fan(rate_sc, srv) for srv in SERVERS}
    for subs in meta["sat_subs"]:
        s["sat"][subs] = {srv: fan(f"sat-{subs}", srv) for srv in SERVERS}
    s["channel"]["rate"] = fan(f"chrate-{meta['rate_subs']}", "switchboard")
    s["channel"]["sat1000"] = fan("chsat-1000", "switchboard")
    return s


def pick_cdf(runs, scenario, server):
    """CDF of the repetition with the median p99."""
    rs = sorted(runs.get((scenario, server), []), key=lambda r: r["latency"]["p99_us"])
    if not rs:
        return None
    return rs[len(rs) // 2]["latency"]["cdf"]


# ---------------------------------------------------------------- SVG plots

def svg_doc(w, h, body):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">\n'
            f'<rect width="{w}" height="{h}" fill="white"/>\n{body}</svg>\n')


def esc(t):
    return t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Axes:
    def __init__(self, x0, y0, w, h, xlim, ylim, xlog=False, ylog=False):
        self.x0, self.y0, self.w, self.h = x0, y0, w, h
        self.xlim, self.ylim, self.xlog, self.ylog = xlim, ylim, xlog, ylog

    def _t(self, v, lim, log):
        lo, hi = lim
        if log:
            v, lo, hi = math.log10(max(v, 1e-12)), math.log10(lo), math.log10(hi)
        return (v - lo) / (hi - lo) if hi != lo else 0.5

    def px(self, x):
        return self.x0 + self._t(x, self.xlim, self.xlog) * self.w

    def py(self, y):
        return self.y0 + self.h - self._t(y, self.ylim, self.ylog) * self.h

    def frame(self, xticks, yticks, xlabel, ylabel, title):
        out = [f'<rect x="{self.x0}" y="{self.y0}" width="{self.w}" height="{self.h}" '
               f'fill="none" stroke="#333"/>']
        for v, label in xticks:
            x = self.px(v)
            out.append(f'<line x1="{x:.1f}" y1="{self.y0}" x2="{x:.1f}" y2="{self.y0 + self.h}" stroke="#ddd"/>')
            out.append(f'<text x="{x:.1f}" y="{self.y0 + self.h + 16}" text-anchor="middle">{esc(label)}</text>')
        for v, label in yticks:
            y = self.py(v)
            out.append(f'<line x1="{self.x0}" y1="{y:.1f}" x2="{self.x0 + self.w}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{self.x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(label)}</text>')
        out.append(f'<text x="{self.x0 + self.w / 2}" y="{self.y0 + self.h + 36}" text-anchor="middle">{esc(xlabel)}</text>')
        out.append(f'<text transform="translate({self.x0 - 52},{self.y0 + self.h / 2}) rotate(-90)" '
                   f'text-anchor="middle">{esc(ylabel)}</text>')
        out.append(f'<text x="{self.x0 + self.w / 2}" y="{self.y0 - 10}" text-anchor="middle" '
                   f'font-weight="bold">{esc(title)}</text>')
        return "\n".join(out) + "\n"

    def line(self, pts, color, dash=None, markers=False):
        if not pts:
            return ""
        d = " ".join(f"{'M' if i == 0 else 'L'}{self.px(x):.1f},{self.py(y):.1f}" for i, (x, y) in enumerate(pts))
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        out = f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2"{extra}/>\n'
        if markers:
            out += "".join(f'<circle cx="{self.px(x):.1f}" cy="{self.py(y):.1f}" r="3.5" fill="{color}"/>\n'
                           for x, y in pts)
        return out


def log_ticks(lo, hi, fmt_fn):
    ticks = []
    e = math.floor(math.log10(lo))
    while 10 ** e <= hi * 1.0001:
        if 10 ** e >= lo * 0.9999:
            ticks.append((10 ** e, fmt_fn(10 ** e)))
        e += 1
    return ticks


def us_label(v):
    if v >= 1e6:
        return f"{v / 1e6:g} s"
    if v >= 1e3:
        return f"{v / 1e3:g} ms"
    return f"{v:g} µs"


def legend(x, y, entries):
    out = []
    for i, (label, color, dash) in enumerate(entries):
        yy = y + i * 18
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{x}" y1="{yy}" x2="{x + 24}" y2="{yy}" stroke="{color}" stroke-width="2"{extra}/>')
        out.append(f'<text x="{x + 30}" y="{yy + 4}">{esc(label)}</text>')
    return "\n".join(out) + "\n"


def plot_latency(runs, meta, path):
    scenario = f"rate-{meta['rate_subs']}"
    curves = {srv: pick_cdf(runs, scenario, srv) for srv in SERVERS}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False
    xs = [x for c in curves.values() for x, _ in c if x > 0]
    lo = 10 ** math.floor(math.log10(max(min(xs), 1)))
    hi = 10 ** math.ceil(math.log10(max(xs)))
    body = ""
    # Left: CDF. Right: tail (1 - F) on a log scale, where p99/p99.9 show.
    a = Axes(80, 50, 360, 280, (lo, hi), (0, 1), xlog=True)
    body += a.frame(log_ticks(lo, hi, us_label), [(i / 5, f"{i / 5:.1f}") for i in range(6)],
                    "publish → deliver latency", "cumulative fraction",
                    f"CDF: {meta['rate_subs']} subscribers × {meta['rate']} msg/s (broadcast)")
    b = Axes(560, 50, 360, 280, (lo, hi), (1e-5, 1), xlog=True, ylog=True)
    body += b.frame(log_ticks(lo, hi, us_label),
                    [(1, "1"), (0.1, "0.1"), (0.01, "0.01"), (1e-3, "1e-3"), (1e-4, "1e-4"), (1e-5, "1e-5")],
                    "publish → deliver latency", "fraction slower (1 − CDF)", "tail")
    entries = []
    for srv, cdf in curves.items():
        pts = [(max(x, lo), f) for x, f in cdf]
        body += a.line(pts, COLORS[srv])
        tail = [(max(x, lo), max(1 - f, 1e-5)) for x, f in cdf if 1 - f > 0]
        body += b.line(tail, COLORS[srv])
        entries.append((NAMES[srv], COLORS[srv], None))
    body += legend(100, 75, entries)
    note = f"{meta['mode']} run {meta['started']}; preliminary: shared, noisy 2-core machine"
    body += f'<text x="500" y="392" text-anchor="middle" fill="#555">{esc(note)}</text>\n'
    with open(path, "w") as f:
        f.write(svg_doc(1000, 405, body))
    return True


def plot_memory(summary, meta, path):
    ns = sorted(int(n) for n in summary["idle"])
    series = {srv: [(n, summary["idle"][n][srv]["kib_per_conn"]) for n in ns
                    if summary["idle"][n][srv]["kib_per_conn"] is not None] for srv in SERVERS}
    ys = [y for pts in series.values() for _, y in pts]
    if not ys:
        return False
    ymax = max(ys + [1.0]) * 1.15
    step = 10 ** math.floor(math.log10(ymax / 2)) if ymax > 2 else 0.5
    yticks = []
    v = 0.0
    while v <= ymax:
        yticks.append((v, f"{v:g}"))
        v += step
    xlo, xhi = min(ns) * 0.8, max(ns) * 1.25
    a = Axes(80, 50, 560, 300, (xlo, xhi), (0, ymax), xlog=True)
    body = a.frame([(n, f"{n:,}") for n in ns], yticks, "idle connections (N)",
                   "server RSS per connection (KiB)", "Idle memory per connection")
    target = 1.0
    body += a.line([(xlo, target), (xhi, target)], "#2ca02c", dash="6,4")
    entries = []
    for srv, pts in series.items():
        body += a.line(pts, COLORS[srv], markers=True)
        entries.append((NAMES[srv], COLORS[srv], None))
    entries.append(("target: 1 KiB", "#2ca02c", "6,4"))
    body += legend(480, 70, entries)
    note = f"(VmRSS after − before) / N, median of {meta['reps']}; {meta['mode']} run {meta['started']}"
    body += f'<text x="360" y="410" text-anchor="middle" fill="#555">{esc(note)}</text>\n'
    with open(path, "w") as f:
        f.write(svg_doc(700, 425, body))
    return True


# ---------------------------------------------------------------- markdown

def status(ok):
    return "**met**" if ok else "**missed**"


def markdown(summary, meta, machine):
    L = []
    mode = meta["mode"]
    L.append(f"_Generated by `bench/report.py` from `bench/results/{meta['started']}-{mode}` "
             f"({mode} mode: {meta['reps']} repetition(s), medians shown; {meta.get('seconds', '?')} s of runs). "
             f"Load average at start {meta.get('loadavg_start')}, at end {meta.get('loadavg_end')}._")
    L.append("")
    L.append(f"**Machine:** {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
             f"Linux {machine.get('kernel', '?')}; Switchboard `{meta.get('git')}` (release), "
             f"Node {meta.get('node')} with ws {meta.get('ws')} / express {meta.get('express')}. "
             "Server and tool share the same 2 cores.")
    L.append("")

    idle = summary["idle"]
    ns = sorted(int(n) for n in idle)
    L.append("### Idle memory per connection")
    L.append("")
    L.append("| N | Switchboard KiB/conn | Node KiB/conn | Switchboard advantage |")
    L.append("|---:|---:|---:|---:|")
    for n in ns:
        sb, nd = idle[n]["switchboard"], idle[n]["node"]
        fails = ""
        if sb["failed"] or nd["failed"]:
            fails = f" (failed connects: SB {sb['failed']}, Node {nd['failed']})"
        L.append(f"| {n:,} | {fmt(sb['kib_per_conn'], 2)} | {fmt(nd['kib_per_conn'], 2)} | "
                 f"{adv(sb['kib_per_conn'], nd['kib_per_conn'], False)}{fails} |")
    L.append("")
    L.append("### Handshakes per second")
    L.append("")
    L.append("First connect to last welcome, 128 handshakes in flight, measured during the idle runs "
             "(the tool's client handshakes run on the same 2 cores).")
    L.append("")
    L.append("| N | Switchboard /s | Node /s | Switchboard advantage | server CPU µs/handshake (SB / Node) | tool CPU µs/handshake (SB / Node) |")
    L.append("|---:|---:|---:|---:|---:|---:|")
    for n in ns:
        sb, nd = idle[n]["switchboard"], idle[n]["node"]
        L.append(f"| {n:,} | {fmt(sb['handshakes_per_sec'])} | {fmt(nd['handshakes_per_sec'])} | "
                 f"{ratio(sb['handshakes_per_sec'], nd['handshakes_per_sec'])} | "
                 f"{fmt(sb['cpu_us_per_handshake'], 1)} / {fmt(nd['cpu_us_per_handshake'], 1)} | "
                 f"{fmt(sb['tool_cpu_us_per_handshake'], 1)} / {fmt(nd['tool_cpu_us_per_handshake'], 1)} |")
    L.append("")

    r = summary["rate"]
    L.append(f"### Fan-out at a fixed rate: {meta['rate_subs']} subscribers × {meta['rate']} msg/s (broadcast)")
    L.append("")
    L.append(f"1 publisher, {meta['size']}-byte data, {meta['duration']} s; latency from the scheduled "
             "send time to receipt (open loop).")
    L.append("")
    L.append("| | Switchboard | Node | Switchboard advantage |")
    L.append("|---|---:|---:|---:|")
    for label, key, d, hb in [("latency p50 (µs)", "p50_us", 0, False), ("latency p99 (µs)", "p99_us", 0, False),
                              ("latency p99.9 (µs)", "p999_us", 0, False), ("latency max (µs)", "max_us", 0, False),
                              ("server CPU per delivery (µs)", "server_cpu_us", 2, False),
                              ("tool CPU per delivery (µs)", "tool_cpu_us", 2, None),
                              ("deliveries/s", "deliveries_per_sec", 0, None)]:
        a = "" if hb is None else adv(r['switchboard'][key], r['node'][key], hb)
        L.append(f"| {label} | {fmt(r['switchboard'][key], d)} | {fmt(r['node'][key], d)} | {a} |")
    L.append(f"| lost / expected (all reps) | {r['switchboard']['lost_total']:,} / {r['switchboard']['expected_total']:,} "
             f"| {r['node']['lost_total']:,} / {r['node']['expected_total']:,} | |")
    L.append(f"| tool send lag p99 (µs) | {fmt(r['switchboard']['send_lag_p99_us'])} | "
             f"{fmt(r['node']['send_lag_p99_us'])} | |")
    L.append("")

    L.append(f"### Saturation (broadcast, {meta['sat_publishers']} publishers, window {meta['sat_window']} each)")
    L.append("")
    L.append("Each publisher keeps at most the window in flight until its message reaches subscriber 0; "
             "the other subscribers are not bounded by it, so their lag (and latency) can grow.")
    L.append("")
    L.append("| subscribers | | Switchboard | Node | Switchboard advantage |")
    L.append("|---:|---|---:|---:|---:|")
    for subs in sorted(int(x) for x in summary["sat"]):
        s = summary["sat"][subs]
        for label, key, d, hb in [("deliveries/s", "deliveries_per_sec", 0, True),
                                  ("server CPU per delivery (µs)", "server_cpu_us", 2, False),
                                  ("server CPU use (cores)", "server_util", 2, None),
                                  ("tool CPU per delivery (µs)", "tool_cpu_us", 2, None),
                                  ("tool CPU use (cores)", "tool_util", 2, None),
                                  ("latency p50 (µs)", "p50_us", 0, False),
                                  ("latency p99 (µs)", "p99_us", 0, False)]:
            a = "" if hb is None else adv(s['switchboard'][key], s['node'][key], hb)
            L.append(f"| {subs:,} | {label} | {fmt(s['switchboard'][key], d)} | {fmt(s['node'][key], d)} | {a} |")
        L.append(f"| {subs:,} | lost / expected | {s['switchboard']['lost_total']:,} / {s['switchboard']['expected_total']:,} "
                 f"| {s['node']['lost_total']:,} / {s['node']['expected_total']:,} | |")
    L.append("")

    ch = summary["channel"]
    if ch["rate"]["reps"] or ch["sat1000"]["reps"]:
        L.append("### Switchboard channels (subscribe / publish; no Node equivalent)")
        L.append("")
        L.append("| scenario | deliveries/s | p50 µs | p99 µs | p99.9 µs | server CPU µs/delivery | lost / expected |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for label, c in [(f"{meta['rate_subs']} subscribers × {meta['rate']} msg/s", ch["rate"]),
                         (f"1,000 subscribers, saturation", ch["sat1000"])]:
            L.append(f"| {label} | {fmt(c['deliveries_per_sec'])} | {fmt(c['p50_us'])} | {fmt(c['p99_us'])} | "
                     f"{fmt(c['p999_us'])} | {fmt(c['server_cpu_us'], 2)} | {c['lost_total']:,} / {c['expected_total']:,} |")
        L.append("")

    # Anything odd: closes, disconnects, loss, reordering, stalls.
    odd = []
    groups = [("rate", "switchboard", r["switchboard"]), ("rate", "node", r["node"])]
    for subs, s in summary["sat"].items():
        groups += [(f"sat-{subs}", srv, s[srv]) for srv in SERVERS]
    groups += [("channel rate", "switchboard", ch["rate"]), ("channel sat-1000", "switchboard", ch["sat1000"])]
    for name, srv, g in groups:
        bits = []
        if g["lost_total"]:
            bits.append(f"{g['lost_total']:,} of {g['expected_total']:,} deliveries lost")
        if g["out_of_order_total"]:
            bits.append(f"{g['out_of_order_total']:,} out of order")
        if g["closes"]:
            bits.append("close frames: " + ", ".join(g["closes"]))
        if g["disconnects"]:
            bits.append("disconnects: " + ", ".join(g["disconnects"][:3]))
        if g["error_frames"]:
            bits.append("error frames: " + ", ".join(g["error_frames"]))
        if g["stalls"]:
            bits.append(f"{g['stalls']} window stalls > 1 s")
        if bits:
            odd.append(f"- {name}, {NAMES[srv]}: " + "; ".join(bits))
    for n in ns:
        for srv in SERVERS:
            if idle[n][srv]["failed"]:
                odd.append(f"- idle N={n:,}, {NAMES[srv]}: {idle[n][srv]['failed']} connections failed")
    L.append("### Anomalies recorded by the tool")
    L.append("")
    L.extend(odd or ["- none (no loss, no reordering, no close frames, no failed connections)"])
    L.append("")

    # Targets.
    L.append("### Targets (issue 6)")
    L.append("")
    L.append("| target | measured (Switchboard) | status |")
    L.append("|---|---|---|")
    nmax = max(ns)
    kib = idle[nmax]["switchboard"]["kib_per_conn"]
    at = "" if nmax >= 19000 else f" (largest N in this run: {nmax:,})"
    if kib is not None:
        L.append(f"| ≤ 1 KiB RSS per idle connection at 19k | {kib:.2f} KiB at N={nmax:,}{at} | "
                 f"{status(kib <= 1.0)}{'' if kib <= 1.0 else f' by {kib - 1.0:.2f} KiB ({kib:.1f}× the target)'} |")
    sat = summary["sat"].get(1000) or summary["sat"].get("1000")
    if sat:
        cpu = sat["switchboard"]["server_cpu_us"]
        if cpu is not None:
            L.append(f"| ≤ 2 µs server CPU per delivery, saturation, 1,000 subscribers | {cpu:.2f} µs | "
                     f"{status(cpu <= 2.0)}{'' if cpu <= 2.0 else f' by {cpu - 2.0:.2f} µs ({cpu / 2.0:.1f}× the target)'} |")
        a, b = sat["switchboard"]["deliveries_per_sec"], sat["node"]["deliveries_per_sec"]
        if a and b:
            x = a / b
            L.append(f"| saturation deliveries/s ≥ 5× Node (1,000 subscribers) | {a:,.0f} vs {b:,.0f}/s = {x:.1f}× | "
                     f"{status(x >= 5)}{'' if x >= 5 else f' ({x:.1f}× of 5×)'} |")
    p99 = r["switchboard"]["p99_us"]
    if p99 is not None:
        L.append(f"| p99 ≤ 2 ms at {meta['rate_subs']} subscribers × {meta['rate']} msg/s | {p99:,.0f} µs | "
                 f"{status(p99 <= 2000)}{'' if p99 <= 2000 else f' by {p99 - 2000:,.0f} µs'} |")
    # Judged on the largest N: the longest burst of handshakes (about a
    # second at 19k); runs at small N last tens of milliseconds, mostly
    # ramp-up, and are shown beside it.
    nmax = max(ns)
    hs = idle[nmax]["switchboard"]["handshakes_per_sec"]
    others = [idle[n]["switchboard"]["handshakes_per_sec"] for n in ns if n != nmax]
    others = [x for x in others if x]
    if hs is not None:
        rest = (f"; {min(others) / 1000:.1f}–{max(others) / 1000:.1f} k/s in the shorter runs at N ≤ "
                f"{max(n for n in ns if n != nmax):,}" if others else "")
        L.append(f"| ≥ 20k handshakes/s | {hs:,.0f}/s at N={nmax:,} (median of {meta['reps']}{rest}) | "
                 f"{status(hs >= 20000)}{'' if hs >= 20000 else f' ({hs / 20000:.0%} of the target)'} |")
    L.append("")
    L.append("![latency CDF](docs/bench/latency-cdf.svg)")
    L.append("")
    L.append("![memory per connection](docs/bench/memory-per-connection.svg)")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--benchmarks", help="BENCHMARKS.md to update between the GENERATED markers")
    ap.add_argument("--plots", help="directory for the SVG plots")
    args = ap.parse_args()
    with open(os.path.join(args.run_dir, "meta.json")) as f:
        meta = json.load(f)
    if meta.get("mode", "").startswith("cluster"):
        # bench/run.sh --cluster: its own tables and plot.
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import report_cluster
        report_cluster.run(args.run_dir, meta, args.benchmarks, args.plots)
        return
    runs, meta = load(args.run_dir)
    if not runs:
        sys.exit(f"report.py: no results in {args.run_dir}")
    summary = summarize(runs, meta)
    machine = next(iter(runs.values()))[0].get("machine", {})
    with open(os.path.join(args.run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    md = markdown(summary, meta, machine)
    print(md)
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        plot_latency(runs, meta, os.path.join(args.plots, "latency-cdf.svg"))
        plot_memory(summary, meta, os.path.join(args.plots, "memory-per-connection.svg"))
    if args.benchmarks:
        text = open(args.benchmarks).read() if os.path.exists(args.benchmarks) else ""
        block = f"{BEGIN}\n{md}\n{END}"
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text = text + "\n" + block + "\n"
        with open(args.benchmarks, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
