"""Losses: pyedge.CrossEntropyLoss / pyedge.MSELoss (forward and backward vs torch) and ONNX
SoftmaxCrossEntropyLoss (forward vs onnxruntime, backward vs torch)."""
import numpy as np
import pytest
from optional_deps import optional
torch = optional("torch")
F = optional("torch.nn.functional")

from opcheck import check_backward, check_forward
from pyedge import _core

rng = np.random.default_rng(1)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def run_pyedge(op, inputs, attrs, dout=1.0):
    outs, grads = _core.run_op(op, inputs, attrs, domain="pyedge",
                               grad_outputs=[np.array(dout, np.float32)])
    assert outs[0].shape == () and outs[0].dtype == np.float32
    return outs[0], grads


# ---------------------------------------------------------------- pyedge.CrossEntropyLoss

def torch_ce(logits, labels, attrs, dout):
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(labels.astype(np.int64))
    xs, ys = x, y
    if attrs.get("shift", 0):
        xs, ys = x[..., :-1, :], y[..., 1:]
    loss = F.cross_entropy(xs.reshape(-1, x.shape[-1]), ys.reshape(-1),
                           ignore_index=attrs.get("ignore_index", -100),
                           label_smoothing=attrs.get("label_smoothing", 0.0),
                           reduction=attrs.get("reduction", "mean"))
    (loss * dout).backward()
    return loss.item(), x.grad.numpy()


CE_CASES = [
    # (logits shape, attrs, fraction of ignored labels)
    ((8, 5), {}, 0.0),
    ((8, 5), {}, 0.3),
    ((2, 6, 11), {}, 0.2),
    ((2, 6, 11), {"shift": 1}, 0.0),
    ((3, 7, 13), {"shift": 1}, 0.3),
    ((16, 10), {"label_smoothing": 0.1}, 0.25),
    ((2, 5, 9), {"label_smoothing": 0.2, "shift": 1}, 0.2),
    ((12, 7), {"reduction": "sum"}, 0.2),
    ((12, 7), {"ignore_index": 3}, 0.0),
    ((4, 3000), {}, 0.0),       # wide vocabulary rows
    ((300, 17), {}, 0.1),       # many rows (parallel)
]


@pytest.mark.parametrize("shape,attrs,ign", CE_CASES)
@pytest.mark.parametrize("label_dtype", [np.int64, np.int32])
def test_cross_entropy(shape, attrs, ign, label_dtype):
    logits = randn(*shape) * 3
    C = shape[-1]
    labels = rng.integers(0, C, size=shape[:-1])
    ii = attrs.get("ignore_index", -100)
    labels[rng.random(labels.shape) < ign] = ii
    labels = labels.astype(label_dtype)
    dout = 0.7
    loss, grads = run_pyedge("CrossEntropyLoss", [logits, labels], attrs, dout)
    ref_loss, ref_grad = torch_ce(logits, labels, attrs, dout)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads[1] is None  # labels take no gradient
    np.testing.assert_allclose(grads[0], ref_grad, rtol=1e-4, atol=1e-6)


def test_cross_entropy_llm_sized_row():
    logits = randn(2, 3, 50257) * 2
    labels = rng.integers(0, 50257, size=(2, 3))
    attrs = {"shift": 1}
    loss, grads = run_pyedge("CrossEntropyLoss", [logits, labels], attrs)
    ref_loss, ref_grad = torch_ce(logits, labels, attrs, 1.0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grads[0], ref_grad, rtol=1e-3, atol=1e-8)
    assert not grads[0][:, -1].any()  # the last position predicts nothing


def test_cross_entropy_all_ignored_is_zero():
    # torch gives NaN here; pyedge gives loss 0 and no gradient (a batch of pure padding)
    logits = randn(4, 6)
    labels = np.full(4, -100, np.int64)
    loss, grads = run_pyedge("CrossEntropyLoss", [logits, labels], {})
    assert loss == 0.0
    assert not grads[0].any()


def test_cross_entropy_large_logits_stable():
    logits = np.array([[1000.0, 1001.0, -1000.0], [-5e4, 0.0, 5e4]], np.float32)
    labels = np.array([1, 0], np.int64)
    loss, grads = run_pyedge("CrossEntropyLoss", [logits, labels], {})
    ref_loss, ref_grad = torch_ce(logits, labels, {}, 1.0)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grads[0], ref_grad, atol=1e-6)


@pytest.mark.parametrize("bad", [5, -1, 99])
def test_cross_entropy_label_out_of_range(bad):
    logits = randn(4, 5)
    labels = np.array([0, 1, bad, 2], np.int64)
    with pytest.raises(_core.PyedgeError, match=rf"CrossEntropyLoss node 'test'.*label {bad}\b"):
        _core.run_op("CrossEntropyLoss", [logits, labels], {}, domain="pyedge")


def test_cross_entropy_bad_shapes_and_attrs():
    with pytest.raises(_core.PyedgeError, match="labels shape"):
        _core.run_op("CrossEntropyLoss", [randn(4, 5), np.zeros(3, np.int64)], {},
                     domain="pyedge")
    with pytest.raises(_core.PyedgeError, match="int64 or int32"):
        _core.run_op("CrossEntropyLoss", [randn(4, 5), np.zeros(4, np.float32)], {},
                     domain="pyedge")
    with pytest.raises(_core.PyedgeError, match="reduction"):
        _core.run_op("CrossEntropyLoss", [randn(4, 5), np.zeros(4, np.int64)],
                     {"reduction": "none"}, domain="pyedge")


# ---------------------------------------------------------------- pyedge.MSELoss

@pytest.mark.parametrize("shape_p,shape_t", [((8, 3), (8, 3)), ((7,), (7,)), ((6, 1), (6,)),
                                             ((100000,), (100000,))])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mse(shape_p, shape_t, reduction):
    p, t = randn(*shape_p), randn(*shape_t)
    loss, grads = run_pyedge("MSELoss", [p, t], {"reduction": reduction}, 1.3)
    pt = torch.tensor(p, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    ref = F.mse_loss(pt.reshape(-1), tt.reshape(-1), reduction=reduction)
    (ref * 1.3).backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)
    np.testing.assert_allclose(grads[0], pt.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grads[1], tt.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_mse_constant_target_and_errors():
    p, t = randn(5, 2), randn(5, 2)
    _, grads = _core.run_op("MSELoss", [p, t], {}, domain="pyedge",
                            grad_outputs=[np.array(1.0, np.float32)], const_inputs=[1])
    assert grads[1] is None and grads[0] is not None
    with pytest.raises(_core.PyedgeError, match="differ"):
        _core.run_op("MSELoss", [randn(4, 2), randn(2, 4)], {}, domain="pyedge")


# ---------------------------------------------------------------- SoftmaxCrossEntropyLoss

SCE_CASES = [
    # (scores shape, attrs, weights?, fraction ignored)
    ((6, 5), {}, False, 0.0),
    ((6, 5), {"reduction": "sum"}, False, 0.0),
    ((6, 5), {"reduction": "none"}, False, 0.0),
    ((6, 5), {"ignore_index": 2}, False, 0.0),
    ((8, 5), {"ignore_index": -1}, True, 0.3),
    ((3, 4, 7), {}, False, 0.0),                      # [N, C, d1]: class axis 1
    ((2, 4, 3, 5), {"ignore_index": -1, "reduction": "none"}, True, 0.2),
    ((2, 4, 3, 5), {"ignore_index": -1, "reduction": "sum"}, False, 0.2),
]


def _sce_inputs(shape, attrs, weights, ign):
    scores = randn(*shape) * 2
    C = shape[1]
    labels = rng.integers(0, C, size=(shape[0],) + shape[2:]).astype(np.int64)
    if "ignore_index" in attrs:
        labels[rng.random(labels.shape) < ign] = attrs["ignore_index"]
    w = (rng.random(C) + 0.5).astype(np.float32) if weights else None
    return [scores, labels] + ([w] if weights else [])


@pytest.mark.parametrize("shape,attrs,weights,ign", SCE_CASES)
def test_softmax_cross_entropy(shape, attrs, weights, ign):
    inputs = _sce_inputs(shape, attrs, weights, ign)
    check_forward("SoftmaxCrossEntropyLoss", inputs, attrs, opset=13, n_outputs=2, num_outputs=2)
    red = attrs.get("reduction", "mean")
    ii = attrs.get("ignore_index", -100)

    def torch_fn(x, y, w=None):
        w = None if w is None else w.detach()
        loss = F.cross_entropy(x, y, weight=w, ignore_index=ii, reduction=red)
        return loss, torch.log_softmax(x, 1)
    check_backward("SoftmaxCrossEntropyLoss", inputs, torch_fn, attrs, opset=13)
    # only the loss carries a gradient (the usual case)
    check_backward("SoftmaxCrossEntropyLoss", inputs, lambda *a: torch_fn(*a)[0], attrs,
                   opset=13, grad_outputs=[randn(*(() if red != "none" else inputs[1].shape)),
                                           None])


def test_softmax_cross_entropy_bad_label():
    scores, labels = randn(3, 4), np.array([0, 4, 1], np.int64)
    with pytest.raises(_core.PyedgeError, match="label 4"):
        _core.run_op("SoftmaxCrossEntropyLoss", [scores, labels], {}, opset=13)
