"""Conv, pooling and BatchNormalization: forward vs onnxruntime, backward vs torch autograd."""
import numpy as np
import pytest
from optional_deps import optional
torch = optional("torch")
F = optional("torch.nn.functional")

from opcheck import check_backward, check_forward, ort_run, pyedge_run
from pyedge import _core

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def conv_attrs(k, stride=1, pads=None, dil=1, group=1, auto_pad=None):
    r = len(k)
    a = {"kernel_shape": list(k), "strides": [stride] * r, "dilations": [dil] * r, "group": group}
    if auto_pad:
        a["auto_pad"] = auto_pad
    else:
        a["pads"] = list(pads) if pads is not None else [0] * (2 * r)
    return a


def torch_pad(pads):
    """ONNX pads [b0, b1, e0, e1] -> F.pad order (last axis first)."""
    r = len(pads) // 2
    out = []
    for a in reversed(range(r)):
        out += [pads[a], pads[a + r]]
    return out


# (N, C, spatial, M, kernel, stride, pads, dilation, group, bias)
CONV2D_CASES = [
    (2, 3, (7, 8), 4, (3, 3), 1, (1, 1, 1, 1), 1, 1, True),
    (1, 4, (9, 9), 6, (3, 3), 2, (1, 1, 1, 1), 1, 1, False),
    (2, 4, (8, 7), 4, (3, 2), 1, (0, 1, 2, 0), 2, 1, True),    # asym pads, dilation
    (2, 6, (6, 6), 4, (3, 3), 2, (1, 0, 0, 1), 1, 2, True),    # groups
    (2, 4, (7, 7), 4, (3, 3), 1, (1, 1, 1, 1), 1, 4, True),    # depthwise
    (1, 3, (8, 6), 6, (3, 3), 2, (1, 1, 1, 1), 1, 3, False),   # depthwise x2 multiplier
    (2, 4, (5, 6), 2, (5, 3), 1, (2, 1, 2, 1), 2, 4 // 2, True),
    (2, 5, (6, 7), 3, (1, 1), 1, (0, 0, 0, 0), 1, 1, True),    # pointwise
    (2, 4, (6, 7), 6, (1, 1), 2, (0, 0, 0, 0), 1, 2, False),   # strided 1x1
    (1, 2, (4, 4), 2, (4, 4), 1, (0, 0, 0, 0), 1, 1, True),    # kernel == input
    (3, 3, (6, 5), 4, (3, 3), 1, (1, 1, 1, 1), 1, 1, True),    # batch split unevenly
    (5, 4, (5, 5), 4, (1, 1), 1, (0, 0, 0, 0), 1, 2, True),    # grouped pointwise
]


def conv_case_inputs(case):
    """(x, w, b or None, attrs, inputs) of a (n, c, spatial, m, kernel, strides, pads,
    dilations, groups, bias) case."""
    n, c, sp, m, k, s, pads, d, g, bias = case
    x = randn(n, c, *sp)
    w = randn(m, c // g, *k)
    b = randn(m) if bias else None
    return x, w, b, conv_attrs(k, s, pads, d, g), [x, w] + ([b] if bias else [])


@pytest.mark.parametrize("case", CONV2D_CASES)
def test_conv2d(case):
    n, c, sp, m, k, s, pads, d, g, bias = case
    x, w, b, attrs, ins = conv_case_inputs(case)
    check_forward("Conv", ins, attrs, rtol=1e-4, atol=1e-4)

    def fn(x, w, b=None):
        return F.conv2d(F.pad(x, torch_pad(pads)), w, b, stride=s, dilation=d, groups=g)

    check_backward("Conv", ins, fn, attrs)


# Several samples per GEMM (small planes: col [Kc, B*P]) and im2col_planned's modes (rows of
# a fixed width and stride, lookup table, plain row-wise copies), under 1 thread (one slot: the whole batch in a block), 2 and 3 (slots
# of uneven sizes, last block of a slot shorter). (N, C, spatial, M, kernel, stride, pads,
# dilation, group, bias)
CONV_BATCHED_CASES = [
    (5, 4, (4, 4), 6, (3, 3), 1, (1, 1, 1, 1), 1, 1, True),    # W3's last block: 4x4, padded
    (6, 3, (8, 8), 4, (3, 3), 2, (1, 1, 1, 1), 1, 1, False),   # strided
    (4, 4, (9, 7), 6, (3, 2), 1, (0, 1, 2, 0), 2, 2, True),    # asym pads, dilation, groups
    (5, 6, (5, 5), 4, (1, 1), 1, (0, 0, 0, 0), 1, 1, True),    # pointwise, gathered
    (4, 4, (6, 6), 4, (3, 3), 1, (0, 0, 0, 0), 1, 1, True),    # no padding: table reads X
    (7, 2, (3, 20), 3, (3, 3), 1, (1, 1, 1, 1), 1, 1, False),  # wide rows: row-wise im2col
    (3, 4, (16, 16), 4, (3, 3), 1, (1, 1, 1, 1), 1, 1, True),  # P = 256: two per GEMM
    (5, 3, (12,), 4, (3,), 2, (1, 1), 1, 1, True),             # 1D
    (4, 3, (5, 5), 4, (3, 3), 1, (1, 1, 1, 1), 1, 1, True),    # OW 5: lookup table, padded
    (4, 3, (10, 10), 4, (3, 3), 3, (1, 1, 1, 1), 1, 1, False), # stride 3: lookup table
    (1, 6, (6, 6), 4, (3, 3), 2, (1, 1, 1, 1), 1, 2, True),    # N = 1: channel blocks split
]


@pytest.fixture(params=[1, 2, 3], ids=lambda t: f"threads{t}")
def threads(request):
    before = _core.num_threads()
    _core.set_num_threads(request.param)
    yield request.param
    _core.set_num_threads(before)


@pytest.mark.parametrize("case", CONV_BATCHED_CASES)
def test_conv_batched(case, threads):
    n, c, sp, m, k, s, pads, d, g, bias = case
    x, w, b, attrs, ins = conv_case_inputs(case)
    check_forward("Conv", ins, attrs, rtol=1e-4, atol=1e-4)
    conv = F.conv2d if len(sp) == 2 else F.conv1d

    def fn(x, w, b=None):
        return conv(F.pad(x, torch_pad(pads)), w, b, stride=s, dilation=d, groups=g)

    check_backward("Conv", ins, fn, attrs)
    frozen_w = check_backward("Conv", ins, lambda x, w, b=None: fn(x, w.detach()), attrs,
                              const_inputs=[1] + ([2] if bias else []))
    assert frozen_w[0] is not None and frozen_w[1] is None
    frozen_x = check_backward("Conv", ins, lambda x, w, b=None: fn(x.detach(), w, b), attrs,
                              const_inputs=[0])
    assert frozen_x[0] is None and frozen_x[1] is not None


# Depthwise kernels: fused 3x3/5x5/7x7 interiors, dilation, tiny planes with no interior,
# a generic kernel size, asymmetric pads, strides. (C, spatial, mult, kernel, stride, pads, dil)
@pytest.mark.parametrize("case", [
    (3, (9, 10), 1, (5, 5), 1, (2, 2, 2, 2), 1),
    (2, (6, 6), 1, (5, 5), 1, (4, 4, 4, 4), 2),
    (2, (11, 12), 2, (7, 7), 1, (3, 2, 3, 4), 1),
    (4, (3, 2), 1, (3, 3), 1, (1, 1, 1, 1), 1),
    (3, (7, 8), 1, (3, 2), 1, (1, 0, 1, 1), 1),
    (3, (9, 9), 1, (4, 4), 2, (1, 2, 2, 1), 2),
])
def test_conv_depthwise(case):
    c, sp, mult, k, s, pads, d = case
    x = randn(2, c, *sp)
    w = randn(c * mult, 1, *k)
    b = randn(c * mult)
    attrs = conv_attrs(k, s, pads, d, c)
    check_forward("Conv", [x, w, b], attrs, rtol=1e-4, atol=1e-4)
    check_backward("Conv", [x, w, b], lambda x, w, b: F.conv2d(
        F.pad(x, torch_pad(pads)), w, b, stride=s, dilation=d, groups=c), attrs)


@pytest.mark.parametrize("case", [
    (2, 3, 10, 4, 3, 1, (1, 1), 1, 1, True),
    (2, 4, 11, 4, 3, 2, (0, 2), 2, 2, False),
    (1, 4, 9, 8, 5, 1, (2, 2), 1, 4, True),   # depthwise 1D
    (2, 3, 6, 5, 1, 1, (0, 0), 1, 1, True),   # pointwise 1D
])
def test_conv1d(case):
    n, c, L, m, k, s, pads, d, g, bias = case
    x = randn(n, c, L)
    w = randn(m, c // g, k)
    b = randn(m) if bias else None
    attrs = conv_attrs((k,), s, pads, d, g)
    ins = [x, w] + ([b] if bias else [])
    check_forward("Conv", ins, attrs, rtol=1e-4, atol=1e-4)
    check_backward("Conv", ins, lambda x, w, b=None: F.conv1d(
        F.pad(x, torch_pad(pads)), w, b, stride=s, dilation=d, groups=g), attrs)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("stride,group", [(1, 1), (2, 1), (2, 4)])
def test_conv_auto_pad(auto_pad, stride, group):
    x = randn(2, 4, 7, 8)
    w = randn(4, 4 // group, 3, 2)
    attrs = conv_attrs((3, 2), stride, dil=1, group=group, auto_pad=auto_pad)
    attrs.pop("kernel_shape")  # inferred from W
    check_forward("Conv", [x, w], attrs, rtol=1e-4, atol=1e-4)
    # Backward: rebuild the implied padding and compare with torch.
    ih, iw = 7, 8
    if auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = [0] * 4
        for a, (i, k) in enumerate([(ih, 3), (iw, 2)]):
            o = -(-i // stride)
            tot = max(0, (o - 1) * stride + k - i)
            lo = tot // 2 if auto_pad == "SAME_UPPER" else tot - tot // 2
            pads[a], pads[a + 2] = lo, tot - lo
    check_backward("Conv", [x, w], lambda x, w: F.conv2d(
        F.pad(x, torch_pad(pads)), w, stride=stride, groups=group), attrs)


@pytest.mark.parametrize("group", [1, 2, 6])
def test_conv_frozen_weight_gives_dx(group):
    x = randn(2, 6, 9, 9)
    w = randn(6, 6 // group, 3, 3)
    b = randn(6)
    attrs = conv_attrs((3, 3), 2, (1, 1, 1, 1), 1, group)
    grads = check_backward("Conv", [x, w, b], lambda x, w, b: F.conv2d(
        x, w.detach(), b.detach(), stride=2, padding=1, groups=group), attrs,
        const_inputs=[1, 2])
    assert grads[1] is None and grads[2] is None and grads[0] is not None


def test_conv_frozen_input_gives_dw():
    x = randn(2, 3, 8, 8)
    w = randn(4, 3, 3, 3)
    attrs = conv_attrs((3, 3), 1, (1, 1, 1, 1))
    grads = check_backward("Conv", [x, w], lambda x, w: F.conv2d(x.detach(), w, padding=1),
                           attrs, const_inputs=[0])
    assert grads[0] is None and grads[1] is not None


def test_conv_errors():
    x = randn(1, 4, 5, 5)
    with pytest.raises(_core.PyedgeError, match="channel mismatch"):
        _core.run_op("Conv", [x, randn(2, 3, 3, 3)], {})
    with pytest.raises(_core.PyedgeError, match="group 3 does not divide"):
        _core.run_op("Conv", [x, randn(3, 1, 3, 3)], {"group": 3})
    with pytest.raises(_core.PyedgeError, match="larger than the padded input"):
        _core.run_op("Conv", [x, randn(2, 4, 7, 7)], {})
    with pytest.raises(_core.PyedgeError, match="B has shape"):
        _core.run_op("Conv", [x, randn(2, 4, 3, 3), randn(3)], {})


# ---------------------------------------------------------------------------- pooling

# (shape, kernel, stride, pads, dilation, ceil_mode)
MAXPOOL_CASES = [
    ((2, 3, 8, 8), (2, 2), 2, (0, 0, 0, 0), 1, 0),
    ((2, 3, 9, 9), (3, 3), 2, (1, 1, 1, 1), 1, 0),
    ((1, 2, 9, 10), (3, 3), 2, (1, 1, 1, 1), 1, 1),
    ((2, 2, 10, 9), (3, 2), 2, (0, 0, 0, 0), 2, 1),
    ((1, 3, 7, 7), (2, 3), (1, 2), (1, 0, 1, 1), 1, 0),
]


@pytest.mark.parametrize("case", MAXPOOL_CASES)
def test_maxpool2d(case):
    shape, k, s, pads, d, ceil = case
    s = s if isinstance(s, tuple) else (s, s)
    x = randn(*shape)
    attrs = {"kernel_shape": list(k), "strides": list(s), "pads": list(pads),
             "dilations": [d, d], "ceil_mode": ceil}
    outs = check_forward("MaxPool", [x], attrs, n_outputs=2, opset=12, num_outputs=2)
    check_forward("MaxPool", [x], attrs, opset=12)  # no Indices: hidden int32 argmax
    if pads[0] == pads[2] and pads[1] == pads[3]:
        fn = lambda x: F.max_pool2d(x, k, s, (pads[0], pads[1]), d, ceil_mode=bool(ceil))
    else:
        assert not ceil
        fn = lambda x: F.max_pool2d(F.pad(x, torch_pad(pads), value=-np.inf), k, s, 0, d)
    g = randn(*outs[0].shape)
    check_backward("MaxPool", [x], fn, attrs, grad_outputs=[g, None], num_outputs=2)
    check_backward("MaxPool", [x], fn, attrs, grad_outputs=[g])


def test_maxpool1d_and_auto_pad():
    x = randn(2, 3, 11)
    attrs = {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}
    outs = check_forward("MaxPool", [x], attrs, n_outputs=2, num_outputs=2)
    check_backward("MaxPool", [x], lambda x: F.max_pool1d(x, 3, 2, 1), attrs,
                   grad_outputs=[randn(*outs[0].shape), None], num_outputs=2)
    check_backward("MaxPool", [x], lambda x: F.max_pool1d(x, 3, 2, 1), attrs)
    x2 = randn(1, 2, 7, 8)
    for ap in ["SAME_UPPER", "SAME_LOWER", "VALID"]:
        check_forward("MaxPool", [x2], {"kernel_shape": [3, 3], "strides": [2, 2],
                                        "auto_pad": ap}, n_outputs=2, num_outputs=2)


# Dense windows (no padding, dilation 1, every window inside X) take the fixed-size kernels:
# 2x2/2, 3x3/2, 2x2/1, 3x3/1, 1D k2/2 and k3/2; the rest of these stay on the generic path.
# (shape, kernel, strides, pads, ceil_mode)
MAXPOOL_DENSE_CASES = [
    ((2, 3, 9, 11), (2, 2), (2, 2), (0, 0, 0, 0), 0),    # odd sizes: last row/column unused
    ((2, 2, 9, 9), (3, 3), (2, 2), (0, 0, 0, 0), 0),
    ((1, 3, 6, 7), (3, 3), (1, 1), (0, 0, 0, 0), 0),
    ((1, 2, 5, 6), (2, 2), (1, 1), (0, 0, 0, 0), 0),
    ((2, 2, 8, 9), (2, 2), (3, 1), (0, 0, 0, 0), 0),     # row stride free, column stride 1
    ((2, 2, 9, 9), (2, 2), (2, 2), (0, 0, 0, 0), 1),     # ceil_mode overhangs: generic
    ((2, 2, 8, 8), (2, 2), (2, 2), (0, 0, 0, 0), 1),     # ceil_mode without overhang: dense
    ((2, 2, 9, 10), (3, 3), (2, 2), (1, 1, 1, 1), 0),    # padded: generic
    ((2, 2, 8, 9), (2, 3), (2, 2), (0, 0, 0, 0), 0),     # no fixed-size kernel: generic
    ((1, 1, 32, 32), (2, 2), (2, 2), (0, 0, 0, 0), 0),   # one plane, more rows than threads
]


@pytest.mark.parametrize("case", MAXPOOL_DENSE_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool2d_dense_and_generic(case, ties):
    shape, k, s, pads, ceil = case
    # ties: small integers, so windows often hold several maxima and the first must win
    x = RNG.integers(-2, 3, shape).astype(np.float32) if ties else randn(*shape)
    attrs = {"kernel_shape": list(k), "strides": list(s), "pads": list(pads), "ceil_mode": ceil}
    outs = check_forward("MaxPool", [x], attrs, n_outputs=2, opset=12, num_outputs=2)
    check_forward("MaxPool", [x], attrs, opset=12)
    if pads[0] == pads[2] and pads[1] == pads[3]:
        fn = lambda x: F.max_pool2d(x, k, s, (pads[0], pads[1]), ceil_mode=bool(ceil))
    if ties:
        # torch may route a tie's gradient to another maximum: scatter through ORT's Indices
        g = randn(*outs[0].shape)
        ref = np.zeros(x.size, np.float64)
        np.add.at(ref, outs[1].ravel(), g.ravel().astype(np.float64))
        for num_outputs in (1, 2):
            _, grads = _core.run_op("MaxPool", [x], attrs, opset=12, num_outputs=num_outputs,
                                    grad_outputs=[g] + [None] * (num_outputs - 1))
            np.testing.assert_allclose(grads[0].ravel(), ref, rtol=1e-6, atol=1e-6)
        return
    g = randn(*outs[0].shape)
    check_backward("MaxPool", [x], fn, attrs, grad_outputs=[g, None], num_outputs=2)
    check_backward("MaxPool", [x], fn, attrs, grad_outputs=[g])


@pytest.mark.parametrize("k,s,pads", [((2, 2), 2, (0, 0, 0, 0)), ((3, 3), 2, (0, 0, 0, 0)),
                                       ((3, 3), 2, (1, 1, 1, 1))])
def test_maxpool_nan_like_onnxruntime_indices(k, s, pads):
    """NaN: taps fold in row-major order with a strict '>', so a NaN first tap wins and later
    NaNs are skipped; onnxruntime's Indices kernel does the same (its kernel without Indices
    differs, so both of our outputs are compared with the Indices one)."""
    x = randn(2, 3, 9, 9)
    x[RNG.random(x.shape) < 0.15] = np.nan
    attrs = {"kernel_shape": list(k), "strides": [s, s], "pads": list(pads)}
    ref = ort_run("MaxPool", [x], attrs, opset=12, n_outputs=2)
    ours = pyedge_run("MaxPool", [x], attrs, opset=12, num_outputs=2)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])
    np.testing.assert_array_equal(pyedge_run("MaxPool", [x], attrs, opset=12)[0], ref[0])


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2), (3, 3)])
def test_maxpool1d_dense(k, s):
    x = randn(2, 3, 13)
    attrs = {"kernel_shape": [k], "strides": [s]}
    outs = check_forward("MaxPool", [x], attrs, n_outputs=2, num_outputs=2)
    check_forward("MaxPool", [x], attrs)
    g = randn(*outs[0].shape)
    fn = lambda x: F.max_pool1d(x, k, s)
    check_backward("MaxPool", [x], fn, attrs, grad_outputs=[g, None], num_outputs=2)
    check_backward("MaxPool", [x], fn, attrs, grad_outputs=[g])


def _conv_pool_conv_model(path, pool_attrs, seed=0):
    """x [2,3,8,8] -> Conv W1 (3->4, 3x3 pad 1) -> Relu -> MaxPool -> Conv W2 (4->5, 3x3 pad 1)
    -> GlobalAveragePool -> Flatten -> MatMul V (5->3): logits [2, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    w = {"W1": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3,
         "W2": rng.standard_normal((5, 4, 3, 3)).astype(np.float32) * 0.3,
         "V": rng.standard_normal((5, 3)).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p"], name="the_pool", **pool_attrs),
        helper.make_node("Conv", ["p", "W2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["f"]),
        helper.make_node("MatMul", ["f", "V"], ["logits"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [2, 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3])],
                          [numpy_helper.from_array(v, k) for k, v in w.items()])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return w


@pytest.mark.parametrize("pool", ["dense", "padded"])
@pytest.mark.parametrize("train", ["W1", "W2"])
def test_maxpool_in_training_session(tmp_path, pool, train):
    """train W1: the gradient crosses MaxPool (backward planned, argmax written); train W2:
    MaxPool is before the first trainable tensor (no backward, argmax skipped)."""
    import pyedge
    pool_attrs = ({"kernel_shape": [2, 2], "strides": [2, 2]} if pool == "dense" else
                  {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})
    p = str(tmp_path / "m.onnx")
    w = _conv_pool_conv_model(p, pool_attrs)
    sess = pyedge.TrainingSession(p, train=[train], loss="mse")
    stats = sess.plan_stats({"x": np.zeros((2, 3, 8, 8), np.float32)})
    assert ("the_pool" in stats["backward_nodes"]) == (train == "W1")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    y = rng.standard_normal((2, 3)).astype(np.float32)
    for _ in range(2):  # the plan is reused: the second step must agree as well
        sess.step({"x": x}, y, update=False)
    grads = sess.gradients()

    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=(k == train)) for k, v in w.items()}
    h = torch.relu(F.conv2d(torch.tensor(x, dtype=torch.float64), t["W1"], padding=1))
    if pool == "dense":
        h = F.max_pool2d(h, 2, 2)
    else:
        h = F.max_pool2d(h, 3, 2, 1)
    h = F.conv2d(h, t["W2"], padding=1).mean((2, 3))
    logits = h @ t["V"]
    np.testing.assert_allclose(sess.run({"x": x})["logits"], logits.detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    loss = F.mse_loss(logits, torch.tensor(y, dtype=torch.float64))
    loss.backward()
    ref = t[train].grad.numpy() * 2  # two accumulated steps
    np.testing.assert_allclose(grads[train], ref, rtol=1e-4, atol=1e-6)


# (shape, kernel, stride, pads, ceil_mode, count_include_pad)
AVGPOOL_CASES = [
    ((2, 3, 8, 8), (2, 2), 2, (0, 0, 0, 0), 0, 0),
    ((2, 3, 9, 9), (3, 3), 2, (1, 1, 1, 1), 0, 0),
    ((2, 3, 9, 9), (3, 3), 2, (1, 1, 1, 1), 0, 1),
    ((1, 2, 10, 9), (3, 3), 2, (1, 1, 1, 1), 1, 0),
    ((1, 2, 10, 9), (3, 3), 2, (1, 1, 1, 1), 1, 1),
    ((1, 2, 7, 8), (3, 2), 1, (0, 1, 2, 0), 0, 1),
]


@pytest.mark.parametrize("case", AVGPOOL_CASES)
def test_avgpool2d(case):
    shape, k, s, pads, ceil, incl = case
    x = randn(*shape)
    attrs = {"kernel_shape": list(k), "strides": [s, s], "pads": list(pads), "ceil_mode": ceil,
             "count_include_pad": incl}
    check_forward("AveragePool", [x], attrs, opset=19)
    if pads[0] == pads[2] and pads[1] == pads[3]:
        fn = lambda x: F.avg_pool2d(x, k, s, (pads[0], pads[1]), ceil_mode=bool(ceil),
                                    count_include_pad=bool(incl))
    else:
        assert incl and not ceil
        fn = lambda x: F.avg_pool2d(F.pad(x, torch_pad(pads)), k, s)
    check_backward("AveragePool", [x], fn, attrs)


def test_avgpool1d_dilated_and_auto_pad():
    x = randn(2, 3, 12)
    attrs = {"kernel_shape": [3], "strides": [2], "pads": [1, 1], "count_include_pad": 1}
    check_forward("AveragePool", [x], attrs)
    check_backward("AveragePool", [x], lambda x: F.avg_pool1d(x, 3, 2, 1), attrs)
    x2 = randn(1, 2, 9, 9)
    check_forward("AveragePool", [x2], {"kernel_shape": [3, 3], "dilations": [2, 2],
                                        "pads": [1, 1, 1, 1]}, opset=19)
    for ap in ["SAME_UPPER", "SAME_LOWER", "VALID"]:
        check_forward("AveragePool", [x2], {"kernel_shape": [2, 3], "strides": [2, 2],
                                            "auto_pad": ap})


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (2, 4, 7), (1, 2, 2, 3, 4)])
def test_global_pools(shape):
    x = randn(*shape)
    axes = tuple(range(2, len(shape)))
    check_forward("GlobalAveragePool", [x])
    check_backward("GlobalAveragePool", [x], lambda x: x.mean(axes, keepdim=True))
    check_forward("GlobalMaxPool", [x])
    check_backward("GlobalMaxPool", [x], lambda x: x.amax(axes, keepdim=True))


def test_pool_errors():
    x = randn(1, 2, 4, 4)
    with pytest.raises(_core.PyedgeError, match="kernel_shape"):
        _core.run_op("MaxPool", [x], {})
    with pytest.raises(_core.PyedgeError, match="larger than the padded input"):
        _core.run_op("AveragePool", [x], {"kernel_shape": [5, 5]})
    with pytest.raises(_core.PyedgeError, match="kernel_shape has 1 dims"):
        _core.run_op("MaxPool", [x], {"kernel_shape": [2]})


# ---------------------------------------------------------------------------- batchnorm

def bn_inputs(shape):
    c = shape[1]
    return [randn(*shape) * 2 + 0.5, randn(c), randn(c),
            randn(c) * 0.1, (RNG.random(c) + 0.5).astype(np.float32)]


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4), (2, 5, 7)])
@pytest.mark.parametrize("opset", [9, 15])
def test_batchnorm_inference(shape, opset):
    ins = bn_inputs(shape)
    attrs = {"epsilon": 1e-3}
    check_forward("BatchNormalization", ins, attrs, opset=opset)
    grads = check_backward(
        "BatchNormalization", ins, lambda x, s, b, m, v: F.batch_norm(
            x, m.detach(), v.detach(), s, b, training=False, eps=1e-3), attrs, opset=opset)
    assert grads[3] is None and grads[4] is None


def bn_train_reference(x, s, b, m, v, eps, mom):
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mu, var = x.mean(axes), x.var(axes)
    sh = (1, -1) + (1,) * (x.ndim - 2)
    y = s.reshape(sh) * (x - mu.reshape(sh)) / np.sqrt(var.reshape(sh) + eps) + b.reshape(sh)
    return y, m * mom + mu * (1 - mom), v * mom + var * (1 - mom)


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (8, 5), (3, 4, 9)])
def test_batchnorm_training(shape):
    ins = bn_inputs(shape)
    attrs = {"epsilon": 1e-5, "momentum": 0.8, "training_mode": 1}
    check_forward("BatchNormalization", ins, attrs, opset=15, n_outputs=3, num_outputs=3,
                  rtol=1e-4, atol=1e-4)
    ref = bn_train_reference(*[a.astype(np.float64) for a in ins], 1e-5, 0.8)
    for k in (1, 2):
        outs, _ = _core.run_op("BatchNormalization", ins, attrs, opset=15, num_outputs=k)
        assert len(outs) == k
        for o, r in zip(outs, ref):
            np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4)
    g = randn(*shape)
    torch_fn = lambda x, s, b, m, v: F.batch_norm(x, None, None, s, b, training=True, eps=1e-5)
    grads = check_backward("BatchNormalization", ins, torch_fn, attrs, opset=15)
    assert all(gr is not None for gr in grads[:3]) and grads[3] is None
    check_backward("BatchNormalization", ins, lambda *a: (torch_fn(*a),), attrs, opset=15,
                   grad_outputs=[g, None, None], num_outputs=3)
    # Frozen scale and bias: dX alone still matches.
    check_backward(
        "BatchNormalization", ins, lambda x, s, b, m, v: F.batch_norm(
            x, None, None, s.detach(), b.detach(), training=True, eps=1e-5),
        attrs, opset=15, const_inputs=[1, 2])


def test_batchnorm_errors():
    ins = bn_inputs((2, 3, 4))
    ins[1] = randn(4)
    with pytest.raises(_core.PyedgeError, match="scale has shape"):
        _core.run_op("BatchNormalization", ins, {})
    with pytest.raises(_core.PyedgeError, match="need training mode"):
        _core.run_op("BatchNormalization", bn_inputs((2, 3)), {}, num_outputs=3)
    with pytest.raises(_core.PyedgeError, match="opset 14"):
        _core.run_op("BatchNormalization", bn_inputs((2, 3)), {"training_mode": 1}, opset=12)
