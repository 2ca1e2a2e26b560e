"""Elementwise ops: forward against onnxruntime, backward against torch autograd.

Covers unary activations/math, Clip, binary arithmetic with broadcasting, variadic
Sum/Mean/Min/Max, comparisons and logic, Where, Expand, Cast/CastLike, Identity, Dropout.
"""
import itertools

import numpy as np
import pytest
from optional_deps import optional
torch = optional("torch")
F = optional("torch.nn.functional")

from opcheck import check_backward, check_forward, ort_run, pyedge_run
from pyedge import _core

RNG = np.random.default_rng(1234)


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def away_from_zero(x, eps=0.3):
    return np.where(x >= 0, x + eps, x - eps).astype(np.float32)


# ----------------------------------------------------------------------------- unary

# op -> (attrs, torch_fn or None (no gradient), opset, input transform)
UNARY = {
    "Relu": ({}, torch.relu, 17, None),
    "LeakyRelu": ({"alpha": 0.1}, lambda x: F.leaky_relu(x, 0.1), 17, None),
    "Sigmoid": ({}, torch.sigmoid, 17, None),
    "Tanh": ({}, torch.tanh, 17, None),
    "Erf": ({}, torch.erf, 17, None),
    "Gelu": ({}, F.gelu, 20, None),
    "HardSigmoid": ({"alpha": 0.3, "beta": 0.4},
                    lambda x: torch.clamp(0.3 * x + 0.4, 0, 1), 17, None),
    "HardSwish": ({}, F.hardswish, 17, None),
    "Softplus": ({}, F.softplus, 17, None),
    "Elu": ({"alpha": 0.7}, lambda x: F.elu(x, 0.7), 17, None),
    "Selu": ({}, F.selu, 17, None),
    "Softsign": ({}, F.softsign, 17, None),
    "Sqrt": ({}, torch.sqrt, 17, lambda x: np.abs(x) + 0.1),
    "Neg": ({}, torch.neg, 17, None),
    "Exp": ({}, torch.exp, 17, None),
    "Log": ({}, torch.log, 17, lambda x: np.abs(x) + 0.1),
    "Abs": ({}, torch.abs, 17, None),
    "Reciprocal": ({}, torch.reciprocal, 17, away_from_zero),
    "Sin": ({}, torch.sin, 17, None),
    "Cos": ({}, torch.cos, 17, None),
    "Floor": ({}, None, 17, None),
    "Ceil": ({}, None, 17, None),
    "Round": ({}, None, 17, None),
    "Sign": ({}, None, 17, None),
}


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary(op):
    attrs, fn, opset, tf = UNARY[op]
    for shape in [(3, 5), (2, 3, 4, 5), (), (0, 3), (40001,)]:
        x = randn(*shape, scale=3.0)
        if tf is not None:
            x = tf(x).astype(np.float32)
        check_forward(op, [x], attrs, opset=opset)
        if fn is not None and x.size and x.size < 1000:
            check_backward(op, [x], fn, attrs, opset=opset)


def test_unary_extra_settings():
    x = randn(4, 6, scale=3.0)
    check_forward("Gelu", [x], {"approximate": "tanh"}, opset=20)
    check_backward("Gelu", [x], lambda t: F.gelu(t, approximate="tanh"),
                   {"approximate": "tanh"}, opset=20)
    check_forward("LeakyRelu", [x], {"alpha": -0.2})  # negative slope: grad reads x
    check_backward("LeakyRelu", [x], lambda t: torch.where(t > 0, t, -0.2 * t), {"alpha": -0.2})
    check_forward("Elu", [x], {})
    check_backward("Elu", [x], F.elu)
    check_forward("HardSigmoid", [x], {})
    check_forward("IsNaN", [np.array([1, np.nan, -np.inf, 0], np.float32)])
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, 100.0, -100.0], np.float32)
    for op in ["Sigmoid", "Tanh", "Erf", "Relu", "Abs", "Neg", "Exp"]:
        check_forward(op, [special])
    check_forward("Gelu", [special[1:]], opset=20)


def test_fast_math_accuracy():
    x = np.linspace(-15, 15, 300001).astype(np.float32)
    ref = torch.tensor(x, dtype=torch.float64)
    for op, fn in [("Sigmoid", torch.sigmoid), ("Tanh", torch.tanh), ("Erf", torch.erf)]:
        y = pyedge_run(op, [x])[0]
        np.testing.assert_allclose(y, fn(ref).numpy(), rtol=2e-6, atol=5e-7, err_msg=op)


def test_gelu_accuracy_and_gradient_over_the_range():
    # GELU's own erf (A&S 7.1.26, one exp shared with the density): value and derivative
    # against float64 where both the tails and the centre matter.
    x = np.linspace(-12, 12, 240001).astype(np.float32)
    (y,), (dx,) = _core.run_op("Gelu", [x], opset=20, grad_outputs=[np.ones_like(x)])
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ref = F.gelu(t)
    ref.sum().backward()
    np.testing.assert_allclose(y, ref.detach().numpy(), rtol=1e-6, atol=3e-7)
    np.testing.assert_allclose(dx, t.grad.numpy(), rtol=0, atol=4e-7)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float64])
def test_unary_numeric_dtypes(dtype):
    x = np.array([[-5, 0, 7], [2**30, -(2**30), 1]], dtype)
    for op in ["Neg", "Abs", "Sign"]:
        check_forward(op, [x])


def test_clip():
    x = randn(4, 7, scale=2.0)
    lo, hi = np.float32(-0.5), np.float32(0.8)
    check_forward("Clip", [x], {"min": -0.5, "max": 0.8}, opset=6)
    check_forward("Clip", [x], {"min": -0.5}, opset=6)
    ours = pyedge_run("Clip", [x], {"min": -0.5, "max": 0.8}, opset=6)[0]
    np.testing.assert_allclose(ours, np.clip(x, -0.5, 0.8))
    for opset in (11, 13):
        check_forward("Clip", [x, lo, hi], opset=opset)
        check_forward("Clip", [x, lo], opset=opset)
        check_forward("Clip", [x, None, hi], opset=opset)
        check_forward("Clip", [x], opset=opset)
    check_backward("Clip", [x, lo, hi], lambda t, a, b: torch.clamp(t, -0.5, 0.8), opset=13)
    check_backward("Clip", [x, None, hi], lambda t, a, b: torch.clamp(t, max=0.8), opset=13)
    xi = np.array([-10, -3, 0, 4, 99], np.int64)
    check_forward("Clip", [xi, np.int64(-3), np.int64(5)], opset=13)
    check_forward("Clip", [xi.astype(np.int32), np.int32(0)], opset=13)


# ----------------------------------------------------------------------------- binary

BCAST_PAIRS = [
    ((3, 4), (3, 4)),
    ((3, 4), (4,)),
    ((3, 4), ()),
    ((4, 1), (4, 5)),
    ((2, 3, 4, 5), (3, 1, 1)),
    ((2, 1, 4), (3, 1)),
    ((5, 1, 6, 1), (1, 7, 1, 8)),
    ((1,), (2, 3)),
    ((1, 1), (1,)),
    ((2, 3, 0), (3, 1)),
]

TORCH_BIN = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div,
             "Pow": torch.pow}


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow"])
def test_binary_float(op):
    for sa, sb in BCAST_PAIRS:
        for a_shape, b_shape in [(sa, sb), (sb, sa)]:
            a, b = randn(*a_shape), randn(*b_shape)
            if op == "Pow":
                a = np.abs(a) + 0.5
            if op == "Div":
                b = away_from_zero(b)
            check_forward(op, [a, b])
            if a.size and b.size:
                check_backward(op, [a, b], TORCH_BIN[op])


def test_pow_special_exponents():
    x = randn(5, 6)
    xp = np.abs(x) + 0.2
    for e in [2.0, 1.0, 0.5, -1.0, 3.0, 0.0]:
        base = xp if e in (0.5,) else away_from_zero(x)
        ex = np.array(e, np.float32)
        check_forward("Pow", [base, ex])
        check_backward("Pow", [base, ex], torch.pow)
    # integer exponent with a float base: only the base gets a gradient
    check_forward("Pow", [x, np.array(2, np.int64)])
    check_forward("Pow", [x, np.array([1, 2, 3, 0, 2, 1], np.int32)])
    g = check_backward("Pow", [x, np.array(3, np.int64)], lambda t, e: t ** 3)
    assert g[1] is None
    # torch conventions at a == 0 / b == 0
    a = np.array([0.0, 0.0, 2.0, 1.5], np.float32)
    b = np.array([2.0, 0.0, 0.0, 1.0], np.float32)
    check_backward("Pow", [a, b], torch.pow)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_binary_int(dtype):
    a = np.array([[7, -7, 7, -7, 0, 123456789], [1, 2, 3, 4, 5, 6]], dtype)
    b = np.array([2, 2, -2, -2, 3, 1000], dtype)
    for op in ["Add", "Sub", "Mul", "Div"]:
        check_forward(op, [a, b])
        check_forward(op, [a, dtype(3)])
        check_forward(op, [dtype(100), b])
    for fmod in (0, 1):
        check_forward("Mod", [a, b], {"fmod": fmod})
        check_forward("Mod", [a, dtype(-3)], {"fmod": fmod})
    check_forward("Pow", [np.array([2, 3, -2, 5], dtype), np.array([3, 2, 3, 0], dtype)])
    check_forward("Pow", [np.array([2, 3, -2, 2], dtype), np.array([0.5, 1.5, 3, 2], np.float32)])
    # shape arithmetic at plan time: exact beyond 2^53
    big = np.array([2**62, -(2**61) - 1], np.int64)
    if dtype == np.int64:
        out = pyedge_run("Add", [big, np.int64(1)])[0]
        assert out.tolist() == [2**62 + 1, -(2**61)]
        out = pyedge_run("Mul", [big, np.int64(1)])[0]
        assert out.tolist() == big.tolist()


def test_int_division_by_zero_does_not_crash():
    a = np.array([5, -5, np.iinfo(np.int64).min], np.int64)
    b = np.array([0, 0, -1], np.int64)
    assert pyedge_run("Div", [a, b])[0].tolist()[:2] == [0, 0]
    assert pyedge_run("Mod", [a, b])[0].tolist() == [0, 0, 0]


def test_mod_float():
    a, b = randn(3, 4, scale=5), away_from_zero(randn(4))
    check_forward("Mod", [a, b], {"fmod": 1})
    with pytest.raises(_core.PyedgeError, match="fmod"):
        pyedge_run("Mod", [a, b])


VARIADIC_SHAPES = [[(3, 4)], [(3, 4), (3, 4)], [(2, 3, 4), (4,), (3, 1)], [(1,), (2, 2), (2, 1), (1, 2)]]


@pytest.mark.parametrize("op", ["Sum", "Mean", "Min", "Max"])
def test_variadic(op):
    def stack_op(*ts):
        ts = torch.broadcast_tensors(*ts)
        s = torch.stack(ts)
        return {"Sum": s.sum(0), "Mean": s.mean(0), "Min": s.amin(0), "Max": s.amax(0)}[op]

    for shapes in VARIADIC_SHAPES:
        xs = [randn(*s) for s in shapes]
        check_forward(op, xs)
        check_backward(op, xs, stack_op)
    if op in ("Min", "Max"):
        for dt in (np.int64, np.int32):
            check_forward(op, [np.array([[1, -5, 9]], dt), np.array([[3], [-7]], dt)])
        # ties: the gradient is split evenly (torch.maximum / torch.minimum for two inputs)
        a = np.array([1.0, 2.0, 3.0, -1.0], np.float32)
        b = np.array([1.0, 5.0, 3.0, -2.0], np.float32)
        tf = torch.maximum if op == "Max" else torch.minimum
        check_backward(op, [a, b], tf)
        check_backward(op, [a, b, a.copy()], stack_op)
        nan = np.array([np.nan, 1.0], np.float32)
        check_forward(op, [nan, np.array([1.0, np.nan], np.float32)])


# ----------------------------------------------------------------------------- logic

CMP = ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"]


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.int32])
def test_compare(dtype):
    a = RNG.integers(-3, 3, (4, 5)).astype(dtype)
    b = RNG.integers(-3, 3, (5,)).astype(dtype)
    for op in CMP:
        check_forward(op, [a, b], opset=16)
        check_forward(op, [b.reshape(5, 1, 1), a], opset=16)
        check_forward(op, [a, dtype(0)], opset=16)


def test_logic():
    a = RNG.integers(0, 2, (3, 4)).astype(bool)
    b = RNG.integers(0, 2, (4,)).astype(bool)
    for op in ["And", "Or", "Xor"]:
        check_forward(op, [a, b])
        check_forward(op, [a[:, :1], b.reshape(1, 1, 4)])
    check_forward("Not", [a])
    check_forward("Equal", [a, b])
    x = np.array([1.0, np.inf, -np.inf, np.nan, 0.0], np.float32)
    check_forward("IsNaN", [x])
    for neg, pos in itertools.product([0, 1], [0, 1]):
        check_forward("IsInf", [x], {"detect_negative": neg, "detect_positive": pos})
    check_forward("IsInf", [x.astype(np.float64)])


WHERE_SHAPES = [
    ((3, 4), (3, 4), (3, 4)),
    ((3, 4), (4,), ()),
    ((2, 1, 4), (3, 1), (2, 3, 4)),
    ((1,), (2, 3), (3,)),
    ((4, 1), (), (1, 5)),
    ((2, 1, 1, 6), (2, 3, 5, 6), ()),  # attention-mask pattern
]


def test_where():
    for sc, sx, sy in WHERE_SHAPES:
        c = RNG.integers(0, 2, sc).astype(bool)
        x, y = randn(*sx), randn(*sy)
        check_forward("Where", [c, x, y])
        check_backward("Where", [c, x, y], torch.where)
        for dt in (np.int64, np.int32, np.uint8, np.float64):
            check_forward("Where", [c, (x * 10).astype(dt), (y * 10).astype(dt)])
        xb, yb = x > 0, y > 0  # onnxruntime has no bool Where
        np.testing.assert_array_equal(pyedge_run("Where", [c, xb, yb])[0], np.where(c, xb, yb))


# ----------------------------------------------------------------------------- misc

def test_expand():
    cases = [((3, 1), (2, 3, 4)), ((4,), (3, 4)), ((1, 4), (1,)), ((2, 1, 3), (2, 1, 5, 1)),
             ((), (2, 2)), ((3, 1), (3, 0))]
    for s_in, s_shape in cases:
        x = randn(*s_in)
        shape = np.array(s_shape, np.int64)
        check_forward("Expand", [x, shape])
        if np.broadcast_shapes(s_in, s_shape) and x.size:
            check_backward("Expand", [x, shape],
                           lambda t, s: t.expand(*np.broadcast_shapes(s_in, s_shape)))
        for dt in (np.int64, bool, np.uint8, np.int32):
            check_forward("Expand", [x.astype(dt), shape])


DTYPES = {1: np.float32, 2: np.uint8, 6: np.int32, 7: np.int64, 9: bool, 11: np.float64}


def _defined_cast(x, d_to):
    """The elements of x whose Cast to d_to ONNX defines: a float -> integer cast is undefined
    when the truncated value is out of the target's range (ONNX Cast: "fixed point: undefined
    if OOR"); integer -> integer wraps and anything -> bool is defined everywhere."""
    if x.dtype.kind != "f" or np.dtype(d_to).kind not in "iu":
        return x
    info = np.iinfo(d_to)
    t = np.trunc(x.astype(np.float64))
    return x[(t >= info.min) & (t <= info.max)]


@pytest.mark.arm64
def test_cast_all_pairs():
    vals = np.array([-1.7, 0.0, 2.9, 300.2, 1.0, -0.2], np.float64)
    for (t_from, d_from), (t_to, d_to) in itertools.product(DTYPES.items(), DTYPES.items()):
        # the sources too: 300.2 does not fit int8 (numpy's result differs by CPU and warns)
        x = _defined_cast(vals, d_from).astype(d_from)
        if d_from is np.uint8:
            x = np.array([0, 1, 2, 255, 7, 128], np.uint8)
        # out-of-range float -> integer is undefined: its documented result is checked below
        x = _defined_cast(x, d_to)
        assert x.size >= 4  # -0.2 -> uint8 (0) is defined and stays in
        check_forward("Cast", [x], {"to": t_to})
        check_forward("CastLike", [x, np.zeros(1, d_to)], opset=19)


def saturating_cast(x, d_to):
    """pyedge's documented float -> integer Cast (elementwise_misc.cpp): truncate toward zero,
    saturate to the target's range, NaN -> 0; computed here in Python integers."""
    info = np.iinfo(d_to)
    out = [0 if np.isnan(v) else info.max if v >= 2.0 ** 64 else info.min if v <= -2.0 ** 64
           else min(max(int(v), info.min), info.max) for v in x.astype(np.float64)]
    return np.array(out, d_to)


@pytest.mark.arm64
def test_cast_out_of_range_float_saturates():
    """Out-of-range float -> integer casts (undefined in ONNX and in C++; x86 and aarch64 gave
    different answers) give the same documented result on every arch, in the core and in the
    import's constant folding."""
    from pyedge.import_rewrites import cast_like_core
    big = [2.0 ** 31, 2.0 ** 31 - 128, -2.0 ** 31, -2.0 ** 31 - 256, 2.0 ** 63, -2.0 ** 63,
           2.0 ** 62, 1e19, -1e19, 1e30]
    vals = np.array([-1.7, 300.2, 255.9, 256.0, -0.2, -0.99, 2.5, -2.5, np.nan, np.inf, -np.inf]
                    + big, np.float64)
    for d_from in (np.float32, np.float64):
        x = vals.astype(d_from)
        for t_to, d_to in ((2, np.uint8), (6, np.int32), (7, np.int64)):
            want = saturating_cast(x, d_to)
            (got,) = pyedge_run("Cast", [x], {"to": t_to})
            assert got.dtype == d_to
            np.testing.assert_array_equal(got, want, err_msg=f"{np.dtype(d_from)} -> {np.dtype(d_to)}")
            (got,) = pyedge_run("CastLike", [x, np.zeros(1, d_to)], opset=19)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(cast_like_core(x, np.dtype(d_to)), want)
    assert list(saturating_cast(np.array([-1.7, 300.2, np.nan]), np.uint8)) == [0, 255, 0]


def test_cast_backward():
    x = randn(3, 4)
    check_backward("Cast", [x], lambda t: t.float(), {"to": 1})
    g = check_backward("Cast", [x], lambda t: t.double(), {"to": 11},
                       grad_outputs=[RNG.standard_normal(x.shape)])
    assert g[0].dtype == np.float32
    _, g = _core.run_op("Cast", [x], {"to": 7}, grad_outputs=[None])
    assert g == [None]


def test_cast_unsupported_type():
    with pytest.raises(_core.UnsupportedOpError, match="data type 10"):
        pyedge_run("Cast", [randn(2)], {"to": 10})


def test_identity():
    for x in [randn(2, 3), np.arange(5), np.array([True, False]), np.float64(3.5)]:
        check_forward("Identity", [x])
    check_backward("Identity", [randn(4, 2)], lambda t: t)


def test_dropout_eval_is_identity():
    x = randn(4, 8)
    for opset, inputs in [(13, [x]), (13, [x, np.float32(0.3)]),
                          (13, [x, np.float32(0.3), np.array(False)]), (10, [x])]:
        # onnxruntime returns an all-false mask here; the ONNX reference (and pyedge) all-true
        outs = check_forward("Dropout", inputs, opset=opset)
        assert outs[1].dtype == bool and outs[1].all()
    outs, grads = _core.run_op("Dropout", [x, np.float32(0.3)], {}, opset=13, training=False,
                               grad_outputs=[x, None])
    np.testing.assert_array_equal(outs[0], x)
    assert outs[1].dtype == bool and outs[1].all()
    np.testing.assert_array_equal(grads[0], x)
    # training_mode false pins inference even when the engine trains
    outs, _ = _core.run_op("Dropout", [x, np.float32(0.3), np.array(False)], {}, opset=13,
                           training=True)
    np.testing.assert_array_equal(outs[0], x)


def test_dropout_training():
    x = randn(200, 500)
    ratio = 0.3
    dy = randn(200, 500)
    run = lambda seed, **kw: _core.run_op("Dropout", [x, np.float32(ratio)], {}, opset=13,
                                          training=True, seed=seed, grad_outputs=[dy, None], **kw)
    (y, mask), (dx, _) = run(7)
    assert mask.dtype == bool
    assert abs((1 - mask.mean()) - ratio) < 0.01
    np.testing.assert_allclose(y, np.where(mask, x / (1 - ratio), 0), rtol=1e-6)
    np.testing.assert_allclose(dx, np.where(mask, dy / (1 - ratio), 0), rtol=1e-6)
    # reproducible, seed-dependent, independent of the thread count
    (_, mask2), _ = run(7)
    (_, mask3), _ = run(8)
    np.testing.assert_array_equal(mask, mask2)
    assert (mask != mask3).mean() > 0.2
    old = _core.num_threads()
    try:
        _core.set_num_threads(1)
        (_, mask4), _ = run(7)
    finally:
        _core.set_num_threads(old)
    np.testing.assert_array_equal(mask, mask4)
    # training_mode given as true; ratio 0 is the identity
    outs, _ = _core.run_op("Dropout", [x, np.float32(0.5), np.array(True)], {}, opset=13,
                           training=True, seed=1)
    assert abs(outs[1].mean() - 0.5) < 0.01
    outs, _ = _core.run_op("Dropout", [x, np.float32(0.0)], {}, opset=13, training=True)
    np.testing.assert_array_equal(outs[0], x)


# ----------------------------------------------------------------------------- broadcasting

def test_broadcast_random_patterns():
    """Add forward and gradient sums against numpy for many random shape pairs."""
    rng = np.random.default_rng(5)
    for _ in range(60):
        rank = rng.integers(0, 6)
        out = rng.integers(1, 5, rank)
        sa = [d if rng.random() < 0.6 else 1 for d in out][rng.integers(0, rank + 1):]
        sb = [d if rng.random() < 0.6 else 1 for d in out][rng.integers(0, rank + 1):]
        a, b = randn(*sa), randn(*sb)
        full = np.broadcast_shapes(a.shape, b.shape)
        dy = randn(*full)
        (y,), (da, db) = _core.run_op("Mul", [a, b], {}, grad_outputs=[dy])
        np.testing.assert_allclose(y, a * b, rtol=1e-6)

        def red(g, shape):
            g = g.sum(axis=tuple(range(g.ndim - len(shape))))
            return g.sum(axis=tuple(i for i, d in enumerate(shape) if d == 1), keepdims=True)

        np.testing.assert_allclose(da, red(dy * b, a.shape), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(db, red(dy * a, b.shape), rtol=1e-4, atol=1e-5)


def test_broadcast_large_parallel_paths():
    cases = [((300, 700), (700,)), ((64, 32, 40), (32, 1)), ((1000, 1000), ()),
             ((8, 3000), (8, 1)), ((2, 1, 50000), (2, 3, 1))]
    for sa, sb in cases:
        a, b = randn(*sa), randn(*sb)
        full = np.broadcast_shapes(sa, sb)
        dy = randn(*full)
        (y,), (da, db) = _core.run_op("Add", [a, b], {}, grad_outputs=[dy])
        np.testing.assert_allclose(y, a + b, rtol=1e-6)
        ref_db = dy.astype(np.float64).sum(axis=tuple(range(len(full) - len(sb))))
        ref_db = ref_db.sum(axis=tuple(i for i, d in enumerate(sb) if d == 1), keepdims=True)
        np.testing.assert_allclose(db, ref_db.reshape(sb), rtol=1e-4, atol=1e-3)
        ref_da = dy.astype(np.float64).sum(
            axis=tuple(i for i, (d, f) in enumerate(zip(sa, full)) if d == 1 and f != 1),
            keepdims=True)
        np.testing.assert_allclose(da, ref_da.reshape(sa), rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- errors

def test_errors():
    with pytest.raises(_core.PyedgeError, match=r"shapes \[2,3\] and \[4\] cannot be broadcast"):
        pyedge_run("Add", [randn(2, 3), randn(4)])
    with pytest.raises(_core.PyedgeError, match="same dtype"):
        pyedge_run("Mul", [randn(2), np.array([1, 2], np.int64)])
    with pytest.raises(_core.PyedgeError, match="approximate"):
        pyedge_run("Gelu", [randn(2)], {"approximate": "fast"}, opset=20)
    with pytest.raises(_core.PyedgeError, match="must be known when the plan is built"):
        _core.run_op("Expand", [randn(3), np.array([2.0, 3.0], np.float32)])
    with pytest.raises(_core.PyedgeError, match="cannot be broadcast"):
        pyedge_run("Expand", [randn(3), np.array([2, 4], np.int64)])
    with pytest.raises(_core.PyedgeError, match="condition must be bool"):
        pyedge_run("Where", [randn(3), randn(3), randn(3)])
    with pytest.raises(_core.PyedgeError, match="must be float32"):
        pyedge_run("Sigmoid", [np.array([1, 2], np.int64)])
    with pytest.raises(_core.PyedgeError, match="Floor node 'test' has no backward"):
        _core.run_op("Floor", [randn(3)], grad_outputs=[randn(3)])


def test_unknown_op_is_a_clear_error():
    with pytest.raises(_core.UnsupportedOpError, match="NoSuchOp"):
        _core.run_op("NoSuchOp", [np.ones(2, np.float32)])
