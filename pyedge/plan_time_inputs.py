"""Graph inputs whose value an op needs at plan time.

The core plans each op once from its inputs' shapes, and from the values of the inputs that
decide an output shape or a layout (Reshape's shape, Slice's starts/ends/axes/steps, Pad's
pads, Tile's repeats, TopK's k, ...). Exporters and ONNX's own node tests sometimes feed
those as graph inputs instead of initializers; the session then keys its plans on their
values too (`_core.Session.set_value_keyed_inputs`): a new value is a new plan, a value seen
before reuses its plan.

A graph input is keyed when it reaches such a slot directly or through shape
arithmetic (Cast, Concat, Unsqueeze, Gather, Add, ...), the ops the core folds at plan time.
"""
from __future__ import annotations

from pyedge.graph import Graph

# op -> input positions the core reads at plan time
PLAN_TIME_SLOTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4),
    "Pad": (1, 3), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "TopK": (1,),
    "ConstantOfShape": (0,), "Range": (0, 1, 2), "OneHot": (1,), "CumSum": (1,),
    "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,),
    "ReduceProd": (1,), "ReduceL1": (1,), "ReduceL2": (1,), "ReduceSumSquare": (1,),
    "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "Resize": (1, 2, 3), "Upsample": (1,),
    "Trilu": (1,),
}
# ops through which a plan-time value is computed from its inputs (all of them)
_SHAPE_ARITHMETIC = {"Cast", "CastLike", "Concat", "Unsqueeze", "Squeeze", "Gather", "Add",
                     "Sub", "Mul", "Div", "Neg", "Abs", "Identity", "Reshape", "Max", "Min",
                     "Slice", "Range", "Sum", "Floor", "Ceil", "Mod", "ReduceProd"}


def plan_time_inputs(graph: Graph) -> list[str]:
    """Names of the numeric graph inputs some op reads at plan time (see module doc)."""
    # float inputs too: Range's start/limit/delta, Resize's scales
    int_inputs = {v.name for v in graph.inputs
                  if v.dtype in ("int64", "int32", "float32", "float64")}
    if not int_inputs:
        return []
    producers = graph.producer_map()
    wanted: set[str] = set()
    stack = [n.inputs[k] for n in graph.nodes if n.domain in ("", "ai.onnx")
             for k in PLAN_TIME_SLOTS.get(n.op_type, ()) if k < len(n.inputs) and n.inputs[k]]
    while stack:
        name = stack.pop()
        if name in wanted:
            continue
        wanted.add(name)
        node = producers.get(name)
        if node is not None and node.op_type in _SHAPE_ARITHMETIC:
            stack.extend(i for i in node.inputs if i)
    return [v.name for v in graph.inputs if v.name in int_inputs and v.name in wanted]
