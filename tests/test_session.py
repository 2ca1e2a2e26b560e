"""Training-session mechanics: sparse backprop, frozen weights, GIL, allocations, errors."""
import threading
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import pyedge
from pyedge import _core

torch = pytest.importorskip("torch")


def make_mlp_onnx(path, sizes=(16, 32, 32, 4), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    m = torch.nn.Sequential(*layers[:-1]).eval()
    x = torch.randn(4, sizes[0])
    torch.onnx.export(m, (x,), path, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}}, dynamo=False,
                      do_constant_folding=False)
    return m


@pytest.fixture
def mlp_path(tmp_path):
    p = str(tmp_path / "mlp.onnx")
    make_mlp_onnx(p)
    return p


def batch(n=8, d=16, c=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, c, n).astype(np.int64)


def test_training_reduces_loss_and_frozen_weights_stay_bit_identical(mlp_path):
    sess = pyedge.TrainingSession(mlp_path, lora=pyedge.LoraConfig(r=4, target_modules=["0", "2"]),
                                  train=["4.*"], optimizer=pyedge.AdamW(lr=1e-2))
    x, y = batch()
    losses = [sess.step({"x": x}, y) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    fresh = pyedge.load_onnx(mlp_path).initializers
    trainable = sess.trainable_parameters()
    assert set(trainable) == {"0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight",
                              "2.lora_B.weight", "4.weight", "4.bias"}
    for name, arr in sess.parameters().items():
        if name in trainable:
            continue
        assert arr.tobytes() == fresh[name].tobytes(), f"frozen {name} changed"
    assert not np.array_equal(trainable["4.weight"], fresh["4.weight"])


def test_gradients_match_torch_autograd(mlp_path):
    torch_model = make_mlp_onnx(mlp_path)
    sess = pyedge.TrainingSession(mlp_path, lora=pyedge.LoraConfig(r=3, alpha=6,
                                  target_modules=["2"]), train=["4.bias"])
    params = sess.trainable_parameters()
    rng = np.random.default_rng(1)
    params["2.lora_B.weight"][...] = rng.standard_normal(params["2.lora_B.weight"].shape) * 0.1
    x, y = batch()
    sess.step({"x": x}, y, update=False)
    grads = {k: v.copy() for k, v in sess.gradients().items()}

    A = torch.tensor(params["2.lora_A.weight"].copy(), requires_grad=True)
    B = torch.tensor(params["2.lora_B.weight"].copy(), requires_grad=True)
    b4 = torch.tensor(params["4.bias"].copy(), requires_grad=True)
    l0, l2, l4 = torch_model[0], torch_model[2], torch_model[4]
    h = torch.relu(l0(torch.tensor(x)))
    h = torch.relu(l2(h) + 2.0 * (h @ A.T) @ B.T)
    out = h @ l4.weight.T + b4
    loss = torch.nn.functional.cross_entropy(out, torch.tensor(y))
    loss.backward()
    for name, t in [("2.lora_A.weight", A), ("2.lora_B.weight", B), ("4.bias", b4)]:
        np.testing.assert_allclose(grads[name], t.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


def test_sparse_backprop_prunes_ops_before_the_first_trainable(mlp_path):
    x, y = batch()
    last = pyedge.TrainingSession(mlp_path, train=["4.*"])
    first = pyedge.TrainingSession(mlp_path, train=["0.*"])
    s_last = last.plan_stats({"x": x})
    s_first = first.plan_stats({"x": x})
    # Only the loss needs a backward when only the head trains (the head's Gemm is fused
    # into it: pyedge.LinearCrossEntropy).
    assert s_last["backward_ops"] == 1, s_last["backward_nodes"]
    assert s_first["backward_ops"] == 5, s_first["backward_nodes"]
    assert s_last["gradient_bytes"] < s_first["gradient_bytes"]


def test_first_writers_assign_gradients_instead_of_zeroing(mlp_path):
    # The loss, Gemm and Relu overwrite the activation gradients they write first, so a step
    # zeroes no gradient buffer at all.
    x, y = batch()
    sess = pyedge.TrainingSession(mlp_path, train=["0.*"])
    st = sess.plan_stats({"x": x})
    assert st["gradient_bytes"] > 0
    assert st["zeroed_gradient_bytes"] == 0, st
    # ...and the gradients are still right after several steps (no stale values carried).
    ref = pyedge.TrainingSession(mlp_path, train=["0.*"])
    for _ in range(3):
        sess.step({"x": x}, y, update=False)
    ref.step({"x": x}, y, update=False)
    for k, g in ref.gradients().items():
        np.testing.assert_allclose(sess.gradients()[k], 3 * g, rtol=1e-5, atol=1e-7, err_msg=k)


def test_steady_state_step_allocates_nothing(mlp_path):
    sess = pyedge.TrainingSession(mlp_path, lora=pyedge.LoraConfig(r=4, target_modules=["0"]),
                                  train=["4.*"])
    x, y = batch()
    sess.step({"x": x}, y)   # builds the plan
    for _ in range(3):
        sess.step({"x": x}, y)
        assert sess.last_step_allocations == 0


def test_step_releases_the_gil(tmp_path):
    p = str(tmp_path / "big.onnx")
    make_mlp_onnx(p, sizes=(512, 1024, 1024, 8))
    sess = pyedge.TrainingSession(p, train=["0.*"])
    x, y = batch(n=256, d=512, c=8)
    sess.step({"x": x}, y)
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1
    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.01)
        during = []
        for _ in range(3):
            before = count[0]
            t0 = time.perf_counter()
            sess.step({"x": x}, y)
            if time.perf_counter() - t0 > 0.01:
                during.append(count[0] - before)
    finally:
        stop.set()
        t.join()
    assert during and max(during) > 1000, during


def test_plan_cache_per_shape(mlp_path):
    sess = pyedge.TrainingSession(mlp_path, train=["4.*"])
    for n in (8, 3, 8):
        x, y = batch(n=n)
        loss = sess.step({"x": x}, y)
        assert np.isfinite(loss)
    assert sess.run({"x": x})["logits"].shape == (8, 4)


def test_plans_share_one_arena_and_rebind_when_it_grows(mlp_path):
    # Training at batch 8, evaluating at batch 512 (a larger plan: the shared arena grows and
    # moves), training again: the losses and parameters are bit-identical to a session that
    # never evaluated, and the session holds the largest plan's arena, not the sum.
    def make():
        return pyedge.TrainingSession(mlp_path, lora=pyedge.LoraConfig(r=4, target_modules=["0"]),
                                      train=["4.*"], optimizer=pyedge.AdamW(lr=1e-2))
    mixed, plain = make(), make()
    xs = [batch(n=8, seed=s) for s in range(4)]
    x_eval, _ = batch(n=512, seed=9)
    want_eval = None
    for i, (x, y) in enumerate(xs):
        assert mixed.step({"x": x}, y) == plain.step({"x": x}, y)
        if i % 2 == 0:
            got = mixed.run({"x": x_eval})["logits"]
            ref = plain.run({"x": x_eval})["logits"]
            np.testing.assert_array_equal(got, ref)
            want_eval = ref
    for k, v in plain.trainable_parameters().items():
        np.testing.assert_array_equal(mixed.trainable_parameters()[k], v, err_msg=k)
    assert want_eval is not None
    train = mixed.plan_stats(shapes={"x": [8, 16], "labels": [8]})
    small_eval = mixed.plan_stats(shapes={"x": [8, 16]}, training=False)
    big_eval = mixed.plan_stats(shapes={"x": [512, 16]}, training=False)
    largest = max(train["arena_bytes"], small_eval["arena_bytes"], big_eval["arena_bytes"])
    assert big_eval["arena_bytes"] > train["arena_bytes"]  # the eval plan did grow the arena
    assert largest <= big_eval["session_arena_bytes"] < largest + 64


def test_nothing_trainable_reaches_the_loss(tmp_path):
    # y = x·W, with an unrelated trainable tensor feeding a side output only.
    W = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))
    V = helper.make_tensor("V", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
         helper.make_node("MatMul", ["x", "V"], ["z"], name="side")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])], [W, V])
    p = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    sess = pyedge.TrainingSession(p, train=["V"], output="y")
    with pytest.raises(_core.PyedgeError, match="no trainable tensor reaches the loss"):
        sess.step({"x": np.ones((2, 4), np.float32)}, np.zeros(2, np.int64))


def test_missing_backward_rule_is_reported_only_on_the_gradient_path(tmp_path):
    # x -> MatMul(W) -> Floor -> MatMul(V) -> y ; Floor has no backward rule.
    W = helper.make_tensor("W", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    V = helper.make_tensor("V", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
         helper.make_node("Floor", ["h"], ["f"], name="the_floor"),
         helper.make_node("MatMul", ["f", "V"], ["y"], name="second")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [W, V])
    p = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    x, y = np.ones((2, 4), np.float32), np.zeros(2, np.int64)
    ok = pyedge.TrainingSession(p, train=["V"])     # gradient stops before Floor
    assert np.isfinite(ok.step({"x": x}, y))
    bad = pyedge.TrainingSession(p, train=["W"])    # gradient must cross Floor
    with pytest.raises(pyedge.UnsupportedOpError, match="Floor node 'the_floor'.*no backward"):
        bad.step({"x": x}, y)


def test_input_errors_are_clear(mlp_path):
    sess = pyedge.TrainingSession(mlp_path, train=["4.*"])
    x, y = batch()
    with pytest.raises(_core.PyedgeError, match="input 'x' has shape"):
        sess.step({"x": x[:, :5]}, y)
    with pytest.raises(ValueError, match="unknown input"):
        sess.step({"nope": x}, y)
    with pytest.raises(_core.PyedgeError, match="label"):
        sess.step({"x": x}, np.full(8, 7, np.int64))


def test_nan_loss_leaves_parameters_untouched(mlp_path):
    sess = pyedge.TrainingSession(mlp_path, train=["4.*"])
    x, y = batch()
    sess.step({"x": x}, y)
    before = {k: v.copy() for k, v in sess.trainable_parameters().items()}
    state = {k: {s: a.copy() for s, a in v.items()} for k, v in sess.optimizer_state().items()}
    x[0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite"):
        sess.step({"x": x}, y)
    for k, v in sess.trainable_parameters().items():
        assert np.array_equal(v, before[k])
        for s, a in sess.optimizer_state()[k].items():
            assert np.array_equal(a, state[k][s])
    assert sess.step_count == 1


def _reshape_chain_model(with_reshapes: bool):
    """x [4, 6] -> MatMul w1 -> Add b -> (Reshape [4,2,3] -> Identity -> Flatten) -> MatMul w2."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(3)
    inits = [helper.make_tensor("w1", TensorProto.FLOAT, [6, 6], rng.standard_normal(36).tolist()),
             helper.make_tensor("w2", TensorProto.FLOAT, [6, 3], rng.standard_normal(18).tolist()),
             helper.make_tensor("shape", TensorProto.INT64, [3], [4, 2, 3]),
             helper.make_tensor("b", TensorProto.FLOAT, [6], rng.standard_normal(6).tolist())]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]),
             helper.make_node("Add", ["h0", "b"], ["h"])]  # frozen bias: dh0 = dh
    if with_reshapes:
        nodes += [helper.make_node("Reshape", ["h", "shape"], ["r"]),
                  helper.make_node("Identity", ["r"], ["i"]),
                  helper.make_node("Flatten", ["i"], ["f"], axis=1),
                  helper.make_node("MatMul", ["f", "w2"], ["y"])]
    else:
        nodes += [helper.make_node("MatMul", ["h", "w2"], ["y"])]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_pass_through_backward_steps_share_the_gradient_buffer():
    x = np.random.default_rng(4).standard_normal((4, 6)).astype(np.float32)
    y = np.array([0, 2, 1, 2], np.int64)
    # fuse=False: the bias Add would otherwise go into the MatMul (fusions.fuse_matmul_bias)
    chain = pyedge.TrainingSession(_reshape_chain_model(True), train=["w1"], fuse=False)
    plain = pyedge.TrainingSession(_reshape_chain_model(False), train=["w1"], fuse=False)
    st = chain.plan_stats({"x": x})
    # Flatten, Identity, Reshape and the Add of the frozen bias need no backward work: dX is
    # dY's buffer.
    assert st["passthrough_backward_ops"] == 4, st
    st_plain = plain.plan_stats({"x": x})
    assert st_plain["passthrough_backward_ops"] == 1, st_plain
    assert st["gradient_bytes"] == st_plain["gradient_bytes"]
    for _ in range(3):
        np.testing.assert_allclose(chain.step({"x": x}, y), plain.step({"x": x}, y), rtol=1e-6)
        np.testing.assert_allclose(chain.gradients()["w1"], plain.gradients()["w1"], rtol=1e-6)


def test_plan_stats_from_shapes_alone(mlp_path):
    sess = pyedge.TrainingSession(mlp_path, train=["4.*"])
    x, _ = batch()
    with pytest.raises(ValueError, match="labels' shape"):
        sess.plan_stats(shapes={"x": list(x.shape)})
    by_shape = sess.plan_stats(shapes={"x": list(x.shape), "labels": [x.shape[0]]})
    assert by_shape["arena_bytes"] == sess.plan_stats({"x": x})["arena_bytes"]
