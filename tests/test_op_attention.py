"""pyedge.Attention (csrc/ops/attention.cpp): softmax(scale * Q Kᵀ + mask) V in one op, both
layouts, against torch in float64; its backward (which recomputes P from the saved log-sum-exp)
through check_backward, also with only some inputs wanting a gradient."""
import numpy as np
import pytest

import pyedge
from pyedge import _core
from opcheck import check_backward, pyedge_run

MASKED = -3.4e38  # the exporters' "minus infinity"


def make_inputs(B, H, L, Lk, D, Dv, layout="bhld", mask_shape=None, seed=0, full_row=False):
    rng = np.random.default_rng(seed)

    def t(rows, cols):
        shape = (B, H, rows, cols) if layout == "bhld" else (B, rows, H, cols)
        return rng.standard_normal(shape).astype(np.float32)

    inputs = [t(L, D), t(Lk, D), t(Lk, Dv)]
    if mask_shape is not None:
        mask = rng.standard_normal(mask_shape).astype(np.float32)
        if mask_shape[-1] > 1:
            mask[..., 0] = MASKED  # one masked key per row
        if full_row:  # and rows where every key is masked
            mask[..., 1, :] = MASKED
        inputs.append(mask)
    return inputs


def torch_ref(scale, layout):
    import torch

    def f(q, k, v, mask=None):
        if layout == "blhd":
            q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
        s = scale * q @ k.transpose(-1, -2)
        if mask is not None:
            s = s + mask
        o = torch.softmax(s, dim=-1) @ v
        return o.permute(0, 2, 1, 3) if layout == "blhd" else o
    return f


def run_ref(inputs, scale, layout):
    import torch
    return torch_ref(scale, layout)(*[torch.tensor(x, dtype=torch.float64) for x in inputs]).numpy()


# (B, H, L, Lk, D, Dv, mask shape over the logical scores [B, H, L, Lk])
CASES = [
    (2, 3, 5, 7, 3, 6, None),
    (2, 3, 5, 7, 3, 6, (2, 1, 1, 7)),
    (2, 3, 5, 7, 3, 6, (2, 1, 5, 7)),
    (2, 3, 5, 7, 3, 6, (1, 1, 5, 7)),
    (2, 3, 5, 7, 3, 6, (2, 3, 5, 7)),
    (2, 3, 5, 7, 3, 6, (7,)),
    (1, 2, 19, 33, 17, 20, (1, 1, 19, 33)),  # small_gemm's vector blocks plus remainders
    (2, 3, 64, 64, 32, 32, (2, 1, 1, 64)),   # a larger one
    (2, 3, 5, 7, 3, 6, (2, 1, 5, 1)),        # one mask value per row
    (1, 2, 3, 600, 4, 5, (1, 1, 1, 600)),    # beyond small_gemm (BLAS products)
    # the fused per-slice kernels (attention_kernels.h: Lk, D, Dv whole vectors of 16 floats
    # with AVX-512, 8 with AVX2): row blocks of 8 then 4, 2, 1 rows; 32-column chunks then a
    # single vector; every mask form (keys, per row and key, one value per row, none)
    (2, 3, 37, 48, 16, 32, (2, 1, 1, 48)),
    (2, 3, 37, 48, 16, 32, (2, 1, 37, 48)),
    (2, 3, 37, 48, 16, 32, (2, 3, 37, 1)),
    (2, 3, 37, 48, 16, 32, (2, 1, 1, 1)),
    (1, 2, 19, 32, 48, 16, None),
    (1, 2, 8, 16, 16, 48, (1, 1, 8, 16)),
]
IDS = [f"{c[2]}x{c[3]}x{c[4]}x{c[5]}-mask{c[6]}" for c in CASES]


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_attention_matches_torch(case, layout):
    B, H, L, Lk, D, Dv, ms = case
    scale = 0.35
    inputs = make_inputs(B, H, L, Lk, D, Dv, layout, ms)
    attrs = {"scale": scale, "layout": layout}
    (o,) = pyedge_run("Attention", inputs, attrs, domain="pyedge")
    want = run_ref(inputs, scale, layout)
    assert o.shape == want.shape and o.dtype == np.float32
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=2e-6)
    grads = check_backward("Attention", inputs, torch_ref(scale, layout), attrs, domain="pyedge")
    assert grads[0] is not None and grads[1] is not None and grads[2] is not None
    if ms is not None:
        assert grads[3] is None  # the mask takes no gradient


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("dims,mask_shape", [
    ((5, 7, 3, 6), (2, 1, 5, 7)), ((5, 7, 3, 6), (2, 3, 5, 7)),
    ((11, 32, 16, 16), (2, 1, 11, 32)),  # the fused kernels
], ids=["5x7-mask-b1", "5x7-mask-bh", "fused-11x32"])
def test_fully_masked_rows_give_uniform_weights(layout, dims, mask_shape):
    # every key of row 1 masked with -3.4e38: softmax (and torch) give uniform weights there,
    # forward and backward (P recomputed from the saved log-sum-exp must stay uniform too)
    scale = 0.5
    inputs = make_inputs(2, 3, *dims, layout, mask_shape, full_row=True)
    attrs = {"scale": scale, "layout": layout}
    (o,) = pyedge_run("Attention", inputs, attrs, domain="pyedge")
    want = run_ref(inputs, scale, layout)
    assert np.isfinite(o).all()
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=2e-6)
    v = inputs[2] if layout == "bhld" else inputs[2].transpose(0, 2, 1, 3)
    o_bh = o if layout == "bhld" else o.transpose(0, 2, 1, 3)
    np.testing.assert_allclose(o_bh[:, :, 1], v.mean(2), rtol=1e-5, atol=1e-6)
    if layout == "bhld":  # the same as the unfused MaskedSoftmax then a product
        s = inputs[0] @ np.swapaxes(inputs[1], -1, -2)
        (p,) = pyedge_run("MaskedSoftmax", [s, inputs[3]], {"scale": scale}, domain="pyedge")
        np.testing.assert_allclose(o, p @ inputs[2], rtol=1e-4, atol=1e-5)
    check_backward("Attention", inputs, torch_ref(scale, layout), attrs, domain="pyedge")


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("const", [[1], [0, 1], [0, 2], [1, 2]],
                         ids=["dQ+dV", "dV-only", "dK-only", "dQ-only"])
@pytest.mark.parametrize("dims", [(5, 7, 3, 6), (13, 32, 16, 32)], ids=["5x7", "fused-13x32"])
def test_backward_with_some_inputs_frozen(layout, const, dims):
    # inputs listed in const_inputs take no gradient (din.data == nullptr): the op skips them
    # (dV only: no dP, dS at all) and the others are unchanged
    inputs = make_inputs(2, 3, *dims, layout, (2, 1, 1, dims[1]), seed=3)
    attrs = {"scale": 0.7, "layout": layout}
    full = check_backward("Attention", inputs, torch_ref(0.7, layout), attrs, domain="pyedge")
    part = check_backward("Attention", inputs, torch_ref(0.7, layout), attrs, domain="pyedge",
                          const_inputs=const)
    for i in range(3):
        if i in const:
            assert part[i] is None
        else:
            np.testing.assert_array_equal(part[i], full[i])


@pytest.fixture
def restore_threads():
    before = _core.num_threads()
    yield
    _core.set_num_threads(before)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("dims", [(33, 40, 16, 24), (33, 48, 16, 32)], ids=["33x40", "fused-33x48"])
def test_one_and_two_threads_agree_exactly(layout, dims, restore_threads):
    inputs = make_inputs(2, 3, *dims, layout, (2, 1, 1, dims[1]), seed=4)
    attrs = {"scale": 0.25, "layout": layout}
    g = np.random.default_rng(9).standard_normal(
        pyedge_run("Attention", inputs, attrs, domain="pyedge")[0].shape).astype(np.float32)
    res = []
    for nt in (1, 2):
        _core.set_num_threads(nt)
        outs, grads = _core.run_op("Attention", inputs, attrs, domain="pyedge",
                                   grad_outputs=[g])
        res.append((outs[0], grads[:3]))
    np.testing.assert_array_equal(res[0][0], res[1][0])
    for a, b in zip(res[0][1], res[1][1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 64), (2, 1, 37, 64), (2, 3, 37, 64)],
                         ids=["keys", "rows", "heads-rows"])
def test_skipped_masked_keys_change_nothing(layout, mask_shape, restore_threads):
    # the fused kernels skip keys masked (-3.4e38, -inf) to the end of a row (padding;
    # attention_kernels.h, key_ends); a mask of -1e25 gives those keys the same zero weight
    # without the skip: outputs and gradients must agree to the bit, on one and two threads
    B, H, L, Lk, D, Dv = 2, 3, 37, 64, 16, 32
    inputs = make_inputs(B, H, L, Lk, D, Dv, layout, seed=5)
    rng = np.random.default_rng(6)
    mask = rng.standard_normal(mask_shape).astype(np.float32)
    rows = mask.reshape(-1, Lk)
    for r in rows:  # 0 to 60 padded keys, some with -inf
        p = int(rng.integers(0, 61))
        r[Lk - p:] = MASKED
        if p and rng.integers(0, 2):
            r[-1] = -np.inf
    if mask_shape[2] > 1:
        mask[:, :, 3] = MASKED   # a row masked entirely: uniform weights, no skip
        mask[:, :, 5, 40:] = -1e25  # masked, but not hard: the keys stay
    soft = np.where(mask <= -1e37, np.float32(-1e25), mask).astype(np.float32)
    attrs = {"scale": 0.4, "layout": layout}
    g = np.random.default_rng(7).standard_normal(
        pyedge_run("Attention", inputs + [mask], attrs, domain="pyedge")[0].shape
    ).astype(np.float32)
    for nt in (1, 2):
        _core.set_num_threads(nt)
        res = [_core.run_op("Attention", inputs + [m], attrs, domain="pyedge", grad_outputs=[g])
               for m in (mask, soft)]
        np.testing.assert_array_equal(res[0][0][0], res[1][0][0])
        for a, b in zip(res[0][1][:3], res[1][1][:3]):
            np.testing.assert_array_equal(a, b)
    want = run_ref(inputs + [mask], 0.4, layout)
    np.testing.assert_allclose(res[0][0][0], want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("live", ["padding", "cls", "middle", "none"])
def test_zero_output_gradient_rows(layout, live, restore_threads):
    # the fused backward skips row blocks whose dO rows are all 0 (positions the loss does not
    # see); their dQ rows are 0 and they add nothing to dK and dV: torch's gradients, and the
    # dQ rows of the other blocks as without the zero rows, to the bit
    import torch
    B, H, L, Lk, D, Dv = 2, 3, 37, 48, 16, 32
    inputs = make_inputs(B, H, L, Lk, D, Dv, layout, (B, 1, 1, Lk), seed=8)
    attrs = {"scale": 0.3, "layout": layout}
    shape = (B, H, L, Dv) if layout == "bhld" else (B, L, H, Dv)
    g_full = np.random.default_rng(10).standard_normal(shape).astype(np.float32)
    rows = {"padding": np.arange(L) < 21, "cls": np.arange(L) == 0,
            "middle": (np.arange(L) < 8) | (np.arange(L) >= 24), "none": np.zeros(L, bool)}[live]
    keep = rows[None, None, :, None] if layout == "bhld" else rows[None, :, None, None]
    g = np.where(keep, g_full, np.float32(0)).astype(np.float32)
    for nt in (1, 2):
        _core.set_num_threads(nt)
        _, grads = _core.run_op("Attention", inputs, attrs, domain="pyedge", grad_outputs=[g])
        _, full = _core.run_op("Attention", inputs, attrs, domain="pyedge", grad_outputs=[g_full])
        dq = grads[0] if layout == "bhld" else grads[0].transpose(0, 2, 1, 3)
        dq_full = full[0] if layout == "bhld" else full[0].transpose(0, 2, 1, 3)
        assert (dq[:, :, ~rows] == 0).all()
        np.testing.assert_array_equal(dq[:, :, rows], dq_full[:, :, rows])
    t = [torch.tensor(x, dtype=torch.float64, requires_grad=i < 3) for i, x in enumerate(inputs)]
    torch_ref(0.3, layout)(*t).backward(torch.tensor(g, dtype=torch.float64))
    for i in range(3):
        np.testing.assert_allclose(grads[i], t[i].grad.numpy(), rtol=1e-4, atol=1e-5)


def _z(*shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("inputs,attrs,match", [
    ([_z(2, 3, 5, 4), _z(2, 2, 7, 4), _z(2, 2, 7, 4)], {}, "batch and head dims"),
    ([_z(2, 3, 5, 4), _z(1, 3, 7, 4), _z(1, 3, 7, 4)], {}, "batch and head dims"),
    ([_z(2, 5, 3, 4), _z(2, 7, 2, 4), _z(2, 7, 3, 4)], {"layout": "blhd"}, "batch and head dims"),
    ([_z(2, 3, 5, 4), _z(2, 3, 7, 8), _z(2, 3, 7, 4)], {}, "same head size D"),
    ([_z(2, 3, 5, 4), _z(2, 3, 7, 4), _z(2, 3, 6, 4)], {}, "same number of keys"),
    ([_z(2, 3, 5, 4), _z(2, 3, 7, 4), _z(2, 3, 7, 4), _z(2, 1, 1, 5)], {}, "does not broadcast"),
    ([_z(2, 3, 5, 4), _z(2, 3, 7, 4), _z(2, 3, 7, 4), _z(1, 2, 3, 5, 7)], {}, "higher rank"),
    ([_z(2, 3, 5, 4), _z(2, 3, 7, 4), _z(2, 3, 7, 4)], {"layout": "bshd"}, "layout must be"),
    ([_z(3, 5, 4), _z(3, 7, 4), _z(3, 7, 4)], {}, "must have rank 4"),
])
def test_errors_name_the_node_and_shapes(inputs, attrs, match):
    with pytest.raises(pyedge.PyedgeError, match=match) as e:
        pyedge_run("Attention", inputs, attrs, domain="pyedge")
    assert "'test'" in str(e.value)  # the node's name (n.where())
    if match != "layout must be":
        assert "[" in str(e.value)  # and the shapes


def _session_model(fused, layout, B=2, H=3, L=6, D=4):
    """q, k, v trainable; softmax(q kᵀ s + mask) v as pyedge.Attention or as the unfused
    chain (with the head-split Transposes for blhd)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(11)
    shp = [B, H, L, D] if layout == "bhld" else [B, L, H, D]
    inits = [numpy_helper.from_array(rng.standard_normal(shp).astype(np.float32), n)
             for n in ("q", "k", "v")]
    if fused:
        nodes = [helper.make_node("Attention", ["q", "k", "v", "mask"], ["o"], domain="pyedge",
                                  scale=0.5, layout=layout)]
    else:
        names = ["q", "k", "v"]
        nodes = []
        if layout == "blhd":
            nodes = [helper.make_node("Transpose", [n], [n + "t"], perm=[0, 2, 1, 3])
                     for n in names]
            names = [n + "t" for n in names]
        nodes += [helper.make_node("MatMul", names[:2], ["s"], domain="pyedge", trans_b=1),
                  helper.make_node("MaskedSoftmax", ["s", "mask"], ["p"], domain="pyedge",
                                   scale=0.5),
                  helper.make_node("MatMul", ["p", names[2]],
                                   ["o" if layout == "bhld" else "ot"])]
        if layout == "blhd":
            nodes.append(helper.make_node("Transpose", ["ot"], ["o"], perm=[0, 2, 1, 3]))
    g = helper.make_graph(
        nodes, "attn", [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [B, 1, 1, L])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, shp)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid("pyedge", 1)])


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("L,D", [(6, 4), (16, 16)], ids=["6x4", "fused-16x16"])
def test_training_session_matches_the_unfused_chain(layout, L, D):
    # through the planner: hidden LSE output, backward_reads_*, fresh gradient buffers
    B, H = 2, 3
    mask = np.zeros((B, 1, 1, L), np.float32)
    mask[1, ..., -2:] = MASKED
    rng = np.random.default_rng(12)
    target = rng.standard_normal((B, H, L, D) if layout == "bhld" else (B, L, H, D)
                                 ).astype(np.float32)
    sess = {f: pyedge.TrainingSession(_session_model(f, layout, B, H, L, D),
                                      train=["q", "k", "v"],
                                      loss="mse", optimizer=pyedge.SGD(lr=0.1), fuse=False)
            for f in (True, False)}
    for _ in range(3):
        losses = {f: s.step({"mask": mask}, target) for f, s in sess.items()}
        np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
        gf, gc = sess[True].gradients(), sess[False].gradients()
        for n in ("q", "k", "v"):
            np.testing.assert_allclose(gf[n], gc[n], rtol=1e-4, atol=1e-6, err_msg=n)
