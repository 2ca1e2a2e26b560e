"""Rotary position embeddings as the exporters write them become one pyedge.Rotary each
(csrc/ops/rotary.cpp); fusions.fuse runs this next to the decoder fusions. Same rules as
fusions.py: exact rewrites only (slice bounds and axes checked, every intermediate value read
by the chain alone), the original graph untouched.

transformers' apply_rotary_pos_emb (half-split convention: Llama, Qwen2/3, Mistral, Gemma 1-3,
Phi-3, SmolLM3, GPT-NeoX) on Q or K [B, H, T, D] after the head split, both exporters (dynamo
and TorchScript), static or symbolic B and T:

    x1 = Slice(x, 0, h, axis -1)        x2 = Slice(x, h, ≥ 2h, axis -1)
    y  = Add(Mul(x, cos), Mul(Concat(Neg(x2), x1, axis -1), sin))       (either operand order)
  partial rotary (GPT-NeoX rotary_pct, Phi-3 partial_rotary_factor): x = Slice(X, 0, rd) and
    Y  = Concat(y, Slice(X, rd, end), axis -1)
  → Rotary(X, cos, sin) writing y (or Y): the output keeps its value name, so the attention
    fusions that start from the rotated Q and K match whichever runs first.

cos and sin ([Bc, 1, T, rd], the exporters' Unsqueeze of the [Bc, T, rd] tables computed once
per model from the position ids) stay in the graph; the op reads the tables before that
Unsqueeze. rd = 2h must be cos's and sin's static last dimension (so D = rd for the inner x;
the op checks every shape again at plan time). A rotary whose tables depend on a trained
tensor is left as it is (the op gives cos and sin no gradient).
"""
from __future__ import annotations

import numpy as np

from pyedge.attention_fusion import _drop_dead, _value
from pyedge.decoder_fusions import _default, _op
from pyedge.fusion_shapes import int_value
from pyedge.fusions import _depends_on, _Matcher
from pyedge.graph import Graph, Node

_BIG = 2 ** 62  # slice ends at or past this mean "to the end" (INT64_MAX, INT32_MAX-ish too)


def _dims(m: _Matcher, value: str) -> list[int] | None:
    """The shape of `value` from the file (-1 for a symbolic dim), or None when unknown."""
    s = m.graph.value_shapes.get(value)
    if s is None:
        v = next((i for i in m.graph.inputs if i.name == value), None)
        s = v.shape if v is not None else None
    return [int(d) for d in s] if s is not None else None


def _ints(m: _Matcher, value: str) -> list[int] | None:
    """A small integer constant (a slice bound, an axis) as a list, or None."""
    v = int_value(m, value)
    return None if v is None else [int(a) for a in np.ravel(v)]


def _is_last_axis(axes: list[int] | None, rank: int | None) -> bool:
    """axes = [-1] or [rank - 1]."""
    return axes is not None and len(axes) == 1 and (
        axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _rank(m: _Matcher, *values: str) -> int | None:
    for v in values:
        d = _dims(m, v)
        if d is not None:
            return len(d)
    return None


HALF = "half"  # a slice bound equal to x.shape[-1] // 2 (TorchScript with symbolic shapes)


def _bound(m: _Matcher, value: str, x: str, rank: int | None) -> list | None:
    """A slice bound: a constant [k], or [HALF] when it computes x.shape[-1] // 2 from the
    Shape of x (Shape → Gather(last) → Div(2) → Cast/Unsqueeze, how TorchScript traces
    rotate_half's `x.shape[-1] // 2` with symbolic dims). None otherwise."""
    c = _ints(m, value)
    if c is not None:
        return c
    v, depth = value, 0
    while depth < 6:  # the Unsqueeze to [1] and the int64 Casts around the scalar
        n = _op(m, v, "Cast", "Unsqueeze", "Identity")
        if n is None:
            break
        if n.op_type == "Cast" and int(n.attrs.get("to", 0)) != 7:
            return None
        if n.op_type == "Unsqueeze":
            axes = _ints(m, n.inputs[1]) if len(n.inputs) > 1 else n.attrs.get("axes")
            if axes is None or list(axes) != [0]:
                return None
        v, depth = n.inputs[0], depth + 1
    div = _op(m, v, "Div")
    if div is None or _ints(m, div.inputs[1]) != [2]:
        return None
    g = _op(m, div.inputs[0], "Gather")
    if g is None or int(g.attrs.get("axis", 0)) != 0:
        return None
    shp = _op(m, g.inputs[0], "Shape")
    idx = _ints(m, g.inputs[1])
    if shp is None or shp.inputs[0] != x or shp.attrs.get("start") not in (None, 0) \
            or shp.attrs.get("end") is not None or idx is None or len(idx) != 1 \
            or not _is_last_axis(idx, rank):
        return None
    return [HALF]


def _last_slice(m: _Matcher, value: str, rank: int | None) -> tuple[str, object, int, Node] | None:
    """value = Slice(x, [start], [end], [last axis], [1]) with constant bounds (or HALF, see
    _bound): (x, start, end clamped to _BIG, that node)."""
    n = _op(m, value, "Slice")
    if n is None or len(n.inputs) < 3:
        return None
    r = rank or _rank(m, n.inputs[0], value)
    starts, ends = (_bound(m, b, n.inputs[0], r) for b in n.inputs[1:3])
    axes = _ints(m, n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3] else None
    steps = _ints(m, n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4] else [1]
    if starts is None or ends is None or len(starts) != 1 or len(ends) != 1 or steps != [1]:
        return None
    if axes is None:  # no axes input: the bounds apply to axis 0 onwards
        if r != 1:
            return None
    elif not _is_last_axis(axes, r):
        return None
    end = ends[0] if ends[0] == HALF else min(ends[0], _BIG)
    return n.inputs[0], starts[0], end, n


def _concat_last(m: _Matcher, value: str, rank: int | None) -> Node | None:
    n = _op(m, value, "Concat")
    if n is None or len(n.inputs) != 2:
        return None
    return n if _is_last_axis([int(n.attrs.get("axis", 0))], rank) else None


def _rotate_half(m: _Matcher, rot: str, x: str, rank: int | None) -> tuple[object, list[Node]] | None:
    """rot = Concat(Neg(x[..., h:]), x[..., :h]): (h, or HALF for x.shape[-1] // 2, the
    nodes)."""
    cat = _concat_last(m, rot, rank)
    if cat is None:
        return None
    neg = _op(m, cat.inputs[0], "Neg")
    if neg is None:
        return None
    hi = _last_slice(m, neg.inputs[0], rank)
    lo = _last_slice(m, cat.inputs[1], rank)
    if hi is None or lo is None or hi[0] != x or lo[0] != x or lo[1] != 0:
        return None
    h = lo[2]
    if h == HALF:  # x[..., D//2:] to the end: the halves of whatever D is
        return (h, [hi[3], neg, lo[3], cat]) if hi[1] == HALF and hi[2] == _BIG else None
    if h <= 0 or hi[1] != h or hi[2] == HALF or hi[2] < 2 * h:
        return None
    return h, [hi[3], neg, lo[3], cat]


def _table(m: _Matcher, value: str, rd: int) -> tuple[str, str, Node | None] | None:
    """cos or sin as the Mul reads it: (the table the op reads, layout, the Unsqueeze dropped
    when nobody else reads it). Accepted: Unsqueeze(t [Bc, T, rd], axis 1) → bhtd, or a 4-D
    value [Bc, 1, T, rd] (bhtd) / [Bc, T, 1, rd] (bthd) with a static last dim rd."""
    unsq = _op(m, value, "Unsqueeze")
    if unsq is not None:
        axes = _ints(m, unsq.inputs[1]) if len(unsq.inputs) > 1 else unsq.attrs.get("axes")
        src = _dims(m, unsq.inputs[0])
        if axes is not None and list(axes) in ([1], [-3]) and src is not None \
                and len(src) == 3 and src[-1] == rd:
            return unsq.inputs[0], "bhtd", unsq
    d = _dims(m, value)
    if d is None or len(d) != 4 or d[-1] != rd:
        return None
    if d[1] == 1:
        return value, "bhtd", None
    if d[2] == 1:
        return value, "bthd", None
    return None


def _rotary_site(m: _Matcher, add: Node) -> dict | None:
    """For an Add ending x·cos + rotate_half(x)·sin: what the Rotary node needs."""
    if len(add.inputs) != 2 or add.inputs[0] == add.inputs[1]:
        return None
    rank = _rank(m, add.outputs[0])
    for a, b in (add.inputs, add.inputs[::-1]):
        mc, ms = _op(m, a, "Mul"), _op(m, b, "Mul")
        if mc is None or ms is None or len(mc.inputs) != 2 or len(ms.inputs) != 2:
            continue
        for x, cos in (mc.inputs, mc.inputs[::-1]):
            for rot, sin in (ms.inputs, ms.inputs[::-1]):
                r = _rotate_half(m, rot, x, rank or _rank(m, x))
                if r is None:
                    continue
                h, nodes = r
                if h == HALF:  # x's last dim, which Mul(x, cos) makes cos's (or 1, refused)
                    d = _dims(m, cos)
                    if d is None or d[-1] <= 0 or d[-1] % 2:
                        continue
                    h = d[-1] // 2
                tc, ts = _table(m, cos, 2 * h), _table(m, sin, 2 * h)
                if tc is None or ts is None or tc[1] != ts[1]:
                    continue
                return dict(x=x, cos=tc[0], sin=ts[0], layout=tc[1], rd=2 * h,
                            nodes=nodes + [mc, ms, add], out=add.outputs[0],
                            unsqueezes=[u for u in (tc[2], ts[2]) if u is not None])
    return None


def _partial(m: _Matcher, site: dict) -> None:
    """Partial rotary: x = X[..., :rd] and the result concatenated with X[..., rd:] → the op
    reads X and writes the Concat's output (site updated in place)."""
    rd = site["rd"]
    rank = _rank(m, site["x"], site["out"])
    inner = _last_slice(m, site["x"], rank)
    if inner is None or inner[1] != 0 or inner[2] != rd:
        return  # x is not a slice of the first rd channels: a full rotary
    X = inner[0]
    cat = m.private(site["out"])
    if cat is None or _concat_last(m, cat.outputs[0], rank) is None or cat.inputs[0] != site["out"]:
        return
    rest = _last_slice(m, cat.inputs[1], rank)
    if rest is None or rest[0] != X or rest[1] != rd or rest[2] != _BIG:
        return
    site["x"] = X
    site["nodes"] = [inner[3]] + site["nodes"] + [rest[3], cat]
    site["out"] = cat.outputs[0]


_SHAPE_ARITH = {"Shape", "Gather", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Concat", "Slice",
                "Add", "Sub", "Mul", "Div"}


def _feeds_only(m: _Matcher, node: Node, ids: set[int], depth: int = 0) -> bool:
    """Whether what `node` (shape arithmetic) computes is read by the nodes `ids` alone."""
    if depth > 10:
        return False
    for v in node.outputs:
        if v in m.outputs:
            return False
        for u in m.consumers.get(v, []):
            if id(u) in ids:
                continue
            if not (_default(u) and u.op_type in _SHAPE_ARITH and _feeds_only(m, u, ids, depth + 1)):
                return False
    return True


def _private(m: _Matcher, nodes: list[Node], result: str) -> bool:
    """Every value the chain makes, but `result`, is read by the chain alone, or by a Shape
    whose arithmetic only bounds the chain's slices (TorchScript's `x.shape[-1] // 2`)."""
    ids = {id(n) for n in nodes}
    for n in nodes:
        for v in n.outputs:
            if v == result or not v:
                continue
            if v in m.outputs:
                return False
            for u in m.consumers.get(v, []):
                if id(u) not in ids and not (_default(u) and u.op_type == "Shape"
                                             and _feeds_only(m, u, ids)):
                    return False
    return True


def fuse_rotary(graph: Graph, trainable: set[str] = frozenset()) -> int:
    """Replaces the exporters' rotary embedding chains (above) with one pyedge.Rotary each."""
    m = _Matcher(graph)
    remove: set[int] = set()
    replace: dict[int, Node] = {}
    for add in graph.nodes:
        if add.op_type != "Add" or not _default(add) or id(add) in remove:
            continue
        site = _rotary_site(m, add)
        if site is None:
            continue
        _partial(m, site)
        nodes, out = site["nodes"], site["out"]
        if not _private(m, nodes, out) \
                or any(id(n) in remove or id(n) in replace for n in nodes):
            continue
        if _depends_on(m, site["cos"], set(trainable)) or _depends_on(m, site["sin"], set(trainable)):
            continue  # the op gives the tables no gradient
        if _value(m, site["x"]) is not None:
            continue  # a constant input: the core folds the chain instead
        last = m.producer[out]
        attrs = {"layout": site["layout"]} if site["layout"] != "bhtd" else {}
        replace[id(last)] = Node("Rotary", [site["x"], site["cos"], site["sin"]], [out],
                                 name=f"{last.name}_rotary", domain="pyedge", attrs=attrs)
        remove.update(id(n) for n in nodes if n is not last)
    if not replace:
        return 0
    removed = [n for n in graph.nodes if id(n) in remove or id(n) in replace]
    graph.nodes = [replace.get(id(n), n) for n in graph.nodes if id(n) not in remove]
    _drop_dead(graph, removed)  # the tables' Unsqueezes and the slice bounds' Cast chains
    graph.opsets.setdefault("pyedge", 1)
    return len(replace)
