"""Benchmark workloads: model, batch, trainable set, loss. Importable with numpy only (the
onnxruntime-training worker runs in its own venv, without transformers), so anything that
needs torch is imported inside functions.

Variant ids: "1".."4" are the workloads of the issue; "5k1".."5k6" are workload 1 with LoRA
on the last k of the 6 encoder layers only (the sparse-scaling sweep, workload 5).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(HERE, ".cache")
BATCHES = 4  # distinct seeded batches, cycled through the steps

MINILM_VOCAB = 30522
MINILM_LAYERS = 6


@dataclasses.dataclass
class Workload:
    id: str
    title: str
    factory: str                 # models.reference.FACTORIES key
    kwargs: dict                 # factory arguments (shapes)
    loss: str                    # "cross_entropy" | "causal_lm"
    lora_targets: list | None    # LoRA target modules (full or suffix names), or None
    lora_r: int = 8
    lora_alpha: float = 16.0
    train: list = dataclasses.field(default_factory=list)  # whole tensors (glob on torch names)
    fan_in_fan_out: bool = False  # transformers Conv1D (GPT-2)
    lr: float = 1e-4
    engines: tuple = ("pyedge", "torch", "ort")
    steps: int = 10              # default timed steps (sub-millisecond workloads take more,
    warmup: int = 3              # so that a median is not three samples of scheduler noise)
    # pyedge-only variants. quantize: arguments of pyedge.quantize(onnx_path, **quantize)
    # (branch qpy), applied to the base model before the session is built; a pyedge without
    # that function reports the run as "skipped: needs pyedge.quantize". max_memory: bytes,
    # passed as TrainingSession(max_memory=...) when the session takes it (branch recompute).
    quantize: dict | None = None
    max_memory: int | None = None
    torch_kwargs: dict = dataclasses.field(default_factory=dict)  # factory overrides, torch only
    # LoraConfig fields both engines get (PEFT's names), e.g. {"use_dora": True}
    lora_extra: dict = dataclasses.field(default_factory=dict)
    # the adapter method on lora_targets: "lora" (LoraConfig + lora_extra) or "ia3" (IA3Config
    # with those targets in both engines: a learned scale on each target's output)
    method: str = "lora"

    def default_steps(self, quick: bool) -> tuple[int, int]:
        """(steps, warmup) when the command line gives none; --quick keeps a few seconds."""
        if quick:
            return (20, 10) if self.steps >= 100 else (3, 1)
        return self.steps, self.warmup

    @property
    def input_names(self) -> list[str]:
        return {"mlp": ["x"], "cnn": ["x"], "gpt2": ["input_ids"], "decoder": ["input_ids"],
                "minilm": ["input_ids", "attention_mask"]}[self.factory]

    def key(self, exporter: str, opset: int | None) -> str:
        """Cache key of the exported base model (shapes + exporter)."""
        blob = json.dumps([self.factory, sorted(self.kwargs.items()), exporter, opset])
        return f"{self.factory}_{exporter}_{opset or 'def'}_" + \
            hashlib.sha1(blob.encode()).hexdigest()[:10]

    # ------------------------------------------------------------------ data (seeded numpy)
    def batches(self, seed: int = 0):
        """[(inputs: {name: array}, labels: array)] — identical in every engine."""
        rng = np.random.default_rng(seed)
        kw = self.kwargs
        out = []
        for _ in range(BATCHES):
            if self.factory == "mlp":
                x = rng.standard_normal((kw["batch"], 784), dtype=np.float32)
                out.append(({"x": x}, rng.integers(0, 10, kw["batch"]).astype(np.int64)))
            elif self.factory == "cnn":
                x = rng.standard_normal((kw["batch"], 3, 32, 32), dtype=np.float32)
                out.append(({"x": x}, rng.integers(0, 10, kw["batch"]).astype(np.int64)))
            elif self.factory in ("gpt2", "decoder"):
                ids = rng.integers(0, kw["vocab"], (kw["batch"], kw["seq"])).astype(np.int64)
                out.append(({"input_ids": ids}, ids.copy()))  # causal LM: labels = ids
            elif self.factory == "minilm":
                b, s = kw["batch"], kw["seq"]
                ids = rng.integers(1000, MINILM_VOCAB, (b, s)).astype(np.int64)
                ids[:, 0] = 101
                mask = np.ones((b, s), np.int64)
                for i in range(b):  # row 0 full length, the others padded a little
                    n = s - (7 * i) % (s // 4)
                    ids[i, n - 1] = 102
                    ids[i, n:] = 0
                    mask[i, n:] = 0
                labels = rng.integers(0, kw["num_labels"], b).astype(np.int64)
                out.append(({"input_ids": ids, "attention_mask": mask}, labels))
            else:
                raise ValueError(self.factory)
        return out


def _minilm(id, title, layers=None, steps=10):
    targets = ["query", "value"] if layers is None else [
        f"bert.encoder.layer.{i}.attention.self.{m}" for i in layers for m in ("query", "value")]
    return Workload(id, title, "minilm", dict(num_labels=3, seq=128, batch=16),
                    loss="cross_entropy", lora_targets=targets, train=["classifier.*"],
                    steps=steps)


WORKLOADS: dict[str, Workload] = {
    # W1 and W4 carry targets on their medians: 20 timed steps per run (W5's sweep keeps 10)
    "1": _minilm("1", "MiniLM-L6 + classifier, LoRA r=8 q/v + head, 16x128", steps=20),
    "2": Workload("2", "MLP 784-256-256-10, last layer, batch 32", "mlp", dict(batch=32),
                  loss="cross_entropy", lora_targets=None, train=["layers.4.*"],
                  steps=300, warmup=30),
    "3": Workload("3", "CNN 4 conv-BN-ReLU blocks, last block + head, 16x3x32x32", "cnn",
                  dict(batch=16), loss="cross_entropy", lora_targets=None,
                  train=["blocks.3.*", "head.*"], steps=100, warmup=10),
    "4": Workload("4", "GPT-2 6L d512 8h V8192, LoRA r=8 c_attn, 4x256, causal LM", "gpt2",
                  dict(n_layer=6, n_embd=512, n_head=8, vocab=8192, seq=256, batch=4),
                  loss="causal_lm", lora_targets=["c_attn"], fan_in_fan_out=True, steps=20),
}
# Decoder LLM shapes with random weights (a config, no download), LoRA r=8 alpha 16, causal LM
# on 4 x 256 tokens. pyedge and PyTorch+PEFT only: onnxruntime-training's exporter path
# (TorchScript, opset 14) and its 2 GB protobuf limit do not reach these models.
LLM_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLM_SHAPES = {
    # SmolLM2-135M
    "6": ("SmolLM2-135M shape (Llama 30L d576 9/3h ff1536 V49152, tied)",
          dict(arch="llama", layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536,
               vocab=49152, tie=True)),
    # Qwen2.5-0.5B (q/k/v biases)
    "7": ("Qwen2.5-0.5B shape (Qwen2 24L d896 14/2h ff4864 V151936, tied)",
          dict(arch="qwen2", layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864,
               vocab=151936, tie=True)),
    # Qwen2.5-1.5B, meant for a 4-bit base
    "8": ("Qwen2.5-1.5B shape (Qwen2 28L d1536 12/2h ff8960 V151936, tied), 4-bit base",
          dict(arch="qwen2", layers=28, hidden=1536, heads=12, kv_heads=2, intermediate=8960,
               vocab=151936, tie=True)),
    # issue "Modern decoders at full speed": GPT-2 W4's size, Llama blocks
    "llama-w4": ("Llama 6L d512 8h ff1376 V8192",
                 dict(arch="llama", layers=6, hidden=512, heads=8, kv_heads=8,
                      intermediate=1376, vocab=8192, tie=False)),
}
W8_QUANTIZE = {"bits": 4, "group_size": 32}


def _decoder(shape_id, batch=4, seq=256, **over):
    title, shape = LLM_SHAPES[shape_id]
    id = shape_id
    targets = ["q_proj", "v_proj"] if id == "llama-w4" else list(LLM_PROJECTIONS)
    w = Workload(id, f"{title}, LoRA r=8 {'q/v' if id == 'llama-w4' else 'all 7 proj.'}, "
                     f"{batch}x{seq}, causal LM",
                 "decoder", dict(shape, seq=seq, batch=batch), loss="causal_lm",
                 lora_targets=targets, engines=("pyedge", "torch"), steps=5, warmup=1,
                 torch_kwargs={"attn": "sdpa"})
    if id == "llama-w4":
        w.steps, w.warmup = 20, 3
    if id == "8":
        # PyTorch+PEFT has no 4-bit CPU path (bitsandbytes' 4-bit is CUDA), and a float
        # 1.5B run needs ~25 GB: pyedge only.
        w.quantize = dict(W8_QUANTIZE)
        w.engines = ("pyedge",)
    for k, v in over.items():
        setattr(w, k, v)
    return w


def tiny(w: Workload) -> Workload:
    """The same workload (factory, architecture, targets, loss, variants) at a test size."""
    if w.factory != "decoder":
        raise ValueError("tiny() is for the decoder workloads")
    kw = dict(w.kwargs)
    kv = 1 if kw["kv_heads"] < kw["heads"] else 4
    kw.update(layers=2, hidden=64, heads=4, kv_heads=kv, intermediate=96, vocab=512, seq=16,
              batch=2)
    return dataclasses.replace(w, id=w.id + "-tiny", kwargs=kw, steps=1, warmup=0)


for _id in LLM_SHAPES:
    WORKLOADS[_id] = _decoder(_id)
# pyedge-only variants (reported as skipped by a pyedge without the feature)
# W1 with DoRA (LoraConfig(use_dora=True) in both engines; onnxruntime-training has no DoRA)
WORKLOADS["1dora"] = _minilm("1dora", "MiniLM-L6 + classifier, DoRA r=8 q/v + head, 16x128",
                             steps=20)
WORKLOADS["1dora"].lora_extra = {"use_dora": True}
WORKLOADS["1dora"].engines = ("pyedge", "torch")
# W1 with (IA)^3 on the key and value projections (+ the head) in both engines
WORKLOADS["1ia3"] = _minilm("1ia3", "MiniLM-L6 + classifier, IA3 on key/value + head, 16x128",
                            steps=20)
WORKLOADS["1ia3"].lora_targets = ["key", "value"]
WORKLOADS["1ia3"].method = "ia3"
WORKLOADS["1ia3"].engines = ("pyedge", "torch")
WORKLOADS["6m"] = _decoder("6", id="6m", engines=("pyedge",), max_memory=int(1.5 * 2**30))
WORKLOADS["6m"].title += ", max_memory 1.5 GiB"
WORKLOADS["7q4"] = _decoder("7", id="7q4", engines=("pyedge",), quantize=dict(W8_QUANTIZE))
WORKLOADS["7q4"].title += ", 4-bit base"
# issue "LLMs on small boards" 1: W6 on 8-bit (int8 per output channel) and 4-bit (int, group
# 32) bases beside its float base, and 2: W6 under budgets from 0.8 to 3 GB
WORKLOADS["7q8"] = _decoder("7", id="7q8", engines=("pyedge",), quantize={"bits": 8})
WORKLOADS["7q8"].title += ", 8-bit base"
WORKLOADS["6q8"] = _decoder("6", id="6q8", engines=("pyedge",), quantize={"bits": 8})
WORKLOADS["6q8"].title += ", 8-bit base"
WORKLOADS["6q4"] = _decoder("6", id="6q4", engines=("pyedge",), quantize=dict(W8_QUANTIZE))
WORKLOADS["6q4"].title += ", 4-bit base"
for _gib in (0.8, 1.0, 1.5, 2.0, 2.5, 3.0):
    _id = f"6m{_gib:g}"
    WORKLOADS[_id] = _decoder("6", id=_id, engines=("pyedge",), max_memory=int(_gib * 2**30))
    WORKLOADS[_id].title += f", max_memory {_gib:g} GiB"
# session 7 (issue 15): W7 under 2.5 GiB beside its unbudgeted run and PyTorch+PEFT; W7 and
# W8 on a 4-bit base with the embedding table packed too, under 1 GiB and 2.5 GiB.
W4_EMBED = dict(W8_QUANTIZE, include=["embeddings"])
WORKLOADS["7m2.5"] = _decoder("7", id="7m2.5", engines=("pyedge",), max_memory=int(2.5 * 2**30))
WORKLOADS["7m2.5"].title += ", max_memory 2.5 GiB"
WORKLOADS["7q4e"] = _decoder("7", id="7q4e", engines=("pyedge",), quantize=dict(W4_EMBED),
                             max_memory=int(1.0 * 2**30))
WORKLOADS["7q4e"].title += ", 4-bit base and embedding, max_memory 1 GiB"
WORKLOADS["8e"] = _decoder("8", id="8e", engines=("pyedge",), quantize=dict(W4_EMBED),
                           max_memory=int(2.5 * 2**30))
WORKLOADS["8e"].title += ", 4-bit embedding too, max_memory 2.5 GiB"

for _k in range(1, MINILM_LAYERS + 1):
    _w = _minilm(f"5k{_k}", f"MiniLM, LoRA q/v on the last {_k} of 6 layers + head",
                 layers=range(MINILM_LAYERS - _k, MINILM_LAYERS))
    _w.engines = ("pyedge", "torch")
    WORKLOADS[_w.id] = _w


def expand(spec: str) -> list[str]:
    """'1,2,5' -> ['1', '2', '5k1', ..., '5k6']; '5k3' stays itself."""
    ids = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == "5":
            ids += [f"5k{k}" for k in range(1, MINILM_LAYERS + 1)]
        elif part in WORKLOADS:
            ids.append(part)
        else:
            raise SystemExit(f"unknown workload '{part}'; choose from 1,2,3,4,5, 5k1..5k6, "
                             f"{','.join(LLM_SHAPES)}, 6m, 7q4")
    return ids


# ------------------------------------------------------------------------- ONNX exports
def build_torch(w: Workload, seed: int = 0, for_torch_engine: bool = False):
    """(module in eval mode, example inputs) from models.reference — needs torch.
    for_torch_engine applies w.torch_kwargs (e.g. PyTorch's own SDPA attention; the ONNX
    export keeps the eager spelling, the same function)."""
    import sys
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from models.reference import FACTORIES
    kwargs = dict(w.kwargs, **(w.torch_kwargs if for_torch_engine else {}))
    model, inputs, in_names, out_names, _dyn = FACTORIES[w.factory](seed=seed, **kwargs)
    return model, inputs, in_names, out_names


def export_path(w: Workload, exporter: str, opset: int | None = None, cache: str = CACHE) -> str:
    return os.path.join(cache, w.key(exporter, opset) + ".onnx")


def ensure_quantized(onnx_path: str, quantize: dict, log=print) -> str:
    """The workload's export quantized by pyedge.quantize(src, dst, **quantize), once, cached
    beside it. It runs in its own process, so the timed worker's peak RSS is the training's,
    not the quantizer's (which reads the float model whole)."""
    import subprocess
    import sys
    import time
    tag = re.sub(r"[^A-Za-z0-9._-]+", "", "-".join(f"{k}{v}" for k, v in sorted(quantize.items())))
    path = onnx_path[:-len(".onnx")] + f".q-{tag}.onnx"
    if os.path.exists(path):
        return path
    t0 = time.time()
    code = ("import json, sys, pyedge; "
            "r = pyedge.quantize(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3])); print(r)")
    r = subprocess.run([sys.executable, "-c", code, onnx_path, path, json.dumps(quantize)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"quantizing {onnx_path} failed: {r.stderr.strip()[-2000:]}")
    log(f"quantized {os.path.relpath(onnx_path, ROOT)} ({tag}) -> "
        f"{os.path.relpath(path, ROOT)} in {time.time() - t0:.1f}s")
    return path


def ensure_export(w: Workload, exporter: str, opset: int | None = None, log=print,
                  cache: str = CACHE) -> str:
    """Exports the workload's base model once (static shapes) into bench/.cache; returns path.

    exporter "dynamo" (opset 18) feeds pyedge; "torchscript" at opset 14 feeds
    onnxruntime-training (LayerNormalization decomposed, which its gradient builder needs).
    The decoder workloads go through pyedge's own exporter (pyedge.export.torch_export):
    weights 64-byte aligned in the file, so pyedge maps them in place, and in
    `<file>.onnx.data` beside it above 1.8 GB (W7, W8).
    """
    path = export_path(w, exporter, opset, cache)
    if os.path.exists(path):  # written last (after its .data), so it is complete
        return path
    if w.factory == "decoder":
        return _export_decoder(w, exporter, opset, path, log)
    import time
    import sys
    import torch
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from models.export_reference import export
    torch.set_num_threads(2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t0 = time.time()
    model, inputs, in_names, out_names = build_torch(w)
    tmp = path + f".tmp{os.getpid()}.onnx"
    export(model, inputs, tmp, exporter=exporter, opset=opset, input_names=in_names,
           output_names=out_names, dynamic_axes=None)
    os.replace(tmp, path)
    log(f"exported {w.factory} ({exporter}, opset {opset or 'default'}) -> "
        f"{os.path.relpath(path, ROOT)} in {time.time() - t0:.1f}s")
    return path


def _export_decoder(w: Workload, exporter: str, opset, path: str, log) -> str:
    import sys
    import time

    import torch
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from pyedge.export.torch_export import export_module
    if exporter != "dynamo":
        raise ValueError(f"workload {w.id}: only the dynamo export is made for decoders")
    torch.set_num_threads(2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t0 = time.time()
    import warnings
    model, inputs, in_names, out_names = build_torch(w)
    with warnings.catch_warnings():
        # rotary_emb.inv_freq and its original_inv_freq copy are equal buffers: recorded as
        # aliases of one initializer, which is what they are
        warnings.filterwarnings("ignore", message="the exporter merged identical-valued")
        export_module(model, inputs, path, input_names=in_names, output_names=out_names,
                      exporter="dynamo", opset=opset, task_type="CAUSAL_LM")
    extra = " + .data" if os.path.exists(path + ".data") else ""
    log(f"exported {w.factory} {w.kwargs.get('arch')} (pyedge export{extra}) -> "
        f"{os.path.relpath(path, ROOT)} in {time.time() - t0:.1f}s")
    return path
