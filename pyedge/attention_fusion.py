"""Decoder attention fusion: the attention of Llama-family exports becomes one
pyedge.Attention. fusions.fuse runs it after the older rules (BERT/GPT-2 attention, whose
Q, K, V come straight from the head-split Transposes), on what they left. Same rules as
fusions.py: exact rewrites only (constants checked, every intermediate read by the chain
alone), the original graph untouched.

Spellings recognised (Q, K, V [B, H, L, D] after the rotary embedding; K, V with Hkv heads):

    SDPA (dynamo)   Q' = Q·√s, Kᵀ' = Reshape(Transpose(Reshape(Kx, [-1, Lk, D]), 0 2 1)) · √s
                    P = Softmax(Q'·Kᵀ' [+ mask]),  P = Where(IsNaN(P), 0, P),  O = P · Vx
    eager           P = Softmax(Q · Transpose(Kx, 0 1 3 2) · s [+ mask]) [→ Cast(float)]
                    [→ Identity (dropout off)],  O = P · Vx
    TorchScript     the same with Q and Kᵀ each multiplied by √s
with Kx = Reshape(Expand(Unsqueeze(K, 2), [B, Hkv, G, Lk, D]), [B, H, Lk, D]) (transformers'
repeat_kv, an Identity in between) when G = H / Hkv > 1, and O going on into the head-merge
Transpose [0, 2, 1, 3] (through a Reshape that keeps its shape, in SDPA). The eager softmax
may already be a pyedge.MaskedSoftmax and Q·Kᵀ a pyedge.MatMul(trans_b) when this runs.
The result reads K and V unexpanded (grouped-query heads); a mask that is the causal one
(0 on keys j <= i + Lk − L, below -1e37 after) becomes causal = 1 and no mask tensor;
another mask stays an input; O is written in [B, L, H, D] when the head-merge Transpose
follows. The IsNaN guard only changes rows whose softmax is NaN: with the exporters' finite
mask (-3.4e38) that takes a NaN or an infinity in Q or K, for which the fused op gives NaN.

Dynamic shapes: batch and sequence may be symbolic. Shapes are compared as products of a
count and named symbolic dims (the names the file gives, e.g. "batch", "seq"; equal names are
equal sizes, an unnamed dim equals nothing but itself), and the exporters' Reshape targets
(Shape → Slice / Gather / Squeeze → Concat) are evaluated over those (symbolic_shapes.py, which
also fills in the shapes TorchScript files do not give). A mask built from shapes alone is
evaluated at two assignments of the symbols to decide whether it is causal.
"""
from __future__ import annotations

import numpy as np

from pyedge import _core
from pyedge.fusions import _depends_on, _Matcher
from pyedge.graph import Graph, Node, ValueInfo, to_core
from pyedge.row_pruning import constant_value
from pyedge.symbolic_shapes import (Dim, _dims, _div, _ints, _mul, _op, _prod,
                                     _static)

def _value(m: _Matcher, name: str, depth: int = 0) -> np.ndarray | None:
    """A float constant computed in the graph (the attention scale): constant_value's chains,
    plus CastLike and Sqrt of a float32 constant."""
    v = constant_value(m.graph, m.producer, name)
    if v is not None or depth > 8:
        return v
    n = m.producer.get(name)
    if n is None or n.domain not in ("", "ai.onnx"):
        return None
    if n.op_type == "CastLike":  # the like-input is an activation, float32 where Attention fuses
        c = _value(m, n.inputs[0], depth + 1)
        return c.astype(np.float32) if c is not None and c.dtype.kind == "f" else None
    if n.op_type == "Sqrt":
        c = _value(m, n.inputs[0], depth + 1)
        return np.sqrt(c) if c is not None and c.dtype == np.float32 else None
    return None


def _perm(n: Node | None, perm: list[int]) -> bool:
    return n is not None and list(n.attrs.get("perm", [])) == perm


def _scale_of(m: _Matcher, value: str) -> tuple[str, float, Node | None]:
    """value = x · c (or x / c) with a scalar float32 constant c: (x, c, the node); else
    (value, 1, None)."""
    n = _op(m, value, "Mul", "Div")
    if n is not None and len(n.inputs) == 2:
        pairs = [tuple(n.inputs)] if n.op_type == "Div" else [tuple(n.inputs), tuple(n.inputs[::-1])]
        for x, c in pairs:
            v = _value(m, c)
            if v is not None and v.dtype == np.float32 and v.size == 1 and _value(m, x) is None:
                f = float(v.reshape(()))
                if n.op_type == "Div":
                    if f == 0.0:
                        continue
                    f = 1.0 / f
                return x, f, n
    return value, 1.0, None


def _reshape_to(m: _Matcher, value: str, want: list[Dim], src: list[Dim] | None = None
                ) -> tuple[str, Node] | None:
    """value = Reshape(x, target) whose result has shape `want` (a -1 in the target resolved
    against x's shape, or `src` when the file does not give it): (x, that node)."""
    n = _op(m, value, "Reshape")
    if n is None or len(n.inputs) != 2:
        return None
    tgt = _ints(m, n.inputs[1])
    src = src if src is not None else _dims(m, n.inputs[0])
    if tgt is None or src is None or len(tgt) != len(want) or (0, ()) in tgt:
        return None
    total = _prod(src)
    if tgt.count((-1, ())) > 1:
        return None
    if (-1, ()) in tgt:
        rest = _div(total, _prod(d for d in tgt if d != (-1, ())))
        if rest is None:
            return None
        tgt = [rest if d == (-1, ()) else d for d in tgt]
    return (n.inputs[0], n) if tgt == want and total == _prod(want) else None


def _whole_slice(m: _Matcher, value: str) -> Node | None:
    """The Slice making `value` when it copies its input whole (starts 0, ends past the end,
    steps 1), else None."""
    n = _op(m, value, "Slice")
    if n is None or len(n.inputs) < 3:
        return None
    c = [constant_value(m.graph, m.producer, i) if i else None for i in n.inputs[1:5]]
    if c[0] is None or c[1] is None or np.any(np.ravel(c[0]) != 0) \
            or np.any(np.ravel(c[1]) < 2**31 - 1):
        return None
    if len(c) > 3 and c[3] is not None and np.any(np.ravel(c[3]) != 1):
        return None
    return n


def _unrepeat_kv(m: _Matcher, value: str, dims: list[Dim], heads: int
                 ) -> tuple[str, list[Dim], list[Node]] | None:
    """For K or V as attention reads it (`dims` [B, heads, Lk, D]): the tensor before
    transformers' repeat_kv (Unsqueeze(2) → Expand → [Identity] → Reshape), its dims and the
    nodes, or the value itself (no nodes) when it is not repeated."""
    if len(dims) != 4 or dims[1] != (heads, ()):
        return None
    found = _reshape_to(m, value, dims)
    if found is None:
        return value, dims, []
    x, reshape = found
    nodes = [reshape]
    idn = _op(m, x, "Identity")
    if idn is not None:
        nodes.append(idn)
        x = idn.inputs[0]
    exp = _op(m, x, "Expand")
    if exp is None:
        return None
    x = exp.inputs[0]
    whole = _whole_slice(m, x)  # dynamic exports: k[:, :, None, :, :] as Unsqueeze → Slice
    if whole is not None:
        nodes.append(whole)
        x = whole.inputs[0]
    unsq = _op(m, x, "Unsqueeze")
    if unsq is None:
        return None
    axes = constant_value(m.graph, m.producer, unsq.inputs[1]) if len(unsq.inputs) > 1 \
        else unsq.attrs.get("axes")
    kv = unsq.inputs[0]
    ks = _dims(m, kv)
    tgt = _ints(m, exp.inputs[1])
    if axes is None or [int(a) for a in np.ravel(axes)] != [2] or ks is None or len(ks) != 4 \
            or tgt is None or _static(ks[1]) is None or heads % ks[1][0]:
        return None
    g = (heads // ks[1][0], ())
    if tgt != [ks[0], ks[1], g, ks[2], ks[3]] or [ks[0], dims[1], ks[2], ks[3]] != dims:
        return None
    return kv, ks, nodes + [exp, unsq]


def _keys_transposed(m: _Matcher, value: str) -> tuple[str, list[Node]] | None:
    """value = Kxᵀ [B, H, D, Lk] spelled Transpose(0 1 3 2) or Reshape → Transpose(0 2 1) →
    Reshape (the dynamo SDPA decomposition): (Kx, the nodes)."""
    t = _op(m, value, "Transpose")
    if _perm(t, [0, 1, 3, 2]):
        return t.inputs[0], [t]
    r2 = _op(m, value, "Reshape")
    t = _op(m, r2.inputs[0], "Transpose") if r2 is not None else None
    r1 = _op(m, t.inputs[0], "Reshape") if _perm(t, [0, 2, 1]) else None
    if r1 is None:
        return None
    kx = r1.inputs[0]
    ks = _dims(m, kx)
    if ks is None or len(ks) != 4:
        return None
    B, H, Lk, D = ks
    if _reshape_to(m, r1.outputs[0], [_mul(B, H), Lk, D]) is None:
        return None
    if _reshape_to(m, value, [B, H, D, Lk], src=[_mul(B, H), D, Lk]) is None:
        return None
    return kx, [r2, t, r1]


_GUARD = Node("IsNaNGuard", [], [], name="(marker: the chain had a NaN guard)")


def _finite_mask(m: _Matcher, mask: str) -> bool:
    """Whether `mask` is Where(cond, a, b) of finite scalar constants (the exporters' 0 and
    -3.4e38): then no softmax row is NaN unless Q or K is, and the NaN guard is a no-op."""
    w = _op(m, mask, "Where")
    if w is None or len(w.inputs) != 3:
        return False
    vals = [_value(m, i) for i in w.inputs[1:]]
    return all(v is not None and v.size == 1 and np.isfinite(v).all() for v in vals)


def _probabilities_to_pv(m: _Matcher, p: str, nodes: list[Node]) -> Node | None:
    """From the softmax's output P: the NaN guard (SDPA), a float Cast and Identity (eager:
    softmax in float32, dropout off) appended to `nodes`, then the MatMul P · Vx."""
    users = m.consumers.get(p, [])
    isnan = next((u for u in users if u.op_type == "IsNaN" and u.domain in ("", "ai.onnx")), None)
    if isnan is not None:
        guard = m.private(isnan.outputs[0])
        if guard is None or guard.op_type != "Where" or guard.inputs[2] != p \
                or guard.inputs[0] != isnan.outputs[0] or not m.is_const(guard.inputs[1], 0.0) \
                or len(users) != 2 or guard not in users:
            return None
        nodes += [isnan, guard]
        nodes.append(_GUARD)
        p = guard.outputs[0]
    user = m.private(p)
    while user is not None and user.domain in ("", "ai.onnx") and (
            user.op_type == "Identity" or (user.op_type == "Cast"
                                           and int(user.attrs.get("to", 0)) == 1)):
        nodes.append(user)
        p = user.outputs[0]
        user = m.private(p)
    if user is None or user.op_type != "MatMul" or len(user.inputs) != 2 or user.inputs[0] != p \
            or (user.domain == "pyedge" and (user.attrs.get("trans_a") or user.attrs.get("trans_b"))) \
            or user.domain not in ("", "ai.onnx", "pyedge"):
        return None
    nodes.append(user)
    return user


def _scores_site(m: _Matcher, sm: Node) -> dict | None:
    """The score side of a Softmax (or pyedge.MaskedSoftmax): Q, Kx, the mask, the scale."""
    nodes = [sm]
    if sm.domain == "pyedge":
        if sm.op_type != "MaskedSoftmax":
            return None
        scores, mask, scale = sm.inputs[0], (sm.inputs[1] if len(sm.inputs) > 1 and sm.inputs[1]
                                             else None), float(sm.attrs.get("scale", 1.0))
    else:
        if int(sm.attrs.get("axis", -1)) not in (-1, 3):
            return None
        scores, mask, scale = sm.inputs[0], None, 1.0
        cast = _op(m, scores, "Cast")
        if cast is not None and int(cast.attrs.get("to", 0)) == 1:
            nodes.append(cast)
            scores = cast.inputs[0]
        add = _op(m, scores, "Add")
        if add is not None and len(add.inputs) == 2:
            for sc, mk in (add.inputs, add.inputs[::-1]):
                if _qk_matmul(m, _scale_of(m, sc)[0]) is not None:
                    scores, mask = sc, mk
                    nodes.append(add)
                    break
            else:
                return None
        scores, scale, n_out = _scale_of(m, scores)
        nodes += [n_out] if n_out else []
    qk = _qk_matmul(m, scores)
    if qk is None:
        return None
    nodes.append(qk)
    q, s_q, n_q = _scale_of(m, qk.inputs[0])
    nodes += [n_q] if n_q else []
    if qk.domain == "pyedge":  # MatMul(Q, Kx, trans_b = 1) after fuse_transposed_matmul
        kx, s_k = qk.inputs[1], 1.0
    else:
        kt, s_k, n_k = _scale_of(m, qk.inputs[1])
        nodes += [n_k] if n_k else []
        found = _keys_transposed(m, kt)
        if found is None:
            return None
        kx, kt_nodes = found
        nodes += kt_nodes
    return dict(q=q, kx=kx, mask=mask, scale=scale * s_q * s_k, nodes=nodes)


def _qk_matmul(m: _Matcher, value: str) -> Node | None:
    n = m.producer.get(value)
    if n is None or n.op_type != "MatMul" or len(n.inputs) != 2:
        return None
    if n.domain in ("", "ai.onnx"):
        return n
    if n.domain == "pyedge" and n.attrs.get("trans_b") and not n.attrs.get("trans_a"):
        return n
    return None


def _site(m: _Matcher, sm: Node) -> dict | None:
    """For a Softmax inside one of the spellings above: what the Attention node needs."""
    found = _scores_site(m, sm)
    if found is None:
        return None
    q, kx, nodes = found["q"], found["kx"], found["nodes"]
    qs = _dims(m, q)
    if qs is None or len(qs) != 4 or _static(qs[1]) is None:
        return None
    B, H, L, D = qs
    kxs = _dims(m, kx)
    if kxs is None:  # the SDPA chain's Kx may have no shape in the file: K's decides
        return None
    k_site = _unrepeat_kv(m, kx, kxs, H[0])
    if k_site is None:
        return None
    k, ks, k_nodes = k_site
    nodes += k_nodes
    pv = _probabilities_to_pv(m, sm.outputs[0], nodes)
    if pv is None:
        return None
    vxs = _dims(m, pv.inputs[1])
    v_site = _unrepeat_kv(m, pv.inputs[1], vxs, H[0]) if vxs is not None else None
    if v_site is None:
        return None
    v, vs, v_nodes = v_site
    nodes += v_nodes
    if ks[0] != B or ks[3] != D or vs[:3] != ks[:3]:
        return None
    Lk = ks[2]
    # O, through a Reshape that keeps its shape, into the head-merge Transpose: O in blhd
    out, out_layout = pv.outputs[0], "bhld"
    # (Shape nodes reading O: TorchScript's Reshape target, checked by _private_but_shapes)
    users = [u for u in m.consumers.get(out, [])
             if not (u.op_type == "Shape" and u.domain in ("", "ai.onnx"))]
    nxt = users[0] if len(users) == 1 and out not in m.outputs else None
    os_ = [B, H, L, vs[3]]
    if nxt is not None and _op(m, nxt.outputs[0], "Reshape") is nxt \
            and _reshape_to(m, nxt.outputs[0], os_, src=os_) is not None:
        after = m.private(nxt.outputs[0])
        if _perm(after, [0, 2, 1, 3]) and _op(m, after.outputs[0], "Transpose") is after:
            nodes += [nxt, after]
            out, out_layout = after.outputs[0], "blhd"
    elif _perm(nxt, [0, 2, 1, 3]) and _op(m, nxt.outputs[0], "Transpose") is nxt:
        nodes.append(nxt)
        out, out_layout = nxt.outputs[0], "blhd"
    return dict(q=q, k=k, v=v, mask=found["mask"], scale=found["scale"], nodes=nodes, out=out,
                out_layout=out_layout, L=L, Lk=Lk)


# ----------------------------------------------------------------------- causal masks
_ONNX_TYPES = {"float32": 1, "int32": 6, "int64": 7, "bool": 9}
_SHAPE_ASSIGNMENTS = ((2, 3, 5, 7, 11, 13), (3, 7, 2, 5, 13, 11))


def _causal_mask(m: _Matcher, mask: str, L: Dim, Lk: Dim) -> bool | None:
    """For a mask computed from constants and shapes alone: whether it is the causal mask
    (0 where j <= i + Lk − L, below -1e37 elsewhere, every batch alike), evaluated with each
    Shape node of a value the file gives the shape of replaced by its value under two assignments of sizes to the symbolic dims
    (one when there are none). None when the mask reads a graph input's values (padding) or
    cannot be evaluated; False when it is some other constant."""
    inputs = {v.name for v in m.graph.inputs}
    input_dtypes = {v.name: v.dtype for v in m.graph.inputs}
    order = {id(n): k for k, n in enumerate(m.graph.nodes)}
    nodes, taken, seen, stack = [], set(), set(), [mask]
    shapes: list[Node] = []
    while stack:
        v = stack.pop()
        if v in seen or v in m.graph.initializers:
            continue
        seen.add(v)
        if v in inputs:
            return None
        n = m.producer.get(v)
        if n is None:
            return None
        if id(n) not in taken:
            taken.add(id(n))
            if n.op_type == "Shape" and n.domain in ("", "ai.onnx") \
                    and _dims(m, n.inputs[0]) is not None:
                shapes.append(n)  # its input's values do not matter, only its dims
                continue
            like = input_dtypes.get(n.inputs[1]) if n.op_type == "CastLike" \
                and n.domain in ("", "ai.onnx") and len(n.inputs) == 2 else None
            at = order[id(n)]
            if like in _ONNX_TYPES:  # ones_like(input_ids): reads the input's dtype alone
                n = Node("Cast", n.inputs[:1], n.outputs, n.name,
                         attrs={"to": _ONNX_TYPES[like]})
            nodes.append((at, n))
            stack.extend(i for i in n.inputs if i)
        if len(nodes) > 400:
            return None
    shape_dims = {}
    for n in shapes:
        d = _dims(m, n.inputs[0])
        if d is None:
            return None
        r = len(d)
        start, end = int(n.attrs.get("start", 0)), n.attrs.get("end")
        shape_dims[n.outputs[0]] = d[start:(r if end is None else int(end))]
    symbols = sorted({s for ds in list(shape_dims.values()) + [[L, Lk]] for d in ds for s in d[1]})
    if len(symbols) > len(_SHAPE_ASSIGNMENTS[0]) or any(s.startswith("?") for s in symbols):
        return None  # an unnamed dim: its size cannot be tied to the scores' L, Lk
    nodes = [n for _, n in sorted(nodes, key=lambda x: x[0])]
    assignments = list(_SHAPE_ASSIGNMENTS[:2 if symbols else 1])
    if symbols:  # sizes past every size-like constant (a sliding window's width)
        big = _largest_size_constant(m, nodes)
        if big + len(symbols) > _MAX_PROBE_SIZE:
            return None  # cannot tell it from a window that wide: the mask stays a tensor
        assignments.append(tuple(big + 1 + k for k in range(len(symbols))))
    for sizes in assignments:
        at = dict(zip(symbols, sizes))

        def size(d: Dim) -> int:
            return int(d[0] * np.prod([at[s] for s in d[1]], dtype=np.int64))
        inits = dict(m.graph.initializers)
        for name, ds in shape_dims.items():
            inits[name] = np.asarray([size(d) for d in ds], np.int64)
        sub = Graph(nodes=nodes, initializers=inits,
                    inputs=[], outputs=[ValueInfo(mask, "float32", [])], opsets=m.graph.opsets)
        try:
            (val,) = _core.Session(to_core(sub), [], "", {}, 0).run([], [mask])
        except Exception:  # noqa: BLE001 -- an op the core cannot fold: keep the mask tensor
            return None
        val = np.asarray(val)
        l, lk = size(L), size(Lk)
        if val.ndim < 2 or val.shape[-2:] != (l, lk) or val.dtype != np.float32:
            return False
        keep = np.tril(np.ones((l, lk), bool), k=lk - l)
        if not (np.all(val[..., keep] == 0.0) and np.all(val[..., ~keep] < -1e37)):
            return False
    return True


_MAX_PROBE_SIZE = 64  # a [b, 1, t, t] mask evaluated at sizes up to this: 64³ floats


def _largest_size_constant(m: _Matcher, nodes: list[Node]) -> int:
    """The largest |integer| constant the mask's nodes read, but the exporters' "to the end"
    sentinels (>= 2^31 - 1). A mask equal to the causal one at sizes up to a window's width
    w differs past it (Mistral's sliding window, 4096 by default): sizes above every such
    constant tell them apart."""
    big = 0
    for n in nodes:
        vals = [m.graph.initializers.get(i) for i in n.inputs if i]
        if n.op_type == "Constant":
            vals.append(n.attrs.get("value"))
        for v in vals:
            a = np.asarray(v) if v is not None else None
            if a is None or a.dtype.kind not in "iu" or a.size > 64:
                continue
            small = [abs(int(x)) for x in a.ravel() if abs(int(x)) < 2**31 - 1]
            big = max([big] + small)
    return big


# ------------------------------------------------------------------------------ rewrite
def _private_but_shapes(m: _Matcher, nodes: list[Node], result: str) -> bool:
    """Every value the chain makes, but `result`, is read by the chain alone, or by Shape
    nodes whose values only feed the exporter's shape arithmetic of the chain (they go with
    the Reshapes, see _drop_dead)."""
    ids = {id(n) for n in nodes}
    for n in nodes:
        for v in n.outputs:
            if v == result or not v:
                continue
            if v in m.outputs:
                return False
            for u in m.consumers.get(v, []):
                if id(u) not in ids and not (u.op_type == "Shape" and u.domain in ("", "ai.onnx")
                                             and not _feeds_outside(m, u, ids)):
                    return False
    return True


def _feeds_outside(m: _Matcher, node: Node, ids: set[int], depth: int = 0) -> bool:
    """Whether anything but the nodes `ids` reads what `node` computes (shape arithmetic)."""
    if depth > 8:
        return True
    for v in node.outputs:
        if v in m.outputs:
            return True
        for u in m.consumers.get(v, []):
            if id(u) not in ids and (u.op_type not in ("Slice", "Concat", "Gather", "Cast",
                                                       "Reshape", "Unsqueeze", "Squeeze")
                                     or _feeds_outside(m, u, ids, depth + 1)):
                return True
    return False


def _drop_dead(graph: Graph, removed: list[Node]) -> None:
    """After a rewrite removed `removed`: drops, repeatedly, the default-domain nodes nobody
    reads any more that computed an input of a removed node (the Reshape targets' shape
    arithmetic) or read an output of one (its Shape nodes)."""
    keep = {v.name for v in graph.outputs}
    cone = {i for n in removed for i in n.inputs if i}
    gone = {o for n in removed for o in n.outputs if o}
    while True:
        used = {i for n in graph.nodes for i in n.inputs} | keep
        drop = [n for n in graph.nodes if n.domain in ("", "ai.onnx")
                and not any(o in used for o in n.outputs)
                and (any(o in cone for o in n.outputs) or any(i in gone for i in n.inputs))]
        if not drop:
            return
        ids = {id(n) for n in drop}
        for n in drop:
            cone.update(i for i in n.inputs if i)
            gone.update(n.outputs)
        graph.nodes = [n for n in graph.nodes if id(n) not in ids]


def fuse_decoder_attention(graph: Graph, trainable: set[str] = frozenset()) -> int:
    """Replaces each attention spelled as above with one pyedge.Attention; returns how many."""
    if graph.opset("") < 13:
        return 0
    m = _Matcher(graph)
    remove: set[int] = set()
    replace: dict[int, Node] = {}
    causal_cache: dict[tuple, bool | None] = {}
    for sm in graph.nodes:
        if sm.op_type not in ("Softmax", "MaskedSoftmax"):
            continue
        site = _site(m, sm)
        if site is None:
            continue
        nodes, out = [n for n in site["nodes"] if n is not _GUARD], site["out"]
        guarded = len(nodes) < len(site["nodes"])
        if any(id(n) in remove or id(n) in replace for n in nodes) \
                or not _private_but_shapes(m, nodes, out):
            continue
        mask = site["mask"]
        if mask is not None and _depends_on(m, mask, set(trainable)):
            continue  # a trained mask: the op has no mask gradient
        attrs = {"scale": float(site["scale"]), "layout": "bhld",
                 "out_layout": site["out_layout"]}
        inputs = [site["q"], site["k"], site["v"]]
        if mask is not None:
            key = (mask, site["L"], site["Lk"])
            if key not in causal_cache:
                causal_cache[key] = _causal_mask(m, mask, site["L"], site["Lk"])
            if causal_cache[key]:
                attrs["causal"] = 1
            elif guarded and not _finite_mask(m, mask):
                continue  # -inf may mask a whole row: softmax NaN, the guard's 0, the op's NaN
            else:
                inputs.append(mask)
        last = m.producer[out]
        replace[id(last)] = Node("Attention", inputs, [out], name=f"{sm.name}_attention",
                                 domain="pyedge", attrs=attrs)
        remove.update(id(n) for n in nodes if n is not last)
    if not replace:
        return 0
    removed = [n for n in graph.nodes if id(n) in remove or id(n) in replace]
    graph.nodes = [replace.get(id(n), n) for n in graph.nodes if id(n) not in remove]
    _drop_dead(graph, removed)
    graph.opsets.setdefault("pyedge", 1)
    return len(replace)
