"""Fusions for Llama-family decoders (Llama, Qwen2, Mistral, Gemma) as the dynamo exporter
writes them; fusions.fuse runs them with the others. Same rules as fusions.py: exact rewrites
only (constants checked to float32 precision, every intermediate value read by the chain
alone), the original graph untouched.

    RMSNorm   Pow(x, 2) → ReduceMean(last axis) → Add(eps) → Sqrt → Reciprocal → Mul(x)
              [→ Mul(weight) or Mul(1 + weight)]          → pyedge.RMSNorm(x, w)
    gated MLP Sigmoid(g) → Mul(g) → Mul(up), or Gelu(g) → Mul(up)  → pyedge.SwiGLU(g, up)

Their attention is matched in attention_fusion.py.
"""
from __future__ import annotations

import numpy as np

from pyedge.fusions import _Matcher
from pyedge.graph import Graph, Node
from pyedge.row_pruning import constant_value


def _chain_is_private(m: _Matcher, nodes: list[Node], result: str) -> bool:
    """Every value the chain `nodes` makes, but `result`, is read by the chain alone."""
    ids = {id(n) for n in nodes}
    for n in nodes:
        for v in n.outputs:
            if v == result or not v:
                continue
            if v in m.outputs or any(id(u) not in ids for u in m.consumers.get(v, [])):
                return False
    return True


def _last_dim(m: _Matcher, value: str) -> int | None:
    """The static last dimension of `value` (from the file's shapes), or None."""
    s = m.graph.value_shapes.get(value)
    if s is None:
        v = next((i for i in m.graph.inputs if i.name == value), None)
        s = v.shape if v is not None else None
    return int(s[-1]) if s and int(s[-1]) >= 0 else None


def _default(n: Node | None) -> bool:
    return n is not None and n.domain in ("", "ai.onnx")


def _op(m: _Matcher, value: str, *types: str) -> Node | None:
    n = m.producer.get(value)
    return n if _default(n) and n.op_type in types else None


# ---------------------------------------------------------------------------------- RMSNorm
def _squared(m: _Matcher, value: str) -> tuple[str, Node] | None:
    """value = x² spelled Pow(x, 2) or Mul(x, x): (x, that node)."""
    n = _op(m, value, "Pow", "Mul")
    if n is None or len(n.inputs) != 2:
        return None
    if n.op_type == "Pow" and m.is_const(n.inputs[1], 2.0, rtol=0.0):
        return n.inputs[0], n
    if n.op_type == "Mul" and n.inputs[0] == n.inputs[1]:
        return n.inputs[0], n
    return None


def _mean_last_axis(m: _Matcher, value: str, rank_of_x: int | None) -> tuple[str, Node] | None:
    """value = ReduceMean(y, last axis, keepdims=1): (y, that node)."""
    n = _op(m, value, "ReduceMean")
    if n is None or not int(n.attrs.get("keepdims", 1)):
        return None
    if len(n.inputs) > 1 and n.inputs[1]:
        axes = constant_value(m.graph, m.producer, n.inputs[1])
    else:
        axes = n.attrs.get("axes")
    if axes is None or np.size(axes) != 1:
        return None
    a = int(np.ravel(axes)[0])
    if a != -1 and (rank_of_x is None or a != rank_of_x - 1):
        return None
    return n.inputs[0], n


def _rms_site(m: _Matcher, mul: Node) -> tuple[str, float, list[Node]] | None:
    """For the Mul(x, r) (or Div(x, sqrt)) ending a normalisation, with r = 1/sqrt(mean(x²) +
    eps): (x, eps, the nodes from the square to `mul`)."""
    if len(mul.inputs) != 2:
        return None
    cands = [(mul.inputs[0], mul.inputs[1])] if mul.op_type == "Div" else \
        [tuple(mul.inputs), tuple(mul.inputs[::-1])]
    for x, r in cands:
        if mul.op_type == "Div":
            sq, rec = _op(m, r, "Sqrt"), None
        else:
            rec = _op(m, r, "Reciprocal", "Div")
            if rec is None:
                continue
            if rec.op_type == "Div" and not m.is_const(rec.inputs[0], 1.0, rtol=0.0):
                continue
            sq = _op(m, rec.inputs[-1], "Sqrt")
        if sq is None:
            continue
        add = _op(m, sq.inputs[0], "Add")
        if add is None or len(add.inputs) != 2:
            continue
        for mean_v, eps_v in (add.inputs, add.inputs[::-1]):
            eps = m.scalar(eps_v)
            if eps is None or not eps >= 0.0:
                continue
            shape = m.graph.value_shapes.get(x)
            mean = _mean_last_axis(m, mean_v, len(shape) if shape else None)
            if mean is None:
                continue
            sqr = _squared(m, mean[0])
            if sqr is None or sqr[0] != x:
                continue
            nodes = [sqr[1], mean[1], add, sq] + ([rec] if rec else []) + [mul]
            return x, eps, nodes
    return None


def _rms_weight(m: _Matcher, y: str, D: int | None) -> tuple[str, bool, Node, list[Node]] | None:
    """The Mul(w, y) scaling the normalised y by an initializer [D], or by Add(w, 1) (Gemma):
    (w, add_one, the Mul, the nodes making 1 + w)."""
    mul = m.private(y)
    if mul is None or not _default(mul) or mul.op_type != "Mul":
        return None
    D = D or _last_dim(m, mul.outputs[0])
    if D is None:
        return None
    w = m.other_input(mul, y)
    if w is None:
        return None
    extra, add_one = [], False
    add = _op(m, w, "Add")
    if add is not None and m.private(w) is mul and len(add.inputs) == 2:
        for base, one in (add.inputs, add.inputs[::-1]):
            init = _float32_init(m, base)
            if init is not None and m.is_const(one, 1.0, rtol=0.0):
                w, extra, add_one = init[0], [add] + init[1], True
                break
    else:
        init = _float32_init(m, w)
        if init is not None and (not init[1] or m.private(w) is mul):
            w, extra = init
    a = m.graph.initializers.get(w)
    if a is None or np.asarray(a).dtype != np.float32 or np.size(a) != D \
            or np.shape(a)[-1:] != (D,) or np.ndim(a) > 1:
        return None
    return w, add_one, mul, extra


def _float32_init(m: _Matcher, value: str) -> tuple[str, list[Node]] | None:
    """A float32 initializer as read directly or through Cast(to float32) (TorchScript's
    `weight.float()`, Gemma): (its name, the Cast when there is one)."""
    nodes = []
    cast = _op(m, value, "Cast")
    if cast is not None and int(cast.attrs.get("to", 0)) == 1 and m.private(value) is not None:
        nodes, value = [cast], cast.inputs[0]
    # TorchScript aliases identical-valued parameters: Identity(the one it kept)
    while value not in m.graph.initializers:
        idn = _op(m, value, "Identity")
        if idn is None:
            return None
        value = idn.inputs[0]
    if np.asarray(m.graph.initializers[value]).dtype != np.float32:
        return None
    return value, nodes


def fuse_rmsnorm(graph: Graph) -> int:
    """Replaces the exported RMSNorm chains with one pyedge.RMSNorm each (weight Mul included
    when it is an initializer [D], or 1 + one: add_one)."""
    m = _Matcher(graph)
    remove: set[int] = set()
    replace: dict[int, Node] = {}
    for mul in graph.nodes:
        if not _default(mul) or mul.op_type not in ("Mul", "Div") or id(mul) in remove:
            continue
        site = _rms_site(m, mul)
        if site is None:
            continue
        x, eps, nodes = site
        # x's last dim, or (TorchScript leaves it symbolic after a Reshape) the normalised
        # value's: the same dim, as the chain is elementwise over it
        D = _last_dim(m, x) or _last_dim(m, mul.outputs[0])
        out, inputs, attrs = mul.outputs[0], [x], {"epsilon": float(eps)}
        wsite = _rms_weight(m, out, D)
        if wsite is not None:
            w, add_one, wmul, extra = wsite
            nodes = nodes + extra + [wmul]
            out, inputs = wmul.outputs[0], [x, w]
            if add_one:
                attrs["add_one"] = 1
        if not _chain_is_private(m, nodes, out) or any(id(n) in remove for n in nodes):
            continue
        last = m.producer[out]
        replace[id(last)] = Node("RMSNorm", inputs, [out], name=f"{last.name}_rmsnorm",
                                 domain="pyedge", attrs=attrs)
        remove.update(id(n) for n in nodes if n is not last)
    if not replace:
        return 0
    graph.nodes = [replace.get(id(n), n) for n in graph.nodes if id(n) not in remove]
    graph.opsets.setdefault("pyedge", 1)
    return len(replace)


# ------------------------------------------------------------------------------- gated MLP
def _same_shape(m: _Matcher, a: str, b: str) -> bool:
    """Whether a and b have the same shape: equal static shapes in the file, or (symbolic
    dims) two projections of the same input with equal output widths, or two equally wide
    last-axis pieces of one tensor (Phi-3's gate_up_proj chunked into gate and up)."""
    sa, sb = m.graph.value_shapes.get(a), m.graph.value_shapes.get(b)
    if sa is not None and sb is not None and list(sa) == list(sb):
        if all(int(d) >= 0 for d in sa):
            return True
        pa, pb = m.producer.get(a), m.producer.get(b)
        if (pa is not None and pb is not None and pa.op_type in ("MatMul", "LoraMatMul")
                and pb.op_type == pa.op_type and pa.inputs[0] == pb.inputs[0]):
            return True
    elif sa is not None and sb is not None:
        return False
    # pieces of one tensor share every leading dim: equal widths make equal shapes
    ka, kb = _last_axis_piece(m, a), _last_axis_piece(m, b)
    return ka is not None and kb is not None and ka[0] == kb[0] and ka[1] == kb[1]


def _last_axis_piece(m: _Matcher, value: str) -> tuple[str, int] | None:
    """(x, width) when `value` is a last-axis piece of x of a known width:
    SequenceAt(SplitToSequence(x, axis -1)) (the dynamo exporter's chunk), Split(x, axis -1)
    or Slice(x, start, end, [-1]) (TorchScript's chunk, bounds from x's static last dim)."""
    from pyedge.fusion_shapes import int_value
    n = m.producer.get(value)
    if not _default(n):
        return None
    vs = m.graph.value_shapes.get(value)
    rank = len(vs) if vs else None
    own = int(vs[-1]) if vs and int(vs[-1]) >= 0 else None

    def last(axis) -> bool:
        return axis == -1 or (rank is not None and axis == rank - 1)
    if n.op_type == "SequenceAt":
        seq = m.producer.get(n.inputs[0])
        if _default(seq) and seq.op_type == "SplitToSequence" \
                and last(int(seq.attrs.get("axis", 0))) and own is not None:
            return seq.inputs[0], own
        return None
    if n.op_type == "Split" and last(int(n.attrs.get("axis", 0))) and own is not None:
        return n.inputs[0], own
    if n.op_type != "Slice" or len(n.inputs) < 4 or not n.inputs[3]:
        return None
    src = n.inputs[0]
    ss = m.graph.value_shapes.get(src)
    bounds = [int_value(m, i) for i in n.inputs[1:4]]
    steps = int_value(m, n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] else np.array([1])
    if not ss or int(ss[-1]) < 0 or any(b is None or b.size != 1 for b in bounds) \
            or steps is None or [int(x) for x in np.ravel(steps)] != [1]:
        return None
    D = int(ss[-1])
    lo, hi, axis = (int(np.ravel(b)[0]) for b in bounds)
    if not (axis == -1 or axis == len(ss) - 1):
        return None
    lo, hi = (min(max(v + D if v < 0 else v, 0), D) for v in (lo, hi))
    return src, max(0, hi - lo)


_GELU_ACT = {"none": "gelu", "tanh": "gelu_tanh"}


def _activation(m: _Matcher, a: str) -> tuple[str, str, list[Node]] | None:
    """a = silu(g) (Mul(g, Sigmoid(g))) or a Gelu node's output: (g, act, the nodes)."""
    n = m.producer.get(a)
    if not _default(n):
        return None
    if n.op_type == "Gelu":
        act = _GELU_ACT.get(str(n.attrs.get("approximate", "none")))
        return (n.inputs[0], act, [n]) if act else None
    if n.op_type != "Mul" or len(n.inputs) != 2:
        return None
    for g, s in (n.inputs, n.inputs[::-1]):
        sig = _op(m, s, "Sigmoid")
        if sig is not None and sig.inputs[0] == g and g != s:
            return g, "silu", [sig, n]
    return None


def fuse_gated_mlp(graph: Graph) -> int:
    """act(gate) · up (SwiGLU: silu; GeGLU: a Gelu node, after fusions.fuse_gelu) becomes one
    pyedge.SwiGLU(gate, up, act)."""
    m = _Matcher(graph)
    remove: set[int] = set()
    replace: dict[int, Node] = {}
    for mul in graph.nodes:
        if not _default(mul) or mul.op_type != "Mul" or len(mul.inputs) != 2 \
                or id(mul) in remove or mul.inputs[0] == mul.inputs[1]:
            continue
        for a, up in (mul.inputs, mul.inputs[::-1]):
            found = _activation(m, a)
            if found is None:
                continue
            g, act, nodes = found
            nodes = nodes + [mul]
            # act(g) has g's shape (Sigmoid and Mul of g with it, Gelu): g and up decide
            if g == up or not _same_shape(m, g, up) \
                    or not _chain_is_private(m, nodes, mul.outputs[0]) \
                    or any(id(n) in remove for n in nodes):
                continue
            replace[id(mul)] = Node("SwiGLU", [g, up], list(mul.outputs), name=f"{mul.name}_glu",
                                    domain="pyedge", attrs={"act": act})
            remove.update(id(n) for n in nodes if n is not mul)
            break
    if not replace:
        return 0
    graph.nodes = [replace.get(id(n), n) for n in graph.nodes if id(n) not in remove]
    graph.opsets.setdefault("pyedge", 1)
    return len(replace)
