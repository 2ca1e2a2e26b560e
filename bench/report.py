"""Aggregation (medians over pooled steps), targets, and the Markdown/console table."""
from __future__ import annotations

import os
import statistics

MiB = 2 ** 20

# (workload, description, kind, peer/None, threshold)
TARGETS = [
    ("1", "time <= 1.0x ORT-training", "time_ratio", "ort", 1.0),
    ("1", "time <= 0.6x PyTorch", "time_ratio", "torch", 0.6),
    ("1", ">= 85% of measured SGEMM rate", "sgemm_fraction", None, 0.85),
    ("1", "peak RSS <= 0.5x the smaller peer", "rss_vs_min_peer", None, 0.5),
    ("2", "time <= 1.0x ORT-training", "time_ratio", "ort", 1.0),
    ("2", "time <= 0.4x PyTorch", "time_ratio", "torch", 0.4),
    ("2", "peak RSS <= 150 MiB", "rss_mib", None, 150.0),
    ("3", "time <= 1.0x ORT-training", "time_ratio", "ort", 1.0),
    ("3", "time <= 0.4x PyTorch", "time_ratio", "torch", 0.4),
    ("3", "peak RSS <= 150 MiB", "rss_mib", None, 150.0),
    ("4", "time <= 0.6x PyTorch", "time_ratio", "torch", 0.6),
    ("4", "peak RSS <= 0.6x PyTorch", "rss_ratio", "torch", 0.6),
    ("5", "pyedge k=1 time <= 0.6x its k=6 time", "sparse", None, 0.6),
]


def _median(xs):
    return statistics.median(xs) if xs else None


def summarize(runs, sgemm, flops, plan, machine, notes, config) -> dict:
    # Machine SGEMM rate, like for like with the step times: the median over all calibration
    # calls of the faster library (numpy's OpenBLAS or pyedge's core GEMM), since a step time
    # is a median too and both see the same load. The best single call (a burst no median
    # ever matches on a shared machine) is kept beside it and compared with the best step.
    cal, pooled = [], {}
    for r in sgemm:
        if not r.get("ok"):
            continue
        row = {"when": r.get("when")}
        for lib in ("numpy", "pyedge"):
            if lib in r:
                row[lib] = _median(r[lib]["gflops"])
                row[f"{lib}_best"] = max(r[lib]["gflops"])
                pooled.setdefault(lib, []).extend(r[lib]["gflops"])
        row["pyedge_blas_core"] = r.get("pyedge_blas_core")
        row["pyedge_core_target"] = r.get("pyedge_core_target")
        row["best"] = max(v for k, v in row.items() if k.endswith("_best") and v is not None)
        cal.append(row)
    medians = {lib: statistics.median(v) for lib, v in pooled.items()}
    rate = max(medians.values(), default=None)
    rate_lib = max(medians, key=medians.get) if medians else None
    rate_best = max([c["best"] for c in cal], default=None)

    summary = {}
    for wid, engines in plan.items():
        summary[wid] = {}
        for eng in engines:
            rs = [r for r in runs if r["workload"] == wid and r["engine"] == eng]
            ok = [r for r in rs if r.get("ok")]
            times = [t for r in ok for t in r["times"]]
            s = {"runs": len(rs), "ok_runs": len(ok),
                 "errors": sorted({r.get("error", "?") for r in rs if not r.get("ok")})}
            if times:
                med = statistics.median(times)
                s.update(
                    median_ms=med * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
                    steps=len(times),
                    repeat_medians_ms=[statistics.median(r["times"]) * 1e3 for r in ok],
                    peak_rss_mib=max(r["peak_rss"] for r in ok) / MiB,
                    gflops=flops[wid]["total"] / med / 1e9,
                    first_loss=ok[0]["losses"][0], last_loss=ok[0]["losses"][-1],
                    build_s=statistics.median([r["build_s"] for r in ok]),
                    versions=ok[0].get("versions", {}), extra=ok[0].get("extra", {}))
                s["sgemm_fraction"] = s["gflops"] / rate if rate else None
                s["sgemm_fraction_best"] = (flops[wid]["total"] / min(times) / 1e9 / rate_best
                                            if rate_best else None)
            summary[wid][eng] = s
        pe = summary[wid].get("pyedge", {})
        for peer in ("torch", "ort"):
            ps = summary[wid].get(peer, {})
            if pe.get("median_ms") and ps.get("median_ms"):
                summary[wid][f"pyedge/{peer}"] = {
                    "time": pe["median_ms"] / ps["median_ms"],
                    "rss": pe["peak_rss_mib"] / ps["peak_rss_mib"]}

    targets = []
    for wid, text, kind, peer, thr in TARGETS:
        if wid == "5":
            if not any(k.startswith("5k") for k in plan):
                continue
        elif wid not in plan:
            continue
        val, why = None, ""
        pe = summary.get(wid, {}).get("pyedge", {})
        if kind == "time_ratio":
            val = summary[wid].get(f"pyedge/{peer}", {}).get("time")
            why = "" if val is not None else f"needs pyedge and {peer} results"
        elif kind == "rss_ratio":
            val = summary[wid].get(f"pyedge/{peer}", {}).get("rss")
            why = "" if val is not None else f"needs pyedge and {peer} results"
        elif kind == "rss_vs_min_peer":
            peers = [summary[wid][p]["peak_rss_mib"] for p in ("torch", "ort")
                     if summary[wid].get(p, {}).get("peak_rss_mib")]
            if pe.get("peak_rss_mib") and peers:
                val = pe["peak_rss_mib"] / min(peers)
            else:
                why = "needs pyedge and a peer result"
        elif kind == "rss_mib":
            val = pe.get("peak_rss_mib")
            why = "" if val is not None else "no pyedge result"
        elif kind == "sgemm_fraction":
            val = pe.get("sgemm_fraction")
            why = "" if val is not None else "no pyedge result / no SGEMM rate"
        elif kind == "sparse":
            k1 = summary.get("5k1", {}).get("pyedge", {}).get("median_ms")
            k6 = summary.get("5k6", {}).get("pyedge", {}).get("median_ms")
            val = k1 / k6 if k1 and k6 else None
            why = "" if val is not None else "needs pyedge at k=1 and k=6"
        held = None if val is None else (val >= thr if kind == "sgemm_fraction" else val <= thr)
        targets.append({"workload": wid, "target": text, "value": val, "threshold": thr,
                        "kind": kind, "held": held, "why_not_measured": why})

    return {"config": config, "machine": machine, "notes": notes,
            "flops": {k: v for k, v in flops.items()},
            "flop_method": ("GEMM-like ops only (MatMul/Gemm/Conv incl. LoRA adapters), "
                            "dense forward + the backward a pruned plan needs (dX only where X "
                            "depends on a trainable tensor, dW only for trainable W); counted "
                            "on the ONNX graph, same number for every engine"),
            "sgemm": {"calibrations": cal, "rate_gflops": rate, "rate_library": rate_lib,
                      "library_medians": medians, "best_call_gflops": rate_best,
                      "method": "1024^3 float32, numpy (OpenBLAS) and pyedge._core MatMul, "
                                "same thread count; rate = median over all calibration calls "
                                "of the faster library (compared with the median step); best "
                                "single call kept (compared with the fastest step)"},
            "summary": summary, "targets": targets, "runs": runs, "sgemm_runs": sgemm}


# ----------------------------------------------------------------------------- rendering
NAMES = {"pyedge": "pyedge", "torch": "PyTorch eager" , "ort": "ORT-training 1.19.2"}


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def _ms(x):
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def markdown(res, plot_dir=None) -> str:
    from bench.workloads import WORKLOADS

    c, m, s = res["config"], res["machine"], res["summary"]
    L = []
    L.append("## pyedge training benchmark")
    L.append("")
    L.append(f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs"
             + (f" ({', '.join(m['simd'])})" if m.get("simd") else "")
             + (f", {m['memory_bytes'] / 2**30:.0f} GiB" if m.get("memory_bytes") else "")
             + f"; threads used: {c['threads']} for every engine")
    la0, la1 = m.get("loadavg_start"), m.get("loadavg_end")
    loads = [r["loadavg_1min_at_start"] for r in res.get("runs", [])
             if "loadavg_1min_at_start" in r]
    if la0:
        hi = max([la0[0], la1[0]] + loads)
        L.append(f"- load average (1 min) at start / end: {la0[0]:.2f} / {la1[0]:.2f}"
                 + (f", {min(loads):.2f}–{max(loads):.2f} at the starts of the runs"
                    if loads else "")
                 + ("  — **machine shared with other work: absolute times are noisy**"
                    if hi > c["threads"] + 0.5 else ""))
    sw = sorted({(c["steps"][w], c["warmup"][w]) for w in c["workloads"]}, reverse=True)
    L.append(f"- {c['date']}, git {c['git']}; timed steps after warm-up per run: "
             + ", ".join(f"{st} after {wu}" for st, wu in sw)
             + f"; {c['repeats']} repeat(s) per engine with the engine order rotated, each run "
             "a separate process; step times of all repeats pooled")
    sg = res["sgemm"]
    if sg["rate_gflops"]:
        parts = ", ".join(f"numpy {_f(x.get('numpy'), '{:.1f}')}"
                          + (f" / pyedge {_f(x.get('pyedge'), '{:.1f}')}" if 'pyedge' in x else "")
                          for x in sg["calibrations"])
        lib = {"pyedge": "pyedge's core GEMM", "numpy": "numpy/OpenBLAS"}[sg["rate_library"]]
        L.append(f"- SGEMM rate (1024³ fp32, {c['threads']} threads): "
                 f"**{sg['rate_gflops']:.1f} GFLOP/s** = median over all calibration calls of "
                 f"{lib} (the faster library; `% SGEMM` compares it with the median step). Best single "
                 f"call {_f(sg.get('best_call_gflops'), '{:.1f}')} GFLOP/s (compared with the "
                 f"fastest step in the targets). Medians of the {len(sg['calibrations'])} "
                 f"calibration runs: {parts}")
        cores = sorted({x["pyedge_blas_core"] for x in sg["calibrations"] if x.get("pyedge_blas_core")})
        if cores:
            L.append(f"- OpenBLAS kernels: pyedge's copy {'/'.join(cores)}; numpy's follow "
                     f"OPENBLAS_CORETYPE={m.get('openblas_coretype_env') or '(unset)'} "
                     "(pyedge/cpu_defaults.py)")
        targets = sorted({x["pyedge_core_target"] for x in sg["calibrations"]
                          if x.get("pyedge_core_target")})
        if targets:
            L.append(f"- pyedge's core: the {'/'.join(targets)} build (pyedge/core_variant.py)")
    L.append(f"- FLOPs per step: {res['flop_method']}")
    for n in res.get("notes", []):
        L.append(f"- note: {n}")
    L.append("")

    main = [w for w in c["workloads"] if not w.startswith("5k")]
    if main:
        L.append("| workload | engine | median ms/step | min–max ms | peak RSS MiB | GFLOP/s | "
                 "% SGEMM | pyedge/this time | pyedge/this RSS | first loss | medians of the runs |")
        L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for wid in main:
            w = WORKLOADS[wid]
            title = f"W{wid} {w.title} ({res['flops'][wid]['total'] / 1e9:.3g} GFLOP)"
            for eng, st in s[wid].items():
                if "/" in eng:
                    continue
                ratio = s[wid].get(f"pyedge/{eng}", {})
                if st.get("median_ms") is None:
                    err = (st.get("errors") or ["no result"])[0]
                    what = err[:120] if err.startswith("skipped:") else f"failed: {err[:120]}"
                    L.append(f"| {title} | {NAMES[eng]} | {what} | | | | | | | | |")
                else:
                    L.append(
                        f"| {title} | {NAMES[eng]} | {_ms(st['median_ms'])} | "
                        f"{_ms(st['min_ms'])}–{_ms(st['max_ms'])} | {st['peak_rss_mib']:.0f} | "
                        f"{st['gflops']:.2f} | {_f(st.get('sgemm_fraction'), '{:.0%}')} | "
                        f"{_f(ratio.get('time'), '{:.2f}×')} | {_f(ratio.get('rss'), '{:.2f}×')} | "
                        f"{st['first_loss']:.5f} | "
                        f"{', '.join(_ms(x) for x in st['repeat_medians_ms'])} |")
                title = ""
        L.append("")

    sweep = [w for w in c["workloads"] if w.startswith("5k")]
    if sweep:
        engines = [e for e in ("pyedge", "torch", "ort") if any(e in s[w] for w in sweep)]
        L.append("**W5 sparse scaling** — MiniLM, LoRA q/v on the last k of 6 layers + head "
                 "(16×128); median ms/step")
        L.append("")
        L.append("| k | GFLOP (fwd + needed bwd) | pyedge backward ops | " +
                 " | ".join(f"{NAMES[e]} ms | {NAMES[e]} k/k=6" for e in engines) + " |")
        L.append("|---:|---:|---:|" + "---:|---:|" * len(engines))
        k6 = {e: s.get("5k6", {}).get(e, {}).get("median_ms") for e in engines}
        for wid in sweep:
            bops = s[wid].get("pyedge", {}).get("extra", {}).get("backward_ops")
            row = [wid[2:], f"{res['flops'][wid]['total'] / 1e9:.1f}", _f(bops, "{}")]
            for e in engines:
                v = s[wid].get(e, {}).get("median_ms")
                row += [_ms(v), _f(v / k6[e] if v and k6[e] else None, "{:.2f}")]
            L.append("| " + " | ".join(row) + " |")
        L.append("")
        png = plot_sweep(res, sweep, engines, plot_dir) if plot_dir else None
        if png:
            L.append(f"![sparse scaling]({os.path.basename(png)})")
            L.append("")

    if res["targets"]:
        L.append("**Targets** (from this run)")
        L.append("")
        L.append("| workload | target | measured | result |")
        L.append("|---|---|---:|---|")
        for t in res["targets"]:
            v = t["value"]
            if v is None:
                meas, verdict = "–", f"not measured ({t['why_not_measured']})"
            else:
                meas = {"sgemm_fraction": f"{v:.0%}", "rss_mib": f"{v:.0f} MiB"}.get(
                    t["kind"], f"{v:.2f}×")
                fb = s.get(t["workload"], {}).get("pyedge", {}).get("sgemm_fraction_best")
                if t["kind"] == "sgemm_fraction" and fb is not None:
                    meas += f" (fastest step vs best call: {fb:.0%})"
                verdict = "**held**" if t["held"] else "not held"
            L.append(f"| W{t['workload']} | {t['target']} | {meas} | {verdict} |")
        L.append("")
    return "\n".join(L) + "\n"


def plot_sweep(res, sweep, engines, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = res["summary"]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for e in engines:
        ks = [int(w[2:]) for w in sweep if s[w].get(e, {}).get("median_ms")]
        ys = [s[w][e]["median_ms"] for w in sweep if s[w].get(e, {}).get("median_ms")]
        if ks:
            ax.plot(ks, ys, marker="o", label=NAMES[e])
    ax.set_xlabel("LoRA on the last k of 6 layers")
    ax.set_ylabel("ms / step (median)")
    ax.set_title("MiniLM 16×128: step time vs k")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "sparse_scaling.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    """python -m bench.report bench/results/latest.json — re-renders the .md next to it."""
    import argparse
    import json
    ap = argparse.ArgumentParser(prog="python -m bench.report")
    ap.add_argument("json_path")
    a = ap.parse_args(argv)
    with open(a.json_path) as f:
        res = json.load(f)
    md = markdown(res, plot_dir=os.path.dirname(os.path.abspath(a.json_path)))
    out = os.path.splitext(a.json_path)[0] + ".md"
    with open(out, "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
