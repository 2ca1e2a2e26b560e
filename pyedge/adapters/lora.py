"""LoRA as a graph rewrite: each targeted MatMul/Gemm whose weight is an initializer becomes a
fused `pyedge.LoraMatMul(x, W, A, B[, bias])` computing x·W + s·(x·Aᵀ)·Bᵀ, with PEFT's layout
(A [r, in], B [out, r]), initialisation (A kaiming-uniform(a=√5), B = 0) and scaling
(alpha/r, or alpha/√r with rsLoRA).

Which base ops can carry LoRA is one table (`_rules`): MatMul/Gemm here, Conv in lora_conv.py,
the quantized MatMulNBits/MatMulBnb4 in lora_quant.py (-> pyedge.LoraQuantMatMul)."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from pyedge.adapters.patterns import any_match
from pyedge.graph import Graph, Node
from pyedge.param_names import module_of


@dataclasses.dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    target_modules: Sequence[str] = ("query", "value")
    dropout: float = 0.0
    use_rslora: bool = False
    seed: int = 0

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


@dataclasses.dataclass
class LoraSite:
    module: str          # PyTorch module name
    weight: str          # ONNX initializer of the base weight
    lora_a: str          # initializer names of the adapter tensors
    lora_b: str
    in_features: int
    out_features: int
    fan_in_fan_out: bool  # the PyTorch weight is [in, out] (transformers Conv1D)


def _weight_source(graph: Graph, producers, name: str):
    """(initializer, transposed_by_graph) for a MatMul B input, looking through Transpose."""
    if name in graph.initializers:
        return name, False
    p = producers.get(name)
    if p is not None and p.op_type == "Transpose" and p.inputs[0] in graph.initializers:
        perm = p.attrs.get("perm", [1, 0])
        if list(perm) == [1, 0] and graph.initializers[p.inputs[0]].ndim == 2:
            return p.inputs[0], True
    return None, False


def _linear_weight(graph: Graph, producers, node: Node) -> str | None:
    if len(node.inputs) < 2:
        return None
    w, _ = _weight_source(graph, producers, node.inputs[1])
    return w if w is not None and graph.initializers[w].ndim == 2 else None


def _conv_weight(graph: Graph, producers, node: Node) -> str | None:
    return node.inputs[1] if len(node.inputs) >= 2 and node.inputs[1] in graph.initializers \
        else None


def _rewrite_linear(graph, node, w, module, cfg, rng, sites):
    fused = _rewrite(graph, node, w, node.inputs[1] != w, module, cfg, rng, sites)
    return [fused] if fused else None


def _rules() -> dict:
    """(domain, op type) -> (weight of the node or None, rewrite into LoRA nodes or None).
    One entry per base op; a new base op is one more entry."""
    from pyedge.adapters.lora_conv import rewrite_conv  # they build on this module
    from pyedge.adapters.lora_quant import quant_weight, rewrite_quant
    conv = (_conv_weight, lambda g, n, w, m, c, r, s: rewrite_conv(g, n, m, c, r, s))
    quant = (quant_weight, rewrite_quant)
    return {("", "MatMul"): (_linear_weight, _rewrite_linear),
            ("", "Gemm"): (_linear_weight, _rewrite_linear),
            ("", "Conv"): conv,
            ("com.microsoft", "MatMulNBits"): quant,
            ("com.microsoft", "MatMulBnb4"): quant}


def inject_lora(graph: Graph, cfg: LoraConfig) -> list[LoraSite]:
    """Rewrites `graph` in place; returns the adapted sites (in graph order)."""
    if cfg.r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {cfg.r}")
    rng = np.random.default_rng(cfg.seed)
    rules = _rules()
    producers = graph.producer_map()
    sites: list[LoraSite] = []
    new_nodes: list[Node] = []
    with_weight: list[str] = []
    for node in graph.nodes:
        replacement = None
        rule = rules.get((node.domain, node.op_type))
        w = rule[0](graph, producers, node) if rule else None
        if w is not None:
            module = module_of(graph, w)
            with_weight.append(module)
            if any_match(module, cfg.target_modules):
                replacement = rule[1](graph, node, w, module, cfg, rng, sites)
        new_nodes.extend(replacement or [node])
    graph.nodes = new_nodes
    if not sites:
        mods = sorted(set(with_weight))
        raise ValueError(f"no module matches LoRA targets {list(cfg.target_modules)}; "
                         f"modules with a weight: {', '.join(mods[:20]) or 'none'}")
    return sites


def _rewrite(graph, node, w, via_transpose, module, cfg, rng, sites):
    W = graph.initializers[w]
    trans_w = via_transpose
    bias = ""
    if node.op_type == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0:
            return None
        trans_w = bool(node.attrs.get("transB", 0)) != via_transpose
        if len(node.inputs) > 2 and node.inputs[2]:
            c = graph.initializers.get(node.inputs[2])
            if c is None or c.ndim != 1 or node.attrs.get("beta", 1.0) != 1.0:
                return None
            bias = node.inputs[2]
    k, n = (W.shape[1], W.shape[0]) if trans_w else (W.shape[0], W.shape[1])
    entry = graph.param_map.get(w, {})
    # The ONNX weight is [in, out] when not transposed; PyTorch's is [out, in] for nn.Linear,
    # unless the exporter kept a transposed copy. transformers' Conv1D stores [in, out].
    torch_is_in_out = not trans_w and not entry.get("transposed", False)
    a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    if a_name not in graph.initializers:  # a module applied twice shares one adapter
        bound = 1.0 / math.sqrt(k)
        graph.initializers[a_name] = rng.uniform(-bound, bound, size=(cfg.r, k)).astype(np.float32)
        graph.initializers[b_name] = np.zeros((n, cfg.r), np.float32)
        sites.append(LoraSite(module, w, a_name, b_name, int(k), int(n),
                              fan_in_fan_out=torch_is_in_out))
    attrs = {"scale": float(cfg.scaling), "trans_w": int(trans_w)}
    if cfg.dropout > 0:
        attrs["dropout"] = float(cfg.dropout)
        attrs["salt"] = len(sites)
    inputs = [node.inputs[0], w, a_name, b_name] + ([bias] if bias else [])
    return Node("LoraMatMul", inputs, list(node.outputs), name=node.name, domain="pyedge",
                attrs=attrs)
