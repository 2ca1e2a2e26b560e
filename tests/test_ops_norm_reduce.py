"""Softmax/LogSoftmax, LayerNormalization and Reduce*: forward vs onnxruntime, backward vs torch."""
import numpy as np
import pytest
from optional_deps import optional
torch = optional("torch")

from opcheck import check_backward, check_forward
from pyedge import _core

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- Softmax / LogSoftmax

def _torch_softmax(op, opset, axis, shape):
    f = torch.softmax if op == "Softmax" else torch.log_softmax
    r = len(shape)
    if opset >= 13:
        return lambda x: f(x, axis)
    a = axis % r  # legacy: flatten to 2D at axis, softmax over the second dim

    def g(x):
        lead = int(np.prod(shape[:a])) if a else 1
        return f(x.reshape(lead, -1), 1).reshape(shape)
    return g


SOFTMAX_CASES = [
    # (shape, attrs)
    ((3, 7), {}),
    ((2, 3, 5), {}),
    ((2, 3, 5), {"axis": 1}),
    ((2, 3, 5), {"axis": 0}),
    ((2, 3, 4, 5), {"axis": -2}),
    ((4, 37), {"axis": -1}),
    ((1, 1), {}),
]


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("shape,attrs", SOFTMAX_CASES)
def test_softmax_forward_backward(op, opset, shape, attrs):
    x = randn(*shape) * 3
    check_forward(op, [x], attrs, opset=opset)
    axis = attrs.get("axis", -1 if opset >= 13 else 1)
    check_backward(op, [x], _torch_softmax(op, opset, axis, shape), attrs, opset=opset)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_stable_and_masked(op):
    x = np.array([[1000.0, 1001.0, -1000.0, 0.0], [0.0, -np.inf, 3.0, -np.inf]], np.float32)
    out = check_forward(op, [x], {"axis": -1}, opset=13)[0]
    assert np.isfinite(out[0]).all()
    if op == "Softmax":
        assert out[1, 1] == 0.0 and out[1, 3] == 0.0


def test_softmax_large_rows():
    x = randn(6, 50257) * 4
    check_forward("Softmax", [x], {}, opset=13, atol=1e-6)
    check_forward("LogSoftmax", [x], {}, opset=13, atol=1e-4)


def test_softmax_bad_axis():
    with pytest.raises(_core.PyedgeError, match="axis"):
        _core.run_op("Softmax", [randn(2, 3)], {"axis": 2}, opset=13)


# ---------------------------------------------------------------- LayerNormalization

LN_CASES = [
    ((4, 8), -1, True),
    ((2, 5, 16), -1, True),
    ((2, 5, 16), -1, False),
    ((2, 3, 4, 6), 2, True),
    ((3, 37), 1, True),
    ((64, 768), -1, True),
]


@pytest.mark.parametrize("shape,axis,bias", LN_CASES)
def test_layernorm(shape, axis, bias):
    x = randn(*shape) * 2 + 0.5
    nshape = shape[axis:]
    w = randn(*nshape)
    b = randn(*nshape) if bias else None
    attrs = {"axis": axis, "epsilon": 1e-5}
    inputs = [x, w, b] if bias else [x, w]
    check_forward("LayerNormalization", inputs, attrs, opset=17, n_outputs=3, atol=1e-4)

    def torch_fn(x, w, b=None):
        return torch.nn.functional.layer_norm(x, list(nshape), w, b, 1e-5)
    gy = randn(*shape)
    check_backward("LayerNormalization", inputs, torch_fn, attrs, opset=17,
                   grad_outputs=[gy, None, None])


def test_layernorm_frozen_params_only_dx():
    x, w, b = randn(4, 8), randn(8), randn(8)
    gy = randn(4, 8)
    # w, b as plan-time constants: no gradient for them, dX still right
    _, grads = _core.run_op("LayerNormalization", [x, w, b], {}, opset=17,
                            grad_outputs=[gy, None, None], const_inputs=[1, 2])
    assert grads[1] is None and grads[2] is None
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.layer_norm(xt, [8], torch.tensor(w, dtype=torch.float64),
                                       torch.tensor(b, dtype=torch.float64), 1e-5)
    (y * torch.tensor(gy, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(grads[0], xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_layernorm_frozen_input_only_param_grads():
    # X a plan-time constant: the backward computes only dScale/dB (no dX pass); D = 37 has
    # a column tail after the SIMD vectors, 40 rows make several row blocks
    x, w, b = randn(40, 37) * 2 + 0.5, randn(37), randn(37)
    gy = randn(40, 37)
    _, grads = _core.run_op("LayerNormalization", [x, w, b], {}, opset=17,
                            grad_outputs=[gy, None, None], const_inputs=[0])
    assert grads[0] is None
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.layer_norm(torch.tensor(x, dtype=torch.float64), [37], wt, bt, 1e-5)
    (y * torch.tensor(gy, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(grads[1], wt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[2], bt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_layernorm_bad_scale_shape():
    with pytest.raises(_core.PyedgeError, match="Scale"):
        _core.run_op("LayerNormalization", [randn(2, 8), randn(7)], {}, opset=17)


# ---------------------------------------------------------------- Reduce*

REDUCE_OPS = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
              "ReduceSumSquare", "ReduceL2"]
REDUCE_CASES = [
    # (shape, axes, keepdims)
    ((3, 4), [1], 1),
    ((3, 4), [0], 0),
    ((2, 3, 4), [-1], 1),
    ((2, 3, 4), [1], 0),
    ((2, 3, 4, 5), [0, 2], 1),
    ((2, 3, 4, 5), [1, 3], 0),
    ((2, 1, 4, 5), [1, 2], 1),
    ((2, 3, 4), None, 1),       # all axes
    ((2, 3, 4), None, 0),
    ((5, 100000), [1], 1),      # long rows
    ((200000,), [0], 0),        # full reduction, parallel blocks
]


def _axes_input_opset(op):
    return 13 if op == "ReduceSum" else 18


def _run_reduce_forward(op, x, axes, keep, opset, **kw):
    attrs = {"keepdims": keep}
    if opset >= _axes_input_opset(op):
        inputs = [x] if axes is None else [x, np.array(axes, np.int64)]
    else:
        inputs = [x]
        if axes is not None:
            attrs["axes"] = axes
    return check_forward(op, inputs, attrs, opset=opset, **kw)


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("shape,axes,keep", REDUCE_CASES)
def test_reduce_forward(op, opset, shape, axes, keep):
    x = randn(*shape)
    if op == "ReduceProd":
        x = (1 + 0.01 * x).astype(np.float32)
    big = int(np.prod(shape)) > 10000
    _run_reduce_forward(op, x, axes, keep, opset, rtol=1e-4 if big else 1e-5,
                        atol=1e-3 if big else 1e-5)


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_reduce_int(op, dtype):
    x = rng.integers(-5, 6, size=(3, 4, 5)).astype(dtype)
    if op == "ReduceProd":
        x = rng.choice([1, 1, 1, 1, -1, 2], size=(3, 4, 5)).astype(dtype)  # no overflow
    for axes, keep in [([1], 1), ([0, 2], 0), (None, 1)]:
        _run_reduce_forward(op, x, axes, keep, 18)


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax"])
def test_reduce_noop_with_empty_axes(op):
    x = randn(3, 4)
    out = check_forward(op, [x], {"noop_with_empty_axes": 1}, opset=18)[0]
    np.testing.assert_array_equal(out, x)
    _, g = _core.run_op(op, [x], {"noop_with_empty_axes": 1}, opset=18,
                        grad_outputs=[np.ones_like(x)])
    np.testing.assert_array_equal(g[0], np.ones_like(x))
    # an empty axes input with the flag off reduces everything
    check_forward(op, [x, np.zeros(0, np.int64)], {"keepdims": 0}, opset=18)


TORCH_REDUCE = {
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, dim=d, keepdim=k),
}


@pytest.mark.parametrize("op", list(TORCH_REDUCE))
@pytest.mark.parametrize("shape,axes,keep", [c for c in REDUCE_CASES if np.prod(c[0]) < 1000]
                         + [((70000,), [0], 0), ((3, 2000), [0], 1)])
def test_reduce_backward(op, shape, axes, keep):
    x = randn(*shape)
    if op in ("ReduceMax", "ReduceMin"):
        x = np.round(x * 2).astype(np.float32)  # many ties: the gradient is split evenly
    dims = list(range(len(shape))) if axes is None else axes
    fn = TORCH_REDUCE[op]
    opset = _axes_input_opset(op)
    inputs = [x] if axes is None else [x, np.array(axes, np.int64)]
    check_backward(op, inputs, lambda x, *a: fn(x, dims, bool(keep)), {"keepdims": keep},
                   opset=opset)


def test_reduce_errors():
    x = randn(2, 3)
    with pytest.raises(_core.PyedgeError, match="out of range"):
        _core.run_op("ReduceSum", [x, np.array([2], np.int64)], {}, opset=13)
    with pytest.raises(_core.PyedgeError, match="twice"):
        _core.run_op("ReduceMean", [x], {"axes": [1, -1]}, opset=13)
    with pytest.raises(_core.PyedgeError, match="float32"):
        _core.run_op("ReduceL2", [np.ones((2, 3), np.int64)], {}, opset=13)
    with pytest.raises(_core.PyedgeError, match="known when the plan is built"):
        _core.run_op("ReduceMax", [x, np.array([1.0], np.float32)], {}, opset=18)
