"""LoRA on a quantized base (QLoRA): a targeted MatMulNBits / MatMulBnb4 node becomes

    pyedge.LoraQuantMatMul(x, A [r, K], B [N, r], q0, q1[, q2, q3])
    y = x·Wqᵀ (+ bias) + s·(x·Aᵀ)·Bᵀ

where q0.. are the base node's inputs after x in the base's order (MatMulNBits: packed,
scales, zero_points or "", bias or ""; MatMulBnb4: packed, absmax) and the attributes are the
base's (K, N, bits, block_size, quant_type, ...) plus ``base`` (its op type), ``scale`` and
optional ``dropout``/``salt`` as pyedge.LoraMatMul. The packed weight stays frozen and packed.

A and B are drawn exactly as for the float model's nn.Linear (A kaiming-uniform with bound
1/√K from the same generator, in graph order; B = 0), so a quantized model and its float
original start from identical adapters. The site's PyTorch weight is [N, K]
(fan_in_fan_out False), which is what PEFT needs to load the adapters onto the float model.
"""
from __future__ import annotations

import math

import numpy as np

from pyedge.graph import Graph, Node
from pyedge.import_quantized import is_quant_node, quant_weight_inputs


def quant_weight(graph: Graph, producers, node: Node) -> str | None:
    """The packed weight initializer of a quantized linear node (its LoRA site key)."""
    if is_quant_node(node) and len(node.inputs) >= 2 and node.inputs[1] in graph.initializers:
        return node.inputs[1]
    return None


def rewrite_quant(graph: Graph, node: Node, w: str, module: str, cfg, rng, sites):
    from pyedge.adapters.lora import LoraSite
    if cfg.init_lora_weights is not True or cfg.use_dora:
        raise ValueError(f"'{module}': init_lora_weights={cfg.init_lora_weights!r} / use_dora="
                         f"{cfg.use_dora} are supported on MatMul/Gemm (nn.Linear) sites only, "
                         f"not on {node.op_type}; leave this module out of target_modules")
    k, n = int(node.attrs["K"]), int(node.attrs["N"])
    a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    if a_name not in graph.initializers:  # a module applied twice shares one adapter
        bound = 1.0 / math.sqrt(k)
        graph.initializers[a_name] = rng.uniform(-bound, bound, size=(cfg.r, k)).astype(np.float32)
        graph.initializers[b_name] = np.zeros((n, cfg.r), np.float32)
        sites.append(LoraSite(module, w, a_name, b_name, k, n, fan_in_fan_out=False))
    attrs = dict(node.attrs)
    attrs.update({"base": node.op_type, "scale": float(cfg.scaling)})
    if cfg.dropout > 0:
        attrs["dropout"] = float(cfg.dropout)
        attrs["salt"] = len(sites)
    inputs = [node.inputs[0], a_name, b_name] + quant_weight_inputs(node)
    return [Node("LoraQuantMatMul", inputs, list(node.outputs), name=node.name, domain="pyedge",
                 attrs=attrs)]
