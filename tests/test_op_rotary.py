"""pyedge.Rotary (csrc/ops/rotary.cpp): x·cos + rotate_half(x)·sin on the first rotary_dim
channels (half-split convention, partial rotary), layouts [B, H, T, D] and [B, T, H, D], cos/sin
[Bc, T, rd] (or [T, rd], or 4-D with the singleton head axis). Forward against onnxruntime
running the exporters' op-by-op spelling and against numpy; backward against torch autograd in
float64 (opcheck: zeroed, accumulated and fresh gradient buffers) and finite differences; the
row kernels' SIMD path against the scalar reference."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from pyedge import _core
from opcheck import pyedge_run


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rotary_np(x, cos, sin, layout="bhtd"):
    """Reference in float64: broadcast cos/sin [Bc, T, rd] over heads, rotate the first rd."""
    rd = cos.shape[-1]
    c, s = (t.reshape((1,) * (3 - t.ndim) + t.shape) if t.ndim < 3 else t for t in (cos, sin))
    c, s = (t[:, None] if layout == "bhtd" else t[:, :, None] for t in (c, s))
    x = x.astype(np.float64)
    xr = x[..., :rd]
    y = xr * c + rotate_half(xr) * s
    return np.concatenate([y, x[..., rd:]], axis=-1)


def tables(rng, Bc, T, rd, base=10000.0):
    """cos/sin as transformers computes them: positions times inverse frequencies, doubled."""
    inv = 1.0 / base ** (np.arange(0, rd, 2) / rd)
    pos = np.arange(T)[None, :] + rng.integers(0, 5, (Bc, 1))
    f = pos[..., None] * inv
    emb = np.concatenate([f, f], -1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


CASES = [  # (B, H, T, D, rd, Bc, layout)
    (2, 3, 5, 16, 16, 1, "bhtd"),
    (2, 4, 7, 64, 64, 2, "bhtd"),      # a table per sequence
    (1, 2, 9, 24, 6, 1, "bhtd"),       # partial rotary, h = 3 (scalar tail only)
    (2, 2, 4, 80, 20, 1, "bhtd"),      # Phi-style partial, h = 10 (vector + tail)
    (2, 3, 6, 32, 32, 2, "bthd"),
    (1, 5, 3, 40, 10, 1, "bthd"),
]


@pytest.mark.arm64
@pytest.mark.parametrize("B,H,T,D,rd,Bc,layout", CASES)
def test_rotary_forward_matches_numpy(B, H, T, D, rd, Bc, layout):
    rng = np.random.default_rng(D + rd)
    shape = (B, H, T, D) if layout == "bhtd" else (B, T, H, D)
    x = rng.standard_normal(shape).astype(np.float32)
    cos, sin = tables(rng, Bc, T, rd)
    (y,) = pyedge_run("Rotary", [x, cos, sin], {"layout": layout}, domain="pyedge")
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, rotary_np(x, cos, sin, layout), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y[..., rd:], x[..., rd:])  # pass-through is a copy


@pytest.mark.arm64
def test_rotary_table_forms_agree():
    """[Bc, T, rd], [T, rd], [Bc, 1, T, rd] (bhtd) and [Bc, T, 1, rd] (bthd), T broadcast."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 8)).astype(np.float32)
    cos, sin = tables(rng, 1, 5, 8)
    (ref,) = pyedge_run("Rotary", [x, cos, sin], {}, domain="pyedge")
    for c, s in ((cos[0], sin[0]), (cos[:, None], sin[:, None])):
        (y,) = pyedge_run("Rotary", [x, c, s], {}, domain="pyedge")
        np.testing.assert_array_equal(y, ref)
    xt = np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    (yt,) = pyedge_run("Rotary", [xt, cos[:, :, None], sin[:, :, None]], {"layout": "bthd"},
                       domain="pyedge")
    np.testing.assert_array_equal(yt.transpose(0, 2, 1, 3), ref)
    (y1,) = pyedge_run("Rotary", [x, cos[:, 2:3], sin[:, 2:3]], {}, domain="pyedge")
    np.testing.assert_allclose(y1, rotary_np(x, cos[:, 2:3], sin[:, 2:3]), rtol=1e-6, atol=1e-6)


def _exported_chain(shape, rd):
    """The dynamo exporter's spelling (Slice/Neg/Concat/Mul/Add; partial: Slice and Concat
    around it) as a one-op-per-node ONNX model."""
    h = rd // 2
    ints = lambda n, v: numpy_helper.from_array(np.array(v, np.int64), n)  # noqa: E731
    inits = [ints("z", [0]), ints("h", [h]), ints("rd", [rd]), ints("end", [2 ** 63 - 1]),
             ints("ax", [-1]), ints("one", [1])]
    nodes = [helper.make_node("Unsqueeze", ["cos", "one"], ["c4"]),
             helper.make_node("Unsqueeze", ["sin", "one"], ["s4"])]
    xin = "x"
    if rd < shape[-1]:
        nodes.append(helper.make_node("Slice", ["x", "z", "rd", "ax"], ["xr"]))
        xin = "xr"
    nodes += [helper.make_node("Mul", [xin, "c4"], ["xc"]),
              helper.make_node("Slice", [xin, "z", "h", "ax", "one"], ["x1"]),
              helper.make_node("Slice", [xin, "h", "end", "ax", "one"], ["x2"]),
              helper.make_node("Neg", ["x2"], ["nx2"]),
              helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
              helper.make_node("Mul", ["rot", "s4"], ["rs"]),
              helper.make_node("Add", ["xc", "rs"], ["yr"])]
    if rd < shape[-1]:
        nodes += [helper.make_node("Slice", ["x", "rd", "end", "ax"], ["xp"]),
                  helper.make_node("Concat", ["yr", "xp"], ["y"], axis=-1)]
    else:
        nodes.append(helper.make_node("Identity", ["yr"], ["y"]))
    f = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s))  # noqa: E731
    g = helper.make_graph(nodes, "rope", [f("x", shape), f("cos", [1, shape[2], rd]),
                                          f("sin", [1, shape[2], rd])], [f("y", shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.arm64
@pytest.mark.parametrize("shape,rd", [((2, 3, 7, 16), 16), ((1, 2, 5, 32), 8)])
def test_rotary_forward_matches_onnxruntime(shape, rd):
    import onnxruntime as ort
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    cos, sin = tables(rng, 1, shape[2], rd)
    sess = ort.InferenceSession(_exported_chain(shape, rd).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    (ref,) = sess.run(None, {"x": x, "cos": cos, "sin": sin})
    (y,) = pyedge_run("Rotary", [x, cos, sin], {}, domain="pyedge")
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def rotary_torch(layout, rd):
    def f(x, cos, sin):
        import torch
        c, s = (t.reshape((1,) * (3 - t.dim()) + tuple(t.shape)) for t in (cos, sin))
        c, s = (t[:, None] if layout == "bhtd" else t[:, :, None] for t in (c, s))
        xr, xp = x[..., :rd], x[..., rd:]
        h = rd // 2
        rot = torch.cat([-xr[..., h:], xr[..., :h]], -1)
        return torch.cat([xr * c + rot * s, xp], -1)
    return f


@pytest.mark.parametrize("B,H,T,D,rd,Bc,layout", CASES)
def test_rotary_backward_matches_torch(B, H, T, D, rd, Bc, layout):
    import torch
    rng = np.random.default_rng(7)
    shape = (B, H, T, D) if layout == "bhtd" else (B, T, H, D)
    x = rng.standard_normal(shape).astype(np.float32)
    cos, sin = tables(rng, Bc, T, rd)
    dy = rng.standard_normal(shape).astype(np.float32)
    f = rotary_torch(layout, rd)
    # cos and sin are plan-time constants here (they take no gradient): only dX is checked
    _, grads = _core.run_op("Rotary", [x, cos, sin], {"layout": layout}, domain="pyedge",
                            grad_outputs=[dy], const_inputs=[1, 2])
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (f(xt, torch.tensor(cos, dtype=torch.float64), torch.tensor(sin, dtype=torch.float64))
     * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    assert grads[1] is None and grads[2] is None
    np.testing.assert_allclose(grads[0], xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    # the three gradient-buffer modes: added onto ones, and fresh (NaN-filled) buffers
    for init, off in (("ones", 1.0), ("fresh", 0.0)):
        _, g = _core.run_op("Rotary", [x, cos, sin], {"layout": layout}, domain="pyedge",
                            grad_outputs=[dy], const_inputs=[1, 2], grad_init=init)
        np.testing.assert_allclose(g[0] - off, grads[0], rtol=1e-6, atol=1e-6, err_msg=init)


@pytest.mark.arm64
def test_rotary_backward_finite_differences():
    """dX against central differences of the forward (float64 sums of float32 outputs)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 3, 12)).astype(np.float32)
    cos, sin = tables(rng, 1, 3, 8)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, (dx, _, _) = _core.run_op("Rotary", [x, cos, sin], {}, domain="pyedge",
                                 grad_outputs=[dy], const_inputs=[1, 2])
    eps = 1e-2  # the op is linear in x: differences are exact up to rounding
    fd = np.zeros(x.size)
    for i in range(x.size):
        xp, xm = x.copy().ravel(), x.copy().ravel()
        xp[i] += eps
        xm[i] -= eps
        (yp,) = pyedge_run("Rotary", [xp.reshape(x.shape), cos, sin], {}, domain="pyedge")
        (ym,) = pyedge_run("Rotary", [xm.reshape(x.shape), cos, sin], {}, domain="pyedge")
        fd[i] = ((yp.astype(np.float64) - ym) * dy).sum() / (2 * eps)
    np.testing.assert_allclose(dx.ravel(), fd, rtol=1e-3, atol=1e-4)


@pytest.mark.arm64
def test_rotary_refuses_a_gradient_for_cos_and_sin():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 3, 8)).astype(np.float32)
    cos, sin = tables(rng, 1, 3, 8)
    with pytest.raises(Exception, match="Rotary.*cos and sin"):
        _core.run_op("Rotary", [x, cos, sin], {}, domain="pyedge",
                     grad_outputs=[np.ones_like(x)])


@pytest.mark.arm64
@pytest.mark.parametrize("inputs,attrs,msg", [
    ((np.zeros((2, 3, 8), np.float32), np.zeros((3, 8), np.float32), np.zeros((3, 8), np.float32)),
     {}, "X must be 4-D"),
    ((np.zeros((1, 2, 3, 8), np.float32), np.zeros((1, 3, 7), np.float32),
      np.zeros((1, 3, 7), np.float32)), {}, "even"),
    ((np.zeros((1, 2, 3, 8), np.float32), np.zeros((1, 3, 10), np.float32),
      np.zeros((1, 3, 10), np.float32)), {}, "rotary_dim"),
    ((np.zeros((1, 2, 3, 8), np.float32), np.zeros((1, 4, 8), np.float32),
      np.zeros((1, 4, 8), np.float32)), {}, "do not match"),
    ((np.zeros((1, 2, 3, 8), np.float32), np.zeros((1, 3, 8), np.float32),
      np.zeros((1, 3, 6), np.float32)), {}, "same shape"),
    ((np.zeros((1, 2, 3, 8), np.float32), np.zeros((1, 2, 3, 8), np.float32),
      np.zeros((1, 2, 3, 8), np.float32)), {}, "head axis"),
    ((np.zeros((1, 2, 3, 8), np.float32), np.zeros((1, 3, 8), np.float32),
      np.zeros((1, 3, 8), np.float32)), {"layout": "hbtd"}, "layout"),
], ids=["rank3_x", "odd_rd", "rd_gt_D", "positions", "cos_sin_differ", "per_head_table",
        "layout"])
def test_rotary_errors_name_the_node(inputs, attrs, msg):
    with pytest.raises(Exception, match=f"Rotary node.*{msg}"):
        pyedge_run("Rotary", list(inputs), attrs, domain="pyedge")


# ---- SIMD path vs the scalar reference (the same template on simd::Scalar)
@pytest.mark.arm64
@pytest.mark.parametrize("D,rd", [(2, 2), (8, 8), (16, 16), (24, 6), (40, 34), (64, 64),
                                  (128, 128), (96, 32), (80, 20)])
def test_rotary_rows_simd_vs_scalar(D, rd):
    rng = np.random.default_rng(D * 7 + rd)
    rows = 5
    x = rng.standard_normal((rows, D)).astype(np.float32)
    ang = rng.uniform(-4, 4, (rows, rd))
    c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    for name in ("rotary", "rotary_bwd"):
        v = _core.simd_kernel(name, x, c, s, scalar=False)
        r = _core.simd_kernel(name, x, c, s, scalar=True)
        np.testing.assert_allclose(v, r, rtol=1e-6, atol=1e-7, err_msg=name)
    h = rd // 2
    x64 = x.astype(np.float64)
    ref = np.concatenate([x64[:, :rd] * c + rotate_half(x64[:, :rd]) * s, x64[:, rd:]], 1)
    np.testing.assert_allclose(_core.simd_kernel("rotary", x, c, s), ref, rtol=1e-6, atol=1e-6)
    # backward on dy = x: dx[:h] = dy[:h]c[:h] + dy[h:]s[h:], dx[h:] = dy[h:]c[h:] - dy[:h]s[:h]
    d1, d2 = x64[:, :h], x64[:, h:rd]
    bref = np.concatenate([d1 * c[:, :h] + d2 * s[:, h:], d2 * c[:, h:] - d1 * s[:, :h],
                           x64[:, rd:]], 1)
    np.testing.assert_allclose(_core.simd_kernel("rotary_bwd", x, c, s), bref, rtol=1e-6,
                               atol=1e-6)
