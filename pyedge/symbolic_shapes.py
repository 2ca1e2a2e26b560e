"""Shapes with symbolic dims for graph rewrites (attention_fusion.py): each dim a product of
a count and named symbolic sizes (the file's names, e.g. "batch", "seq": equal names are equal
sizes), the small integer tensors exporters compute for Reshape and Expand targets evaluated
over them, and a pass that fills in the shapes a file does not give (TorchScript files carry
no value_info; ONNX shape inference loses sizes behind Shape-computed targets): Split's
outputs too, and Slices whose bounds are static sizes computed from shapes (TorchScript's
chunk of GPT-NeoX's fused q, k, v: (Shape(x)[-1] + 2) / 3 · k)."""
from __future__ import annotations

from collections import Counter

import numpy as np

from pyedge.fusions import _Matcher
from pyedge.graph import Node
from pyedge.row_pruning import constant_value

# A dimension: (count, sorted names of symbolic factors). 64 -> (64, ()), "seq" -> (1,
# ("seq",)), the -1 of a Reshape target -> (-1, ()). Products multiply counts and join names.
Dim = tuple


def _dim_of(size: int, name: str, unique: str) -> Dim:
    """One dim of a file's shape: static size, or its symbolic name (split at '*': the dynamo
    exporter writes products so), or `unique` when it has no name."""
    if size >= 0:
        return (int(size), ())
    if not name:
        return (1, (unique,))
    count, names = 1, []
    for f in name.replace(" ", "").split("*"):
        if f.lstrip("-").isdigit():
            count *= int(f)
        else:
            names.append(f)
    return (count, tuple(sorted(names)))


def _mul(a: Dim, b: Dim) -> Dim:
    return (a[0] * b[0], tuple(sorted(a[1] + b[1])))


def _prod(dims) -> Dim:
    out: Dim = (1, ())
    for d in dims:
        out = _mul(out, d)
    return out


def _div(a: Dim, b: Dim) -> Dim | None:
    """a / b when it is a whole Dim, else None."""
    if b[0] == 0 or a[0] % b[0]:
        return None
    rest = Counter(a[1])
    rest.subtract(Counter(b[1]))
    if any(v < 0 for v in rest.values()):
        return None
    return (a[0] // b[0], tuple(sorted(rest.elements())))


def _static(d: Dim) -> int | None:
    return d[0] if not d[1] else None


def _file_dims(m: _Matcher, value: str) -> list[Dim] | None:
    """The shape of `value` as the file gives it (value_info, inputs), symbolic dims by name;
    ONNX shape inference's made-up names (unk__N) count as unnamed."""
    g = m.graph
    s = g.value_shapes.get(value)
    if s is None:
        v = next((i for i in g.inputs if i.name == value), None)
        s = v.shape if v is not None else None
    if s is None:
        return None
    names = g.dim_names.get(value, [""] * len(s))
    if len(names) != len(s):
        names = [""] * len(s)
    return [_dim_of(int(d), "" if nm.startswith("unk__") else nm, f"?{value}:{k}")
            for k, (d, nm) in enumerate(zip(s, names))]


def _known(d: Dim) -> bool:
    return not any(f.startswith("?") for f in d[1])


def _dims(m: _Matcher, value: str) -> list[Dim] | None:
    """The shape of `value`: the file's, with the dims it does not know (TorchScript files
    carry no value_info, and ONNX shape inference loses the sizes behind Shape-computed
    Reshape targets) taken from _propagate's pass over the graph."""
    table = getattr(m, "_attn_dims", None)
    if table is None:
        table = m._attn_dims = _propagate(m)
    return table.get(value)


def _broadcast(shapes: list[list[Dim]]) -> list[Dim] | None:
    """Numpy broadcasting of Dims: per position the dims other than 1 must be one Dim; an
    unnamed dim yields to a known one (the graph runs, so they are equal)."""
    r = max(len(s) for s in shapes)
    out = []
    for k in range(r):
        ds = {s[k - r + len(s)] for s in shapes if k - r + len(s) >= 0} - {(1, ())}
        known = {d for d in ds if _known(d)}
        if len(known) > 1:
            return None
        out.append(next(iter(known)) if known else (next(iter(ds)) if len(ds) == 1 else
                                                    ((1, ()) if not ds else None)))
        if out[-1] is None:
            out[-1] = (1, (f"?bc{id(shapes)}:{k}",))
    return out


_SAME_SHAPE = {"Identity", "Cast", "CastLike", "Neg", "Sqrt", "Reciprocal", "Sigmoid", "Tanh",
               "Softmax", "Erf", "Exp", "Log", "Relu", "Gelu", "IsNaN", "Not", "Abs",
               "RMSNorm", "SwiGLU", "MaskedSoftmax", "Rotary", "LayerNormalization"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "And", "Or", "Equal", "Less",
                "Greater", "LessOrEqual", "GreaterOrEqual", "Max", "Min"}


def _propagate(m: _Matcher) -> dict[str, list[Dim]]:
    """Shapes of every value, in graph order: the file's where it knows every dim, else
    computed from the inputs' for the ops decoders are made of (Reshape with its target
    evaluated by _ints, Transpose, Unsqueeze, Expand, MatMul, Concat, Slice, Gather,
    elementwise broadcasting), merged dim by dim with the file's."""
    g = m.graph
    table: dict[str, list[Dim]] = {}
    for v in g.inputs:
        d = _file_dims(m, v.name)
        if d is not None:
            table[v.name] = d
    for name, arr in g.initializers.items():
        table[name] = [(int(x), ()) for x in np.shape(arr)]
    m._attn_dims = table
    for n in g.nodes:
        if not n.outputs or not n.outputs[0]:
            continue
        if n.op_type == "Split" and n.domain in ("", "ai.onnx"):
            try:  # several outputs (TorchScript's chunk of GPT-NeoX's fused q, k, v)
                parts = _split(m, n, table)
            except (IndexError, ValueError, TypeError, KeyError):
                parts = None
            for k, out in enumerate(n.outputs):
                _merge(m, table, out, parts[k] if parts and out else None)
            continue
        f = _file_dims(m, n.outputs[0])
        if f is not None and all(_known(d) for d in f):
            table[n.outputs[0]] = f
            continue
        try:
            got = _infer(m, n, table)
        except (IndexError, ValueError, TypeError, KeyError):
            got = None
        _merge(m, table, n.outputs[0], got)
    return table


def _merge(m: _Matcher, table: dict, out: str, got: list[Dim] | None) -> None:
    """table[out]: the file's shape where it knows every dim, else `got` with the dims it
    leaves unknown taken from the file's."""
    f = _file_dims(m, out)
    if f is not None and all(_known(d) for d in f):
        table[out] = f
        return
    if got is not None and f is not None and len(got) == len(f):
        got = [a if _known(a) or not _known(b) else b for a, b in zip(f, got)]
    elif got is None:
        got = f
    if got is not None:
        table[out] = got


def _split(m: _Matcher, n: Node, table: dict) -> list[list[Dim]] | None:
    """The output shapes of Split: sizes from its `split` input (or attribute, opset < 13),
    else equal parts of a static dim (opset 18's num_outputs: the last part may be smaller)."""
    x = table.get(n.inputs[0])
    if x is None:
        return None
    ax = int(n.attrs.get("axis", 0)) % len(x)
    sizes = constant_value(m.graph, m.producer, n.inputs[1]) \
        if len(n.inputs) > 1 and n.inputs[1] else n.attrs.get("split")
    k = len(n.outputs)
    if sizes is None:
        size = _static(x[ax])
        if size is None:
            return None
        part = -(-size // k)
        sizes = [min(part, size - part * i) for i in range(k)]
    sizes = [int(v) for v in np.ravel(sizes)]
    if len(sizes) != k:
        return None
    return [x[:ax] + [(v, ())] + x[ax + 1:] for v in sizes]


def _infer(m: _Matcher, n: Node, table: dict) -> list[Dim] | None:
    if n.domain not in ("", "ai.onnx", "pyedge"):
        return None
    ins = [table.get(i) if i else None for i in n.inputs]
    t = n.op_type
    if t in _SAME_SHAPE:
        return ins[0]
    if t in _ELEMENTWISE:
        return _broadcast([s for s in ins if s is not None]) if all(
            s is not None for s in ins) else None
    x = ins[0]
    if x is None:
        return None
    if t == "Transpose":
        perm = n.attrs.get("perm") or list(range(len(x)))[::-1]
        return [x[p] for p in perm]
    if t == "Reshape":
        tgt = _ints(m, n.inputs[1])
        if tgt is None or (0, ()) in tgt:
            return None
        if (-1, ()) in tgt:
            rest = _div(_prod(x), _prod(d for d in tgt if d != (-1, ())))
            if rest is None or tgt.count((-1, ())) > 1:
                return None
            tgt = [rest if d == (-1, ()) else d for d in tgt]
        return tgt
    if t == "Unsqueeze":
        axes = constant_value(m.graph, m.producer, n.inputs[1]) if len(n.inputs) > 1 \
            else n.attrs.get("axes")
        if axes is None:
            return None
        r = len(x) + np.size(axes)
        axes = sorted(int(a) % r for a in np.ravel(axes))
        out = list(x)
        for a in axes:
            out.insert(a, (1, ()))
        return out
    if t == "Expand":
        tgt = _ints(m, n.inputs[1])
        return _broadcast([x, tgt]) if tgt is not None else None
    if t == "MatMul" and len(ins) >= 2 and ins[1] is not None and len(x) >= 2:
        a, b = list(x), list(ins[1])
        if n.domain == "pyedge":
            if n.attrs.get("trans_a"):
                a[-2:] = a[-2:][::-1]
            if n.attrs.get("trans_b"):
                b[-2:] = b[-2:][::-1]
        if len(b) < 2:
            return None
        batch = _broadcast([a[:-2], b[:-2]]) if len(a) > 2 or len(b) > 2 else []
        return None if batch is None else batch + [a[-2], b[-1]]
    if t == "LoraMatMul" and len(ins) >= 4 and ins[3] is not None:  # lora_B [N, r]
        return list(x[:-1]) + [ins[3][0]]
    if t == "Concat":
        if any(s is None for s in ins):
            return None
        ax = int(n.attrs.get("axis", 0)) % len(x)
        out = list(x)
        out[ax] = _prod_sum([s[ax] for s in ins])
        return out
    if t == "Slice":
        c = [_slice_arg(m, i) if i else None for i in n.inputs[1:5]]
        if c[0] is None or c[1] is None:
            return None
        axes = np.ravel(c[2]) if len(c) > 2 and c[2] is not None else range(np.size(c[0]))
        steps = np.ravel(c[3]) if len(c) > 3 and c[3] is not None else [1] * np.size(c[0])
        out = list(x)
        for a, lo, hi, st in zip(axes, np.ravel(c[0]), np.ravel(c[1]), steps):
            a = int(a) % len(x)
            if lo == 0 and hi >= 2**31 - 1 and st == 1:
                continue
            size = _static(x[a])
            if size is None:
                return None
            out[a] = (len(range(size)[int(lo):int(min(hi, 2**62)):int(st)]), ())
        return out
    if t == "Gather" and len(ins) >= 2 and ins[1] is not None:
        ax = int(n.attrs.get("axis", 0)) % len(x)
        return x[:ax] + list(ins[1]) + x[ax + 1:]
    return None


def _slice_arg(m: _Matcher, name: str) -> np.ndarray | None:
    """A Slice bound, axis or step: a constant, or static integers computed from shapes
    (TorchScript's chunk: starts and ends from (Shape(x)[-1] + 2) / 3)."""
    v = constant_value(m.graph, m.producer, name)
    if v is not None:
        return v
    d = _ints(m, name)
    if d is None or any(_static(x) is None for x in d):
        return None
    return np.asarray([x[0] for x in d], np.int64)


def _prod_sum(ds: list[Dim]) -> Dim:
    """The sum of Concat's parts: static sums, or one symbolic part plus zero-sized ones."""
    if all(_static(d) is not None for d in ds):
        return (sum(d[0] for d in ds), ())
    rest = [d for d in ds if d != (0, ())]
    return rest[0] if len(rest) == 1 else (1, (f"?cat{id(ds)}",))


def _ints(m: _Matcher, name: str, depth: int = 0) -> list[Dim] | None:
    """A small 1-D (or scalar) integer tensor the exporter computes for a Reshape or Expand
    target, entry by entry as Dims: constants, Shape of a value with a known shape, and
    Slice / Gather / Concat / Squeeze / Unsqueeze / Reshape / Cast / Identity of those."""
    v = constant_value(m.graph, m.producer, name)
    if v is not None:
        return [(int(x), ()) for x in np.ravel(v)] if v.dtype.kind in "iu" and v.ndim <= 1 \
            else None
    n = m.producer.get(name)
    if n is None or n.domain not in ("", "ai.onnx") or depth > 12:
        return None
    t = n.op_type
    if t == "Shape":
        s = _dims(m, n.inputs[0])
        if s is None:
            return None
        r = len(s)
        start, end = int(n.attrs.get("start", 0)), n.attrs.get("end")
        return s[start:(r if end is None else int(end))]
    if t == "Where" and len(n.inputs) == 3:
        return _expand_keep(m, n, depth)
    args = [_ints(m, i, depth + 1) if i else None for i in n.inputs[:1]]
    x = args[0]
    if x is None:
        return None
    flat = t == "Reshape" and len(n.inputs) == 2 and (len(x) == 1 or [
        int(a) for a in np.ravel(constant_value(m.graph, m.producer, n.inputs[1]) or [0, 0])]
        in ([-1], [len(x)]))
    if t in ("Squeeze", "Unsqueeze", "Identity") or flat or (
            t == "Cast" and int(n.attrs.get("to", 0)) in (6, 7)):
        return x
    if t in ("Add", "Sub", "Div") and len(n.inputs) == 2:  # static sizes only
        y = _ints(m, n.inputs[1], depth + 1)
        if y is None or len(x) != len(y) or any(_static(d) is None for d in x + y):
            return None
        if t == "Div" and any(d[0] <= 0 for d in y) or any(d[0] < 0 for d in x):
            return None
        op = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b,
              "Div": lambda a, b: a // b}[t]  # nonnegative sizes: ONNX's truncation
        return [(op(a[0], b[0]), ()) for a, b in zip(x, y)]
    if t == "Mul" and len(n.inputs) == 2:  # TorchScript's heads · G for repeat_kv
        y = _ints(m, n.inputs[1], depth + 1)
        if y is None or (len(x) != len(y) and 1 not in (len(x), len(y))):
            return None
        r = max(len(x), len(y))
        return [_mul(x[k % len(x)], y[k % len(y)]) for k in range(r)]
    if t == "Concat":
        parts = [_ints(m, i, depth + 1) for i in n.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if t == "Gather" and int(n.attrs.get("axis", 0)) == 0:
        idx = constant_value(m.graph, m.producer, n.inputs[1])
        if idx is None or idx.ndim > 1:
            return None
        try:
            return [x[int(i)] for i in np.ravel(idx)]
        except IndexError:
            return None
    if t == "Slice" and len(n.inputs) >= 3:
        c = [constant_value(m.graph, m.producer, i) if i else None for i in n.inputs[1:5]]
        if c[0] is None or c[1] is None or (len(c) > 2 and c[2] is not None
                                            and [int(a) for a in np.ravel(c[2])] != [0]):
            return None
        step = int(np.ravel(c[3])[0]) if len(c) > 3 and c[3] is not None else 1
        lo, hi = (int(np.clip(np.ravel(a)[0], -2**62, 2**62)) for a in c[:2])
        return x[lo:hi:step]
    return None


def _expand_keep(m: _Matcher, n: Node, depth: int) -> list[Dim] | None:
    """TorchScript's Expand target Where(Equal(t, ConstantOfShape(Shape(t)) · -1), ones, t)
    (a -1 keeps the input's dim): t itself when none of t's entries can be -1 (sizes)."""
    cond, t = _op(m, n.inputs[0], "Equal"), n.inputs[2]
    x = _ints(m, t, depth + 1)
    if cond is None or x is None or (-1, ()) in x or t not in cond.inputs:
        return None
    other = cond.inputs[1] if cond.inputs[0] == t else cond.inputs[0]
    mul = _op(m, other, "Mul")
    if mul is None:
        return None
    for a, c in (mul.inputs, mul.inputs[::-1]):
        cos = _op(m, a, "ConstantOfShape")
        k = constant_value(m.graph, m.producer, c)
        if cos is None or k is None or np.size(k) != 1:
            continue
        fill = cos.attrs.get("value")
        fill = np.ravel(np.asarray(fill))[0] if fill is not None else 0
        if float(fill) * float(np.ravel(k)[0]) == -1.0:
            return x
    return None


def _op(m: _Matcher, value: str, *types: str) -> Node | None:
    n = m.producer.get(value)
    return n if n is not None and n.domain in ("", "ai.onnx") and n.op_type in types else None
