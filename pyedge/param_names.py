"""Which PyTorch parameter each ONNX initializer is.

pyedge's exporter stores the map in the file (metadata key `pyedge.param_map`, JSON). For files
exported by anyone else it is recovered, best first, from: the initializer's own name when it
looks like a PyTorch parameter path (`encoder.layer.0.attention.self.query.weight`), the
neighbouring bias (`MatMul(x, onnx::MatMul_12) -> Add(., <module>.bias)`), dynamo's
`pkg.torch.onnx.name_scopes` node metadata, or else the ONNX name itself.

Each entry: {"module": str, "param": "weight"|"bias"|..., "transposed": bool, "kind": str}
where `transposed` says the ONNX tensor is the transpose of the PyTorch parameter.
"""
from __future__ import annotations

import json
import re

PARAM_MAP_KEY = "pyedge.param_map"
_PARAM_RE = re.compile(r"^[\w.]+\.(weight|bias)$")


def _kind_of(op_type: str) -> str:
    return {"MatMul": "linear", "Gemm": "linear", "Conv": "conv", "Gather": "embedding"}.get(op_type, "other")


def recover_param_map(graph) -> dict[str, dict]:
    """The file's map or the recovered one, plus entries for quantized weights
    (pyedge/import_quantized.py) that it does not name."""
    from pyedge.import_quantized import quantized_param_entries
    result = _float_param_map(graph)
    result.update(quantized_param_entries(graph, result))
    return result


def _float_param_map(graph) -> dict[str, dict]:
    if PARAM_MAP_KEY in graph.metadata:
        try:
            return json.loads(graph.metadata[PARAM_MAP_KEY])
        except ValueError:
            pass  # fall back to recovery
    consumers = graph.consumer_map()
    result: dict[str, dict] = {}
    for name, arr in graph.initializers.items():
        if arr.dtype.kind != "f" or arr.ndim == 0:
            continue
        users = consumers.get(name, [])
        # Look through a Transpose on the weight (torch layout [out, in] fed to MatMul).
        through_transpose = False
        real_users = []
        for u in users:
            if u.op_type == "Transpose" and arr.ndim == 2:
                through_transpose = True
                real_users += consumers.get(u.outputs[0], [])
            else:
                real_users.append(u)
        kind = _kind_of(real_users[0].op_type) if real_users else "other"
        m = _PARAM_RE.match(name)
        if m:
            module = name[: -len(m.group(1)) - 1]
            result[name] = {"module": module, "param": m.group(1), "transposed": False,
                            "kind": kind}
            continue
        # Renamed weight: find the module from the bias added to the product.
        module = None
        for u in real_users:
            if u.op_type in ("MatMul", "Gemm"):
                if u.op_type == "Gemm" and len(u.inputs) > 2:
                    bm = _PARAM_RE.match(u.inputs[2])
                    if bm:
                        module = u.inputs[2][:-5]
                for c in (consumers.get(u.outputs[0], []) if u.outputs else []):
                    if c.op_type == "Add":
                        for b in c.inputs:
                            bm = _PARAM_RE.match(b)
                            if bm and bm.group(1) == "bias":
                                module = b[:-5]
                if module is None and u.name in graph.node_scopes:
                    module = _module_from_scope(graph.node_scopes[u.name])
        if module is not None:
            # A renamed MatMul weight with no Transpose is the pre-transposed torch weight.
            result[name] = {"module": module, "param": "weight",
                            "transposed": kind == "linear" and not through_transpose
                            and arr.ndim == 2, "kind": kind}
    return result


def _module_from_scope(scope: str) -> str | None:
    """dynamo name_scopes: '["", "encoder", "encoder.layer.0", ...]' -> deepest module path."""
    try:
        parts = json.loads(scope) if scope.startswith("[") else scope.split("/")
    except ValueError:
        parts = scope.split("/")
    parts = [p for p in parts if p]
    return parts[-1] if parts else None


def module_of(graph, init_name: str) -> str:
    entry = graph.param_map.get(init_name)
    return entry["module"] if entry else init_name
