"""Fusions applied to a training graph before the core plans it.

Exporters spell some functions out as chains of elementwise ops: GELU becomes five ops
(erf form) or eight (tanh form, with a Pow); attention's softmax(scale * scores + mask) three; MatMul(x, Transpose(W)) copies W
transposed (every step, or once into a folded copy as large as the weight). Each op of a chain reads and writes a whole
activation in the forward, again in the backward, and keeps its output alive for the
backward; one fused op does one pass each way. Only exact rewrites are made: the
constants must match the function's to float32 precision, and every intermediate value
must be used by the chain alone (so nothing else reads a value that disappears).

The original graph (``TrainingSession.base_graph``) is not changed: adapters are saved and
merged against it.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from pyedge.adapters.base import op_rule
from pyedge.graph import Graph, Node
from pyedge.row_pruning import push_gathers_up

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class _Matcher:
    """Read-only views of a graph for pattern matching: producers, consumers, constants."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.producer = graph.producer_map()
        self.consumers = graph.consumer_map()
        self.outputs = {v.name for v in graph.outputs}

    def scalar(self, name: str) -> float | None:
        v = self.graph.initializers.get(name)
        if v is None:
            return None
        a = np.asarray(v)
        if a.size != 1 or a.dtype.kind != "f":
            return None
        return float(a.reshape(()))

    def is_const(self, name: str, value: float, rtol: float = 1e-6) -> bool:
        v = self.scalar(name)
        return v is not None and math.isclose(v, value, rel_tol=rtol, abs_tol=0.0)

    def private(self, value: str) -> Node | None:
        """The single consumer of `value`, if it has exactly one and is not a graph output."""
        users = self.consumers.get(value, [])
        if len(users) != 1 or value in self.outputs:
            return None
        return users[0]

    def made_by(self, value: str, op_type: str) -> Node | None:
        n = self.producer.get(value)
        return n if n is not None and n.op_type == op_type and n.domain in ("", "ai.onnx") else None

    def other_input(self, node: Node, value: str) -> str | None:
        """For a two-input node that reads `value` once, its other input."""
        if len(node.inputs) != 2 or node.inputs.count(value) != 1:
            return None
        return node.inputs[1] if node.inputs[0] == value else node.inputs[0]


def _scaled_input(m: _Matcher, value: str, factor: float) -> tuple[str, Node] | None:
    """value = x * factor, spelled Mul(x, c), Mul(c, x) or Div(x, 1/c): (x, that node)."""
    found = _scalar_scale(m, value)
    if found is None or not math.isclose(found[1], factor, rel_tol=1e-6, abs_tol=0.0):
        return None
    return found[0], found[2]


def _gelu_inner(m: _Matcher, act: Node) -> tuple[str, str, list[Node]] | None:
    """For an Erf / Tanh node computing GELU's inner function of some x: (x, approximate,
    the nodes from x up to and including `act`)."""
    if act.op_type == "Erf":
        found = _scaled_input(m, act.inputs[0], 1.0 / _SQRT2)
        if found is None:
            return None
        x, scale = found
        return x, "none", [scale, act]
    if act.op_type == "Tanh":
        # tanh(sqrt(2/pi) * (x + 0.044715 * x^3))
        found = _scaled_input(m, act.inputs[0], _SQRT_2_OVER_PI)
        if found is None:
            return None
        inner, scale = found
        add = m.made_by(inner, "Add")
        if add is None or len(add.inputs) != 2:
            return None
        for x, cube_term in (add.inputs, add.inputs[::-1]):
            found = _scaled_input(m, cube_term, 0.044715)
            if found is None:
                continue
            cubed, coef = found
            pw = m.made_by(cubed, "Pow")
            if pw is not None and pw.inputs[0] == x and m.is_const(pw.inputs[1], 3.0):
                return x, "tanh", [pw, coef, add, scale, act]
            cube = _cube_by_muls(m, cubed, x)  # TorchScript: x · (x · x)
            if cube is not None:
                return x, "tanh", cube + [coef, add, scale, act]
        return None
    return None


def _cube_by_muls(m: _Matcher, value: str, x: str) -> list[Node] | None:
    """value = x³ spelled Mul(x, Mul(x, x)) in either operand order: the two Mul nodes."""
    outer = m.made_by(value, "Mul")
    if outer is None or len(outer.inputs) != 2 or x not in outer.inputs:
        return None
    sq = m.made_by(m.other_input(outer, x) or "", "Mul")
    if sq is None or list(sq.inputs) != [x, x]:
        return None
    return [sq, outer]


def _gelu_outer(m: _Matcher, x: str, one_plus: str) -> tuple[str, list[Node]] | None:
    """0.5 * x * one_plus in any association: (output value, the Mul nodes)."""
    first = m.private(one_plus)
    if first is None or first.op_type != "Mul":
        return None
    other = m.other_input(first, one_plus)
    if other is None:
        return None
    # Mul(one_plus, Mul(x, 0.5))
    half_x = _scaled_input(m, other, 0.5)
    if half_x is not None and half_x[0] == x and m.private(other) is first:
        return first.outputs[0], [half_x[1], first]
    # Mul(Mul(one_plus, 0.5), x) or Mul(Mul(one_plus, x), 0.5)
    if other != x and not m.is_const(other, 0.5):
        return None
    second = m.private(first.outputs[0])
    if second is None or second.op_type != "Mul":
        return None
    last = m.other_input(second, first.outputs[0])
    if (other == x and m.is_const(last or "", 0.5)) or (other != x and last == x):
        return second.outputs[0], [first, second]
    return None


def fuse_gelu(graph: Graph) -> int:
    """Replaces the exported GELU chains (erf and tanh forms) with one Gelu node each."""
    m = _Matcher(graph)
    remove: set[int] = set()
    replace: dict[int, Node] = {}  # id of the chain's last node -> the Gelu replacing it
    for act in graph.nodes:
        if act.op_type not in ("Erf", "Tanh") or id(act) in remove:
            continue
        inner = _gelu_inner(m, act)
        if inner is None:
            continue
        x, approximate, chain = inner
        plus = m.private(act.outputs[0])
        if plus is None or plus.op_type != "Add" \
                or not m.is_const(m.other_input(plus, act.outputs[0]) or "", 1.0):
            continue
        outer = _gelu_outer(m, x, plus.outputs[0])
        if outer is None:
            continue
        out, muls = outer
        nodes = chain + [plus] + muls
        # Every value the chain makes, but its result, must be read by the chain alone.
        made = {o for n in nodes for o in n.outputs} - {out}
        if any(v in m.outputs or any(id(u) not in {id(n) for n in nodes}
                                     for u in m.consumers.get(v, [])) for v in made):
            continue
        last = m.producer[out]
        attrs = {"approximate": approximate} if approximate != "none" else {}
        replace[id(last)] = Node("Gelu", [x], [out], name=f"{last.name}_gelu", attrs=attrs)
        remove.update(id(n) for n in nodes if n is not last)
    if not replace:
        return 0
    graph.nodes = [replace.get(id(n), n) for n in graph.nodes if id(n) not in remove]
    return len(replace)


def _depends_on(m: _Matcher, value: str, names: set[str]) -> bool:
    """Whether `value` is computed from any of `names` (initializers or inputs)."""
    seen, stack = set(), [value]
    while stack:
        v = stack.pop()
        if v in names:
            return True
        if v in seen:
            continue
        seen.add(v)
        n = m.producer.get(v)
        if n is not None:
            stack.extend(i for i in n.inputs if i)
    return False


def fuse_masked_softmax(graph: Graph, trainable: set[str] = frozenset()) -> int:
    """Softmax(scale * x + mask) over the last axis, as attention computes its weights
    (Mul or Div by a constant, Add of the mask, Softmax), becomes one pyedge.MaskedSoftmax.
    Also Softmax(scale * x) without a mask."""
    if graph.opset("") < 13:  # older Softmax flattens to 2-D around `axis`
        return 0
    m = _Matcher(graph)
    remove: set[int] = set()
    replace: dict[int, Node] = {}
    for sm in graph.nodes:
        if sm.op_type != "Softmax" or sm.domain not in ("", "ai.onnx") \
                or int(sm.attrs.get("axis", -1)) != -1:
            continue
        pre = m.producer.get(sm.inputs[0])
        mask = None
        nodes = []
        if pre is not None and pre.op_type == "Add" and m.private(pre.outputs[0]) is sm:
            for scores, other in (pre.inputs, pre.inputs[::-1]):
                sc = _scalar_scale(m, scores)
                if sc is not None and m.private(scores) is pre:
                    mask, nodes, (x, scale, scale_node) = other, [pre], sc
                    break
            else:
                continue
            # Masks come from the inputs; one computed from a trained tensor is left as it is
            # (the core op has a mask gradient, but the plain graph is the reference there).
            if _depends_on(m, mask, trainable):
                continue
        else:
            sc = _scalar_scale(m, sm.inputs[0])
            if sc is None or m.private(sm.inputs[0]) is not sm:
                continue
            x, scale, scale_node = sc
        nodes.append(scale_node)
        if any(id(n) in remove for n in nodes):
            continue
        inputs = [x] + ([mask] if mask else [])
        replace[id(sm)] = Node("MaskedSoftmax", inputs, list(sm.outputs), name=f"{sm.name}_fused",
                               domain="pyedge", attrs={"scale": float(scale)})
        remove.update(id(n) for n in nodes)
    if not replace:
        return 0
    graph.nodes = [replace.get(id(n), n) for n in graph.nodes if id(n) not in remove]
    return len(replace)


def _scalar_scale(m: _Matcher, value: str) -> tuple[str, float, Node] | None:
    """value = x * c or x / c with a scalar constant c: (x, the factor, the node)."""
    n = m.producer.get(value)
    if n is None or n.domain not in ("", "ai.onnx") or len(n.inputs) != 2:
        return None
    a, b = n.inputs
    if n.op_type == "Mul":
        for x, c in ((a, b), (b, a)):
            v = m.scalar(c)
            if v is not None and m.scalar(x) is None:
                return x, v, n
    if n.op_type == "Div":
        v = m.scalar(b)
        if v is not None and v != 0.0:
            return a, 1.0 / v, n
    return None



def _swaps_last_two(node: Node) -> bool:
    perm = node.attrs.get("perm")
    if not isinstance(perm, list) or len(perm) < 2:  # a malformed file may give a float
        return False
    r = len(perm)
    return list(perm) == list(range(r - 2)) + [r - 1, r - 2]


def fuse_transposed_matmul(graph: Graph) -> int:
    """MatMul(A, Transpose(B)) with the Transpose swapping the last two dims (a Linear's
    weight, attention's K) becomes pyedge.MatMul(A, B, trans_b=1); the same for A. The
    Transpose goes away once nothing else reads it, and with it the transposed copy (for a
    frozen weight, a folded copy as large as the weight)."""
    m = _Matcher(graph)
    count = 0
    for node in graph.nodes:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        attrs = {}
        inputs = list(node.inputs)
        for k, flag in ((0, "trans_a"), (1, "trans_b")):
            t = m.made_by(inputs[k], "Transpose")
            if t is not None and _swaps_last_two(t) and inputs[0] != inputs[1]:
                inputs[k] = t.inputs[0]
                attrs[flag] = 1
        if not attrs:
            continue
        node.op_type, node.domain, node.inputs = "MatMul", "pyedge", inputs
        node.attrs = {**node.attrs, **attrs}
        count += 1
    if count:
        # Transposes nobody reads any more (their MatMuls now read the source).
        used = {i for n in graph.nodes for i in n.inputs} | m.outputs
        graph.nodes = [n for n in graph.nodes
                       if not (n.op_type == "Transpose" and n.outputs[0] not in used)]
    return count


def fuse_matmul_bias(graph: Graph, trainable: set[str] = frozenset()) -> int:
    """MatMul(x, W) + b, a Linear's bias added in a second op, becomes pyedge.MatMul(x, W, b)
    (and a LoRA-adapted pyedge.LoraMatMul(x, W, A, B) + b the same op with its bias input;
    a quantized MatMulNBits or LoraQuantMatMul on one takes b as its bias input)
    when W and b are initializers, b is [N] (W's output columns) and not trained, and nothing
    else reads the product: the GEMM adds onto rows pre-filled with b instead of a separate
    pass over the output."""
    m = _Matcher(graph)
    count = 0
    remove: set[int] = set()
    for mm in graph.nodes:
        is_mm = mm.op_type == "MatMul" and len(mm.inputs) == 2 and (
            mm.domain in ("", "ai.onnx") or (mm.domain == "pyedge" and not mm.attrs.get("trans_a")))
        # an adapter op with an optional bias input (LoraMatMul(x, W, A, B[, b])), by its
        # method's rule (pyedge/adapters/base.py)
        rule = op_rule(mm)
        is_lora = rule is not None and rule.bias_input is not None and \
            len(mm.inputs) == rule.bias_input
        bias_at = _quant_bias_slot(mm)
        if bias_at is not None:
            n_out = int(mm.attrs["N"])
            add = m.private(mm.outputs[0])
            bias = m.other_input(add, mm.outputs[0]) if add is not None and \
                add.op_type == "Add" and add.domain in ("", "ai.onnx") else None
            b = graph.initializers.get(bias) if bias else None
            if b is None or np.shape(b) != (n_out,) or np.asarray(b).dtype != np.float32 \
                    or bias in trainable:
                continue
            mm.inputs = (mm.inputs + [""] * bias_at)[:bias_at] + [bias]
            mm.outputs = list(add.outputs)
            remove.add(id(add))
            count += 1
            continue
        w = graph.initializers.get(mm.inputs[rule.weight_input if is_lora else 1]) \
            if is_mm or is_lora else None
        if w is None or np.ndim(w) < 2:
            continue
        transposed = mm.attrs.get(rule.trans_attr if is_lora else "trans_b")
        n_out = np.shape(w)[-2] if transposed else np.shape(w)[-1]
        add = m.private(mm.outputs[0])
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        bias = m.other_input(add, mm.outputs[0])
        b = graph.initializers.get(bias) if bias else None
        if b is None or np.shape(b) != (n_out,) or np.asarray(b).dtype != np.float32 \
                or bias in trainable:
            continue
        mm.domain, mm.inputs, mm.outputs = "pyedge", mm.inputs + [bias], list(add.outputs)
        remove.add(id(add))
        count += 1
    if remove:
        graph.nodes = [n for n in graph.nodes if id(n) not in remove]
    return count


def _quant_bias_slot(node: Node) -> int | None:
    """Index of the empty bias input of a MatMulNBits (5) or LoraQuantMatMul on one (6)."""
    if node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
        at = 5
    elif node.domain == "pyedge" and node.op_type == "LoraQuantMatMul" and \
            node.attrs.get("base") == "MatMulNBits":
        at = 6
    else:
        return None
    return at if len(node.inputs) <= at or not node.inputs[at] else None


def _made_by_transpose(m: _Matcher, value: str, perm: list[int]) -> str | None:
    """The input of the Transpose(perm) that makes `value`, when `value` has no other reader."""
    t = m.made_by(value, "Transpose")
    if t is None or list(t.attrs.get("perm", [])) != perm or m.private(value) is None:
        return None
    return t.inputs[0]


_HEADS_FIRST = [0, 2, 1, 3]   # [B, L, H, D] <-> [B, H, L, D], the exporters' head split/merge
_KEYS_LAST = [0, 2, 3, 1]     # [B, L, H, D] -> [B, H, D, L], Kᵀ in one Transpose


def _attention_site(m: _Matcher, sm: Node) -> tuple[list[str], str, list[Node]] | None:
    """For a MaskedSoftmax node inside multi-head attention,
        O = Transpose(MaskedSoftmax(Q·Kᵀ, mask) · V)  with Q, K, V head-split by Transpose,
    ([q, k, v] in [B, L, H, D] layout, O's merged-heads output name, the nodes to remove)."""
    scores = sm.inputs[0]
    qk = m.producer.get(scores)
    if qk is None or qk.op_type != "MatMul" or m.private(scores) is not sm or len(qk.inputs) != 2:
        return None
    q_t, k_in = qk.inputs
    trans = (int(qk.attrs.get("trans_a", 0)), int(qk.attrs.get("trans_b", 0)))
    if qk.domain == "pyedge" and trans == (0, 1):
        k = _made_by_transpose(m, k_in, _HEADS_FIRST)         # Q · Kᵀ via trans_b
    elif qk.domain in ("", "ai.onnx") and trans == (0, 0):
        k = _made_by_transpose(m, k_in, _KEYS_LAST)           # Q · Transpose(K, 0 2 3 1)
    else:
        return None
    q = _made_by_transpose(m, q_t, _HEADS_FIRST)
    if q is None or k is None or q_t == k_in:
        return None
    nodes = [m.producer[q_t], m.producer[k_in], qk, sm]
    # P may pass through Identity (dropout off) or a float Cast before P · V.
    p = sm.outputs[0]
    user = m.private(p)
    while user is not None and (user.op_type == "Identity" or (
            user.op_type == "Cast" and int(user.attrs.get("to", 0)) == 1)):
        nodes.append(user)
        p = user.outputs[0]
        user = m.private(p)
    if user is None or user.op_type != "MatMul" or user.inputs[0] != p or len(user.inputs) != 2 \
            or (user.domain == "pyedge" and (user.attrs.get("trans_a") or user.attrs.get("trans_b"))):
        return None
    v_t = user.inputs[1]
    v = _made_by_transpose(m, v_t, _HEADS_FIRST)
    merge = m.private(user.outputs[0])
    if v is None or v_t in (q_t, k_in) or merge is None or merge.op_type != "Transpose" \
            or list(merge.attrs.get("perm", [])) != _HEADS_FIRST:
        return None
    nodes += [m.producer[v_t], user, merge]
    return [q, k, v], merge.outputs[0], nodes


def fuse_attention(graph: Graph) -> int:
    """Multi-head attention after the MaskedSoftmax and transposed-MatMul rewrites, from the
    head-split Transposes of Q, K, V to the head-merge Transpose of the result, becomes one
    pyedge.Attention reading and writing the [B, L, H, D] layout: the probabilities
    (B·H·L·L floats) are not kept for the backward but recomputed from a per-row
    log-sum-exp, and the four transposed copies (and their backward) go away."""
    m = _Matcher(graph)
    remove: set[int] = set()
    replace: dict[int, Node] = {}
    for sm in graph.nodes:
        if sm.op_type != "MaskedSoftmax" or sm.domain != "pyedge":
            continue
        site = _attention_site(m, sm)
        if site is None:
            continue
        (q, k, v), out, nodes = site
        if any(id(n) in remove or id(n) in replace for n in nodes):
            continue
        inputs = [q, k, v] + sm.inputs[1:2]
        last = nodes[-1]
        replace[id(last)] = Node("Attention", inputs, [out], name=f"{sm.name}_attention",
                                 domain="pyedge", attrs={"scale": float(sm.attrs.get("scale", 1.0)),
                                                         "layout": "blhd"})
        remove.update(id(n) for n in nodes if n is not last)
    if not replace:
        return 0
    graph.nodes = [replace.get(id(n), n) for n in graph.nodes if id(n) not in remove]
    return len(replace)


def _fused_kinds(graph: Graph) -> Counter:
    """How many nodes of the graph each earlier rule made (MaskedSoftmax, transposed MatMul)."""
    return Counter("masked_softmax" if n.op_type == "MaskedSoftmax" else "transposed_matmul"
                   for n in graph.nodes if n.domain == "pyedge" and (
                       n.op_type == "MaskedSoftmax" or (n.op_type == "MatMul" and (
                           n.attrs.get("trans_a") or n.attrs.get("trans_b")))))


def fuse(graph: Graph, trainable: set[str] = frozenset()) -> dict[str, int]:
    """Applies every fusion in place; returns how many sites each one rewrote. `trainable`:
    names of the tensors being trained (a fusion that drops a gradient path checks them)."""
    # Llama-family fusions live in their own modules (they import this one's matcher)
    from pyedge import attention_fusion
    from pyedge import decoder_fusions as dec
    from pyedge.rotary_fusion import fuse_rotary

    done = Counter()
    # first, so the fusions below see the ops that now run on gathered rows
    done["gathered_rows"] += push_gathers_up(graph)
    done["gelu"] += fuse_gelu(graph)
    done["rmsnorm"] += dec.fuse_rmsnorm(graph)
    done["gated_mlp"] += dec.fuse_gated_mlp(graph)  # after fuse_gelu: GeGLU reads a Gelu
    # keeps the rotated Q/K value names, so the attention rules below match either way
    done["rotary"] += fuse_rotary(graph, set(trainable))
    done["masked_softmax"] += fuse_masked_softmax(graph, set(trainable))
    done["transposed_matmul"] += fuse_transposed_matmul(graph)
    done["attention"] += fuse_attention(graph)
    # the softmaxes the rules above left: decoder attention (SDPA, eager, TorchScript); what
    # it absorbs of the rules above (eager's MaskedSoftmax, Q·Kᵀ) is no longer counted there
    before = _fused_kinds(graph)
    done["attention"] += attention_fusion.fuse_decoder_attention(graph, set(trainable))
    done.subtract(before - _fused_kinds(graph))
    done["matmul_bias"] += fuse_matmul_bias(graph, set(trainable))
    return dict(done)
