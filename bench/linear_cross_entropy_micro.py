"""The LM head + causal-LM cross-entropy, fused over row chunks (pyedge.LinearCrossEntropy)
against the plain head + pyedge.CrossEntropyLoss: training-plan arena and step time.

    python -m bench.linear_cross_entropy_micro [--shape 4,256,576,49152] [--steps 3]
        [--head frozen|lora|trained] [--chunk 0] [--no-plain]
    python -m bench.linear_cross_entropy_micro --llama 30,576,9,3,1536,49152 --shape 4,256

The graph: h [B, T, D] (input) -> MatMul(w1 [D, D], trained) -> MatMul(h, Transpose(W [V, D]))
-> logits [B, T, V], the layout of an nn.Linear LM head or a tied embedding. Shapes:
SmolLM2-135M's head is 576 x 49152, Qwen2.5-0.5B's 896 x 151936 (W alone is 544 MB; the plain
plan then needs about 2·B·T·V·4 bytes more: run it only where that fits).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def model(B, T, D, V):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((D, D)) / D ** 0.5).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((V, D)) * 0.02).astype(np.float32),
                                     "lm_head.weight")]
    nodes = [helper.make_node("MatMul", ["h", "w1"], ["hid"]),
             helper.make_node("Transpose", ["lm_head.weight"], ["wT"], perm=[1, 0]),
             helper.make_node("MatMul", ["hid", "wT"], ["logits"])]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("h", TensorProto.FLOAT,
                                                                        [B, T, D])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [B, T, V])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def measure(m, B, T, D, V, head, chunked, chunk, steps):
    import numpy as np
    import pyedge
    kw = dict(loss="causal_lm", optimizer=pyedge.SGD(lr=1e-3), chunked_loss=chunked,
              loss_chunk_rows=chunk)
    train = ["w1"] + (["lm_head.weight"] if head == "trained" else [])
    lora = pyedge.LoraConfig(r=8, target_modules=["lm_head"]) if head == "lora" else None
    sess = pyedge.TrainingSession(m, lora=lora, train=train, **kw)
    stats = sess.plan_stats(shapes={"h": [B, T, D], "labels": [B, T]})
    rng = np.random.default_rng(1)
    h = rng.standard_normal((B, T, D)).astype(np.float32)
    y = rng.integers(0, V, (B, T)).astype(np.int64)
    times, loss = [], None
    for _ in range(steps + 1):  # the first builds the plan
        t0 = time.perf_counter()
        loss = sess.step({"h": h}, y)
        times.append(time.perf_counter() - t0)
    return {"arena_MiB": stats["arena_bytes"] / 2**20, "scratch_MiB": stats["scratch_bytes"] / 2**20,
            "step_s": statistics.median(times[1:]), "loss": loss,
            "fusions": stats.get("fusions", {})}


def whole_llama(spec, B, T, steps):
    """A Llama of the given shape (random weights, tied embeddings, TorchScript export), LoRA
    r8 on q/v: training-plan arena and step time, chunked vs plain. spec: L,D,H,KV,I,V."""
    import tempfile

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import pyedge
    L, D, H, KV, I, V = (int(v) for v in spec.split(","))

    class LlamaLogits(LlamaForCausalLM):
        def forward(self, input_ids):  # noqa: D401
            return super().forward(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   use_cache=False, return_dict=True).logits

    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=KV, tie_word_embeddings=True,
                      max_position_embeddings=max(T, 64), use_cache=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = LlamaLogits(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "llama.onnx")
        t0 = time.perf_counter()
        pyedge.torch.export(m, {"input_ids": torch.randint(0, V, (1, 8))}, path,
                            input_names=["input_ids"], output_names=["logits"],
                            dynamic_axes={"input_ids": {0: "b", 1: "t"}, "logits": {0: "b", 1: "t"}},
                            exporter="torchscript")
        del m
        print(f"Llama L={L} D={D} V={V} tied, B={B} T={T}: exported in "
              f"{time.perf_counter() - t0:.0f} s; logits {B * T * V * 4 / 2**20:.0f} MiB")
        rng = np.random.default_rng(1)
        ids = rng.integers(0, V, (B, T)).astype(np.int64)
        for chunked in (True, False):
            sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                                          loss="causal_lm", chunked_loss=chunked)
            st = sess.plan_stats(shapes={"input_ids": [B, T], "labels": [B, T]})
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                loss = sess.step({"input_ids": ids}, ids)
                times.append(time.perf_counter() - t0)
            print(f"  {'chunked' if chunked else 'plain  '}: arena {st['arena_bytes'] / 2**20:8.1f} MiB"
                  + (f", step {statistics.median(times):.2f} s (median of {steps}), loss {loss:.6f}"
                     if steps else ""))
            del sess


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4,256,576,49152", help="B,T,D,V")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--head", choices=("frozen", "lora", "trained"), default="frozen")
    ap.add_argument("--chunk", type=int, default=0, help="rows per chunk (0: the op's default)")
    ap.add_argument("--no-plain", action="store_true", help="skip the unfused plan")
    ap.add_argument("--llama", default="", help="L,D,H,KV,I,V: a whole tied-embedding Llama "
                    "instead (SmolLM2-135M: 30,576,9,3,1536,49152); --shape gives B,T")
    a = ap.parse_args(argv)
    if a.llama:
        B, T = (int(v) for v in a.shape.split(",")[:2])
        return whole_llama(a.llama, B, T, a.steps)
    B, T, D, V = (int(v) for v in a.shape.split(","))
    m = model(B, T, D, V)
    print(f"B={B} T={T} D={D} V={V} head={a.head}: logits {B * T * V * 4 / 2**20:.0f} MiB")
    for chunked in ((True,) if a.no_plain else (True, False)):
        r = measure(m, B, T, D, V, a.head, chunked, a.chunk, a.steps)
        print(f"  {'chunked' if chunked else 'plain  '}: arena {r['arena_MiB']:8.1f} MiB "
              f"(scratch {r['scratch_MiB']:.1f}), step {r['step_s']:.3f} s, loss {r['loss']:.6f}"
              f" {r['fusions']}")


if __name__ == "__main__":
    main()
