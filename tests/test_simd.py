"""Each SIMD kernel (common/simd.h, NEON on aarch64, SSE2/AVX2/AVX-512 on x86-64) equals its
scalar reference (simd::Scalar), run through _core.simd_kernel(name, ..., scalar=True/False).
Exact for add/sub/mul/div/max/min and reductions of exactly representable data; a few ulp
for the polynomial math (FMA contraction differs between paths)."""
import numpy as np
import pytest

from pyedge import _core

pytestmark = pytest.mark.arm64

SIZES = [1, 3, 4, 5, 8, 15, 16, 17, 31, 64, 100, 1027]


def pair(name, *args, **kw):
    return (_core.simd_kernel(name, *args, scalar=False, **kw),
            _core.simd_kernel(name, *args, scalar=True, **kw))


def randn(n, scale=1.0, seed=0):
    return (np.random.default_rng(seed + n).standard_normal(n) * scale).astype(np.float32)


def test_info():
    info = _core.simd_info()
    assert info["backend"] in ("avx512", "avx2", "sse2", "neon", "scalar")
    assert info["width"] in (1, 4, 8, 16)
    import platform
    if platform.machine() in ("aarch64", "arm64"):
        assert info["backend"] == "neon"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("op,ref", [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                                    ("div", np.divide), ("max", np.maximum),
                                    ("min", np.minimum)])
def test_binary_exact(op, ref, n):
    a, b = randn(n, 3.0), randn(n, 2.0, seed=99) + 0.1
    v, s = pair(op, a, b)
    np.testing.assert_array_equal(v, s)
    np.testing.assert_array_equal(v, ref(a, b))


@pytest.mark.parametrize("n", SIZES)
def test_fma(n):
    a, b, c = randn(n), randn(n, seed=1), randn(n, seed=2)
    v, s = pair("fma", a, b, c)
    ref = (a.astype(np.float64) * b + c).astype(np.float32)
    np.testing.assert_allclose(v, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s, ref, rtol=1e-6, atol=1e-6)


MATH = {
    "exp": (np.exp, 30.0),
    "tanh": (np.tanh, 4.0),
    "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), 10.0),
    "erf": (None, 3.0),
}


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", sorted(MATH))
def test_math_vs_scalar(name, n):
    fn, scale = MATH[name]
    x = randn(n, scale)
    v, s = pair(name, x)
    np.testing.assert_allclose(v, s, rtol=4e-7, atol=1e-7 if name == "erf" else 1e-30)
    if fn is not None:
        with np.errstate(over="ignore"):
            ref = fn(x.astype(np.float64)).astype(np.float32)  # overflow -> inf as in float32
        np.testing.assert_allclose(v, ref, rtol=2e-6, atol=1e-7)


def test_math_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 88.0, 89.0, -87.0, -88.0, -200.0,
                  1e-30, -1e-30, 0.6249, 0.6251, 0.4999, 0.5001], np.float32)
    x = np.concatenate([x, x])  # vector and tail lanes
    for name in ("exp", "tanh", "sigmoid", "erf"):
        v, s = pair(name, x)
        np.testing.assert_allclose(v, s, rtol=4e-7, atol=1e-7, err_msg=name)
        assert np.array_equal(np.isnan(v), np.isnan(x)), name
    v, _ = pair("exp", x)
    assert v[2] == np.inf and v[3] == 0.0 and v[9] == 0.0
    v, _ = pair("tanh", x)
    assert v[2] == 1.0 and v[3] == -1.0


@pytest.mark.parametrize("n", SIZES)
def test_reductions(n):
    x = randn(n, 5.0)
    y = randn(n, seed=3)
    v, s = pair("row_max", x)
    assert v[0] == s[0] == x.max()
    # integers: sums are exact whatever the order
    xi = np.round(x * 4).astype(np.float32)
    v, s = pair("row_sum", xi)
    assert v[0] == s[0] == xi.sum()
    v, s = pair("row_sum", x)
    np.testing.assert_allclose(v, s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v, x.astype(np.float64).sum(), rtol=1e-5, atol=1e-5)
    v, s = pair("row_dot", x, y)
    np.testing.assert_allclose(v, s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v, x.astype(np.float64) @ y, rtol=1e-5, atol=1e-5)
    v, s = pair("exp_sum", x)
    ref = np.exp(x.astype(np.float64) - x.max()).sum()
    np.testing.assert_allclose(v, s, rtol=1e-6)
    np.testing.assert_allclose(v, ref, rtol=1e-6)


@pytest.mark.parametrize("D", [1, 3, 7, 16, 33, 384, 1000])
@pytest.mark.parametrize("name", ["softmax", "logsoftmax"])
def test_softmax_rows(name, D):
    x = np.random.default_rng(D).standard_normal((5, D)).astype(np.float32) * 4
    x[1, : D // 2] = -np.inf  # masked positions
    v, s = pair(name, x)
    np.testing.assert_allclose(v, s, rtol=1e-5, atol=1e-6)
    x64 = x.astype(np.float64)
    m = x64.max(1, keepdims=True)
    ls = np.log(np.exp(x64 - m).sum(1, keepdims=True))
    ref = (x64 - m - ls) if name == "logsoftmax" else np.exp(x64 - m - ls)
    np.testing.assert_allclose(v, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("D", [1, 5, 16, 37, 384])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_rows(D, bias):
    rng = np.random.default_rng(D)
    x = (rng.standard_normal((4, D)) * 3 + 1).astype(np.float32)
    g = rng.standard_normal(D).astype(np.float32)
    b = rng.standard_normal(D).astype(np.float32) if bias else None
    v, s = pair("layernorm", x, g, b)
    np.testing.assert_allclose(v, s, rtol=1e-5, atol=1e-5)
    x64 = x.astype(np.float64)
    mu = x64.mean(1, keepdims=True)
    ref = (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(1, keepdims=True) + 1e-5) * g
    if bias:
        ref = ref + b
    np.testing.assert_allclose(v, ref, rtol=1e-4, atol=1e-4)


def test_unknown_kernel():
    with pytest.raises(ValueError):
        _core.simd_kernel("nope", np.zeros(3, np.float32))
