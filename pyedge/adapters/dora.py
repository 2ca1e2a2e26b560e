"""DoRA (weight-decomposed LoRA, PEFT's ``LoraConfig(use_dora=True)``) on MatMul/Gemm sites.

PEFT (peft/tuners/lora/dora.py, 0.21) computes, per nn.Linear with weight W [out, in]:

    y = m / ‖W + s·B·A‖_row · (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias       (the norm detached)

with the magnitude m [out] trained beside A and B, initialised to ‖W + s·B·A‖ (so the model
starts unchanged; with B = 0 that is ‖W‖ row by row). The rewrite keeps LoRA's fused op and
scales its output:

    z = pyedge.LoraMatMul(x, W, A, B)                 (no bias: it must not be scaled)
    y = pyedge.DoraScale(z, m, W, A, B[, bias])       (csrc/ops/dora.cpp)

PEFT file: ``<module>.lora_magnitude_vector`` [out] beside lora_A / lora_B, use_dora true.
Merge: W' = (m / ‖W + s·B·A‖) ∘ (W + s·B·A), row by row in PyTorch's [out, in] layout.
Conv and quantized bases are refused (lora_conv.py, lora_quant.py), as is dropout (PEFT's
DoRA with dropout computes the base output on the undropped x; not built here yet).
"""
from __future__ import annotations

import numpy as np

from pyedge.adapters.base import OpRule, register
from pyedge.adapters.lora import LoraConfig, LoraMethod, LoraSite, inject_lora
from pyedge.adapters.lora_init import effective_weight
from pyedge.graph import Graph, Node

MAGNITUDE = "lora_magnitude_vector"


def row_norms(W_eff: np.ndarray) -> np.ndarray:
    """‖row‖ of an [out, in] matrix, float32 (PEFT's torch.linalg.norm(dim=1))."""
    W = np.asarray(W_eff, np.float32)
    return np.sqrt(np.einsum("ij,ij->i", W, W, dtype=np.float32)).astype(np.float32)


def inject_dora(graph: Graph, cfg: LoraConfig) -> list[LoraSite]:
    if cfg.dropout > 0:
        raise ValueError("DoRA with lora_dropout > 0 is not supported yet; use dropout=0")
    sites = inject_lora(graph, cfg)
    by_a = {s.lora_a: s for s in sites}
    for s in sites:
        W = effective_weight(graph.initializers[s.weight], s.trans_w)
        A, B = graph.initializers[s.lora_a], graph.initializers[s.lora_b]
        merged = W.astype(np.float32) + np.float32(cfg.scaling) * (B @ A)
        s.magnitude = f"{s.module}.{MAGNITUDE}"
        graph.initializers[s.magnitude] = row_norms(merged)
    nodes: list[Node] = []
    for n in graph.nodes:
        site = by_a.get(n.inputs[2]) if n.op_type == "LoraMatMul" and n.domain == "pyedge" \
            else None
        if site is None:
            nodes.append(n)
            continue
        z = graph.fresh_name(f"{n.outputs[0]}/lora")
        bias = n.inputs[4:5]
        nodes.append(Node("LoraMatMul", n.inputs[:4], [z], n.name, "pyedge", dict(n.attrs)))
        nodes.append(Node("DoraScale", [z, site.magnitude, n.inputs[1], n.inputs[2],
                                        n.inputs[3]] + bias, list(n.outputs),
                          f"{n.name or n.outputs[0]}/dora", "pyedge",
                          {"scale": n.attrs["scale"], "trans_w": n.attrs["trans_w"]}))
    graph.nodes = nodes
    return sites


class DoraMethod(LoraMethod):
    name = "dora"
    peft_type = "LORA"
    config_class = LoraConfig
    # z [..., N] -> y [..., N] scaled per column: rows independent
    op_rules = {("pyedge", "DoraScale"): OpRule(row_input=0)}

    def accepts(self, cfg) -> bool:
        return isinstance(cfg, LoraConfig) and cfg.use_dora

    def accepts_peft(self, config: dict) -> bool:
        return bool(config.get("use_dora"))

    def inject(self, graph, cfg) -> list[LoraSite]:
        return inject_dora(graph, cfg)

    def trainable(self, sites) -> list[str]:
        return [n for s in sites for n in (s.lora_a, s.lora_b, s.magnitude)]

    def lr_scales(self, sites, cfg) -> dict[str, float]:
        # peft's create_loraplus_optimizer puts lora_B and every 1-D parameter (m) in group B
        if not cfg.loraplus_lr_ratio:
            return {}
        return {n: float(cfg.loraplus_lr_ratio) for s in sites for n in (s.lora_b, s.magnitude)}

    def peft_tensors(self, sites, params) -> dict:
        out = super().peft_tensors(sites, params)
        for s in sites:
            out[f"{s.module}.{MAGNITUDE}"] = np.array(params[s.magnitude])
        return out

    def noop_tensors(self, graph, module: str, n_in: int, n_out: int, r: int) -> dict:
        out = super().noop_tensors(graph, module, n_in, n_out, r)
        for name, arr in graph.initializers.items():
            e = graph.param_map.get(name) or {}
            if e.get("module") == module and e.get("param") == "weight" and arr.ndim == 2:
                w = arr.T if e.get("transposed") else arr  # PyTorch layout
                if e.get("kind") == "conv1d_fan_in_fan_out":
                    w = w.T
                out[f"{module}.{MAGNITUDE}"] = row_norms(w)
                return out
        from pyedge.export.adapter_files import AdapterError
        raise AdapterError(f"PEFT adapts '{module}' by suffix and DoRA needs its weight norm, "
                           "but the graph has no float weight for it")

    def plan_load(self, session, ad, strict: bool):
        from pyedge.adapters.lora_peft import plan_lora_load
        return plan_lora_load(session, ad, strict, method_tensors=[(MAGNITUDE, "magnitude")])

    def merge_deltas(self, graph, config: dict, ad) -> dict:
        from pyedge.adapters.lora_peft import lora_deltas
        from pyedge.export.adapter_files import AdapterError
        layouts: dict = {}
        deltas = lora_deltas(graph, config, ad.lora, layouts)
        for module in ad.lora:
            if module not in layouts:
                raise AdapterError(f"DoRA module '{module}' has no MatMul/Gemm weight to merge")
            w, trans = layouts[module]
            W = graph.initializers[w].astype(np.float64)
            merged = effective_weight(W + deltas[w], trans)                 # [out, in]
            m = np.asarray(ad.extra[module][MAGNITUDE], np.float64)
            scaled = merged * (m / np.linalg.norm(merged, axis=1))[:, None]
            deltas[w] = effective_weight(scaled, trans) - W                 # back to W's layout
        return deltas


register(DoraMethod())
