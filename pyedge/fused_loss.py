"""The LM head fused into its cross-entropy loss (pyedge.LinearCrossEntropy).

A language model's loss reads logits [B, T, V] made by one projection of the last hidden
state h [B, T, D]. For a 151,936-word vocabulary at 4 x 256 tokens those logits are 622 MB,
and their gradient as much again. Here the loss node reads h and the head's weight (and bias,
and LoRA A/B when the head is adapted) directly; the core op computes the logits chunk by
chunk of rows and recomputes each chunk in the backward, so B·T·V floats never exist.

The logits-producing node stays in the graph: the core plans only the nodes a plan's targets
need, so the training plan (target: the loss) never runs it, while ``TrainingSession.run``
(targets: the graph outputs) still returns the logits.

Runs after pyedge.fusions.fuse (which may have turned the head's MatMul(h, Transpose(W)) into
pyedge.MatMul(h, W, trans_b=1) and folded its bias Add in), so it recognises the head both as
exported and as rewritten:
    MatMul(h, W) | MatMul(h, Transpose(W)) | Gemm(h, W[, c]) | pyedge.MatMul(h, W[, b])
    | pyedge.LoraMatMul(h, W, A, B[, b]) (no dropout), each optionally followed by Add(·, b),
with W a 2-D float32 initializer (frozen, or trained: a trained head or tied embedding) and
b a [V] initializer; or
    com.microsoft.MatMulNBits(h, B, scales[, zero_points][, , bias]) (a 4/8-bit head, or the
    tied embedding table kept packed) | pyedge.LoraQuantMatMul on one (no dropout),
    likewise optionally followed by Add(·, b),
with B, scales and zero points constants: the fused op then reads the packed head (inputs 6
and 7: scales, zero points; attributes K, N, bits, block_size) and dequantizes it a panel
at a time, so neither the logits nor a float copy of the head exist.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pyedge.graph import Graph, Node


@dataclasses.dataclass
class _Head:
    h: str
    weight: str
    trans_w: int                # 1: W is [V, D]; 0: [D, V]
    bias: str = ""
    lora_a: str = ""
    lora_b: str = ""
    lora_scale: float = 1.0
    scales: str = ""            # a packed MatMulNBits head: W is its uint8 B
    zero_points: str = ""
    quant: dict = dataclasses.field(default_factory=dict)  # K, N, bits, block_size


def _is_onnx(node: Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _matrix(graph: Graph, name: str) -> np.ndarray | None:
    a = graph.initializers.get(name)
    return a if a is not None and a.ndim == 2 and a.dtype == np.float32 else None


def _vector(graph: Graph, name: str, n: int) -> bool:
    a = graph.initializers.get(name)
    return a is not None and a.dtype == np.float32 and a.shape == (n,)


def _through_transpose(graph: Graph, producers, name: str) -> tuple[str, bool] | None:
    """A 2-D weight initializer read as is or through Transpose(perm=[1, 0]): (name, transposed)."""
    if _matrix(graph, name) is not None:
        return name, False
    t = producers.get(name)
    if t is not None and t.op_type == "Transpose" and _is_onnx(t) \
            and list(t.attrs.get("perm", [1, 0])) == [1, 0] and _matrix(graph, t.inputs[0]) is not None:
        return t.inputs[0], True
    return None


def _head(graph: Graph, producers, node: Node) -> _Head | None:
    """The projection `node` computes, when it is one the fused op can take over."""
    ins = node.inputs
    if node.op_type == "MatMul" and _is_onnx(node) and len(ins) == 2:
        w = _through_transpose(graph, producers, ins[1])
        return _Head(ins[0], w[0], int(w[1])) if w else None
    if node.op_type == "Gemm" and _is_onnx(node) and len(ins) >= 2:
        if node.attrs.get("transA", 0) or float(node.attrs.get("alpha", 1.0)) != 1.0:
            return None
        w = _through_transpose(graph, producers, ins[1])
        if w is None:
            return None
        trans = int(bool(node.attrs.get("transB", 0)) != w[1])
        bias = ins[2] if len(ins) > 2 else ""
        if bias:
            n_out = graph.initializers[w[0]].shape[0 if trans else 1]
            if float(node.attrs.get("beta", 1.0)) != 1.0 or not _vector(graph, bias, n_out):
                return None
        return _Head(ins[0], w[0], trans, bias)
    if node.op_type == "MatMul" and node.domain == "pyedge" and len(ins) in (2, 3):
        if node.attrs.get("trans_a") or _matrix(graph, ins[1]) is None:
            return None
        return _Head(ins[0], ins[1], int(bool(node.attrs.get("trans_b", 0))),
                     ins[2] if len(ins) > 2 else "")
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        return _quant_head(graph, node, list(ins))
    if node.op_type == "LoraQuantMatMul" and node.domain == "pyedge" and \
            node.attrs.get("base") == "MatMulNBits" and len(ins) >= 5 and \
            float(node.attrs.get("dropout", 0.0)) == 0.0:
        # (x, A, B, packed, scales, zero points, bias): the MatMulNBits inputs with LoRA
        head = _quant_head(graph, node, [ins[0]] + list(ins[3:6]) + [""] + list(ins[6:7]))
        if head is None:
            return None
        return dataclasses.replace(head, lora_a=ins[1], lora_b=ins[2],
                                   lora_scale=float(node.attrs.get("scale", 1.0)))
    if node.op_type == "LoraMatMul" and node.domain == "pyedge" and len(ins) in (4, 5):
        if float(node.attrs.get("dropout", 0.0)) > 0 or _matrix(graph, ins[1]) is None:
            return None
        return _Head(ins[0], ins[1], int(bool(node.attrs.get("trans_w", 0))),
                     ins[4] if len(ins) > 4 else "", ins[2], ins[3],
                     float(node.attrs.get("scale", 1.0)))
    return None


def _quant_head(graph: Graph, node: Node, ins: list) -> _Head | None:
    """MatMulNBits(h, B, scales, zero_points?, g_idx (absent), bias?) on constants (`ins`
    in that order; `node` has the attributes)."""
    ins = list(ins) + [""] * 6
    a = node.attrs
    if ins[4] or any(k not in a for k in ("K", "N", "block_size")) or \
            int(a.get("bits", 4)) not in (4, 8):
        return None
    b = graph.initializers.get(ins[1])
    if b is None or b.dtype != np.uint8 or ins[2] not in graph.initializers or \
            (ins[3] and ins[3] not in graph.initializers):
        return None
    if ins[5] and not _vector(graph, ins[5], int(a["N"])):
        return None
    return _Head(ins[0], ins[1], 1, ins[5], scales=ins[2], zero_points=ins[3],
                 quant={"K": int(a["K"]), "N": int(a["N"]), "bits": int(a.get("bits", 4)),
                        "block_size": int(a["block_size"])})


def _find_head(graph: Graph, logits: str) -> _Head | None:
    producers = graph.producer_map()
    node = producers.get(logits)
    if node is None:
        return None
    head = _head(graph, producers, node)
    if head is not None or node.op_type != "Add" or not _is_onnx(node) or len(node.inputs) != 2:
        return head
    # Add(product, b): the head's bias added in a second op. The product may have other
    # readers (a graph output): its node stays, and training plans need none of them.
    for prod, bias in (node.inputs, node.inputs[::-1]):
        inner = producers.get(prod)
        if inner is None:
            continue
        head = _head(graph, producers, inner)
        if head is None or head.bias:
            continue
        w = graph.initializers[head.weight]
        if _vector(graph, bias, w.shape[0] if head.trans_w else w.shape[1]):
            return dataclasses.replace(head, bias=bias)
    return None


def fuse_linear_cross_entropy(graph: Graph, loss: str, chunk: int = 0) -> int:
    """Replaces the pyedge.CrossEntropyLoss node making `loss` by a pyedge.LinearCrossEntropy
    reading the head's input, when its logits come from a head it can take over. Returns
    the number of rewrites (0 or 1). chunk: rows per chunk (0: the op's default)."""
    for i, node in enumerate(graph.nodes):
        if node.op_type == "CrossEntropyLoss" and node.domain == "pyedge" and node.outputs == [loss]:
            break
    else:
        return 0
    head = _find_head(graph, node.inputs[0])
    if head is None:
        return 0
    attrs = {k: v for k, v in node.attrs.items() if k in ("ignore_index", "label_smoothing",
                                                          "shift", "reduction")}
    attrs["trans_w"] = head.trans_w
    if head.lora_a:
        attrs["lora_scale"] = head.lora_scale
    if chunk:
        attrs["chunk"] = int(chunk)
    attrs.update(head.quant)
    inputs = [head.h, head.weight, node.inputs[1], head.bias, head.lora_a, head.lora_b,
              head.scales, head.zero_points]
    while not inputs[-1]:
        inputs.pop()
    graph.nodes[i] = Node("LinearCrossEntropy", inputs, [loss],
                          name="pyedge_linear_cross_entropy", domain="pyedge", attrs=attrs)
    return 1
