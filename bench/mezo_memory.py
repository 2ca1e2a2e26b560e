"""Peak RSS of a MeZO step vs an AdamW step (and inference) on the same model, each in its own
subprocess (the high-water mark VmHWM of a fresh process).

    python -m bench.mezo_memory bench/.cache/minilm_....onnx --targets query,value \
        --train 'classifier.*' --steps 3

Prints one line per mode: peak RSS, step seconds (median), planned peak of the step's plan."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import numpy as np
import pyedge
a = json.loads(sys.argv[1])
g = pyedge.load_onnx(a["model"])
shapes = {v.name: v.shape for v in g.inputs}
rng = np.random.default_rng(0)
feed = {}
for v in g.inputs:
    if v.name == "attention_mask":
        feed[v.name] = np.ones(v.shape, np.int64)
    else:
        feed[v.name] = rng.integers(1000, a["vocab"], v.shape).astype(np.int64)
out = g.outputs[0]
if a["loss"] == "causal_lm":
    labels = feed["input_ids"]
else:
    labels = rng.integers(0, out.shape[-1], out.shape[:-1]).astype(np.int64)
opt = {"mezo": pyedge.MeZO(lr=1e-6, eps=1e-3), "adamw": pyedge.AdamW(lr=1e-4),
       "inference": pyedge.MeZO()}[a["mode"]]
s = pyedge.TrainingSession(g, lora=pyedge.LoraConfig(r=8, alpha=16, target_modules=a["targets"]),
                           train=a["train"], loss=a["loss"], optimizer=opt, threads=a["threads"])
del g
times = []
for _ in range(a["steps"]):
    t = time.perf_counter()
    if a["mode"] == "inference":
        s.run(feed)
    else:
        s.step(feed, labels)
    times.append(time.perf_counter() - t)
st = s.plan_stats(feed, training=a["mode"] != "inference") if a["mode"] != "inference" else \
    s.plan_stats(feed, training=False)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"peak_rss_mib": int(hwm) / 1024, "step_s": sorted(times)[len(times) // 2],
                  "planned_peak_mib": st["planned_peak_bytes"] / 2**20}))
"""


def measure(mode: str, args) -> dict:
    a = {"model": args.model, "targets": args.targets.split(","),
         "train": [t for t in args.train.split(",") if t], "loss": args.loss,
         "steps": args.steps, "threads": args.threads, "mode": mode, "vocab": args.vocab}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(a)], capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"{mode}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--targets", default="query,value")
    p.add_argument("--train", default="classifier.*")
    p.add_argument("--loss", default="cross_entropy")
    p.add_argument("--vocab", type=int, default=30000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="inference,mezo,adamw")
    args = p.parse_args(argv)
    t0 = time.time()
    for mode in args.modes.split(","):
        r = measure(mode, args)
        print(f"{mode:9s} peak RSS {r['peak_rss_mib']:7.0f} MiB  step {r['step_s']:.3f} s  "
              f"planned peak {r['planned_peak_mib']:7.0f} MiB", flush=True)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
