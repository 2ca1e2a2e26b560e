"""A small, editable graph IR between the ONNX file and the C++ core.

Adapters rewrite this IR (pure Python, no copies of weights); `to_core` hands it to C++.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from pyedge import _core


@dataclasses.dataclass
class Node:
    op_type: str
    inputs: list[str]          # "" for an absent optional input
    outputs: list[str]
    name: str = ""
    domain: str = ""
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ValueInfo:
    name: str
    dtype: str                 # numpy dtype name: float32, int64, ...
    shape: list[int]           # -1 for a symbolic dimension


@dataclasses.dataclass
class Graph:
    nodes: list[Node]
    initializers: dict[str, np.ndarray]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    opsets: dict[str, int]
    # ONNX initializer name -> {"module", "param", "transposed", "kind"} (see export/)
    param_map: dict[str, dict] = dataclasses.field(default_factory=dict)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    # node name -> PyTorch module scope (dynamo's name_scopes), when the file has it
    node_scopes: dict[str, str] = dataclasses.field(default_factory=dict)
    # intermediate value -> shape (-1 symbolic) as the file or ONNX shape inference gave it;
    # rewrites that add values do not update it (see row_pruning.value_ranks)
    value_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    # value (intermediate, input or output) with a symbolic dim -> each dim's name ("" for
    # a static or unnamed one), as the file gave them: equal names are equal sizes
    dim_names: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    _counter: Any = dataclasses.field(default_factory=lambda: itertools.count(), repr=False)

    def producer_map(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs if o}

    def consumer_map(self) -> dict[str, list[Node]]:
        cons: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    cons.setdefault(i, []).append(n)
        return cons

    def fresh_name(self, base: str) -> str:
        taken = {o for n in self.nodes for o in n.outputs} | set(self.initializers)
        taken |= {v.name for v in self.inputs}
        while True:
            name = f"{base}__{next(self._counter)}"
            if name not in taken:
                return name

    def opset(self, domain: str = "") -> int:
        return self.opsets.get(domain, self.opsets.get("ai.onnx", 17))

    def copy(self) -> "Graph":
        """Structural copy (weights shared, nodes and dicts new) for rewriting."""
        return Graph(
            nodes=[dataclasses.replace(n, inputs=list(n.inputs), outputs=list(n.outputs),
                                       attrs=dict(n.attrs)) for n in self.nodes],
            initializers=dict(self.initializers),
            inputs=[dataclasses.replace(v, shape=list(v.shape)) for v in self.inputs],
            outputs=[dataclasses.replace(v, shape=list(v.shape)) for v in self.outputs],
            opsets=dict(self.opsets),
            param_map={k: dict(v) for k, v in self.param_map.items()},
            metadata=dict(self.metadata),
            node_scopes=dict(self.node_scopes),
            value_shapes={k: list(v) for k, v in self.value_shapes.items()},
            dim_names={k: list(v) for k, v in self.dim_names.items()},
        )


def to_core(graph: Graph) -> "_core.Model":
    """Builds the C++ model. Weights are passed as views (no copy)."""
    m = _core.Model()
    for v in graph.inputs:
        m.add_input(v.name, v.dtype, list(v.shape))
    for name, arr in graph.initializers.items():
        m.add_initializer(name, arr)
    for n in graph.nodes:
        m.add_node(n.op_type, n.domain, n.name, list(n.inputs), list(n.outputs), n.attrs,
                   graph.opset(n.domain))
    for v in graph.outputs:
        m.add_output(v.name)
    m.finalize()
    return m
