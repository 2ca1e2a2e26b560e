"""Whole tensors made trainable by pattern (a classifier head, biases, a last block)."""
from __future__ import annotations

from pyedge.adapters.patterns import matches
from pyedge.graph import Graph
from pyedge.param_names import module_of


def select_trainable_tensors(graph: Graph, patterns) -> list[str]:
    """Initializer names whose PyTorch name (module.param) or module matches a pattern."""
    chosen = []
    for name, arr in graph.initializers.items():
        if arr.dtype.kind != "f" or ".lora_" in name:
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
