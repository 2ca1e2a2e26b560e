"""pyedge.RMSNorm (csrc/ops/rmsnorm.cpp) and pyedge.SwiGLU (csrc/ops/gated_mlp.cpp), the ops the
Llama-family fusions map onto: forward and backward against torch autograd in float64
(opcheck.check_backward: zeroed, accumulated and fresh gradient buffers), and their row /
elementwise kernels' SIMD path against the scalar reference (_core.simd_kernel)."""
import numpy as np
import pytest

from pyedge import _core
from opcheck import check_backward, pyedge_run


def rms_ref(eps, add_one):
    def f(x, w=None):
        y = x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
        if w is None:
            return y
        return y * (1 + w) if add_one else y * w
    return f


@pytest.mark.parametrize("shape", [(2, 5, 64), (3, 37), (1, 1, 7), (4, 384)])
@pytest.mark.parametrize("form", ["weight", "add_one", "none"])
def test_rmsnorm_matches_torch(shape, form):
    import torch
    rng = np.random.default_rng(shape[-1])
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    eps = 1e-5
    attrs = {"epsilon": eps, "add_one": int(form == "add_one")}
    inputs = [x] if form == "none" else [x, w]
    (y,) = pyedge_run("RMSNorm", inputs, attrs, domain="pyedge")
    ref = rms_ref(eps, form == "add_one")(*[torch.tensor(a, dtype=torch.float64) for a in inputs])
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5)
    check_backward("RMSNorm", inputs, rms_ref(eps, form == "add_one"), attrs, domain="pyedge")


def test_rmsnorm_only_weight_grad():
    """dW alone (X frozen) and dX alone (W frozen) give torch's values."""
    import torch
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 40)).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    dy = rng.standard_normal((9, 40)).astype(np.float32)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    (rms_ref(1e-6, False)(xt, wt) * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    for frozen, k, ref in ((0, 1, wt.grad), (1, 0, xt.grad)):  # const inputs take no gradient
        _, grads = _core.run_op("RMSNorm", [x, w], {}, domain="pyedge", grad_outputs=[dy],
                                const_inputs=[frozen])
        assert grads[1 - k] is None
        np.testing.assert_allclose(grads[k], ref.numpy(), rtol=1e-4, atol=1e-5)


def test_rmsnorm_errors():
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(Exception, match="RMSNorm.*W has shape"):
        pyedge_run("RMSNorm", [x, np.zeros(7, np.float32)], {}, domain="pyedge")
    with pytest.raises(Exception, match="add_one"):
        pyedge_run("RMSNorm", [x], {"add_one": 1}, domain="pyedge")


def gated_ref(act):
    import torch.nn.functional as F

    def f(g, u):
        if act == "silu":
            return F.silu(g) * u
        return F.gelu(g, approximate="tanh" if act == "gelu_tanh" else "none") * u
    return f


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(2, 7, 96), (5,), (3, 4097)])
def test_swiglu_matches_torch(act, shape):
    import torch
    rng = np.random.default_rng(len(shape))
    g = (rng.standard_normal(shape) * 3).astype(np.float32)
    u = rng.standard_normal(shape).astype(np.float32)
    (y,) = pyedge_run("SwiGLU", [g, u], {"act": act}, domain="pyedge")
    ref = gated_ref(act)(torch.tensor(g, dtype=torch.float64), torch.tensor(u, dtype=torch.float64))
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=2e-6)
    check_backward("SwiGLU", [g, u], gated_ref(act), {"act": act}, domain="pyedge")


def test_swiglu_errors():
    a = np.zeros((2, 8), np.float32)
    with pytest.raises(Exception, match="same shape"):
        pyedge_run("SwiGLU", [a, np.zeros((2, 4), np.float32)], {}, domain="pyedge")
    with pytest.raises(Exception, match="act must be"):
        pyedge_run("SwiGLU", [a, a], {"act": "relu"}, domain="pyedge")


# ---- SIMD path vs the scalar reference (the same template on simd::Scalar)
def pair(name, *args):
    return (_core.simd_kernel(name, *args, scalar=False),
            _core.simd_kernel(name, *args, scalar=True))


@pytest.mark.arm64
@pytest.mark.parametrize("D", [1, 5, 16, 37, 384])
@pytest.mark.parametrize("kind", ["rmsnorm", "rmsnorm_1p", "noweight"])
def test_rmsnorm_rows_simd_vs_scalar(D, kind):
    rng = np.random.default_rng(D)
    x = (rng.standard_normal((4, D)) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    dy = rng.standard_normal((4, D)).astype(np.float32)
    name = "rmsnorm" if kind == "noweight" else kind
    wa = np.zeros(0, np.float32) if kind == "noweight" else w
    v, s = pair(name, x, wa)
    np.testing.assert_allclose(v, s, rtol=1e-5, atol=1e-6)
    x64 = x.astype(np.float64)
    wp = 1.0 if kind == "noweight" else (1 + w if kind == "rmsnorm_1p" else w)
    r = 1 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(v, x64 * r * wp, rtol=1e-5, atol=1e-5)
    v, s = pair(name + "_bwd", x, wa, dy)
    np.testing.assert_allclose(v, s, rtol=1e-5, atol=1e-5)
    dx = r * dy * wp - x64 * r ** 3 * (dy * wp * x64).mean(1, keepdims=True)
    np.testing.assert_allclose(v[:4], dx, rtol=1e-4, atol=1e-5)
    if kind != "noweight":
        np.testing.assert_allclose(v[4], (dy * x64 * r).sum(0), rtol=1e-4, atol=1e-5)


@pytest.mark.arm64
@pytest.mark.parametrize("n", [1, 3, 8, 17, 64, 1027])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_gated_simd_vs_scalar(act, n):
    rng = np.random.default_rng(n)
    g = (rng.standard_normal(n) * 4).astype(np.float32)
    g[:3] = [0.0, -30.0, 30.0][: min(3, n)]
    u = rng.standard_normal(n).astype(np.float32)
    dy = rng.standard_normal(n).astype(np.float32)
    v, s = pair(f"gated_{act}", g, u)
    np.testing.assert_allclose(v, s, rtol=2e-6, atol=1e-7)
    v, s = pair(f"gated_{act}_bwd", g, u, dy)
    np.testing.assert_allclose(v, s, rtol=2e-6, atol=1e-7)
