"""Rewrites applied at import so the core sees plain tensor ops.

SplitToSequence + SequenceAt (the dynamo exporter's `torch.split`) become one Slice per
element taken; sequences never reach the core.
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
