"""The elementwise fast-math kernels' vector paths (csrc/ops/unary_kernels.h: NEON on aarch64,
AVX2/AVX-512 on x86-64 v3/v4 and native builds) against their scalar reference
(simd::Scalar), forward and backward, through _core.simd_kernel("unary_<op>[_bwd]", ...);
both against float64 numpy math; and the ops that use them (Exp, Log, Softplus, Elu, Selu,
Sigmoid, Tanh, Erf, Gelu) against numpy with gradients by central finite differences.
numpy only: runs on aarch64 under scripts/arm64-check.sh."""
from math import erf as _erf1

import numpy as np
import pytest

from pyedge import _core

pytestmark = pytest.mark.arm64

SIZES = [1, 3, 4, 5, 8, 15, 16, 17, 31, 64, 100, 1027]
SELU_A, SELU_G = 1.67326319217681884765625, 1.05070102214813232421875

_erf = np.vectorize(_erf1)


def _phi(x):
    return 0.5 * (1 + _erf(x / np.sqrt(2)))


def _gelu_tanh_parts(x):
    u = np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)
    du = np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x ** 2)
    return np.tanh(u), du


def _sig(x):
    return 1 / (1 + np.exp(-x))


# name -> (input scale, input shift, f(x), f'(x)) in float64; log takes positive inputs
KERNELS = {
    "exp": (20.0, 0.0, np.exp, np.exp),
    "log": (10.0, None, np.log, lambda x: 1 / x),
    "sigmoid": (8.0, 0.0, _sig, lambda x: _sig(x) * (1 - _sig(x))),
    "tanh": (3.0, 0.0, np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "erf": (2.0, 0.0, _erf, lambda x: 2 / np.sqrt(np.pi) * np.exp(-x * x)),
    "gelu": (3.0, 0.0, lambda x: x * _phi(x),
             lambda x: _phi(x) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)),
    "gelu_tanh": (3.0, 0.0, lambda x: 0.5 * x * (1 + _gelu_tanh_parts(x)[0]),
                  lambda x: 0.5 * (1 + _gelu_tanh_parts(x)[0])
                  + 0.5 * x * (1 - _gelu_tanh_parts(x)[0] ** 2) * _gelu_tanh_parts(x)[1]),
    "softplus": (6.0, 0.0, lambda x: np.logaddexp(0, x), _sig),
    "elu": (3.0, 0.0, lambda x: np.where(x > 0, x, np.expm1(x)),
            lambda x: np.where(x > 0, 1.0, np.exp(x))),
    "elu_x": (3.0, 0.0, lambda x: np.where(x > 0, x, np.expm1(x)),
              lambda x: np.where(x > 0, 1.0, np.exp(x))),
    "selu": (3.0, 0.0, lambda x: SELU_G * np.where(x > 0, x, SELU_A * np.expm1(x)),
             lambda x: SELU_G * np.where(x > 0, 1.0, SELU_A * np.exp(x))),
}


def _x(name, n, lowest=-95):
    scale, shift, _, _ = KERNELS[name]
    rng = np.random.default_rng(7 * n)
    x = rng.standard_normal(n) * scale
    if shift is None:  # log: positive over many binades, down to denormals (e^-95)
        x = np.exp(rng.uniform(lowest, 40, n))
    return x.astype(np.float32)


def pair(name, *args):
    return (_core.simd_kernel(name, *args, scalar=False),
            _core.simd_kernel(name, *args, scalar=True))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_forward_vector_equals_scalar_and_float64(name, n):
    x = _x(name, n)
    v, s = pair(f"unary_{name}", x)
    # the same polynomials on both paths: a few ulp apart (FMA contraction differs)
    np.testing.assert_allclose(v, s, rtol=1e-6, atol=1e-30, err_msg=name)
    with np.errstate(over="ignore"):
        want = KERNELS[name][2](x.astype(np.float64))
    # erf: A&S 7.1.26, 1.5e-7 absolute; gelu_tanh: 1 + tanh(u) cancels for x << 0 (an ulp of 1 times |x|)
    atol = {"erf": 3e-7, "gelu": 3e-7, "gelu_tanh": 1e-7 * np.abs(x)}.get(name, 1e-30)
    np.testing.assert_array_less(np.abs(v - want.astype(np.float32)),
                                 2e-6 * np.abs(want) + atol, err_msg=name)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_backward_vector_equals_scalar_and_float64(name, n):
    x = _x(name, n, lowest=-20)  # log: dy/x stays finite in float32
    if name == "exp":
        x = np.clip(x, -80, 80)  # keep dy·e^x finite
    dy = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    v, s = pair(f"unary_{name}_bwd", x, dy)
    want = dy.astype(np.float64) * KERNELS[name][3](x.astype(np.float64))
    scale = np.abs(dy).astype(np.float64)  # errors relative to the output gradient
    np.testing.assert_allclose(v, s, rtol=2e-6, atol=0, err_msg=name)
    np.testing.assert_array_less(np.abs(v - want), 2e-6 * np.abs(want) + 1e-6 * scale + 1e-30,
                                 err_msg=name)


def test_special_values_vector_equals_scalar():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 88.0, 89.0, -87.0, -88.0, -200.0, 200.0,
                  1e-30, -1e-30, 1e-40, 0.0999, 0.1001, -0.0999, 0.6249, 0.6251, 0.4999, 0.5001,
                  1.0, 1.0000001, 0.9999999, 3.4e38], np.float32)
    x = np.concatenate([x, x[::-1], x[:3]])  # full vectors and a padded tail, in other lanes
    dy = np.linspace(-2, 2, len(x)).astype(np.float32)
    for name in sorted(KERNELS):
        with np.errstate(all="ignore"):
            v, s = pair(f"unary_{name}", x)
            np.testing.assert_allclose(v, s, rtol=1e-6, atol=1e-37, err_msg=name)
            v, s = pair(f"unary_{name}_bwd", x, dy)
            np.testing.assert_allclose(v, s, rtol=2e-6, atol=1e-37, err_msg=name + " bwd")


def test_log_special_values():
    x = np.array([0.0, -0.0, -1.0, np.inf, -np.inf, np.nan, 1.0, 1e-45, 1e-40, 3.4e38] * 2,
                 np.float32)
    v, s = pair("log", x)
    np.testing.assert_array_equal(v, s)
    with np.errstate(all="ignore"):
        want = np.log(x.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(v, want, rtol=2e-6)


def test_unknown_unary_kernel():
    with pytest.raises(ValueError, match="unknown unary kernel 'nope'"):
        _core.simd_kernel("unary_nope", np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="b must match"):
        _core.simd_kernel("unary_exp_bwd", np.zeros(4, np.float32))


# ---------------------------------------------------------------- the ops that use them
def _fd(f, x, eps=1e-6):
    """f'(x) elementwise by central differences (f is elementwise)."""
    return (f(x + eps) - f(x - eps)) / (2 * eps)


OPS = [  # (op, attrs, opset, x, f in float64)
    ("Exp", {}, 17, (-3, 3), np.exp),
    ("Log", {}, 17, (0.05, 5), np.log),
    ("Sigmoid", {}, 17, (-6, 6), _sig),
    ("Tanh", {}, 17, (-3, 3), np.tanh),
    ("Erf", {}, 17, (-2.5, 2.5), _erf),
    ("Gelu", {}, 20, (-4, 4), lambda x: x * _phi(x)),
    ("Gelu", {"approximate": "tanh"}, 20, (-4, 4), KERNELS["gelu_tanh"][2]),
    ("Softplus", {}, 17, (-6, 6), lambda x: np.logaddexp(0, x)),
    ("Elu", {"alpha": 0.7}, 17, (-3, 3), lambda x: np.where(x > 0, x, 0.7 * np.expm1(x))),
    ("Elu", {"alpha": -0.5}, 17, (-3, 3), lambda x: np.where(x > 0, x, -0.5 * np.expm1(x))),
    ("Selu", {}, 17, (-3, 3), KERNELS["selu"][2]),
]


@pytest.mark.parametrize("case", OPS, ids=[f"{c[0]}{'_' + '_'.join(map(str, c[1].values())) if c[1] else ''}"
                                           for c in OPS])
def test_op_forward_and_backward_vs_finite_differences(case):
    op, attrs, opset, (lo, hi), f = case
    rng = np.random.default_rng(3)
    # 4099 elements: several parallel chunks' vectors and a padded tail; off the kinks of Elu
    x = rng.uniform(lo, hi, 4099).astype(np.float32)
    x[np.abs(x) < 1e-3] = 0.25
    g = rng.standard_normal(x.shape).astype(np.float32)
    (y,), (dx,) = _core.run_op(op, [x], attrs, opset=opset, grad_outputs=[g])
    xd = x.astype(np.float64)
    np.testing.assert_allclose(y, f(xd), rtol=2e-6, atol=3e-7, err_msg=op)
    want = g * _fd(f, xd)  # elementwise: d/dx_i sum(f(x)·g) = g_i·f'(x_i)
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-5, err_msg=op)
    # an element's result does not depend on where it sits (full vector or padded tail)
    (ys,), (dxs,) = _core.run_op(op, [x[5:18]], attrs, opset=opset, grad_outputs=[g[5:18]])
    np.testing.assert_array_equal(ys, y[5:18])
    np.testing.assert_array_equal(dxs, dx[5:18])
