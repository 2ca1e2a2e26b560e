"""Compute only the rows the model's output reads.

A sequence classifier reads one position of the last layer: BERT's pooler takes
``hidden[:, 0]`` ([CLS]) with a ``Gather(hidden, 0, axis=1)``. Everything between the last
attention and that Gather works row by row (output projection, residual Adds, LayerNorms,
the feed-forward block), so for B·L positions it computes B·L rows of which B are read.
Moving the Gather up through row-wise ops, to where a value has other readers, makes those
ops run on [B, ...] instead of [B, L, ...]: for MiniLM at 16×128 the last layer's output
projection and feed-forward block (6 of its 7.2 GFLOP) shrink 128-fold, in the forward and
in the backward. The result is the same function: only rows nobody reads are dropped
(row-wise GEMMs may round a row differently when fewer rows are multiplied).

Moves made (x the Gather's data, read by nothing else and not a graph output):
    Gather(u(x))            -> u(Gather(x))              unary elementwise, Identity
    Gather(x ∘ y)           -> Gather(x) ∘ Gather(y)     Add/Sub/Mul/Div, numpy broadcasting
    Gather(LayerNorm(x))    -> LayerNorm(Gather(x))      gathered axis outside the normalised ones
    Gather(MatMul(x, W))    -> MatMul(Gather(x), W)      W 2-D, gathered axis a row/batch axis of x
    (and pyedge.LoraMatMul(x, W, A, B[, b]) without dropout, the same way; likewise the
    quantized MatMulNBits/MatMulBnb4(x, ...) and pyedge.LoraQuantMatMul without dropout)
Identical Gathers of one value are merged, so a value read twice on the way (the residual
stream feeding both the feed-forward block and the Add after it) moves on as one.

Ranks come from the file's value_info (or ONNX shape inference at import) and a small
propagation over the graph for values added since; where a rank is unknown nothing moves. Broadcast operands are gathered at index
0 only when the index is 0 (a size-1 axis broadcasts its row 0, a full axis gives row 0), so
other indices move only through operands that lack the axis.
"""
from __future__ import annotations

import numpy as np

from pyedge.adapters.base import op_rule
from pyedge.graph import Graph, Node

_UNARY = {"Identity", "Relu", "Tanh", "Sigmoid", "Erf", "Sqrt", "Neg", "Abs", "Exp", "Log",
          "Gelu", "LeakyRelu", "Elu", "Selu", "Softplus", "Softsign", "HardSigmoid",
          "HardSwish", "Reciprocal", "Sin", "Cos", "Cast", "Clip"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}
# reductions that keep their axes (keepdims=1): LayerNorm as older exporters spell it out
_QUANT_LINEAR = {"MatMulNBits", "MatMulBnb4"}  # x [..., K] times a packed constant [N, K]
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceSumSquare", "ReduceL2"}
_SAME_RANK = _UNARY | {"LayerNormalization", "Softmax", "LogSoftmax", "Transpose", "Dropout",
                       "Where", "Max", "Min"} | _BINARY


def value_ranks(graph: Graph) -> dict[str, int]:
    """Rank of every value the propagation can tell (graph inputs, initializers, and the
    outputs of common ops from their inputs); values it cannot tell are left out."""
    # (graph outputs are left out: an output declared without a shape reads as rank 0)
    ranks = {k: len(v) for k, v in graph.value_shapes.items()}
    ranks.update({v.name: len(v.shape) for v in graph.inputs})
    ranks.update({k: np.ndim(a) for k, a in graph.initializers.items()})
    for n in graph.nodes:
        r = [ranks.get(i) for i in n.inputs if i]
        out = None
        t = n.op_type
        rule = op_rule(n)  # an adapter op: the rank of its row input
        if rule is not None:
            out = ranks.get(n.inputs[rule.row_input])
        elif n.domain == "pyedge" and t in ("Gelu", "MaskedSoftmax") or \
                n.domain == "com.microsoft" and t in _QUANT_LINEAR:
            out = r[0]  # the shape of x
        elif n.domain == "pyedge" and t == "MatMul" and None not in r[:2]:
            out = max(r[:2])
        elif n.domain not in ("", "ai.onnx"):
            out = None
        elif t == "Expand" and r and r[0] is not None:
            shape = graph.initializers.get(n.inputs[1])
            out = max(r[0], int(np.size(shape))) if shape is not None else None
        elif t in _SAME_RANK and r and None not in r:
            out = max(r)
        elif t == "MatMul" and len(r) == 2 and None not in r:
            out = max(r) if min(r) >= 2 else max(r) - 1
        elif t == "Gemm":
            out = 2
        elif t == "Reshape":
            shape = graph.initializers.get(n.inputs[1])
            out = int(np.size(shape)) if shape is not None else None
        elif t == "Gather" and len(r) == 2 and None not in r:
            out = r[0] - 1 + r[1]
        elif t == "Unsqueeze" and r and r[0] is not None:
            axes = graph.initializers.get(n.inputs[1]) if len(n.inputs) > 1 else None
            axes = n.attrs.get("axes") if axes is None else axes
            out = r[0] + int(np.size(axes)) if axes is not None else None
        elif t == "Shape":
            out = 1
        elif t in _REDUCE and r and r[0] is not None and int(n.attrs.get("keepdims", 1)):
            out = r[0]
        elif t in ("Concat", "Slice") and r and r[0] is not None:
            out = r[0]
        if out is not None and n.outputs and n.outputs[0] not in ranks:
            ranks[n.outputs[0]] = out
    return ranks


def constant_value(graph: Graph, producer: dict[str, Node], name: str, depth: int = 0):
    """The value of `name` when it is an initializer, or Cast / Reshape / Identity /
    Unsqueeze / Squeeze of such values (how the dynamo exporter spells a Slice's bounds);
    None otherwise. The core folds all of these at plan time; this is for rewrites."""
    if name in graph.initializers:
        return np.asarray(graph.initializers[name])
    n = producer.get(name)
    if n is None or depth > 8 or n.domain not in ("", "ai.onnx") or n.op_type not in (
            "Cast", "Reshape", "Identity", "Unsqueeze", "Squeeze"):
        return None
    args = [constant_value(graph, producer, i, depth + 1) if i else None for i in n.inputs]
    x = args[0]
    if x is None:
        return None
    if n.op_type == "Cast":
        to = {1: np.float32, 6: np.int32, 7: np.int64, 11: np.float64}.get(int(n.attrs.get("to", 0)))
        return x.astype(to) if to else None
    if n.op_type == "Reshape":
        if len(args) < 2 or args[1] is None or 0 in args[1]:
            return None
        return x.reshape([int(d) for d in args[1]])
    if n.op_type == "Identity":
        return x
    axes = args[1] if len(args) > 1 else n.attrs.get("axes")
    if axes is None:
        return np.squeeze(x) if n.op_type == "Squeeze" else None
    f = np.squeeze if n.op_type == "Squeeze" else np.expand_dims
    return f(x, tuple(int(a) for a in np.ravel(axes)))


def _axes_without(axes: list[int], axis: int) -> np.ndarray:
    """Non-negative `axes` renumbered once `axis` has left the rank (those after it move
    down by one)."""
    return np.array([a - (a > axis) for a in axes], np.int64)


def _scalar_index(graph: Graph, name: str) -> int | None:
    a = graph.initializers.get(name)
    if a is None or np.ndim(a) != 0 or np.asarray(a).dtype.kind not in "iu":
        return None
    return int(a)


class _Pusher:
    def __init__(self, graph: Graph):
        self.g = graph
        self.ranks = value_ranks(graph)
        self.outputs = {v.name for v in graph.outputs}
        self.producer = graph.producer_map()

    def const(self, name: str):
        return constant_value(self.g, self.producer, name)

    def gather(self, data: str, index: str, axis: int, where: str) -> tuple[str, Node]:
        out = self.g.fresh_name(f"{data}_rows")
        self.ranks[out] = self.ranks[data] - 1
        return out, Node("Gather", [data, index], [out], name=self.g.fresh_name(where),
                         attrs={"axis": axis})

    def reduce_axes(self, p: Node, R: int) -> list[int] | None:
        """The axes a Reduce* node reduces (attribute, or a constant second input), made
        non-negative; None when they are not known here or reduce everything."""
        if "axes" in p.attrs:
            axes = p.attrs["axes"]
        elif len(p.inputs) > 1 and p.inputs[1]:
            axes = self.const(p.inputs[1])
        else:
            return None  # no axes: all of them
        return None if axes is None else [int(a) + R if int(a) < 0 else int(a)
                                          for a in np.ravel(axes)]

    def axes_input(self, p: Node, axes: list[int], axis: int) -> str:
        """A new int64 initializer holding `axes` renumbered for the rank without `axis`."""
        name = self.g.fresh_name(f"{p.name}_axes")
        self.g.initializers[name] = _axes_without(axes, axis)
        return name

    def move(self, g: Node, p: Node, axis: int, index: str, idx: int) -> list[Node] | None:
        """New nodes computing Gather(p(...)) as p(Gather(...)), or None if p does not allow
        it. The returned list ends with p rewired to write g's output."""
        t, R = p.op_type, self.ranks.get(p.outputs[0])
        plain = p.domain in ("", "ai.onnx")
        if R is None or (len(p.outputs) != 1 and not (
                t == "LayerNormalization" and not any(p.outputs[1:]))):
            return None
        new: list[Node] = []
        inputs = list(p.inputs)
        if plain and t in _UNARY:
            targets = [(0, axis)]
        elif plain and t in _BINARY and len(inputs) == 2:
            # numpy broadcasting aligns ranks on the right: operand i has the axis at
            # axis - (R - rank_i), or lacks it (a bias [D]) and is read as it is
            targets = []
            for i, name in enumerate(inputs):
                r = self.ranks.get(name)
                if r is None:
                    return None
                if axis - (R - r) >= 0:
                    targets.append((i, axis - (R - r)))
            # an operand may have the axis at size 1 (broadcast): only index 0 is exact then
            if idx != 0 and targets:
                return None
        elif plain and t in _REDUCE and int(p.attrs.get("keepdims", 1)) \
                and not int(p.attrs.get("noop_with_empty_axes", 0)):
            axes = self.reduce_axes(p, R)
            if axes is None or axis in axes:
                return None
            if "axes" in p.attrs:
                p.attrs = {**p.attrs, "axes": [int(a) for a in _axes_without(axes, axis)]}
            else:
                inputs[1] = self.axes_input(p, axes, axis)
            targets = [(0, axis)]
        elif plain and t == "Slice" and all(self.const(i) is not None for i in inputs[1:] if i):
            # x[:, 0] exported with dynamic shapes: Gather(Slice(h, 0:MAX on axis 0), 0, axis=1)
            starts = np.ravel(self.const(inputs[1]))
            axes = (np.ravel(self.const(inputs[3])) if len(inputs) > 3 and inputs[3]
                    else np.arange(len(starts)))
            axes = [int(a) + R if int(a) < 0 else int(a) for a in axes]
            if axis in axes:
                return None
            inputs += [""] * (4 - len(inputs))
            inputs[3] = self.axes_input(p, axes, axis)
            targets = [(0, axis)]
        elif plain and t == "LayerNormalization":
            norm = int(p.attrs.get("axis", -1))
            norm = norm + R if norm < 0 else norm
            if axis >= norm:
                return None
            targets = [(0, axis)]
        elif (plain and t == "MatMul") or (p.domain == "pyedge" and t == "MatMul"
                                           and not p.attrs.get("trans_a")):
            rx, rw = self.ranks.get(inputs[0]), self.ranks.get(inputs[1])
            if rx is None or rw != 2 or rx < 2 or axis > rx - 2 or rx != R:
                return None
            targets = [(0, axis)]
        elif op_rule(p) is not None:  # an adapter op: its method says which input has the rows
            rule = op_rule(p)
            rx = self.ranks.get(inputs[rule.row_input])
            if not rule.rows_movable(p) or rx is None or rx < 2 or axis > rx - 2 or rx != R:
                return None
            targets = [(rule.row_input, axis)]
        elif p.domain == "com.microsoft" and t in _QUANT_LINEAR:
            rx = self.ranks.get(inputs[0])  # the weight is 2-D by construction
            if rx is None or rx < 2 or axis > rx - 2 or rx != R:
                return None
            targets = [(0, axis)]
        else:
            return None
        for i, ax in targets:
            out, node = self.gather(inputs[i], index, ax, p.name + "_rows")
            new.append(node)
            inputs[i] = out
        p.inputs = inputs
        p.outputs = [g.outputs[0]]
        return new + [p]


def push_gathers_up(graph: Graph) -> int:
    """Applies the moves until none applies; returns how many ops now run on gathered rows."""
    moved = 0
    while True:
        _merge_identical_gathers(graph)
        pusher = _Pusher(graph)
        consumers = graph.consumer_map()
        done = False
        for g in graph.nodes:
            if g.op_type != "Gather" or g.domain not in ("", "ai.onnx") or len(g.inputs) != 2:
                continue
            idx = _scalar_index(graph, g.inputs[1])
            data = g.inputs[0]
            p = pusher.producer.get(data)
            R = pusher.ranks.get(data)
            if idx is None or p is None or R is None or data in pusher.outputs \
                    or len(consumers.get(data, [])) != 1:
                continue
            axis = int(g.attrs.get("axis", 0))
            axis = axis + R if axis < 0 else axis
            if not 0 <= axis < R or idx < 0:
                continue
            new = pusher.move(g, p, axis, g.inputs[1], idx)
            if new is None:
                continue
            # the Gather goes; p (rewired) and the new Gathers take p's place in the order
            at = graph.nodes.index(p)
            graph.nodes = [n for n in graph.nodes if n is not g and n is not p]
            graph.nodes[at:at] = new
            moved += 1
            done = True
            break
        if not done:
            return moved


def _merge_identical_gathers(graph: Graph) -> None:
    """Gathers of the same value, index value and axis become one (the first)."""
    outputs = {v.name for v in graph.outputs}
    seen: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for n in graph.nodes:
        n.inputs = [rename.get(i, i) for i in n.inputs]
        if n.op_type == "Gather" and n.domain in ("", "ai.onnx") and len(n.inputs) == 2:
            idx = _scalar_index(graph, n.inputs[1])
            if idx is not None:
                key = (n.inputs[0], idx, int(n.attrs.get("axis", 0)))
                if key in seen and n.outputs[0] not in outputs:
                    rename[n.outputs[0]] = seen[key]
                    continue
                seen.setdefault(key, n.outputs[0])
        keep.append(n)
    graph.nodes = keep
