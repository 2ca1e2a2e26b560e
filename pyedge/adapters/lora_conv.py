"""LoRA on Conv nodes, exactly as PEFT's ConvNd LoRA, built from standard ops.

PEFT adapts ``nn.Conv{1,2,3}d`` with ``lora_A = ConvNd(in, r, kernel, stride, padding,
bias=False)`` (no dilation) and ``lora_B = ConvNd(r, out, 1, 1, bias=False)``; the output is
``conv(x, W) + s · B(A(x))`` with ``s = alpha/r`` (or ``alpha/√r``). The rewrite keeps the base
Conv and adds::

    t = Conv(x, A; kernel_shape, strides, pads/auto_pad of the base, dilations 1, group 1)
    u = Conv(t, B)                        # 1×1
    y = Add(base_output, Mul(u, s))

so no new kernel is needed (training needs Conv's backward). Tensors are named like the
MatMul LoRA and PEFT: ``<module>.lora_A.weight`` [r, in, *k], ``<module>.lora_B.weight``
[out, r, 1, ...]; A is kaiming-uniform(a=√5) (bound 1/√(in·∏k)), B = 0.

Not adapted (the node is left alone): grouped convs (PEFT cannot merge them), dilated convs
(PEFT's lora_A has no dilation, so its output size would differ), weights that are not
initializers. LoRA dropout on Conv is refused.

Wiring: `inject_lora` (pyedge/adapters/lora.py) handles MatMul/Gemm; a Conv node whose module
matches the targets can be handed to `rewrite_conv`, which returns the nodes that replace it
and appends a `LoraSite` -- or call `inject_lora_conv(graph, cfg)` after `inject_lora`.
"""
from __future__ import annotations

import math

import numpy as np

from pyedge.adapters.lora import LoraConfig, LoraSite
from pyedge.adapters.patterns import any_match
from pyedge.graph import Graph, Node
from pyedge.param_names import module_of


def conv_is_adaptable(graph: Graph, node: Node) -> bool:
    if node.op_type != "Conv" or len(node.inputs) < 2:
        return False
    W = graph.initializers.get(node.inputs[1])
    if W is None or W.ndim < 3:
        return False
    if int(node.attrs.get("group", 1)) != 1:
        return False
    return all(int(d) == 1 for d in node.attrs.get("dilations", []) or [])


def rewrite_conv(graph: Graph, node: Node, module: str, cfg: LoraConfig, rng,
                 sites: list[LoraSite]) -> list[Node] | None:
    """The nodes replacing `node` (base Conv + LoRA branch), or None when not adaptable."""
    if not conv_is_adaptable(graph, node):
        return None
    if cfg.init_lora_weights is not True or cfg.use_dora:
        raise ValueError(f"'{module}': init_lora_weights={cfg.init_lora_weights!r} / use_dora="
                         f"{cfg.use_dora} are supported on MatMul/Gemm (nn.Linear) sites only, "
                         f"not on {node.op_type}; leave this module out of target_modules")
    if cfg.dropout > 0:
        raise ValueError(f"LoRA dropout is not supported on Conv ('{module}'); use dropout=0")
    w = node.inputs[1]
    W = graph.initializers[w]
    out_ch, in_ch, kernel = int(W.shape[0]), int(W.shape[1]), [int(k) for k in W.shape[2:]]
    a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    if a_name not in graph.initializers:
        bound = 1.0 / math.sqrt(in_ch * int(np.prod(kernel)))
        graph.initializers[a_name] = rng.uniform(-bound, bound, size=(cfg.r, in_ch, *kernel)) \
            .astype(np.float32)
        graph.initializers[b_name] = np.zeros((out_ch, cfg.r) + (1,) * len(kernel), np.float32)
        sites.append(LoraSite(module, w, a_name, b_name, in_ch, out_ch, fan_in_fan_out=False))
    scale_name = f"{module}.lora_scaling"
    graph.initializers.setdefault(scale_name, np.asarray(cfg.scaling, np.float32))
    base_out = node.outputs[0]
    y0 = graph.fresh_name(f"{base_out}/base")
    t, u, v = (graph.fresh_name(f"{base_out}/lora_{k}") for k in ("a", "b", "scaled"))
    base = Node(node.op_type, list(node.inputs), [y0] + list(node.outputs[1:]), node.name,
                node.domain, dict(node.attrs))
    a_attrs = {k: v_ for k, v_ in node.attrs.items()
               if k in ("kernel_shape", "strides", "pads", "auto_pad")}
    name = node.name or base_out
    return [
        base,
        Node("Conv", [node.inputs[0], a_name], [t], f"{name}/lora_A", "", a_attrs),
        Node("Conv", [t, b_name], [u], f"{name}/lora_B", "", {}),
        Node("Mul", [u, scale_name], [v], f"{name}/lora_scale", "", {}),
        Node("Add", [y0, v], [base_out], f"{name}/lora_add", "", {}),
    ]


def inject_lora_conv(graph: Graph, cfg: LoraConfig, rng=None,
                     sites: list[LoraSite] | None = None) -> list[LoraSite]:
    """Adds LoRA to every adaptable Conv whose module matches cfg.target_modules, in place;
    returns the new sites (appended to `sites` when given)."""
    if cfg.r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {cfg.r}")
    rng = rng if rng is not None else np.random.default_rng(cfg.seed)
    sites = sites if sites is not None else []
    start = len(sites)
    new_nodes: list[Node] = []
    for node in graph.nodes:
        repl = None
        if node.op_type == "Conv" and len(node.inputs) > 1 and \
                node.inputs[1] in graph.initializers:
            module = module_of(graph, node.inputs[1])
            if any_match(module, cfg.target_modules):
                repl = rewrite_conv(graph, node, module, cfg, rng, sites)
        new_nodes.extend(repl or [node])
    graph.nodes = new_nodes
    return sites[start:]
