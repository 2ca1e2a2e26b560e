"""Shared checks for single ops: forward against onnxruntime, backward against torch autograd.

    check_forward("Relu", [x], attrs={})             # pyedge vs onnxruntime, same node
    check_backward("Relu", [x], torch_fn=torch.relu) # pyedge vs torch autograd in float64
"""
import numpy as np
import onnx
from onnx import helper

from pyedge import _core

NP_TO_ONNX = {
    np.dtype("float32"): onnx.TensorProto.FLOAT,
    np.dtype("float64"): onnx.TensorProto.DOUBLE,
    np.dtype("int64"): onnx.TensorProto.INT64,
    np.dtype("int32"): onnx.TensorProto.INT32,
    np.dtype("uint8"): onnx.TensorProto.UINT8,
    np.dtype("bool"): onnx.TensorProto.BOOL,
}


def ort_run(op_type, inputs, attrs=None, opset=17, n_outputs=1, domain=""):
    """Runs one node in onnxruntime; inputs may contain None for absent optional inputs."""
    import onnxruntime as ort

    attrs = dict(attrs or {})
    names, graph_inputs, feeds = [], [], {}
    for i, x in enumerate(inputs):
        if x is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        x = np.asarray(x)
        graph_inputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[x.dtype], list(x.shape)))
        feeds[name] = x
    outs = [f"out{j}" for j in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, domain=domain, **attrs)
    graph = helper.make_graph(
        [node], "g", graph_inputs,
        [helper.make_empty_tensor_value_info(o) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def pyedge_run(op_type, inputs, attrs=None, opset=17, **kw):
    outs, _ = _core.run_op(op_type, list(inputs), dict(attrs or {}), opset=opset, **kw)
    return outs


def check_forward(op_type, inputs, attrs=None, opset=17, rtol=1e-5, atol=1e-5, n_outputs=1,
                  **kw):
    """pyedge's outputs equal onnxruntime's for the same single-node model."""
    ours = pyedge_run(op_type, inputs, attrs, opset, **kw)
    ref = ort_run(op_type, inputs, attrs, opset, n_outputs)
    assert len(ours) >= n_outputs
    for j in range(n_outputs):
        assert ours[j].shape == ref[j].shape, (op_type, j, ours[j].shape, ref[j].shape)
        assert ours[j].dtype == ref[j].dtype, (op_type, j, ours[j].dtype, ref[j].dtype)
        np.testing.assert_allclose(ours[j], ref[j], rtol=rtol, atol=atol, err_msg=op_type)
    return ours


def check_backward(op_type, inputs, torch_fn, attrs=None, opset=17, rtol=1e-4, atol=1e-5,
                   grad_outputs=None, seed=0, **kw):
    """pyedge's input gradients equal torch autograd's (float64) for a random output gradient.

    torch_fn takes torch tensors (float inputs as float64 leaves, others as-is) and returns a
    tensor or a tuple of tensors matching the op's outputs.
    """
    import torch

    rng = np.random.default_rng(seed)
    outs, _ = _core.run_op(op_type, list(inputs), dict(attrs or {}), opset=opset, **kw)
    if grad_outputs is None:
        grad_outputs = [rng.standard_normal(o.shape).astype(np.float32)
                        if o.dtype == np.float32 else None for o in outs]
    # The same backward three ways: into zeroed buffers, added onto ones (the op must
    # accumulate), and into NaN-filled buffers marked fresh (an op that assigns fresh
    # gradients must overwrite every element; the others get zeros, as in a plan).
    runs = {init: _core.run_op(op_type, list(inputs), dict(attrs or {}), opset=opset,
                               grad_outputs=grad_outputs, grad_init=init, **kw)[1]
            for init in ("zeros", "ones", "fresh")}
    grads = runs["zeros"]
    for init, off in (("ones", 1.0), ("fresh", 0.0)):
        for i, (g0, g) in enumerate(zip(grads, runs[init])):
            if g0 is not None:
                np.testing.assert_allclose(g - off, g0, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(g0).max(initial=0))),
                                           err_msg=f"{op_type} grad of input {i} with grad_init={init}")
    leaves = []
    for x in inputs:
        if x is not None and np.asarray(x).dtype == np.float32:
            leaves.append(torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True))
        elif x is not None:
            leaves.append(torch.tensor(np.asarray(x)))
        else:
            leaves.append(None)
    res = torch_fn(*leaves)
    res = res if isinstance(res, (tuple, list)) else (res,)
    total = sum((r.double() * torch.tensor(g, dtype=torch.float64)).sum()
                for r, g in zip(res, grad_outputs) if g is not None)
    total.backward()
    checked = 0
    for i, (leaf, g) in enumerate(zip(leaves, grads)):
        if g is None:
            continue
        ref = leaf.grad.numpy() if leaf.grad is not None else np.zeros(leaf.shape)
        scale = max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
        np.testing.assert_allclose(g, ref, rtol=rtol, atol=atol * scale,
                                   err_msg=f"{op_type} grad of input {i}")
        checked += 1
    assert checked > 0, f"{op_type}: no input gradient was produced"
    return grads
