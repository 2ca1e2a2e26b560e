"""Integer shape arithmetic for the fusion matchers: the value of a slice bound, a split
point or an axis that the exporters compute in the graph instead of writing a constant.

TorchScript traces `x.shape[-1] // 2` or `chunk(2, -1)` as Shape → Gather → Add/Div/Mul →
Cast/Unsqueeze; the dynamo exporter writes Cast/Reshape chains of constants. The core folds all
of these at plan time; a rewrite needs them earlier, in Python, and only when they do not
depend on a symbolic dimension (a dim the file leaves unknown makes the value unknown here,
never a guess).
"""
from __future__ import annotations

import numpy as np

from pyedge.row_pruning import constant_value


def _static_dims(m, value: str) -> list[int] | None:
    s = m.graph.value_shapes.get(value)
    if s is None:
        v = next((i for i in m.graph.inputs if i.name == value), None)
        s = v.shape if v is not None else None
    return [int(d) for d in s] if s is not None else None


def _idiv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX integer Div: truncation toward zero."""
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q).astype(np.result_type(a, b))


def int_value(m, name: str, depth: int = 0) -> np.ndarray | None:
    """The integer value (scalar or 1-D) of `name`, or None when it is not a constant of the
    kinds above. `m` is a fusions._Matcher."""
    if not name or depth > 16:
        return None
    v = constant_value(m.graph, m.producer, name)
    if v is not None:
        return v if v.dtype.kind in "iu" and v.ndim <= 1 else None
    n = m.producer.get(name)
    if n is None or n.domain not in ("", "ai.onnx"):
        return None
    t = n.op_type
    if t == "Shape":
        s = _static_dims(m, n.inputs[0])
        if s is None:
            return None
        r = len(s)
        start, end = int(n.attrs.get("start", 0)), n.attrs.get("end")
        dims = s[start:(r if end is None else int(end))]
        return np.asarray(dims, np.int64) if all(d >= 0 for d in dims) else None
    if t == "Gather" and int(n.attrs.get("axis", 0)) == 0:
        idx = int_value(m, n.inputs[1], depth + 1)
        src = m.producer.get(n.inputs[0])
        if idx is None:
            return None
        if src is not None and src.op_type == "Shape" and src.domain in ("", "ai.onnx"):
            # one known dim of a partly symbolic shape is enough
            s = _static_dims(m, src.inputs[0])
            if s is None:
                return None
            start, end = int(src.attrs.get("start", 0)), src.attrs.get("end")
            dims = np.asarray(s[start:(len(s) if end is None else int(end))], np.int64)
        else:
            dims = int_value(m, n.inputs[0], depth + 1)
        if dims is None or dims.ndim != 1 or np.any((idx < -len(dims)) | (idx >= len(dims))):
            return None
        out = dims[idx]
        return out if np.all(out >= 0) else None
    args = [int_value(m, i, depth + 1) if i else None for i in n.inputs]
    if t in ("Cast", "Identity"):
        if args[0] is None:
            return None
        to = int(n.attrs.get("to", 7))
        return args[0].astype(np.int64) if t == "Identity" or to in (6, 7) else None
    if t in ("Unsqueeze", "Squeeze", "Reshape"):
        if args[0] is None:
            return None
        if t == "Reshape":
            return args[0].reshape(-1) if args[1] is not None and len(args[1]) == 1 else None
        return args[0].reshape(-1) if args[0].size == 1 else None
    if t in ("Add", "Sub", "Mul", "Div") and len(args) == 2 and all(a is not None for a in args):
        a, b = args
        if t == "Div":
            return None if np.any(b == 0) else _idiv(a, b)
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[t](a, b)
    if t == "Concat" and args and all(a is not None and a.ndim == 1 for a in args):
        return np.concatenate(args)
    return None
