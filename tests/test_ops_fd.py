"""Op backward rules against central finite differences of float64 numpy references.

Needs numpy only (no torch), so it runs on aarch64 devices and in scripts/arm64-check.sh.
For each case: pyedge's forward equals the numpy reference (float32 tolerance) and pyedge's
input gradients for a random output gradient g equal d/dx sum(f(x) * g), by central
differences on the float64 reference."""
import numpy as np
import pytest

from pyedge import _core

pytestmark = pytest.mark.arm64


def _erf(x):
    from math import erf
    return np.vectorize(erf)(x)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _conv2d(x, w, b):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    y = np.zeros((n, o, h - kh + 1, wd - kw + 1))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("nchw,oc->nohw", x[:, :, i:i + y.shape[2], j:j + y.shape[3]],
                           w[:, :, i, j])
    return y + b[None, :, None, None]


def _sce(x, labels):
    lsm = x - x.max(1, keepdims=True)
    lsm = lsm - np.log(np.exp(lsm).sum(1, keepdims=True))
    return -lsm[np.arange(len(labels)), labels].mean()


def _attention(q, k, v, mask, scale, layout="bhld"):
    """softmax(scale * q kᵀ + mask) v; blhd tensors are [B, L, H, D]."""
    t = (lambda x: x.transpose(0, 2, 1, 3)) if layout == "blhd" else (lambda x: x)
    q, k, v = t(q), t(k), t(v)
    return t(_softmax(scale * q @ np.swapaxes(k, -1, -2) + mask) @ v)


def R(*shape, seed=0, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed + sum(shape))
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


# (id, op, inputs, attrs, opset, numpy reference over float64 float inputs)
CASES = [
    ("matmul", "MatMul", [R(3, 4), R(4, 5, seed=1)], {}, 17, lambda a, b: a @ b),
    ("matmul_batched", "MatMul", [R(2, 3, 4), R(4, 2, seed=1)], {}, 17, lambda a, b: a @ b),
    ("gemm_transB", "Gemm", [R(3, 4), R(5, 4, seed=1), R(5, seed=2)], {"transB": 1}, 17,
     lambda a, b, c: a @ b.T + c),
    ("add_broadcast", "Add", [R(3, 4), R(4, seed=1)], {}, 17, lambda a, b: a + b),
    ("mul_broadcast", "Mul", [R(2, 3, 4), R(3, 1, seed=1)], {}, 17, lambda a, b: a * b),
    ("div", "Div", [R(3, 4), R(3, 4, seed=1, shift=3.0)], {}, 17, lambda a, b: a / b),
    ("tanh", "Tanh", [R(5, 7, scale=2)], {}, 17, np.tanh),
    ("sigmoid", "Sigmoid", [R(5, 7, scale=3)], {}, 17, lambda x: 1 / (1 + np.exp(-x))),
    ("erf", "Erf", [R(5, 7)], {}, 17, _erf),
    ("gelu", "Gelu", [R(5, 7, scale=2)], {}, 20, lambda x: 0.5 * x * (1 + _erf(x / np.sqrt(2)))),
    ("gelu_tanh", "Gelu", [R(5, 7, scale=2)], {"approximate": "tanh"}, 20,
     lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))),
    ("softmax", "Softmax", [R(3, 37, scale=2)], {}, 17, _softmax),
    ("logsoftmax", "LogSoftmax", [R(3, 19, scale=2)], {}, 17,
     lambda x: np.log(_softmax(x))),
    ("softmax_axis1", "Softmax", [R(2, 5, 3, scale=2)], {"axis": 1}, 17,
     lambda x: _softmax(x, 1)),
    ("layernorm", "LayerNormalization", [R(4, 33, scale=2, shift=1), R(33, seed=1),
                                         R(33, seed=2)], {}, 17, _layernorm),
    ("reducemean", "ReduceMean", [R(3, 4, 5)], {"axes": [1], "keepdims": 1}, 17,
     lambda x: x.mean(1, keepdims=True)),
    ("transpose", "Transpose", [R(2, 3, 4)], {"perm": [2, 0, 1]}, 17,
     lambda x: x.transpose(2, 0, 1)),
    ("conv2d", "Conv", [R(2, 3, 6, 5), R(4, 3, 3, 2, seed=1), R(4, seed=2)], {}, 17, _conv2d),
    # pyedge's own fused ops (domain "pyedge")
    ("masked_softmax", "pyedge.MaskedSoftmax", [R(2, 3, 4, 9, scale=2), R(2, 1, 1, 9, seed=1)],
     {"scale": 0.7}, 17, lambda x, m: _softmax(0.7 * x + m)),
    ("matmul_trans_b", "pyedge.MatMul", [R(2, 3, 4), R(2, 5, 4, seed=1)], {"trans_b": 1}, 17,
     lambda a, b: a @ np.swapaxes(b, -1, -2)),
    ("matmul_trans_a", "pyedge.MatMul", [R(2, 4, 3), R(4, 5, seed=1)], {"trans_a": 1}, 17,
     lambda a, b: np.swapaxes(a, -1, -2) @ b),
    # batched with 17 columns: small_gemm's vector block plus a remainder column
    ("matmul_small_gemm", "pyedge.MatMul", [R(2, 3, 5), R(2, 17, 5, seed=1)], {"trans_b": 1}, 17,
     lambda a, b: a @ np.swapaxes(b, -1, -2)),
    # LoRA on its base weight: the merged-weight GEMM and the chunked adapter gradients
    # (skinny8_gemm with an odd K, small_gemm for dBᵀ and dA), and trans_w with a bias
    ("lora_matmul", "pyedge.LoraMatMul", [R(40, 9), R(9, 7, seed=1), R(3, 9, seed=2),
                                          R(7, 3, seed=3)], {"scale": 0.5}, 17,
     lambda x, w, a, b: x @ w + 0.5 * (x @ a.T) @ b.T),
    ("lora_matmul_linear", "pyedge.LoraMatMul", [R(70, 16), R(20, 16, seed=1), R(8, 16, seed=2),
                                                 R(20, 8, seed=3), R(20, seed=4)],
     {"scale": 2.0, "trans_w": 1}, 17, lambda x, w, a, b, c: x @ w.T + 2.0 * (x @ a.T) @ b.T + c),
    # fused attention, L != Lk and D != Dv, a mask over [B, 1, L, Lk] (no mask gradient)
    ("attention", "pyedge.Attention",
     [R(2, 2, 3, 4), R(2, 2, 5, 4, seed=1), R(2, 2, 5, 3, seed=2), R(2, 1, 3, 5, seed=3)],
     {"scale": 0.6}, 17, lambda q, k, v, m: _attention(q, k, v, m, 0.6)),
    ("attention_blhd", "pyedge.Attention",
     [R(2, 3, 2, 4), R(2, 5, 2, 4, seed=1), R(2, 5, 2, 3, seed=2), R(2, 1, 1, 5, seed=3)],
     {"scale": 0.6, "layout": "blhd"}, 17,
     lambda q, k, v, m: _attention(q, k, v, m, 0.6, "blhd")),
]


def _fd_grads(f, xs, g, eps=1e-6):
    xs = [x.astype(np.float64) for x in xs]
    grads = []
    for k, x in enumerate(xs):
        d = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + eps
            fp = np.sum(f(*xs) * g)
            x[idx] = old - eps
            fm = np.sum(f(*xs) * g)
            x[idx] = old
            d[idx] = (fp - fm) / (2 * eps)
        grads.append(d)
    return grads


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_backward_vs_finite_differences(case):
    _, op, inputs, attrs, opset, ref = case
    domain, _, op = op.rpartition(".")
    outs, _ = _core.run_op(op, inputs, attrs, opset=opset, domain=domain)
    want = ref(*[x.astype(np.float64) for x in inputs])
    np.testing.assert_allclose(outs[0], want, rtol=2e-5, atol=2e-5, err_msg=f"{op} forward")
    g = np.random.default_rng(1).standard_normal(outs[0].shape).astype(np.float32)
    gouts = [g] + [None] * (len(outs) - 1)
    _, grads = _core.run_op(op, inputs, attrs, opset=opset, grad_outputs=gouts, domain=domain)
    fd = _fd_grads(ref, inputs, g.astype(np.float64))
    checked = 0
    for i, (ours, want) in enumerate(zip(grads, fd)):
        if ours is None:
            continue
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"{op} grad of input {i}")
        checked += 1
    assert checked > 0


def test_softmax_cross_entropy_vs_finite_differences():
    x = R(4, 7, scale=2)
    labels = np.array([0, 3, 6, 2], np.int64)
    outs, _ = _core.run_op("SoftmaxCrossEntropyLoss", [x, labels], {"reduction": "mean"})
    np.testing.assert_allclose(outs[0], _sce(x.astype(np.float64), labels), rtol=1e-5)
    _, grads = _core.run_op("SoftmaxCrossEntropyLoss", [x, labels], {"reduction": "mean"},
                            grad_outputs=[np.ones((), np.float32)])
    fd = _fd_grads(lambda a: _sce(a, labels), [x], np.float64(1.0))
    np.testing.assert_allclose(grads[0], fd[0], rtol=1e-4, atol=1e-5)


def test_gelu_accuracy_and_position_independence():
    # Value and derivative against float64 math.erf over [-12, 12] (as the torch test in
    # test_ops_elementwise.py, but also on aarch64). An element's result must not depend on
    # where it sits: in a full SIMD vector or in a chunk's padded last vector.
    x = np.linspace(-12, 12, 48001).astype(np.float32)
    (y,), (dx,) = _core.run_op("Gelu", [x], opset=20, grad_outputs=[np.ones_like(x)])
    xd = x.astype(np.float64)
    cdf = 0.5 * (1 + _erf(xd / np.sqrt(2)))
    np.testing.assert_allclose(y, xd * cdf, rtol=1e-6, atol=3e-7)
    np.testing.assert_allclose(dx, cdf + xd * np.exp(-0.5 * xd * xd) / np.sqrt(2 * np.pi),
                               rtol=0, atol=4e-7)
    for k, n in ((1, 37), (5, 3), (24000, 21)):
        (ys,), (dxs,) = _core.run_op("Gelu", [x[k:k + n]], opset=20,
                                     grad_outputs=[np.ones(n, np.float32)])
        np.testing.assert_array_equal(ys, y[k:k + n])
        np.testing.assert_array_equal(dxs, dx[k:k + n])


def test_gemm_with_a_packed_frozen_weight_matches_numpy():
    # A weight known at plan time, times few rows, is packed into 64-column panels
    # (csrc/ops/packed_gemm.cpp): one full and one partial panel, both weight layouts.
    a, c = R(5, 20), R(70, seed=2)
    for tb, w in ((0, R(20, 70, seed=1)), (1, R(70, 20, seed=1))):
        want = a.astype(np.float64) @ (w.T if tb else w).astype(np.float64) + c
        (y,), _ = _core.run_op("Gemm", [a, w, c], {"transB": tb}, const_inputs=[1, 2])
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
