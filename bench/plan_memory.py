"""Planned memory and step time of a LoRA step with and without recomputation.

    python -m bench.plan_memory export --out /tmp/smollm.onnx      # needs torch + transformers
    python -m bench.plan_memory measure /tmp/smollm.onnx [--steps 2] [--budgets 2.5G,2G,1.5G]

The model is a SmolLM2-135M-shaped LlamaConfig (hidden 576, 30 layers, 9 heads / 3 kv heads,
intermediate 1536, vocab 49152, tied embeddings) with random weights; LoRA r=8 on q, k, v, o,
gate, up, down; causal_lm on batch 4 x 256. `measure` needs no torch. It prints the planned
arena and peak with recompute none / cheap / full and under each budget, then the step time
(the last of --steps) with and without recomputation. ~3 GB of RAM: run it alone.
"""
from __future__ import annotations

import argparse
import json
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def export(out):
    import torch
    import transformers
    import pyedge

    cfg = transformers.LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, intermediate_size=1536,
                                   vocab_size=49152, tie_word_embeddings=True,
                                   max_position_embeddings=2048)
    cfg._attn_implementation = "eager"

    class Logits(transformers.LlamaForCausalLM):
        def forward(self, input_ids):  # noqa: D401
            return super().forward(input_ids=input_ids, use_cache=False).logits

    torch.manual_seed(0)
    model = Logits(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))  # size-1 dims would be specialised
    pyedge.torch.export(model, (ids,), out, input_names=["input_ids"], output_names=["logits"],
                        dynamic_axes={"input_ids": {0: "b", 1: "s"}, "logits": {0: "b", 1: "s"}})


def measure(path, steps, budgets, batch=4, seq=256):
    import numpy as np
    import pyedge
    from pyedge.memory_budget import format_bytes, parse_memory_size

    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=8, alpha=16,
                                  target_modules=TARGETS), loss="causal_lm")
    shapes = {"input_ids": [batch, seq], "labels": [batch, seq]}
    rows = []

    def plan(label, max_memory=None, recompute="auto"):
        sess.set_memory_budget(max_memory, recompute)
        t0 = time.perf_counter()
        try:
            st = sess.plan_stats(shapes=dict(shapes))
        except Exception as e:  # a budget below the minimum
            rows.append({"plan": label, "error": str(e)})
            print(f"{label:>14}: {e}")
            return None
        row = {"plan": label, "arena_bytes": st["arena_bytes"],
               "planned_peak_bytes": st["planned_peak_bytes"], "recompute_ops": st["recompute_ops"],
               "recompute_op_types": st["recompute_op_types"],
               "extra_flops_percent": 100.0 * st["recompute_flops"] / st["forward_flops"],
               "choice": st["recompute_choice"], "plan_seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"{label:>14}: arena {format_bytes(st['arena_bytes']):>10}  peak "
              f"{format_bytes(st['planned_peak_bytes']):>10}  recomputed {st['recompute_ops']:4d} "
              f"ops (+{row['extra_flops_percent']:.0f}% forward FLOPs)  plan {row['plan_seconds']:.1f} s")
        return st

    plan("none", recompute="none")
    plan("cheap", recompute="cheap")
    plan("full", recompute="full")
    for b in budgets:
        plan(f"budget {b}", max_memory=parse_memory_size(b))
    ids = np.random.default_rng(0).integers(0, 49152, (batch, seq)).astype(np.int64)
    for label, rc in (("none", "none"), ("full", "full"), ("cheap", "cheap")):
        sess.set_memory_budget(None, rc)
        times, cpu = [], []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = sess.step({"input_ids": ids}, ids)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)  # less sensitive to other load on the machine
        rows.append({"step": label, "seconds": times, "cpu_seconds": cpu, "loss": loss})
        print(f"step, recompute {label:>5}: wall {', '.join(f'{t:.2f}' for t in times)} s, "
              f"cpu {', '.join(f'{t:.2f}' for t in cpu)} s (the first step also plans; the "
              f"session keeps training, so losses differ)")
    hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")]
    print(f"VmHWM {format_bytes(hwm[0])}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("--out", required=True)
    m = sub.add_parser("measure")
    m.add_argument("model")
    m.add_argument("--steps", type=int, default=2)
    m.add_argument("--budgets", default="3G,2.5G,2G,1.5G,1.2G")
    m.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    if a.cmd == "export":
        export(a.out)
    else:
        rows = measure(a.model, a.steps, [b for b in a.budgets.split(",") if b])
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
