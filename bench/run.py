"""pyedge benchmark against PyTorch(+PEFT) and onnxruntime-training.

    python -m bench [--workloads 1,2,3,4,5] [--engines pyedge,torch,ort] [--steps N]
                    [--warmup N] [--repeats R] [--threads T] [--quick]

Every (workload, engine) run is its own process (``python -m bench.worker``; the ORT one under
bench/.venv-ort's python), engines alternate: in repeat r the engine order is rotated by r,
and an SGEMM calibration run (numpy/OpenBLAS and pyedge's core GEMM, 1024³, same threads) opens
each repeat and closes the last. Per-step times of all repeats are pooled: median, min–max.
Results go to bench/results/latest.{json,md} (--quick: quick.{json,md}, so a smoke test
never overwrites the numbers the README shows).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import report  # noqa: E402
from bench.workloads import WORKLOADS, ensure_export, expand  # noqa: E402

ENGINES = ("pyedge", "torch", "ort")
PYEDGE_EXPORTER = ("dynamo", None)      # pyedge reads the default (dynamo, opset 18) export
ORT_EXPORTER = ("torchscript", 14)      # LayerNorm decomposed for ORT's gradient builder


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def machine_info(threads):
    model, physical = "unknown", None
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        for line in txt.splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("cpu cores") and physical is None:
                physical = int(line.split(":", 1)[1])
        flags = next((ln.split(":", 1)[1].split() for ln in txt.splitlines()
                      if ln.startswith("flags")), [])
        simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "neon", "asimd") if f in flags]
    except OSError:
        simd = []
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    return {"cpu": model, "logical_cpus": os.cpu_count(), "cores_per_socket": physical,
            "simd": simd, "memory_bytes": mem, "threads_used": threads,
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg_start": os.getloadavg(),
            "openblas_coretype_env": os.environ.get("OPENBLAS_CORETYPE")}


def git_rev():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def worker_env(threads):
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "PYEDGE_NUM_THREADS"):
        env[k] = str(threads)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_worker(python, args, env, timeout):
    cmd = [python, "-m", "bench.worker", *args]
    t0 = time.time()
    load = os.getloadavg()[0]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout}s"}
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"ok": False, "error": f"exit {p.returncode}: " + " | ".join(tail)[:800]}
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = time.time() - t0
    res["loadavg_1min_at_start"] = load
    if not res.get("ok"):
        res.setdefault("stderr_tail", p.stderr.strip().splitlines()[-5:])
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="1,2,3,4,5",
                    help="comma list of 1..5 (5 = the k=1..6 sweep; 5k3 = one point) and the "
                         "decoder LLM workloads 6, 7, 8, llama-w4 (not in the default: W7 "
                         "and W8 need 7+ GB)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per run (default: 20 for W1 and W4, 10 for W5; W2 300, W3 100)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (default: 3; W2 30, W3 10)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per engine, engine order rotated each time (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 3 steps, 1 warm-up, 1 repeat; writes quick.{json,md}")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default=None, help="result file stem (default latest / quick)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per worker run")
    ap.add_argument("--no-ort-install", action="store_true",
                    help="do not create bench/.venv-ort when missing (skip the ORT engine)")
    a = ap.parse_args(argv)
    # SIGTERM -> SystemExit, so subprocess.run kills the running worker on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def steps_for(wid):
        st, wu = WORKLOADS[wid].default_steps(a.quick)
        return (a.steps if a.steps is not None else st,
                a.warmup if a.warmup is not None else wu)
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else 3)
    name = a.name or ("quick" if a.quick else "latest")
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise SystemExit(f"unknown engine(s) {bad}; choose from {','.join(ENGINES)}")
    ids = expand(a.workloads)
    t_start = time.time()
    load_start = os.getloadavg()
    env = worker_env(a.threads)
    notes = []

    pythons = {"pyedge": sys.executable, "torch": sys.executable}
    if "ort" in engines and any("ort" in WORKLOADS[i].engines for i in ids):
        from bench import ort_env
        py = ort_env.ensure(create=not a.no_ort_install)
        if py is None:
            notes.append("onnxruntime-training skipped: no environment (" +
                         "python -m bench.ort_env --print shows how to make it)")
            engines = [e for e in engines if e != "ort"]
        else:
            pythons["ort"] = py

    # Exports (cached in bench/.cache) and the FLOP count of each workload.
    from bench.flops import workload_flops
    paths, flops = {}, {}
    # pyedge variants this pyedge cannot run (W8's 4-bit base without pyedge.quantize): no
    # worker, no export (a 6 GB float export would be for nothing)
    skips = {}
    if "pyedge" in engines:
        from bench.worker import skip_reason
        skips = {wid: r for wid in ids if (r := skip_reason(WORKLOADS[wid]))}
    for wid in ids:
        w = WORKLOADS[wid]
        if wid in skips and not [e for e in engines if e in w.engines and e != "pyedge"]:
            flops[wid] = {"forward": float("nan"), "backward": float("nan"),
                          "total": float("nan"), "unknown_ops": 0}
            notes.append(f"W{wid} pyedge skipped: {skips[wid]}")
            continue
        if "ort" in w.engines:
            ts = ensure_export(w, *ORT_EXPORTER, log=log)
            paths[(wid, "ort")] = ts
        else:  # decoders: no ORT copy (see workloads.py); count on pyedge's export
            ts = ensure_export(w, *PYEDGE_EXPORTER, log=log)
        if "pyedge" in engines and wid not in skips:
            paths[(wid, "pyedge")] = ensure_export(w, *PYEDGE_EXPORTER, log=log)
        flops[wid] = workload_flops(w, ts)

    plan = {wid: [e for e in engines if e in WORKLOADS[wid].engines] for wid in ids}
    runs, sgemm = [], []

    def calibrate(tag):
        r = run_worker(sys.executable, ["--engine", "sgemm", "--threads", str(a.threads),
                                        "--steps", "5" if a.quick else "10"], env, 300)
        r["when"] = tag
        sgemm.append(r)
        if r.get("ok"):
            log(f"sgemm {tag}: numpy {statistics.median(r['numpy']['gflops']):.1f} GFLOP/s" +
                (f", pyedge {statistics.median(r['pyedge']['gflops']):.1f} GFLOP/s"
                 if "pyedge" in r else ""))
        else:
            log(f"sgemm {tag}: FAILED {r.get('error')}")

    for rep in range(repeats):
        calibrate(f"before repeat {rep + 1}")
        # odd repeats walk the workloads backwards, so slow drifts of the machine's load do
        # not line up with the order (the W5 sweep k = 1..6 would otherwise)
        for wid in (ids if rep % 2 == 0 else ids[::-1]):
            engs = plan[wid]
            k = rep % max(1, len(engs))
            order = engs[k:] + engs[:k]
            steps, warmup = steps_for(wid)
            for pos, eng in enumerate(order):
                args = ["--engine", eng, "--workload", wid, "--steps", str(steps),
                        "--warmup", str(warmup), "--threads", str(a.threads)]
                if eng == "pyedge" and wid in skips:
                    r = {"ok": False, "skipped": True, "error": f"skipped: {skips[wid]}"}
                else:
                    if eng in ("pyedge", "ort"):
                        args += ["--onnx", paths[(wid, eng)]]
                    r = run_worker(pythons[eng], args, env, a.timeout)
                r.update(engine=eng, workload=wid, repeat=rep, position=pos)
                runs.append(r)
                if r.get("skipped"):
                    log(f"[{rep + 1}/{repeats}] w{wid:<4} {eng:<6} {r.get('error')}")
                elif r.get("ok"):
                    med = statistics.median(r["times"]) * 1e3
                    log(f"[{rep + 1}/{repeats}] w{wid:<4} {eng:<6} median {med:9.2f} ms/step "
                        f"({steps} steps) peak RSS {r['peak_rss'] / 2**20:7.1f} MiB")
                else:
                    log(f"[{rep + 1}/{repeats}] w{wid:<4} {eng:<6} FAILED: {r.get('error')}")
    calibrate("after the last repeat")

    machine = machine_info(a.threads)
    machine["loadavg_start"] = load_start
    machine["loadavg_end"] = os.getloadavg()
    result = report.summarize(
        runs=runs, sgemm=sgemm, flops=flops, plan=plan, machine=machine, notes=notes,
        config={"workloads": ids, "engines": engines,
                "steps": {w: steps_for(w)[0] for w in ids},
                "warmup": {w: steps_for(w)[1] for w in ids},
                "repeats": repeats, "threads": a.threads, "quick": a.quick,
                "pyedge_export": "dynamo opset 18 (static shapes)",
                "ort_export": "torchscript opset 14 (static shapes), LoRA as plain ONNX ops",
                "git": git_rev(),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "wall_s": time.time() - t_start})
    os.makedirs(a.out, exist_ok=True)
    md = report.markdown(result, plot_dir=a.out)
    with open(os.path.join(a.out, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(a.out, name + ".md"), "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {os.path.relpath(os.path.join(a.out, name + '.json'), ROOT)} and .md "
        f"in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
