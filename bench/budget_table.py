"""The memory-budget table of a bench result: budget vs planned peak vs measured VmHWM vs step
time and recomputed FLOPs, one row per pyedge/PyTorch run.

    python -m bench.budget_table bench/results/<name>.json [...]   # markdown on stdout
"""
from __future__ import annotations

import json
import statistics
import sys

MIB = 1 << 20


def _mib(n):
    return "–" if n is None else f"{n / MIB:,.0f}"


def rows(result: dict) -> list[str]:
    out = []
    for r in result["runs"]:
        x = r.get("extra", {})
        budget = x.get("max_memory")
        if not r.get("ok"):
            err = r.get("error", "")
            out.append(f"| {r['workload']} | {r['engine']} | {_mib(budget)} | – | – | – | – | "
                       f"{err[:300]} |")
            continue
        hwm = r.get("peak_rss")
        ms = statistics.median(r["times"]) * 1e3
        fwd = x.get("forward_flops") or 0.0
        rec = x.get("recompute_flops") or 0.0
        rec_s = f"{x.get('recompute_ops', 0)} ops, +{100 * rec / fwd:.0f}%" if fwd else "–"
        under = "" if budget is None else (" ✓" if hwm <= budget else " **over**")
        out.append(f"| {r['workload']} | {r['engine']} | {_mib(budget)} | "
                   f"{_mib(x.get('planned_peak_bytes'))} | {_mib(hwm)}{under} | {ms:,.0f} | "
                   f"{rec_s} | {x.get('recompute_choice', '')} |")
    return out


def table(paths) -> str:
    head = ["| workload | engine | budget MiB | planned peak MiB | VmHWM MiB | ms/step | "
            "recomputed (forward FLOPs) | planner's choice |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    body = []
    for p in paths:
        with open(p) as fh:
            body += rows(json.load(fh))
    return "\n".join(head + body)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
