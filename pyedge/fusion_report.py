"""What the fusions left op by op, said so a user notices (`pyedge inspect`).

`fusions` counts what was fused per kind; a count of 0 (or a kind missing) is easy to miss.
Attention matters most: unfused, a layer keeps its B·H·L·Lk probabilities for the backward
and runs a dozen ops instead of one. So after fusing, the attention layers are counted both
ways: each pyedge.Attention is one fused layer; each softmax still in the graph whose
probabilities go (through a float Cast, an Identity or the SDPA NaN guard) into P · V, a
MatMul with an activation, is one layer that runs op by op."""
from __future__ import annotations

from pyedge.graph import Graph


def _feeds_pv(graph: Graph, consumers: dict, value: str) -> bool:
    """Whether `value` (softmax probabilities) reaches a MatMul with a non-constant right
    operand as its left operand, through Cast / Identity / Where (the NaN guard) alone."""
    seen, stack = set(), [value]
    while stack:
        v = stack.pop()
        if v in seen or len(seen) > 16:
            continue
        seen.add(v)
        for u in consumers.get(v, []):
            if u.op_type == "MatMul" and len(u.inputs) == 2 and u.inputs[0] == v \
                    and u.inputs[1] not in graph.initializers:
                return True
            if u.op_type in ("Cast", "Identity", "Where") and u.domain in ("", "ai.onnx"):
                stack.extend(o for o in u.outputs if o)
    return False


def attention_coverage(graph: Graph) -> dict[str, int]:
    """For a fused graph: {"layers": attention layers found, "fused": of them pyedge.Attention}."""
    consumers = graph.consumer_map()
    fused = sum(1 for n in graph.nodes if n.domain == "pyedge" and n.op_type == "Attention")
    plain = sum(1 for n in graph.nodes
                if ((n.domain in ("", "ai.onnx") and n.op_type == "Softmax")
                    or (n.domain == "pyedge" and n.op_type == "MaskedSoftmax"))
                and _feeds_pv(graph, consumers, n.outputs[0]))
    return {"layers": fused + plain, "fused": fused}


def attention_line(cov: dict[str, int]) -> str | None:
    """One line for `pyedge inspect`, or None when the model has no attention."""
    n, k = cov["layers"], cov["fused"]
    if not n:
        return None
    if k == n:
        return f"attention: {k} of {n} layers fused (pyedge.Attention)"
    return (f"attention: {k} of {n} layers fused; {n - k} run op by op (slower, and each keeps "
            f"its B·H·T² softmax probabilities for the backward)")
