"""Rewrites applied at import so the core sees plain tensor ops.

SplitToSequence + SequenceAt (the dynamo exporter's `torch.split`) become one Slice per
element taken; sequences never reach the core.

Constant chains in float64 or integers that end in a Cast to float32 (the TorchScript
exporter's SDPA scale, `Cast(Sqrt(Constant 0.25 float64))`) are evaluated here with numpy
and replaced by one float32 initializer: the core's kernels are float32 (and int64 for index
math) only, and folding a handful of scalars in Python is smaller than float64 kernels for
every elementwise op the core folds at plan time.
"""
from __future__ import annotations

import numpy as np

from pyedge.graph import Graph, Node


class ImportRewriteError(ValueError):
    pass


def rewrite_sequences(graph: Graph) -> None:
    consumers = graph.consumer_map()
    new_nodes: list[Node] = []
    replaced: dict[str, Node] = {}  # SequenceAt output -> replacement
    for node in graph.nodes:
        if node.op_type != "SplitToSequence":
            continue
        axis = int(node.attrs.get("axis", 0))
        keepdims = int(node.attrs.get("keepdims", 1))
        split = graph.initializers.get(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
        users = consumers.get(node.outputs[0], [])
        for u in users:
            if u.op_type != "SequenceAt" or u.inputs[1] not in graph.initializers:
                raise ImportRewriteError(
                    f"SplitToSequence node '{node.name}' feeds {u.op_type} node '{u.name}': only "
                    "constant SequenceAt positions are supported")
            k = int(np.asarray(graph.initializers[u.inputs[1]]).reshape(()))
            if k < 0:
                raise ImportRewriteError(f"SequenceAt node '{u.name}': negative position {k} "
                                         "is not supported")
            if split is None:
                start, end = k, k + 1
            elif np.asarray(split).ndim == 0:
                s = int(split)
                start, end = k * s, (k + 1) * s
            else:
                sizes = np.asarray(split).astype(np.int64)
                start, end = int(sizes[:k].sum()), int(sizes[:k + 1].sum())
            consts = {}
            for key, val in (("starts", start), ("ends", end), ("axes", axis)):
                cname = graph.fresh_name(f"{u.name}_{key}")
                graph.initializers[cname] = np.array([val], np.int64)
                consts[key] = cname
            out = u.outputs[0]
            squeeze = split is None and keepdims == 0
            sliced = graph.fresh_name(out) if squeeze else out
            rep = [Node("Slice", [node.inputs[0], consts["starts"], consts["ends"], consts["axes"]],
                        [sliced], name=f"{u.name}_slice")]
            if squeeze:
                rep.append(Node("Squeeze", [sliced, consts["axes"]], [out], name=f"{u.name}_squeeze"))
            replaced[u.name] = rep
    if not replaced:
        return
    for node in graph.nodes:
        if node.op_type == "SplitToSequence":
            continue
        if node.op_type == "SequenceAt" and node.name in replaced:
            new_nodes.extend(replaced[node.name])
            continue
        new_nodes.append(node)
    graph.nodes = new_nodes


# ------------------------------------------------- constant chains ending in Cast(to=float)
def _int_div(a, b):
    # ONNX integer Div truncates toward zero (C semantics); numpy's // floors
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q)


def _div(a, b):
    return _int_div(a, b) if np.issubdtype(a.dtype, np.integer) else a / b


# op -> numpy function of the input arrays; the result takes input 0's dtype (ONNX binary
# ops need equal input types; Pow's result has the base's type)
_UNARY = {"Sqrt": np.sqrt, "Neg": np.negative, "Reciprocal": np.reciprocal, "Exp": np.exp,
          "Log": np.log, "Abs": np.abs, "Floor": np.floor, "Ceil": np.ceil, "Sin": np.sin,
          "Cos": np.cos, "Tanh": np.tanh, "Identity": lambda a: a}
_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _div,
           "Pow": np.power, "Max": np.maximum, "Min": np.minimum}


def cast_like_core(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """numpy's astype, except float -> integer (out of range: undefined in ONNX, and numpy's
    result differs between x86 and aarch64) is what the core's Cast does on every arch:
    truncate toward zero, saturate to the target's range, NaN -> 0."""
    if a.dtype.kind != "f" or dtype.kind not in "iu":
        return a.astype(dtype)
    info = np.iinfo(dtype)
    t = np.trunc(a.astype(np.float64))
    hi, lo = t >= float(info.max), t <= float(info.min)  # float(int64 max) rounds up to 2^63
    out = np.where(hi | lo | np.isnan(t), 0, t).astype(dtype)
    out[hi], out[lo] = info.max, info.min
    return out


def _eval_const(node: Node, args: list[np.ndarray]) -> np.ndarray:
    """One node of a constant chain in numpy (ONNX semantics, input dtypes kept)."""
    from pyedge.onnx_import import ONNX_TO_NP
    if node.op_type == "Cast":
        to = int(node.attrs.get("to", 0))
        if to not in ONNX_TO_NP:
            raise ImportRewriteError(f"Cast node '{node.name}': target type {to} unsupported")
        return cast_like_core(np.asarray(args[0]), np.dtype(ONNX_TO_NP[to]))
    a = np.asarray(args[0])
    if node.op_type in _UNARY:
        with np.errstate(all="ignore"):  # NaN/inf follow IEEE as onnxruntime's do
            return np.asarray(_UNARY[node.op_type](a)).astype(a.dtype)
    with np.errstate(all="ignore"):
        out = _BINARY[node.op_type](a, np.asarray(args[1]))
    return np.asarray(out).astype(a.dtype)


def _foldable(node: Node) -> bool:
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return False
    if node.op_type in _UNARY or node.op_type == "Cast":
        return len(node.inputs) == 1
    return node.op_type in _BINARY and len(node.inputs) == 2


def fold_cast_chains(graph: Graph) -> int:
    """Replaces each Cast(to=float32) whose input is computed from initializers only by
    elementwise ops (_UNARY/_BINARY/Cast) in which some value is not float32 by one float32
    initializer, computed in numpy in the chain's own dtypes (float64 stays float64 until the
    Cast, as onnxruntime computes it). Nodes left without a reader, and initializers only they
    read, are dropped. Returns the number of Casts folded. All-float32 chains are left to
    the core, which folds them at plan time; so is a chain numpy refuses (an integer to a
    negative integer power), which then fails there with the node's name."""
    from onnx import TensorProto
    from pyedge.onnx_import import ONNX_TO_NP
    producers = graph.producer_map()
    graph_outputs = {v.name for v in graph.outputs}
    wide: dict[str, bool | None] = {}  # value -> some value of its chain is not float32;
    #                                    None: not computed from initializers only

    def chain_wide(name: str) -> bool | None:
        """Decided from the graph alone, before any arithmetic: in an elementwise chain a
        value is not float32 only if a leaf is not or a Cast makes it not."""
        if name in graph.initializers:
            return np.asarray(graph.initializers[name]).dtype != np.float32
        if name in wide:
            return wide[name]
        wide[name] = None  # guards against a (malformed) cycle
        node = producers.get(name)
        if node is None or not _foldable(node):
            return None
        parts = [chain_wide(i) for i in node.inputs]
        if any(p is None for p in parts):
            return None
        cast_wide = (node.op_type == "Cast"
                     and ONNX_TO_NP.get(int(node.attrs.get("to", 0))) != "float32")
        wide[name] = any(parts) or cast_wide
        return wide[name]

    values: dict[str, np.ndarray] = {}

    def const(name: str) -> np.ndarray:
        if name in graph.initializers:
            return np.asarray(graph.initializers[name])
        if name not in values:
            node = producers[name]
            values[name] = _eval_const(node, [const(i) for i in node.inputs])
        return values[name]

    folded: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        if (node.op_type != "Cast" or not _foldable(node) or node.outputs[0] in graph_outputs
                or int(node.attrs.get("to", 0)) != TensorProto.FLOAT
                or not chain_wide(node.inputs[0])):
            continue
        try:
            src = const(node.inputs[0])
        except (ValueError, TypeError, ArithmeticError, ImportRewriteError):
            continue
        folded[node.outputs[0]] = np.array(src, np.float32, order="C")  # keeps 0-d shapes
    if not folded:
        return 0
    graph.initializers.update(folded)
    _drop_dead(graph, candidates=set(folded) | set(values))
    return len(folded)


def _drop_dead(graph: Graph, candidates: set[str]) -> None:
    """Removes nodes producing only unread `candidates` (repeatedly: a chain dies from its
    end), and initializers among the chain's leaves that nothing reads any more."""
    outputs = {v.name for v in graph.outputs}
    producers = graph.producer_map()
    leaves = {i for name in candidates if name in producers
              for i in producers[name].inputs if i in graph.initializers}
    while True:
        read = {i for n in graph.nodes for i in n.inputs if i} | outputs
        dead = [n for n in graph.nodes
                if n.outputs and all(o in candidates and o not in read for o in n.outputs if o)]
        # a folded Cast is replaced by its initializer, read or not
        replaced = [n for n in graph.nodes if n.op_type == "Cast"
                    and n.outputs[0] in graph.initializers]
        gone = {id(n) for n in dead + replaced}
        if not gone:
            break
        graph.nodes = [n for n in graph.nodes if id(n) not in gone]
    read = {i for n in graph.nodes for i in n.inputs if i} | outputs
    for name in leaves - read:
        graph.initializers.pop(name, None)


# ----------------------------------------------- int8 / int16 (and uint8 inputs) as int64
# Ops whose integer result can leave the narrow range: it is wrapped back (two's complement,
# as onnxruntime's int8/int16 kernels give) after the op. The core computes in int64.
_WRAPPING = {"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Pow", "Sum", "ReduceSum", "ReduceProd",
             "CumSum", "Cast"}
# Ops whose output has the type of their data input(s) and stays in range (no wrap needed).
_SAME_TYPE = {"Max", "Min", "Clip", "Mod", "Where", "Identity", "Reshape", "Transpose",
              "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split", "Slice", "Gather",
              "GatherElements", "GatherND", "Expand", "Tile", "Pad", "ReduceMax", "ReduceMin",
              "Sign", "Relu", "Trilu", "ScatterND", "Dropout"}
_NARROW_TO = {"int8": 3, "int16": 5, "uint8": 2}  # onnx.TensorProto.INT8 / INT16 / UINT8
_BITS = {"int8": (8, True), "int16": (16, True), "uint8": (8, False)}
_COMPARE = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Cast", "CastLike"}


def _uint8_inputs_to_widen(graph: Graph) -> set[str]:
    """uint8 is a core dtype (quantized weights, masks) without arithmetic kernels: a uint8
    graph input is widened only when every reader is an op the int64 path covers."""
    names = {v.name for v in graph.inputs if v.dtype == "uint8"}
    if not names:
        return set()
    ok = _WRAPPING | _SAME_TYPE | _COMPARE
    for n in graph.nodes:
        for i in n.inputs:
            if i in names and (n.op_type not in ok or n.domain not in ("", "ai.onnx")):
                names.discard(i)
    return names


def widen_narrow_ints(graph: Graph, narrow_inits: dict[str, str]) -> int:
    """int8 / int16 values (and uint8 graph inputs whose readers all have an int64 path)
    become int64 for the core, with their narrow semantics kept:
    graph inputs are declared int64 (the session widens what it is fed), Cast(to=int8/16)
    casts to int64, and every op whose result can overflow the narrow type (_WRAPPING) gets
    its result wrapped back into range by Add(2^(b-1)) -> Mod(2^b) -> Sub(2^(b-1)). Graph
    outputs keep their declared narrow dtype (the session narrows its results). Initializers
    in `narrow_inits` (name -> dtype) are already int64 arrays with in-range values.
    Returns the number of wraps inserted."""
    from onnx import TensorProto
    narrow: dict[str, str] = dict(narrow_inits)
    wide_u8 = _uint8_inputs_to_widen(graph)
    for v in graph.inputs:
        if v.dtype in ("int8", "int16") or v.name in wide_u8:
            narrow[v.name] = v.dtype
            v.dtype = "int64"
    if not narrow and not any(n.op_type == "Cast" and int(n.attrs.get("to", 0)) in
                              (TensorProto.INT8, TensorProto.INT16) for n in graph.nodes):
        return 0
    out_nodes: list[Node] = []
    wraps = 0
    for node in graph.nodes:
        kind = None  # narrow dtype of this node's outputs
        if node.op_type == "Cast":
            to = int(node.attrs.get("to", 0))
            for name, code in _NARROW_TO.items():
                if to == code and name != "uint8":  # uint8 is a core dtype: Cast makes it
                    kind = name
                    node.attrs["to"] = TensorProto.INT64
        elif node.op_type in _WRAPPING or node.op_type in _SAME_TYPE:
            data = node.inputs[1:] if node.op_type == "Where" else node.inputs[:1]
            if node.op_type in ("Max", "Min", "Sum", "Concat", "Add", "Sub", "Mul", "Div",
                                "Pow", "Mod"):
                data = node.inputs
            kinds = {narrow[i] for i in data if i in narrow}
            kind = max(kinds, key=lambda k: _NARROW_TO[k]) if kinds else None
        out_nodes.append(node)
        if kind is None:
            continue
        wrap = node.op_type in _WRAPPING
        for k, out in enumerate(node.outputs):
            if not out or (node.op_type == "Dropout" and k > 0):  # the mask is bool
                continue
            narrow[out] = kind
            if not wrap:
                continue
            wide = graph.fresh_name(f"{out}_wide")
            node.outputs[k] = wide
            bits, signed = _BITS[kind]
            half, full = graph.fresh_name(f"{out}_half"), graph.fresh_name(f"{out}_mod")
            graph.initializers[half] = np.array(1 << (bits - 1) if signed else 0, np.int64)
            graph.initializers[full] = np.array(1 << bits, np.int64)
            a, m = graph.fresh_name(f"{out}_shifted"), graph.fresh_name(f"{out}_wrapped")
            out_nodes += [Node("Add", [wide, half], [a], name=f"{node.name}_wrap_add"),
                          Node("Mod", [a, full], [m], name=f"{node.name}_wrap_mod"),
                          Node("Sub", [m, half], [out], name=f"{node.name}_wrap_sub")]
            wraps += 1
    graph.nodes = out_nodes
    return wraps
