"""One engine on one workload, in its own process; prints one JSON line (prefixed RESULT).

    python -m bench.worker --engine pyedge|torch|ort|sgemm --workload 1 --steps 10 --warmup 2 \
        --threads 2 --onnx bench/.cache/....onnx

The parent (bench.run) sets OMP/OpenBLAS/PYEDGE thread variables before starting it. Each
step is timed with perf_counter around the engine's whole step call (forward, backward,
optimizer update); peak RSS is this process's own ru_maxrss. The `ort` engine runs under
bench/.venv-ort's python and must not import torch-side modules.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.workloads import CACHE, WORKLOADS  # noqa: E402  (numpy only)

MARK = "RESULT "


def _status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_now() -> int:
    return _status("VmRSS")


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_rss() -> int:
    """Peak resident set of this process's own address space (VmHWM).

    Linux carries the pre-exec image's high-water mark into ru_maxrss across exec (with
    vfork/posix_spawn that is the *parent's* peak), so a worker started by a large parent
    would report the parent's RSS. VmHWM is the same high-water mark for this process's
    own memory only; ru_maxrss is kept in the JSON too. Elsewhere: ru_maxrss."""
    return _status("VmHWM") or ru_maxrss()


def time_steps(step, batches, steps, warmup):
    losses = []
    for i in range(warmup):
        losses.append(float(step(*batches[i % len(batches)])))
    times = []
    for i in range(steps):
        b = batches[(warmup + i) % len(batches)]
        t0 = time.perf_counter()
        loss = step(*b)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return times, losses


# --------------------------------------------------------------------------------- pyedge
class Skipped(Exception):
    """The run cannot happen with this pyedge (a feature of another branch is missing)."""


def skip_reason(w) -> str | None:
    """Why this pyedge cannot run workload w (a variant needs another branch's feature)."""
    import inspect

    import pyedge
    if w.quantize and getattr(pyedge, "quantize", None) is None:
        return "needs pyedge.quantize"
    if w.max_memory is not None and \
            "max_memory" not in inspect.signature(pyedge.TrainingSession.__init__).parameters:
        return "needs TrainingSession(max_memory=...)"
    return None


def pyedge_model_and_options(w, onnx_path):
    """(model for TrainingSession, extra keyword arguments) for the workload's variants:
    w.quantize: the export quantized by pyedge.quantize(src, dst, **w.quantize), cached beside
    it by bench.workloads.ensure_quantized (in its own process), w.max_memory becomes TrainingSession(max_memory=...); raises Skipped
    when this pyedge lacks either (a variant that silently ran as its base would mislead).""" 
    import pyedge

    model, kwargs = onnx_path, {}
    reason = skip_reason(w)
    if reason:
        raise Skipped(reason)
    if w.quantize:
        from bench.workloads import ensure_quantized
        model = ensure_quantized(onnx_path, w.quantize, log=lambda m: print(m, file=sys.stderr))
    if w.max_memory is not None:  # skip_reason made sure the session takes it
        kwargs["max_memory"] = int(w.max_memory)
    return model, kwargs


def run_pyedge(w, a):
    import pyedge

    if w.method == "ia3":
        lora = pyedge.IA3Config(target_modules=list(w.lora_targets))
    else:
        lora = pyedge.LoraConfig(r=w.lora_r, alpha=w.lora_alpha,
                                 target_modules=list(w.lora_targets),
                                 **w.lora_extra) if w.lora_targets else None
    t0 = time.perf_counter()
    model, options = pyedge_model_and_options(w, a.onnx)
    sess = pyedge.TrainingSession(model, lora=lora, train=list(w.train), loss=w.loss,
                                  optimizer=pyedge.AdamW(lr=w.lr), threads=a.threads,
                                  **options)
    batches = w.batches(a.seed)
    # with the labels: no forward run to find their shape (it would plan and hold the logits)
    stats = sess.plan_stats(dict(batches[0][0], labels=batches[0][1]))
    build = time.perf_counter() - t0
    rss_built = rss_now()
    times, losses = time_steps(lambda x, y: sess.step(x, y), batches, a.steps, a.warmup)
    extra = {k: stats[k] for k in ("forward_ops", "backward_ops", "pruned_nodes", "arena_bytes",
                                   "activation_bytes", "trainable_parameters", "weight_bytes",
                                   "quantized_weight_bytes", "planned_peak_bytes",
                                   "recompute_ops", "recompute_flops", "forward_flops", "fusions",
                                   "recompute_choice", "fixed_bytes", "constant_bytes",
                                   "arena_bytes_no_recompute", "arena_bytes_min",
                                   "scratch_reduced_ops")
             if k in stats}
    extra["steady_state_allocations"] = sess.last_step_allocations
    extra["core_threads"] = pyedge._core.num_threads()
    extra["blas_core"] = pyedge._core.blas_core()
    extra["core_target"] = pyedge._core.simd_info()["target"]
    extra.update({k: v for k, v in (("quantize", w.quantize),
                                    ("max_memory", options.get("max_memory"))) if v})
    return times, losses, build, rss_built, extra, {"pyedge": pyedge.__version__}


# ---------------------------------------------------------------------------------- torch
def run_torch(w, a):
    import fnmatch

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from bench.workloads import build_torch

    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    model, _inputs, in_names, _out = build_torch(w, for_torch_engine=True)
    model.eval()  # dropout off (all dropout probabilities are 0 as well), BN uses running stats
    for p in model.parameters():
        p.requires_grad_(False)
    versions = {"torch": torch.__version__}
    if w.lora_targets:
        import peft
        if w.method == "ia3":
            cfg = peft.IA3Config(target_modules=list(w.lora_targets), feedforward_modules=[])
        else:
            cfg = peft.LoraConfig(r=w.lora_r, lora_alpha=w.lora_alpha,
                                  target_modules=list(w.lora_targets), lora_dropout=0.0,
                                  fan_in_fan_out=w.fan_in_fan_out, **w.lora_extra)
        peft.get_peft_model(model, cfg)  # injects LoRA layers into `model` in place
        versions["peft"] = peft.__version__
    for name, p in model.named_parameters():
        clean = name.replace("base_model.model.", "")
        if ".lora_" in clean or ".ia3_l" in clean or any(fnmatch.fnmatchcase(clean, pat) for pat in w.train):
            p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=w.lr, weight_decay=0.01)
    batches = [([torch.from_numpy(np.ascontiguousarray(x[n])) for n in in_names],
                torch.from_numpy(y)) for x, y in w.batches(a.seed)]
    causal = w.loss == "causal_lm"

    def step(xs, y):
        opt.zero_grad(set_to_none=True)
        logits = model(*xs)
        if causal:  # like transformers: predict token t+1 from positions <= t
            v = logits.shape[-1]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v),
                                                     y[:, 1:].reshape(-1))
        else:
            loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        return loss.item()

    build = time.perf_counter() - t0
    rss_built = rss_now()
    times, losses = time_steps(step, batches, a.steps, a.warmup)
    extra = {"trainable_parameters": int(sum(p.numel() for p in trainable)),
             "torch_threads": torch.get_num_threads()}
    return times, losses, build, rss_built, extra, versions


# ------------------------------------------------------------------- onnxruntime-training
def ort_artifacts(w, onnx_path):
    """Generates (once, cached by content) the training artifacts; returns their folder."""
    import hashlib

    import onnx
    from onnxruntime.training import artifacts, onnxblock

    from bench.onnx_lora import prepare_for_ort

    st = os.stat(onnx_path)
    src = os.path.join(HERE, "onnx_lora.py")
    key = json.dumps([os.path.abspath(onnx_path), st.st_size, st.st_mtime, repr(w),
                      os.stat(src).st_mtime, 2])
    d = os.path.join(CACHE, "ort", f"w{w.id}-" + hashlib.sha1(key.encode()).hexdigest()[:10])
    if os.path.exists(os.path.join(d, "optimizer_model.onnx")):
        return d
    m = onnx.load(onnx_path)
    requires_grad = prepare_for_ort(m, w)
    frozen = [i.name for i in m.graph.initializer if i.name not in set(requires_grad)]
    tmp = d + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    artifacts.generate_artifacts(
        m, requires_grad=requires_grad, frozen_params=frozen,
        loss=artifacts.LossType.CrossEntropyLoss,
        optimizer=onnxblock.optim.AdamW(eps=1e-8, weight_decay=0.01),  # torch's defaults
        artifact_directory=tmp)
    os.replace(tmp, d)
    return d


def run_ort(w, a):
    import numpy as np
    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    t0 = time.perf_counter()
    d = ort_artifacts(w, a.onnx)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    state = CheckpointState.load_checkpoint(os.path.join(d, "checkpoint"))
    module = Module(os.path.join(d, "training_model.onnx"), state,
                    os.path.join(d, "eval_model.onnx"), device="cpu", session_options=so)
    opt = Optimizer(os.path.join(d, "optimizer_model.onnx"), module)
    opt.set_learning_rate(w.lr)
    module.train()
    names = module.input_names()
    batches = []
    for x, y in w.batches(a.seed):
        if w.loss == "causal_lm":
            y = np.ascontiguousarray(y[:, 1:].reshape(-1))
        batches.append(([np.ascontiguousarray(x[n]) for n in w.input_names], y))

    def step(xs, y):
        loss = module(*xs, y)
        opt.step()
        module.lazy_reset_grad()
        return float(loss)

    build = time.perf_counter() - t0
    rss_built = rss_now()
    times, losses = time_steps(step, batches, a.steps, a.warmup)
    extra = {"trainable_parameters": int(module.get_parameters_size(trainable_only=True)),
             "inputs": names}
    import onnxruntime
    return times, losses, build, rss_built, extra, {"onnxruntime-training": onnxruntime.__version__}


# --------------------------------------------------------------------------------- sgemm
def run_sgemm(a, n=1024):
    """numpy (OpenBLAS) and pyedge._core MatMul on n x n x n float32: GFLOP/s per call."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n), dtype=np.float32)
    y = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3
    out = {}

    def bench(f):
        for _ in range(2):
            f()
        ts = []
        for _ in range(max(3, a.steps)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return ts

    ts = bench(lambda: x @ y)
    out["numpy"] = {"times": ts, "gflops": [flops / t / 1e9 for t in ts]}
    try:
        import pyedge
        pyedge._core.set_num_threads(a.threads)
        # the core's own GEMM on preallocated buffers (run_op would add a plan per call)
        ts = pyedge._core.time_sgemm(n, max(3, a.steps) + 2)[2:]
        out["pyedge"] = {"times": ts, "gflops": [flops / t / 1e9 for t in ts]}
        out["pyedge_blas_core"] = pyedge._core.blas_core()
        out["pyedge_core_target"] = pyedge._core.simd_info()["target"]
    except Exception as e:  # pyedge not built: numpy only
        out["pyedge_error"] = f"{type(e).__name__}: {e}"
    out["n"] = n
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", required=True, choices=["pyedge", "torch", "ort", "sgemm"])
    ap.add_argument("--workload", default="")
    ap.add_argument("--onnx", default="")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    res = {"engine": a.engine, "workload": a.workload, "threads": a.threads, "pid": os.getpid()}
    try:
        if a.engine == "sgemm":
            res.update(run_sgemm(a))
        else:
            w = WORKLOADS[a.workload]
            fn = {"pyedge": run_pyedge, "torch": run_torch, "ort": run_ort}[a.engine]
            times, losses, build, rss_built, extra, versions = fn(w, a)
            res.update(times=times, losses=losses, build_s=build, rss_after_build=rss_built,
                       extra=extra, versions=versions, steps=a.steps, warmup=a.warmup)
        res["peak_rss"] = peak_rss()
        res["ru_maxrss"] = ru_maxrss()
        res["ok"] = True
    except Skipped as e:
        res["ok"] = False
        res["skipped"] = True
        res["error"] = f"skipped: {e}"
    except Exception as e:
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {str(e)[:800]}"
        traceback.print_exc()
    sys.stdout.flush()
    print(MARK + json.dumps(res), flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
