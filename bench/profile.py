"""Per-op-family time breakdown of one pyedge training step.

    python -m bench.profile --workload 1 [--threads 2] [--steps 5] [--top 12] [--replay] [--perf]

With a core that times its plan (``Session.profiling`` / ``Session.last_profile()``: node,
op type, forward/backward, seconds, calls), the real steps are profiled: every op of the plan
is timed in place over --steps steps and the per-step average is reported; what is left of
the measured step time is the optimizer, the Python call and input checks.

Without it (older cores), or with --replay, each op of the step is *replayed* alone through
``pyedge._core.run_op`` on the real intermediate tensors of one batch (fetched with
``Session.run``): forward for every op the plan does not fold away, backward (the VJP with
gradients only for the inputs that depend on a trainable tensor, as the pruned plan does)
for the plan's ``backward_nodes``; each op is timed on its own (median of --reps), so the
sum differs from a real step by the plan's memory reuse, run_op's output copies and the
optimizer.

--perf additionally samples real steps with ``perf record`` and splits the samples by shared
object (pyedge core, OpenBLAS, OpenMP runtime, Python, kernel).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FAMILIES = {
    "GEMM (MatMul/Gemm/LoRA)": {"MatMul", "Gemm", "LoraMatMul"},
    "Conv": {"Conv", "ConvTranspose"},
    "Normalization": {"LayerNormalization", "BatchNormalization", "GroupNormalization",
                      "InstanceNormalization", "SimplifiedLayerNormalization"},
    "Softmax": {"Softmax", "LogSoftmax"},
    "Loss": {"CrossEntropyLoss", "SoftmaxCrossEntropyLoss", "MSELoss"},
    "Reduce": {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2",
               "ReduceSumSquare", "ArgMax", "ArgMin"},
    "Pooling": {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"},
    "Layout/index": {"Reshape", "Transpose", "Concat", "Slice", "Gather", "GatherElements",
                     "GatherND", "ScatterND", "Split", "Squeeze", "Unsqueeze", "Expand",
                     "Flatten", "Tile", "Pad", "Identity", "Shape", "Size", "Range",
                     "ConstantOfShape", "Trilu", "CumSum"},
}


def family(op_type: str) -> str:
    op_type = op_type.rsplit(".", 1)[-1]  # "pyedge.LoraMatMul" -> "LoraMatMul"
    for fam, ops in FAMILIES.items():
        if op_type in ops:
            return fam
    return "Elementwise/other"


def _session(w, onnx_path, threads):
    import pyedge
    lora = pyedge.LoraConfig(r=w.lora_r, alpha=w.lora_alpha,
                             target_modules=list(w.lora_targets)) if w.lora_targets else None
    return pyedge.TrainingSession(onnx_path, lora=lora, train=list(w.train), loss=w.loss,
                                  optimizer=pyedge.AdamW(lr=w.lr), threads=threads)


def _time(f, reps):
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def replay(sess, batch, reps=3, log=print):
    """[(node name, op_type, forward s, backward s or None)] for one batch."""
    import numpy as np
    from pyedge import _core

    g = sess.graph
    inputs, labels = batch
    feed = sess._input_list(inputs, labels)
    graph_inputs = {n: a for n, a in zip(sess._input_names, feed) if a is not None}
    # values that depend on a graph input (the rest the plan folds at plan time)
    dynamic = set(graph_inputs)
    trainable = set(sess.trainable_parameters())
    rg = set(trainable)
    for n in g.nodes:
        if any(i in dynamic or i in trainable for i in n.inputs if i):
            dynamic.update(o for o in n.outputs if o)
        if any(i in rg for i in n.inputs if i):
            rg.update(o for o in n.outputs if o)
    wanted = [o for n in g.nodes for o in n.outputs if o]  # folded ones too: their users need them
    values = dict(graph_inputs)
    try:
        values.update(zip(wanted, sess._sess.run(feed, wanted)))
    except Exception:  # some value the plan does not keep: fetch one by one
        for o in wanted:
            try:
                values[o] = sess._sess.run(feed, [o])[0]
            except Exception:
                pass
    stats = sess.plan_stats(inputs)
    bwd_nodes = set(stats.get("backward_nodes", []))
    rows = []
    rng = np.random.default_rng(0)
    for n in g.nodes:
        if n.op_type == "Constant" or not any(i in dynamic for i in n.inputs if i):
            continue
        args = []
        missing = False
        for i in n.inputs:
            if not i:
                args.append(None)
            elif i in values:
                args.append(values[i])
            elif i in g.initializers:
                args.append(g.initializers[i])
            else:
                missing = True
                break
        if missing:
            log(f"  skipped {n.op_type} '{n.name}': an input was not kept by the plan")
            continue
        kw = dict(attrs=n.attrs, domain=n.domain, opset=g.opset(n.domain),
                  num_outputs=len(n.outputs))
        try:
            fwd = _time(lambda: _core.run_op(n.op_type, args, **kw), reps)
        except Exception as e:
            log(f"  skipped {n.op_type} '{n.name}': {type(e).__name__}: {str(e)[:120]}")
            continue
        bwd = None
        if n.name in bwd_nodes:
            outs = _core.run_op(n.op_type, args, **kw)[0]
            gouts = [rng.standard_normal(o.shape).astype(o.dtype) if o.dtype.kind == "f"
                     else None for o in outs]
            const = [k for k, i in enumerate(n.inputs) if i and i not in rg]
            try:
                both = _time(lambda: _core.run_op(n.op_type, args, grad_outputs=gouts,
                                                  const_inputs=const, **kw), reps)
                bwd = max(both - fwd, 0.0)
            except Exception as e:
                log(f"  no backward timing for {n.op_type} '{n.name}': {str(e)[:120]}")
        rows.append((n.name, n.op_type, fwd, bwd))
    return rows


def perf_split(w, onnx_path, threads, steps):
    """Samples `steps` real steps with perf; {shared object group: % of samples}."""
    if not shutil.which("perf"):
        return None, "perf is not installed"
    tmp = tempfile.mkdtemp(prefix="pyedge-perf-")
    data = os.path.join(tmp, "perf.data")
    cmd = ["perf", "record", "-F", "499", "-o", data, "--", sys.executable, "-m",
           "bench.worker", "--engine", "pyedge", "--workload", w.id, "--onnx", onnx_path,
           "--steps", str(steps), "--warmup", "1", "--threads", str(threads)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        return None, "perf record failed: " + r.stderr.strip()[-300:]
    rep = subprocess.run(["perf", "report", "-i", data, "--sort", "dso", "--stdio"],
                         capture_output=True, text=True).stdout
    shutil.rmtree(tmp, ignore_errors=True)
    groups = {}
    for line in rep.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "%" not in line:
            continue
        pct, dso = line.split(None, 1)
        dso = dso.strip()
        g = ("pyedge core (_core.so)" if "_core" in dso else
             "OpenBLAS" if "openblas" in dso.lower() else
             "OpenMP runtime (libgomp)" if "gomp" in dso or "omp" in dso else
             "Python interpreter" if "python" in dso.lower() else
             "kernel" if "kernel" in dso else
             "numpy / onnx / other libs")
        groups[g] = groups.get(g, 0.0) + float(pct.rstrip("%"))
    return groups, "(whole process incl. import and plan build; the _core module is stripped, " \
                   "so no per-symbol split)"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="real steps timed (and profiled)")
    ap.add_argument("--top", type=int, default=12, help="slowest single ops to list")
    ap.add_argument("--perf", action="store_true", help="also sample real steps with perf")
    ap.add_argument("--replay", action="store_true",
                    help="replay ops through run_op even when the core can time its plan")
    a = ap.parse_args(argv)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYEDGE_NUM_THREADS"):
        os.environ.setdefault(k, str(a.threads))
    from bench.workloads import WORKLOADS, ensure_export
    from bench.run import PYEDGE_EXPORTER

    w = WORKLOADS[a.workload]
    path = ensure_export(w, *PYEDGE_EXPORTER, log=lambda m: print(m, file=sys.stderr))
    sess = _session(w, path, a.threads)
    batches = w.batches()
    sess.step(*batches[0])

    def timed_steps():
        ts = []
        for i in range(a.steps):
            t0 = time.perf_counter()
            sess.step(*batches[(i + 1) % len(batches)])
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    real_ms = timed_steps()
    print(f"W{w.id} {w.title}: real step median {real_ms:.2f} ms over {a.steps} steps "
          f"({a.threads} threads, profiling off)")

    core_profile = hasattr(sess._sess, "last_profile") and hasattr(sess._sess, "profiling")
    if core_profile and not a.replay:
        sess._sess.profiling = True
        sess.step(*batches[0])  # plan state is per plan: start the count after one step
        before = {(n, b): (sec, c) for n, _op, b, sec, c in sess._sess.last_profile()}
        prof_ms = timed_steps()
        rows = []
        for node, op, bwd, sec, calls in sess._sess.last_profile():
            s0, c0 = before.get((node, bwd), (0.0, 0))
            per_step = (sec - s0) / max(calls - c0, 1)
            if bwd:
                rows.append((node, op, 0.0, per_step))
            else:
                rows.append((node, op, per_step, None))
        merged = {}
        for node, op, f, b in rows:  # one row per node: forward and backward together
            m = merged.setdefault(node, [node, op, 0.0, None])
            m[2] += f
            if b is not None:
                m[3] = (m[3] or 0.0) + b
        rows = [tuple(v) for v in merged.values()]
        how = (f"the core's own per-op timing over {a.steps} real steps, average per step; "
               f"step median with profiling on: {prof_ms:.2f} ms")
    else:
        rows = replay(sess, batches[0], a.reps, log=lambda m: print(m, file=sys.stderr))
        how = "replay of each op alone through _core.run_op (the core has no per-op timing yet)"
    fams = {}
    for _name, op, f, b in rows:
        d = fams.setdefault(family(op), [0, 0.0, 0.0, 0])
        d[0] += 1
        d[1] += f
        d[2] += b or 0.0
        d[3] += int(b is not None)
    total = sum(d[1] + d[2] for d in fams.values())
    print(f"\nper op family ({how}):\n")
    print("| family | ops | fwd ms | bwd ops | bwd ms | total ms | share |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for fam, (n, f, b, nb) in sorted(fams.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
        print(f"| {fam} | {n} | {f * 1e3:.2f} | {nb} | {b * 1e3:.2f} | {(f + b) * 1e3:.2f} | "
              f"{(f + b) / total:.0%} |")
    print(f"| sum of ops | {sum(d[0] for d in fams.values())} | "
          f"{sum(d[1] for d in fams.values()) * 1e3:.2f} | | "
          f"{sum(d[2] for d in fams.values()) * 1e3:.2f} | {total * 1e3:.2f} | |")
    print(f"\nreal step {real_ms:.2f} ms vs sum of ops {total * 1e3:.2f} ms (the rest: "
          "optimizer, Python call, input checks" +
          ("; the replay also adds output copies)" if "replay" in how else ")"))
    types = {}
    for _name, op, f, b in rows:
        d = types.setdefault(op, [0, 0.0, 0.0])
        d[0] += 1
        d[1] += f
        d[2] += b or 0.0
    print("\nper op type:\n")
    print("| op | nodes | fwd ms | bwd ms | total ms |")
    print("|---|---:|---:|---:|---:|")
    for op, (n, f, b) in sorted(types.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
        if f + b >= 0.0005 * total:
            print(f"| {op} | {n} | {f * 1e3:.2f} | {b * 1e3:.2f} | {(f + b) * 1e3:.2f} |")
    print("\nslowest single ops:\n")
    print("| node | op | fwd ms | bwd ms |")
    print("|---|---|---:|---:|")
    for name, op, f, b in sorted(rows, key=lambda r: -(r[2] + (r[3] or 0)))[:a.top]:
        print(f"| {name} | {op} | {f * 1e3:.2f} | {'' if b is None else f'{b * 1e3:.2f}'} |")
    if a.perf:  # enough steps that they, not the imports, dominate the samples
        groups, note = perf_split(w, path, a.threads, max(3, int(4000 / max(real_ms, 1e-3))))
        print(f"\nperf samples by shared object {note}:\n")
        if groups:
            for g, p in sorted(groups.items(), key=lambda kv: -kv[1]):
                print(f"  {p:5.1f}%  {g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
