"""Fold PEFT-format adapters into an ONNX model: same graph, new weights.

    merge_adapters("model.onnx", "runs/x/adapters", "merged.onnx")

The adapter method of the folder (pyedge/adapters/base.py: method_for_peft, from peft_type
and flags such as use_dora) gives the deltas (its ``merge_deltas``); for LoRA (lora_peft.py):
for each adapted module the base initializer W becomes W + s·ΔW, in the layout the graph
consumes it: the graph computes ``x @ W_eff`` with ``W_eff = Wᵀ`` when the MatMul/Gemm
transposes it (Gemm transB=1 or a Transpose node: PyTorch's nn.Linear [out, in]) and ``W``
otherwise (transformers' Conv1D [in, out]); LoRA adds ``x @ (s·B·A)ᵀ``, so the initializer gets
``s·B·A`` or ``s·(B·A)ᵀ``. Conv weights (PEFT's ConvNd LoRA, B being 1×1) get
``s·einsum(B, A)``. The MatMul/Gemm sites are found with the same rewrite pyedge trains with
(`inject_lora`), so what is merged is exactly what was trained. Whole trained tensors
(PEFT's modules_to_save) are written back, transposed to the ONNX layout when the parameter
map says so. Nodes, their order, every other initializer and all metadata stay as they were
(byte-identical protobuf messages); the result runs in plain onnxruntime.
"""
from __future__ import annotations

import os
import warnings

import numpy as np


from pyedge.export.adapter_files import read_adapter_folder
from pyedge.export.peft import (AdapterError, module_scaling, q, to_onnx_layout,  # noqa: F401
                                torch_names_to_onnx)
# the LoRA family's merge delta lives with the method (pyedge/adapters/lora_peft.py)
from pyedge.adapters.lora_peft import lora_deltas  # noqa: F401,E402


def _save_atomic(proto, out_path, external: bool):
    """Writes `proto` atomically with every initializer's bytes 64-byte aligned, in the file
    or (external) in `out_path.data`: a device then memory-maps the weights in place instead
    of copying them (pyedge/onnx_wire.py). Nothing temporary is left behind on failure."""
    from pyedge import onnx_wire

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if external:  # keep big models' weights next to the file, like the input had them
        onnx_wire.save_external(proto, out_path)
    else:
        onnx_wire.save_aligned(proto, out_path)


def merge_adapters(model_path, adapters_dir, out_path, bits: int | None = None,
                   group_size: int | None = None) -> dict:
    """Writes `out_path`: `model_path` with the adapters in `adapters_dir` folded in.

    Returns {"lora": [initializers changed by LoRA], "whole": [initializers replaced by a
    different value],
    "skipped": [adapter tensors with no counterpart in the graph]}, and for adapted quantized
    layers (merge_quantized.py) "dequantized": [modules written float] or "requantized":
    [modules quantized again with `bits`/`group_size`].
    """
    import onnx
    from onnx import numpy_helper

    from pyedge.onnx_import import load_onnx

    model_path, out_path = os.fspath(model_path), os.fspath(out_path)
    # The whole folder is checked (files, values, config) before the model is even read, and
    # everything below raises before _save_atomic: a refused merge writes nothing.
    ad = read_adapter_folder(adapters_dir)
    config, lora, whole, shown = ad.config, ad.lora, ad.whole, ad.weights_path
    graph = load_onnx(model_path)
    from pyedge.adapters.base import method_for_peft
    method = method_for_peft(config, ad.config_path)
    try:
        deltas = method.merge_deltas(graph, config, ad) if (lora or ad.extra) else {}
    except AdapterError as e:
        raise AdapterError(f"{shown}: {e}") from None
    from pyedge.export.merge_quantized import fold_quantized, quantized_sites
    qsites = quantized_sites(graph)
    qdeltas = {k: deltas.pop(k) for k in list(deltas) if k in qsites}
    if bits is not None and not qdeltas:
        raise AdapterError("--bits re-quantizes merged quantized layers; this model has no "
                           "adapted quantized layer")

    new_values: dict[str, np.ndarray] = {}
    name_map = torch_names_to_onnx(graph.param_map, graph.initializers)
    skipped = []
    for tname, arr in whole.items():
        hit = name_map.get(tname)
        if hit is None:
            skipped.append(tname)
            continue
        init, entry = hit
        value = to_onnx_layout(np.asarray(arr), entry)
        if tuple(value.shape) != tuple(graph.initializers[init].shape):
            raise AdapterError(f"{shown}: tensor {q(ad.key_of(tname))} has shape "
                               f"{list(arr.shape)}, the model's tensor {q(init)} is "
                               f"{list(graph.initializers[init].shape)}")
        if graph.initializers[init].dtype.kind == "f" and value.dtype.kind != "f":
            raise AdapterError(f"{shown}: tensor {q(ad.key_of(tname))} is {value.dtype}, the "
                               f"model's tensor {q(init)} is {graph.initializers[init].dtype}")
        if not np.array_equal(value.astype(graph.initializers[init].dtype),
                              graph.initializers[init]):
            new_values[init] = value  # unchanged tensors (e.g. running statistics) stay as is
    float_skipped = [k for k in skipped if whole[k].dtype.kind == "f" and whole[k].ndim > 0]
    if float_skipped:
        warnings.warn(f"adapter tensors with no counterpart in {model_path} were ignored: "
                      f"{float_skipped[:8]}", stacklevel=2)

    header = onnx.load(model_path, load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in header.graph.initializer)
    proto = onnx.load(model_path) if external else header
    inits = {t.name: t for t in proto.graph.initializer}
    consts = {n.output[0]: n for n in proto.graph.node
              if n.op_type == "Constant" and len(n.output) == 1}
    changed = set(deltas) | set(new_values)
    for name in changed:
        if name in inits:
            orig = numpy_helper.to_array(inits[name], base_dir=os.path.dirname(
                os.path.abspath(model_path)))
        elif name in consts:
            orig = numpy_helper.to_array(next(a.t for a in consts[name].attribute
                                              if a.name == "value"))
        else:
            raise AdapterError(f"tensor '{name}' is neither an initializer nor a Constant")
        if name in new_values:
            value = new_values[name].astype(np.float64)
            if name in deltas:  # trained whole and LoRA'd: PEFT does not allow it either
                raise AdapterError(f"'{name}' is both trained whole and LoRA-adapted")
        else:
            value = orig.astype(np.float64) + deltas[name]
        with np.errstate(over="ignore", invalid="ignore"):
            value = value.astype(orig.dtype)
        if value.dtype.kind == "f" and not np.all(np.isfinite(value) | ~np.isfinite(orig)):
            # finite A, B and alpha can still overflow float32 in W + s*B*A
            raise AdapterError(f"{shown}: merging into {q(name)} gives non-finite weights "
                               "(the adapter values are too large for the model's dtype)")
        t = numpy_helper.from_array(value, name)
        if name in inits:
            inits[name].CopyFrom(t)
        else:
            for a in consts[name].attribute:
                if a.name == "value":
                    a.t.CopyFrom(t)
    quant = {}
    if qdeltas:
        quant = fold_quantized(proto, graph, qdeltas, bits, group_size)
        proto = quant.pop("proto")
    _save_atomic(proto, out_path, external)
    return {"lora": sorted(deltas) + sorted(qdeltas), "whole": sorted(new_values),
            "skipped": sorted(skipped), **quant}
