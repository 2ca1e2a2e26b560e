"""Ops that imports of real models needed (issue 19): InstanceNormalization (wav2vec2's
group-norm feature extractor), pools whose ceil_mode window reaches past the input
(EfficientNet's pooler), Pad's edge / reflect / wrap modes. Forward against onnxruntime,
backward against torch autograd in float64 and against central finite differences."""
import numpy as np
import pytest

from opcheck import check_backward, check_forward
from pyedge import _core

RNG = np.random.default_rng(19)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def ints(*v):
    return np.array(v, np.int64)


def fd_grad(f, xs, g, i, eps=1e-3):
    """d/dx_i sum(f(xs) * g) by central differences, float64."""
    xs = [np.asarray(x, np.float64) for x in xs]
    grad = np.zeros_like(xs[i])
    for k in range(xs[i].size):
        for sgn in (1, -1):
            ys = [x.copy() for x in xs]
            ys[i].flat[k] += sgn * eps
            grad.flat[k] += sgn * (f(*ys) * g).sum() / (2 * eps)
    return grad


# ------------------------------------------------------------------ InstanceNormalization
def np_instancenorm(x, s, b, eps=1e-5):
    ax = tuple(range(2, x.ndim))
    mu = x.mean(ax, keepdims=True)
    var = ((x - mu) ** 2).mean(ax, keepdims=True)
    shp = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mu) / np.sqrt(var + eps) * s.reshape(shp) + b.reshape(shp)


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 4, 3, 5), (1, 2, 2, 2, 3)])
def test_instancenorm_forward_backward(shape):
    import torch.nn.functional as F
    x = randn(*shape) * 3 + 2
    s, b = randn(shape[1]), randn(shape[1])
    check_forward("InstanceNormalization", [x, s, b], {"epsilon": 1e-3}, rtol=1e-4, atol=1e-5)
    check_backward("InstanceNormalization", [x, s, b],
                   lambda x, s, b: F.instance_norm(x, weight=s, bias=b, eps=1e-3),
                   {"epsilon": 1e-3})


@pytest.mark.arm64
def test_instancenorm_finite_differences():
    x, s, b = randn(2, 3, 5), randn(3), randn(3)
    g = randn(2, 3, 5)
    outs, grads = _core.run_op("InstanceNormalization", [x, s, b], {}, grad_outputs=[g])
    np.testing.assert_allclose(outs[0], np_instancenorm(x, s, b), rtol=1e-4, atol=1e-5)
    for i in range(3):
        ref = fd_grad(np_instancenorm, [x, s, b], g, i)
        np.testing.assert_allclose(grads[i], ref, rtol=2e-3, atol=2e-3)


def test_instancenorm_large_mean_plane():
    """A long plane with a large mean: the statistics in double keep the variance."""
    x = (randn(1, 2, 4000) + 1000).astype(np.float32)
    s, b = np.ones(2, np.float32), np.zeros(2, np.float32)
    check_forward("InstanceNormalization", [x, s, b], rtol=1e-3, atol=2e-3)


def test_instancenorm_errors():
    with pytest.raises(_core.PyedgeError, match="scale has shape"):
        _core.run_op("InstanceNormalization", [randn(1, 3, 4), randn(2), randn(3)])
    with pytest.raises(_core.PyedgeError, match="spatial"):
        _core.run_op("InstanceNormalization", [randn(2, 3), randn(3), randn(3)])


# ------------------------------------------------- pooling: ceil_mode windows past the input
@pytest.mark.parametrize("op", ["AveragePool", "MaxPool"])
@pytest.mark.parametrize("incl", [0, 1])
def test_pool_ceil_window_larger_than_input(op, incl):
    """EfficientNet's pooler: AvgPool2d(1280, ceil_mode=True) over a 7x7 map gives 1x1."""
    import torch
    import torch.nn.functional as F
    x = randn(2, 3, 7, 5)
    attrs = {"kernel_shape": [16, 16], "strides": [16, 16], "ceil_mode": 1}
    if op == "AveragePool":
        attrs["count_include_pad"] = incl
    elif incl:
        pytest.skip("count_include_pad is AveragePool's")
    out = check_forward(op, [x], attrs)
    assert out[0].shape == (2, 3, 1, 1)
    if op == "AveragePool":
        fn = lambda x: F.avg_pool2d(x, 16, 16, ceil_mode=True, count_include_pad=bool(incl))
    else:
        fn = lambda x: F.max_pool2d(x, 16, 16, ceil_mode=True)
    np.testing.assert_allclose(out[0], fn(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    check_backward(op, [x], fn, attrs)


def test_pool_ceil_partial_last_window():
    """ceil_mode with a stride: a last window that is partly outside, 1-D and 2-D."""
    import torch.nn.functional as F
    x = randn(1, 2, 9)
    attrs = {"kernel_shape": [4], "strides": [3], "ceil_mode": 1}
    check_forward("AveragePool", [x], attrs)
    check_backward("AveragePool", [x],
                   lambda x: F.avg_pool1d(x, 4, 3, ceil_mode=True, count_include_pad=False),
                   attrs)
    x2 = randn(1, 2, 6, 6)
    a2 = {"kernel_shape": [4, 4], "strides": [3, 3], "ceil_mode": 1}
    check_forward("MaxPool", [x2], a2)
    check_backward("MaxPool", [x2], lambda x: F.max_pool2d(x, 4, 3, ceil_mode=True), a2)


def test_pool_window_too_large_without_ceil_mode():
    with pytest.raises(_core.PyedgeError, match="larger than the padded input"):
        _core.run_op("AveragePool", [randn(1, 2, 4, 4)],
                     {"kernel_shape": [9, 9], "strides": [9, 9]})


# ---------------------------------------------------------------- Pad edge / reflect / wrap
def np_pad(x, pads, mode):
    r = x.ndim
    width = [(pads[a], pads[a + r]) for a in range(r)]
    return np.pad(x, width, mode={"edge": "edge", "reflect": "reflect", "wrap": "wrap"}[mode])


@pytest.mark.parametrize("mode", ["edge", "reflect", "wrap"])
def test_pad_modes_forward_backward(mode):
    import torch
    x = randn(2, 3, 4, 5)
    pads = ints(0, 0, 2, 1, 0, 0, 1, 3)
    check_forward("Pad", [x, pads], {"mode": mode}, opset=19)
    # torch's F.pad wants (last axis first) (w0, w1, h0, h1) for 4-D input
    tmode = {"edge": "replicate", "reflect": "reflect", "wrap": "circular"}[mode]
    check_backward("Pad", [x, pads],
                   lambda x, p: torch.nn.functional.pad(x, (1, 3, 2, 1), mode=tmode),
                   {"mode": mode}, opset=19)


@pytest.mark.arm64
@pytest.mark.parametrize("mode", ["edge", "reflect", "wrap"])
def test_pad_modes_numpy_and_finite_differences(mode):
    x = randn(3, 4)
    pads = [1, 2, 2, 3]  # wider than reflect's single period on axis 0 is numpy's too
    g = randn(3 + 1 + 2, 4 + 2 + 3)
    outs, grads = _core.run_op("Pad", [x, ints(*pads)], {"mode": mode}, opset=19,
                               grad_outputs=[g])
    np.testing.assert_array_equal(outs[0], np_pad(x, pads, mode))
    ref = fd_grad(lambda x: np_pad(x, pads, mode), [x], g, 0)
    np.testing.assert_allclose(grads[0], ref, rtol=1e-3, atol=1e-3)


def test_pad_modes_other_dtypes_and_axes():
    x = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    for mode in ("edge", "reflect", "wrap"):
        check_forward("Pad", [x, ints(1, 2, 0, 1), None, ints(1, 2)], {"mode": mode}, opset=19)
        out = check_forward("Pad", [x.astype(np.uint8), ints(0, 1, 1, 0, 2, 1)],
                            {"mode": mode}, opset=19)
        np.testing.assert_array_equal(out[0], np_pad(x.astype(np.uint8), [0, 1, 1, 0, 2, 1],
                                                     mode))


def test_pad_edge_of_empty_axis_is_an_error():
    with pytest.raises(_core.PyedgeError, match="empty"):
        _core.run_op("Pad", [np.zeros((0, 3), np.float32), ints(1, 0, 1, 0)],
                     {"mode": "edge"}, opset=19)


# ------------------------------------------------------------------------------ 3-D pools
@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [2, 2, 2], "strides": [2, 2, 2]},
    {"kernel_shape": [3, 2, 3], "strides": [1, 2, 2], "pads": [1, 0, 1, 1, 1, 0]},
    {"kernel_shape": [2, 3, 2], "strides": [2, 2, 1], "ceil_mode": 1},
    {"kernel_shape": [2, 2, 2], "dilations": [2, 1, 2]},
])
def test_pool_3d_forward_backward(attrs):
    import torch.nn.functional as F
    x = randn(2, 3, 5, 6, 5)
    pads = attrs.get("pads", [0] * 6)
    check_forward("MaxPool", [x], attrs, opset=19)
    check_forward("AveragePool", [x], attrs, opset=19)  # dilations: opset 19
    if pads[:3] != pads[3:]:
        return  # torch takes symmetric padding only; the forward above covers it
    k, s = attrs["kernel_shape"], attrs.get("strides", [1, 1, 1])
    d, p, c = attrs.get("dilations", [1, 1, 1]), pads[:3], bool(attrs.get("ceil_mode", 0))
    check_backward("MaxPool", [x], lambda x: F.max_pool3d(x, k, s, p, d, ceil_mode=c), attrs)
    if d == [1, 1, 1]:
        check_backward("AveragePool", [x],
                       lambda x: F.avg_pool3d(x, k, s, p, ceil_mode=c, count_include_pad=False),
                       attrs)


def test_pool_3d_indices_and_count_include_pad():
    x = randn(1, 2, 4, 4, 4)
    check_forward("MaxPool", [x], {"kernel_shape": [2, 2, 2], "strides": [2, 2, 2]},
                  n_outputs=2, num_outputs=2)
    check_forward("AveragePool", [x], {"kernel_shape": [3, 3, 3], "pads": [1] * 6,
                                       "count_include_pad": 1})


@pytest.mark.arm64
def test_pool_3d_average_finite_differences():
    x = randn(1, 1, 3, 4, 3)
    attrs = {"kernel_shape": [2, 2, 2], "strides": [1, 2, 1]}
    g = randn(1, 1, 2, 2, 2)

    def ref(x):
        y = np.zeros((1, 1, 2, 2, 2))
        for a in range(2):
            for b in range(2):
                for c in range(2):
                    y[0, 0, a, b, c] = x[0, 0, a:a + 2, 2 * b:2 * b + 2, c:c + 2].mean()
        return y
    outs, grads = _core.run_op("AveragePool", [x], attrs, grad_outputs=[g])
    np.testing.assert_allclose(outs[0], ref(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[0], fd_grad(ref, [x], g, 0), rtol=1e-3, atol=1e-3)


def test_tile_past_the_memory_limit_is_refused_before_allocating():
    """Found by the CI fuzz run: Tile(64x64, repeats [2^20, 2^10]) allocated one int64 per
    tile (8 GB) while planning, before any memory check: the process was killed."""
    with pytest.raises(_core.PyedgeError, match="over the plan memory limit"):
        _core.run_op("Tile", [randn(64, 64), ints(1 << 20, 1 << 10)])
