"""Whole tensors made trainable by pattern (a classifier head, biases, a last block)."""
from __future__ import annotations

from pyedge.adapters.patterns import matches
from pyedge.graph import Graph
from pyedge.param_names import module_of


# PyTorch buffers exported as initializers: statistics and constants, never trained.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "position_ids")


def _statistics_inputs(graph: Graph) -> set[str]:
    """Tensors a BatchNormalization reads as mean/variance, and a quantized weight's scales,
    zero points and bias (frozen with it)."""
    from pyedge.import_quantized import is_quant_node, quant_weight_inputs
    return {n.inputs[i] for n in graph.nodes if n.op_type == "BatchNormalization"
            for i in (3, 4) if len(n.inputs) > i} | \
        {x for n in graph.nodes if is_quant_node(n) for x in quant_weight_inputs(n)}


def select_trainable_tensors(graph: Graph, patterns) -> list[str]:
    """Initializer names whose PyTorch name (module.param) or module matches a pattern."""
    chosen = []
    stats = _statistics_inputs(graph)
    for name, arr in graph.initializers.items():
        if arr.dtype.kind != "f" or ".lora_" in name or name in stats:
            continue
        if name.endswith(BUFFER_SUFFIXES) or graph.param_map.get(name, {}).get("buffer"):
            continue
        entry = graph.param_map.get(name)
        torch_name = f"{entry['module']}.{entry['param']}" if entry else name
        module = module_of(graph, name)
        if any(matches(torch_name, p) or matches(module, p) or matches(name, p) for p in patterns):
            chosen.append(name)
    missing = [p for p in patterns if not any(
        matches(graph.param_map.get(n, {}).get("module", n), p) or matches(n, p)
        or matches(_torch_name(graph, n), p) for n in chosen)]
    if missing:
        raise ValueError(f"--train pattern(s) {missing} match no float tensor of the model")
    return chosen


def _torch_name(graph, name):
    e = graph.param_map.get(name)
    return f"{e['module']}.{e['param']}" if e else name
