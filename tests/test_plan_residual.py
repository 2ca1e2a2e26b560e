"""Residual Adds z = x + y whose two input gradients both take over dZ's buffer (the planner's
share_both in csrc/graph/plan.cpp): the backward step disappears, and the gradients stay
exact, checked against torch autograd. Each graph is built so that sharing is safe or
unsafe in a known way; the unsafe ones must keep their own buffers."""
import numpy as np
import pytest
from optional_deps import optional
torch = optional("torch")
from onnx import TensorProto, helper, numpy_helper

import pyedge

D = 8


def _model(nodes, n_weights):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((D, D)) * 0.4).astype(np.float32),
                                     f"w{i}") for i in range(n_weights)]
    g = helper.make_graph(nodes, "residual",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), \
        {f"w{i}": numpy_helper.to_array(t) for i, t in enumerate(inits)}


def mm(a, w, out):
    return helper.make_node("MatMul", [a, w], [out])


# name: (nodes, weights, torch function of (x, w), how many Adds share their buffers)
CASES = {
    # a = x·w0; z = a + (a·w1)·w2: the branch's last reader (w2's MatMul) runs before the
    # branch's first MatMul adds a's other gradient share: sharing is exact.
    "deep_branch": ([mm("x", "w0", "a"), mm("a", "w1", "c"), mm("c", "w2", "b"),
                     helper.make_node("Add", ["a", "b"], ["z"]), mm("z", "w3", "out")], 4,
                    lambda x, w: (lambda a: (a + a @ w[1] @ w[2]) @ w[3])(x @ w[0]), 1),
    # the branch output goes through an Identity (an exported Dropout) before the Add
    "identity_in_branch": ([mm("x", "w0", "a"), mm("a", "w1", "c"), mm("c", "w2", "b0"),
                            helper.make_node("Identity", ["b0"], ["b"]),
                            helper.make_node("Add", ["b", "a"], ["z"]), mm("z", "w3", "out")], 4,
                           lambda x, w: (lambda a: (a @ w[1] @ w[2] + a) @ w[3])(x @ w[0]), 1),
    # z = a + a·w1: the MatMul reading dB also writes dA: sharing would alias its input and
    # output gradients, so the Add keeps its step.
    "shallow_branch": ([mm("x", "w0", "a"), mm("a", "w1", "b"),
                        helper.make_node("Add", ["b", "a"], ["z"]), mm("z", "w2", "out")], 3,
                       lambda x, w: (lambda a: (a @ w[1] + a) @ w[2])(x @ w[0]), 0),
    # b is also read by another op after the Add: the Add writes b's gradient second.
    "branch_read_twice": ([mm("x", "w0", "a"), mm("a", "w1", "c"), mm("c", "w2", "b"),
                           helper.make_node("Add", ["a", "b"], ["z"]),
                           helper.make_node("Mul", ["z", "b"], ["m"]), mm("m", "w3", "out")], 4,
                          lambda x, w: (lambda a, b: ((a + b) * b) @ w[3])(
                              x @ w[0], x @ w[0] @ w[1] @ w[2]), 0),
    # b is also read before the Add (d = b·w4, joined later by a second residual Add): the
    # first Add writes b's gradient first but not alone, so it keeps its step; the second
    # (z + d, d read only by it) shares.
    "branch_read_before_add": ([mm("x", "w0", "a"), mm("a", "w1", "c"), mm("c", "w2", "b"),
                                mm("b", "w4", "d"), helper.make_node("Add", ["a", "b"], ["z"]),
                                helper.make_node("Add", ["z", "d"], ["z2"]),
                                mm("z2", "w3", "out")], 5,
                               lambda x, w: (lambda a, b: (a + b + b @ w[4]) @ w[3])(
                                   x @ w[0], x @ w[0] @ w[1] @ w[2]), 1),
    # z = a + a
    "same_input": ([mm("x", "w0", "a"), helper.make_node("Add", ["a", "a"], ["z"]),
                    mm("z", "w1", "out")], 2, lambda x, w: ((x @ w[0]) * 2) @ w[1], 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_residual_add_gradients(case):
    nodes, n, fn, shared = CASES[case]
    model, weights = _model(nodes, n)
    x = np.random.default_rng(1).standard_normal((4, D)).astype(np.float32)
    target = np.random.default_rng(2).standard_normal((4, D)).astype(np.float32)
    trained = sorted(weights)
    sess = pyedge.TrainingSession(model, train=trained, loss="mse", fuse=False)
    # The reference plan: the same graph with the Add spelled as a Sum (no sharing rule).
    ref_model, _ = _model([helper.make_node("Sum", nd.input, nd.output) if nd.op_type == "Add"
                           else nd for nd in nodes], n)
    ref = pyedge.TrainingSession(ref_model, train=trained, loss="mse", fuse=False)
    extra = sess.plan_stats({"x": x})["passthrough_backward_ops"] - \
        ref.plan_stats({"x": x})["passthrough_backward_ops"]
    assert extra == shared
    loss = sess.step({"x": x}, target, update=False)
    wt = [torch.tensor(weights[f"w{i}"], dtype=torch.float64, requires_grad=True) for i in range(n)]
    out = fn(torch.tensor(x, dtype=torch.float64), wt)
    want = ((out - torch.tensor(target, dtype=torch.float64)) ** 2).mean()
    want.backward()
    np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
    grads = sess.gradients()
    for i in range(n):
        np.testing.assert_allclose(grads[f"w{i}"], wt[i].grad.numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=f"{case}: w{i}")
