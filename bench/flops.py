"""FLOPs of one training step, counted analytically on the ONNX graph — the same number is
used for every engine.

Counted: GEMM-like ops only (MatMul, Gemm, Conv, including the LoRA adapter MatMuls), one
multiply-add = 2 FLOPs. Forward: every such op (dense forward). Backward: only what a
pruned backward needs: for op C = f(A, B), dA (same FLOPs as the forward op) is counted iff A
depends on a trainable tensor, dB iff B does. "Depends on" is propagated forward from the
trainable tensors through every op with a float output. So frozen weights cost no weight
gradient and nothing below the lowest trainable tensor gets a backward. Elementwise,
normalisation, softmax, loss and optimizer work are not counted (a few % of the total).
"""
from __future__ import annotations

import numpy as np

GEMM_OPS = ("MatMul", "Gemm", "Conv")


def _dims(vi):
    t = vi.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim], t.elem_type


def op_flops(node, shapes) -> float | None:
    """Forward FLOPs of one GEMM-like node, or None when a shape is unknown."""
    try:
        if node.op_type == "MatMul":
            a = shapes[node.input[0]]
            shapes[node.input[1]]  # KeyError (-> None) when B's shape is unknown
            out = shapes[node.output[0]]
            k = a[-1]
            return 2.0 * float(np.prod(out)) * k
        if node.op_type == "Gemm":
            at = {x.name: x.i for x in node.attribute if x.name in ("transA",)}
            a = shapes[node.input[0]]
            k = a[0] if at.get("transA", 0) else a[1]
            return 2.0 * float(np.prod(shapes[node.output[0]])) * k
        if node.op_type == "Conv":
            w = shapes[node.input[1]]  # [Cout, Cin/groups, kh, kw]
            return 2.0 * float(np.prod(shapes[node.output[0]])) * float(np.prod(w[1:]))
    except (KeyError, TypeError):
        return None
    return None


def count(model, trainable) -> dict:
    """{'forward': F, 'backward': B, 'total': F+B, 'unknown_ops': n} for a ModelProto whose
    trainable initializers are `trainable` (inputs have static shapes)."""
    import onnx
    from onnx import shape_inference

    m = shape_inference.infer_shapes(model, data_prop=True)
    g = m.graph
    shapes, types = {}, {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        d, t = _dims(vi)
        if all(x is not None for x in d):
            shapes[vi.name] = d
        types[vi.name] = t
    for i in g.initializer:
        shapes[i.name] = list(i.dims)
        types[i.name] = i.data_type
    rg = set(trainable)
    fwd = bwd = 0.0
    unknown = 0
    for n in g.node:
        needs = [x in rg for x in n.input]
        if any(needs):
            for o in n.output:
                if types.get(o, onnx.TensorProto.FLOAT) in (onnx.TensorProto.FLOAT,
                                                            onnx.TensorProto.FLOAT16,
                                                            onnx.TensorProto.DOUBLE):
                    rg.add(o)
        if n.op_type in GEMM_OPS:
            f = op_flops(n, shapes)
            if f is None:
                unknown += 1
                continue
            fwd += f
            bwd += f * sum(needs[:2])
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "unknown_ops": unknown}


def _load_for_counting(path):
    """The model with only its small initializers' values (shape constants): counting needs
    the big ones' dims alone, and a decoder's weights are GBs."""
    import onnx

    try:
        from pyedge.onnx_wire import map_model
        proto, mapped = map_model(path)
    except Exception:  # noqa: BLE001 - not a plain single file: external data left out
        return onnx.load(path, load_external_data=False)
    for i, t in enumerate(proto.graph.initializer):
        if mapped.has(i) and mapped.ranges[i][1] <= 4096:
            off, n = mapped.ranges[i]
            t.raw_data = mapped.mm[off:off + n]
    return proto


def workload_flops(workload, onnx_path) -> dict:
    """Counts on the onnxruntime-training copy of the workload (LoRA as plain ops); for the
    decoder workloads (no ORT copy) on pyedge's export, values of big weights not loaded."""
    import onnx
    from bench.onnx_lora import prepare_for_ort

    m = _load_for_counting(onnx_path) if workload.factory == "decoder" else onnx.load(onnx_path)
    trainable = prepare_for_ort(m, workload)
    return count(m, trainable)
