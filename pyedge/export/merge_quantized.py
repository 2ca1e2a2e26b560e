"""Merging LoRA into a quantized base: the adapted layers get float weights, optionally
re-quantized.

For each adapted quantized layer (a MatMulNBits/MatMulBnb4 node, or a DequantizeLinear weight
the import packed), W' = dequantize(Wq) + s·B·A [N, K] in float64, then the reader node (the
quantized node, or the MatMul/Gemm behind the DequantizeLinear) is replaced by
``MatMul(x, W'ᵀ)`` (+ ``Add(bias)``), W'ᵀ stored float32 [K, N] under the PyTorch-style name
(``W_Q4`` -> ``W``; recorded in the parameter map as the transposed weight of the module).
DequantizeLinear/Transpose nodes and quantized tensors nothing reads any more are removed.
Layers without adapters stay quantized as they were.

With ``bits`` the merged weights are quantized again by pyedge.quantize (settings: the base's
from ``pyedge.quantization`` or its nodes, ``bits``/``group_size`` overriding), so the file
stays small but carries a second rounding: W'' = q(W') != W'.
"""
from __future__ import annotations

import json

import numpy as np

from pyedge.import_quantized import _SUFFIX_RE, dequantized_weight, is_quant_node


def quantized_sites(graph) -> dict[str, object]:
    """{packed initializer: its quantized node} in the imported graph."""
    return {n.inputs[1]: n for n in graph.nodes if is_quant_node(n) and len(n.inputs) > 1}


def fold_quantized(proto, graph, deltas: dict[str, np.ndarray], bits: int | None = None,
                   group_size: int | None = None) -> dict:
    """Writes W' = deq(Wq) + delta ([N, K], float64) for each packed initializer in `deltas`
    into `proto` (edited in place; returns the new proto when re-quantized). Returns
    {"dequantized": [modules], "requantized": [modules], "settings": {...}, "proto": proto}."""
    from onnx import helper, numpy_helper

    from pyedge.param_names import PARAM_MAP_KEY
    sites = quantized_sites(graph)
    meta = {p.key: p for p in proto.metadata_props}
    pmap = json.loads(meta[PARAM_MAP_KEY].value) if PARAM_MAP_KEY in meta else None
    by_name = {n.name: n for n in proto.graph.node}
    taken = {t.name for t in proto.graph.initializer} | {o for n in proto.graph.node
                                                         for o in n.output}
    new_weights, modules = [], []
    candidates: set[str] = set()   # values the replaced nodes read: maybe dead now
    renames: dict[str, str] = {}
    first = None
    for packed, delta in deltas.items():
        node = sites[packed]
        first = first or node
        W = dequantized_weight(graph, node, np.float64) + delta
        entry = graph.param_map.get(packed, {})
        module = entry.get("module", packed)
        m = _SUFFIX_RE.match(packed)
        base = m.group("base") if m else f"{module}.weight"
        name = f"{base}_merged"  # renamed to `base` below once the old nodes are gone
        while name in taken:
            name += "_"
        taken.add(name)
        renames[name] = base
        proto.graph.initializer.append(numpy_helper.from_array(
            np.ascontiguousarray(W.T.astype(np.float32)), name))
        reader = by_name.get(node.name)
        if reader is None:
            raise ValueError(f"quantized node '{node.name}' is not in the file (unnamed node?); "
                             "cannot merge into it")
        bias = ""
        ins = list(reader.input) + [""] * 6
        if reader.op_type == "MatMulNBits":
            bias = ins[5]
        elif reader.op_type == "Gemm":
            bias = ins[2]
        out = reader.output[0]
        mm_out = out if not bias else f"{out}_merged_nobias"
        nodes = [helper.make_node("MatMul", [reader.input[0], name], [mm_out], name=reader.name)]
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [out],
                                          name=f"{reader.name}_bias"))
        candidates.update(i for i in reader.input if i)
        idx = list(proto.graph.node).index(reader)
        del proto.graph.node[idx]
        for k, n in enumerate(nodes):
            proto.graph.node.insert(idx + k, n)
        if pmap is not None:
            pmap.pop(packed, None)
            pmap[name] = {"module": module, "param": "weight", "transposed": True,
                          "kind": entry.get("kind", "linear")}
        new_weights.append(name)
        modules.append(module)
    _sweep(proto, candidates)
    used = {t.name for t in proto.graph.initializer} | {o for n in proto.graph.node
                                                         for o in n.output} | \
        {i.name for i in proto.graph.input}
    for tmp in renames:
        base = renames[tmp]
        if base in used:
            continue
        for t in proto.graph.initializer:
            if t.name == tmp:
                t.name = base
        for n in proto.graph.node:
            n.input[:] = [base if i == tmp else i for i in n.input]
        if pmap is not None:
            pmap[base] = pmap.pop(tmp)
        new_weights[new_weights.index(tmp)] = base
    if pmap is not None:
        meta[PARAM_MAP_KEY].value = json.dumps(pmap, sort_keys=True)
    result = {"dequantized": modules, "requantized": [], "settings": None, "proto": proto}
    if bits is None or not new_weights:
        return result
    from pyedge.quantize import QUANT_META_KEY, quantize_model
    st = json.loads(meta[QUANT_META_KEY].value) if QUANT_META_KEY in meta else {}
    kw = _requant_settings(st, first, bits, group_size)
    proto2, rep = quantize_model(proto, include=("lm_head",), only=set(new_weights), **kw)
    result.update(requantized=[q.name for q in rep.layers], dequantized=[], settings=kw,
                  proto=proto2)
    return result


def _requant_settings(st: dict, node, bits, group_size) -> dict:
    """The base's settings with bits/group_size overridden."""
    scheme = st.get("scheme") or ("nf4" if node.op_type == "MatMulBnb4" and
                                  int(node.attrs.get("quant_type", 1)) == 1 else
                                  "fp4" if node.op_type == "MatMulBnb4" else "int")
    block = int(node.attrs.get("block_size", 64))
    base_gs = st.get("block_size", block if block != int(node.attrs["K"]) else 0)
    if scheme in ("nf4", "fp4") and bits != 4:
        scheme = "int"
    sym = st.get("symmetric")
    if sym is None and node.op_type == "MatMulNBits":
        sym = not (len(node.inputs) > 3 and node.inputs[3])
    gs = group_size if group_size is not None else (base_gs or None)
    if bits == 4 and not gs:
        gs = 64
    if gs and (gs < 16 or gs & (gs - 1)):
        gs = 64
    kw = {"bits": bits, "group_size": gs, "scheme": scheme}
    if scheme == "int" and (bits == 4 or gs):
        kw["symmetric"] = bool(sym)
    return kw


def _sweep(proto, candidates: set[str]) -> None:
    """Removes the DequantizeLinear/Transpose nodes and initializers among what the replaced
    nodes read (transitively) that nothing reads any more; the rest of the file stays."""
    g = proto.graph
    outputs = {o.name for o in g.output}
    while True:
        read = {i for n in g.node for i in n.input} | outputs
        dead = [k for k, n in enumerate(g.node) if n.op_type in ("DequantizeLinear", "Transpose")
                and set(n.output) & candidates and not any(o in read for o in n.output)]
        if not dead:
            break
        for k in reversed(dead):
            candidates.update(i for i in g.node[k].input if i)
            del g.node[k]
    read = {i for n in g.node for i in n.input} | outputs
    keep = [t for t in g.initializer if t.name in read or t.name not in candidates]
    if len(keep) != len(g.initializer):
        g.ClearField("initializer")
        g.initializer.extend(keep)
