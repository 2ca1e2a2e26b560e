"""Generation tokens/s: pyedge generate (key/value cache, LoRA adapters) vs transformers +
PEFT `generate`, same threads, greedy, on W6's shape (SmolLM2-135M: Llama 30 layers, d 576,
9 / 3 heads, FFN 1536, vocab 49152, tied; random weights from a config, no download).

    python -m bench.generate [--prompt 64 --new 64 --threads 2 --repeats 3 --arch llama]

A 64-token prompt, 64 new tokens (EOS suppressed on both sides so both make all 64), LoRA
r=8 alpha=16 on the seven projections with random A and B (PEFT's init_lora_weights=False).
Each engine runs once to warm up (pyedge plans its prefill and its decoding step there), then
`--repeats` timed runs; reported: the median of whole generate calls (prefill + 64 tokens) as
new tokens per second, and pyedge's prefill and per-step times. The two engines' tokens are
compared (greedy: they must be equal). The model folder, its export and the adapters are made
once in bench/.cache/gen-<arch>/. Results: bench/results/generate_<arch>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "bench", ".cache")
SHAPES = {  # W6 and W7 of bench/workloads.py
    "llama": dict(layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, vocab=49152),
    "qwen2": dict(layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864, vocab=151936),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_assets(arch: str, log=print) -> tuple[str, str, str]:
    """(HF folder, pyedge export folder, PEFT adapters folder), made once."""
    base = os.path.join(CACHE, f"gen-{arch}")
    src, out, ad = (os.path.join(base, d) for d in ("hf", "export", "adapters"))
    if os.path.isfile(os.path.join(out, "model.onnx")) and os.path.isdir(ad):
        return src, out, ad
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import text_fixtures as tf
    s = SHAPES[arch]
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    cfg = cls[0](vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                 num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                 intermediate_size=s["intermediate"], max_position_embeddings=2048,
                 tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    m = cls[1](cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0)
                        + 0.05 * torch.randn(p.shape, generator=g))
    t0 = time.time()
    m.save_pretrained(src)
    tf.save_tokenizer_folder(src)
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                      target_modules=TARGETS, task_type="CAUSAL_LM"))
    pm.save_pretrained(ad)
    from pyedge.export.hf_export import export_hf
    export_hf(src, "causal-lm", out)
    log(f"made {base} in {time.time() - t0:.0f} s")
    return src, out, ad


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    import numpy as np
    return [0] + np.random.default_rng(seed).integers(3, min(vocab, 300), n - 1).tolist()


def run_pyedge(out, ad, ids, new, threads, repeats):
    from pyedge.generate import Generator
    gen = Generator(out, adapters=ad, threads=threads)
    gen.eos_ids = set()  # all `new` tokens, like min_new_tokens on the torch side
    runs = [gen.generate(ids=ids, max_new_tokens=new) for _ in range(repeats + 1)]
    timed = runs[1:]
    return {"seconds": [r.seconds for r in timed], "ids": timed[0].ids,
            "prefill_seconds": [r.prefill_seconds for r in timed],
            "step_seconds_median": statistics.median(t for r in timed for t in r.times),
            "cached": timed[0].cached, "cache_reason": gen.cache_reason,
            "first_call_seconds": runs[0].seconds}


def run_torch(src, ad, ids, new, threads, repeats):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), ad).eval()
    x = torch.tensor([ids])
    secs, out = [], None
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = m.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, num_beams=1)
            if i:
                secs.append(time.perf_counter() - t0)
    return {"seconds": secs, "ids": out[0, len(ids):].tolist(),
            "attn_implementation": m.base_model.model.config._attn_implementation}


def _worker(args):
    """One engine in this process (so each engine's memory and threads are its own)."""
    src, out, ad = make_assets(args.arch)
    ids = prompt_ids(args.prompt, SHAPES[args.arch]["vocab"])
    fn = run_pyedge if args.engine == "pyedge" else run_torch
    res = fn(out if args.engine == "pyedge" else src, ad, ids, args.new, args.threads,
             args.repeats)
    import resource
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(SHAPES), default="llama")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine", choices=("pyedge", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    if args.engine:
        return _worker(args)
    make_assets(args.arch)
    res = {}
    for engine in ("pyedge", "torch"):
        cmd = [sys.executable, "-m", "bench.generate", "--engine", engine, "--arch", args.arch,
               "--prompt", str(args.prompt), "--new", str(args.new), "--threads",
               str(args.threads), "--repeats", str(args.repeats)]
        env = dict(os.environ, PYEDGE_NUM_THREADS=str(args.threads),
                   OMP_NUM_THREADS=str(args.threads))
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if r.returncode or line is None:
            raise SystemExit(f"{engine} failed:\n{r.stderr[-3000:]}")
        res[engine] = json.loads(line[7:])
        tps = args.new / statistics.median(res[engine]["seconds"])
        res[engine]["tokens_per_second"] = tps
        print(f"{engine}: {tps:.1f} new tokens/s (median of {args.repeats}), peak RSS "
              f"{res[engine]['peak_rss_mib']:.0f} MiB", flush=True)
    py, tc = res["pyedge"], res["torch"]
    same = py["ids"] == tc["ids"]
    ratio = py["tokens_per_second"] / tc["tokens_per_second"]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    load = os.getloadavg()[0]
    s = SHAPES[args.arch]
    md = [f"# Generation tokens/s, {args.arch} ({s['layers']}L d{s['hidden']} "
          f"{s['heads']}/{s['kv_heads']}h ff{s['intermediate']} V{s['vocab']}, tied), "
          f"LoRA r8 on 7 projections",
          "",
          f"git {git}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.threads} "
          f"threads each, load average {load:.1f} at the end (a shared machine: absolute times "
          "vary; both engines ran back to back).",
          f"Prompt {args.prompt} tokens, {args.new} new tokens (greedy, EOS suppressed), median "
          f"of {args.repeats} runs after one warm-up run.",
          "",
          "| engine | new tokens/s | whole call (s) | prefill (s) | per step (ms) | peak RSS (MiB) |",
          "|---|---|---|---|---|---|",
          f"| pyedge generate ({'KV cache' if py['cached'] else 'no cache: ' + py['cache_reason']}) "
          f"| {py['tokens_per_second']:.1f} | {statistics.median(py['seconds']):.2f} | "
          f"{statistics.median(py['prefill_seconds']):.3f} | {1e3 * py['step_seconds_median']:.1f} "
          f"| {py['peak_rss_mib']:.0f} |",
          f"| transformers + PEFT generate ({tc['attn_implementation']}) | "
          f"{tc['tokens_per_second']:.1f} | {statistics.median(tc['seconds']):.2f} | | | "
          f"{tc['peak_rss_mib']:.0f} |",
          "",
          f"pyedge / PyTorch: **{ratio:.2f}x** tokens/s. Same tokens: {same}."]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"generate_{args.arch}")
    with open(stem + ".json", "w") as f:
        json.dump({"args": vars(args), "git": git, "load": load, "ratio": ratio,
                   "same_tokens": same, **res}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
