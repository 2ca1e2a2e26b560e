import numpy as np
import pytest
from optional_deps import optional
torch = optional("torch")

from opcheck import check_backward, check_forward
from pyedge import _core

rng = np.random.default_rng(0)


def randn(*s):
    return rng.standard_normal(s).astype(np.float32)


@pytest.mark.parametrize("a,b", [
    ((3, 4), (4, 5)),            # plain
    ((2, 3, 4), (4, 5)),         # batched x weight: one folded GEMM
    ((2, 3, 4), (2, 4, 5)),      # batched x batched
    ((2, 1, 3, 4), (5, 4, 2)),   # broadcast batch dims
    ((4,), (4, 5)),              # vector on the left
    ((3, 4), (4,)),              # vector on the right
    ((4, 3, 4), (1, 4, 6)),
])
def test_matmul(a, b):
    A, B = randn(*a), randn(*b)
    check_forward("MatMul", [A, B], rtol=1e-4, atol=1e-4)
    check_backward("MatMul", [A, B], torch.matmul)


def test_matmul_frozen_weight_gets_no_gradient():
    A, B = randn(2, 3, 4), randn(4, 5)
    _, grads = _core.run_op("MatMul", [A, B], grad_outputs=[randn(2, 3, 5)], const_inputs=[1])
    assert grads[1] is None and grads[0] is not None


def test_matmul_shape_error():
    with pytest.raises(_core.PyedgeError, match="inner dimensions"):
        _core.run_op("MatMul", [randn(3, 4), randn(5, 6)])


@pytest.mark.parametrize("ta,tb,c", [(0, 0, (5,)), (0, 1, (5,)), (1, 0, (3, 5)), (1, 1, (1,)),
                                     (0, 1, None), (0, 0, (3, 1))])
def test_gemm(ta, tb, c):
    A = randn(4, 3) if ta else randn(3, 4)
    B = randn(5, 4) if tb else randn(4, 5)
    C = randn(*c) if c else None
    attrs = {"transA": ta, "transB": tb, "alpha": 0.7, "beta": 1.3}
    inputs = [A, B] + ([C] if c else [])
    check_forward("Gemm", inputs, attrs, rtol=1e-4, atol=1e-4)

    def ref(a, b, cc=None):
        a = a.T if ta else a
        b = b.T if tb else b
        y = 0.7 * a @ b
        return y if cc is None else y + 1.3 * cc
    check_backward("Gemm", inputs, ref, attrs)


def _lora_ref(trans_w, s):
    def ref(x, W, A, B, b=None):
        y = x @ (W.T if trans_w else W) + s * (x @ A.T) @ B.T
        return y if b is None else y + b
    return ref


@pytest.mark.parametrize("trans_w,bias,x_shape", [(0, False, (2, 3, 6)), (1, True, (4, 6)),
                                                  (1, False, (2, 2, 3, 6))])
def test_lora_matmul_matches_peft_formula(trans_w, bias, x_shape):
    r, k, n, s = 3, 6, 5, 0.75
    x = randn(*x_shape)
    W = randn(n, k) if trans_w else randn(k, n)
    A, B = randn(r, k), randn(n, r)
    ins = [x, W, A, B] + ([randn(n)] if bias else [])
    attrs = {"scale": s, "trans_w": trans_w}
    ref = _lora_ref(trans_w, s)
    out = _core.run_op("LoraMatMul", ins, attrs, domain="pyedge")[0][0]
    with torch.no_grad():
        expect = ref(*[torch.tensor(t) for t in ins]).numpy()
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-4)
    check_backward("LoraMatMul", ins, ref, attrs, domain="pyedge")


def test_lora_matmul_dropout_masks_adapter_path_only():
    x, W, A, B = randn(64, 8), randn(8, 4), randn(2, 8), randn(4, 2)
    attrs = {"scale": 1.0, "dropout": 0.5}
    eval_out = _core.run_op("LoraMatMul", [x, W, A, B], attrs, domain="pyedge")[0][0]
    np.testing.assert_allclose(eval_out, x @ W + (x @ A.T) @ B.T, rtol=1e-4, atol=1e-4)
    train_out = _core.run_op("LoraMatMul", [x, W, A, B], attrs, domain="pyedge",
                             training=True, seed=3)[0][0]
    assert not np.allclose(train_out, eval_out)
    # With B = 0 the adapter path vanishes, dropout or not.
    base = _core.run_op("LoraMatMul", [x, W, A, np.zeros_like(B)], attrs, domain="pyedge",
                        training=True, seed=3)[0][0]
    np.testing.assert_allclose(base, x @ W, rtol=1e-4, atol=1e-4)


# Many rows: the forward runs one GEMM on the merged weight W + s·B·A, the adapter gradients
# come from one pass over row chunks in fixed partitions (12 partitions of up to 2 chunks of
# 128 rows at M = 3100); r = 20 > 16 takes the plain BLAS calls instead.
@pytest.mark.parametrize("m,k,n,r", [(3100, 24, 40, 8), (700, 33, 17, 3), (300, 20, 24, 20),
                                     (40, 48, 48, 16)])
@pytest.mark.parametrize("trans_w", [0, 1])
def test_lora_matmul_many_rows(m, k, n, r, trans_w):
    s = 0.5
    x = randn(m, k) * 0.5
    W = randn(n, k) if trans_w else randn(k, n)
    ins = [x, W, randn(r, k), randn(n, r), randn(n)]
    attrs = {"scale": s, "trans_w": trans_w}
    ref = _lora_ref(trans_w, s)
    out = _core.run_op("LoraMatMul", ins, attrs, domain="pyedge")[0][0]
    with torch.no_grad():
        expect = ref(*[torch.tensor(t, dtype=torch.float64) for t in ins]).numpy()
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-4)
    check_backward("LoraMatMul", ins, ref, attrs, domain="pyedge", rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("frozen", [[1, 2], [1, 3], [0, 1, 3], [0, 1, 2]])
def test_lora_matmul_pruned_gradients(frozen):
    """Only the gradients asked for are written; each equals the full backward's."""
    x, W, A, B = randn(500, 24), randn(24, 40), randn(8, 24), randn(40, 8)
    g = randn(500, 40)
    attrs = {"scale": 2.0}
    _, full = _core.run_op("LoraMatMul", [x, W, A, B], attrs, domain="pyedge", grad_outputs=[g])
    _, part = _core.run_op("LoraMatMul", [x, W, A, B], attrs, domain="pyedge", grad_outputs=[g],
                           const_inputs=frozen)
    for i in range(4):
        if i in frozen:
            assert part[i] is None
        else:
            np.testing.assert_allclose(part[i], full[i], rtol=1e-6, atol=1e-6)


def test_lora_matmul_adapter_grads_do_not_depend_on_threads():
    x, W, A, B = randn(3000, 24), randn(24, 40), randn(8, 24), randn(40, 8)
    g = randn(3000, 40)
    before = _core.num_threads()
    try:
        res = []
        for nt in (1, 2):
            _core.set_num_threads(nt)
            res.append(_core.run_op("LoraMatMul", [x, W, A, B], {"scale": 0.5}, domain="pyedge",
                                    grad_outputs=[g], const_inputs=[1])[1])
    finally:
        _core.set_num_threads(before)
    np.testing.assert_array_equal(res[0][2], res[1][2])
    np.testing.assert_array_equal(res[0][3], res[1][3])


def test_lora_matmul_dropout_backward_matches_its_mask():
    """With dropout the adapter sees xd = keep·x/(1-p). A, B and dY are positive, so every
    element of dx's adapter share is either clearly positive (kept) or exactly 0 (dropped):
    that recovers the mask, and with it y, dA, dB and dx against float64."""
    p, s = 0.25, 0.5
    x, W = randn(300, 16), randn(16, 20)
    A, B, g = [np.abs(randn(*sh)) + 0.1 for sh in ((4, 16), (20, 4), (300, 20))]
    attrs = {"scale": s, "dropout": p}
    (y,), grads = _core.run_op("LoraMatMul", [x, W, A, B], attrs, domain="pyedge",
                               training=True, seed=5, grad_outputs=[g])
    f64 = [torch.tensor(v, dtype=torch.float64) for v in (x, W, A, B, g)]
    dense = (s * f64[4] @ f64[3] @ f64[2]).numpy() / (1 - p)   # dt·A/(1-p) > 0
    share = grads[0] - g @ W.T
    keep = share > 0.5 * dense
    assert np.all(np.abs(share[~keep]) < 1e-4)
    assert 0.6 < keep.mean() < 0.9                  # about 1 - p of the elements kept
    xd = torch.tensor(keep * x / (1 - p), dtype=torch.float64)
    t = xd @ f64[2].T
    dt = s * f64[4] @ f64[3]
    np.testing.assert_allclose(y, (f64[0] @ f64[1] + s * t @ f64[3].T).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[2], (dt.T @ xd).numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(grads[3], (s * f64[4].T @ t).numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(share, keep * dense, rtol=1e-4, atol=1e-4)


# Batched products with every dim <= 512 run on small_gemm (csrc/ops/small_gemm.cpp): its
# register blocks (4 rows x 64 columns, 6 x 16), the row and column remainders, and the
# transposed operands (A read in place, B through a panel), forward and both gradients.
@pytest.mark.parametrize("m,n,k", [(1, 16, 1), (3, 17, 5), (7, 37, 33), (13, 64, 8),
                                   (6, 80, 2), (5, 130, 12), (128, 32, 16)])
@pytest.mark.parametrize("ta,tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_small_batched_products(m, n, k, ta, tb):
    A = randn(3, *((k, m) if ta else (m, k)))
    B = randn(3, *((n, k) if tb else (k, n)))

    def ref(a, b):
        return torch.matmul(a.transpose(-1, -2) if ta else a, b.transpose(-1, -2) if tb else b)
    (y,), _ = _core.run_op("MatMul", [A, B], {"trans_a": ta, "trans_b": tb}, domain="pyedge")
    want = ref(torch.tensor(A, dtype=torch.float64), torch.tensor(B, dtype=torch.float64))
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-4, atol=1e-4)
    check_backward("MatMul", [A, B], ref, {"trans_a": ta, "trans_b": tb}, domain="pyedge")


# A frozen weight (known at plan time) times few rows is packed once into panels
# (csrc/ops/packed_gemm.cpp): full and partial 64-column panels, both weight layouts.
@pytest.mark.parametrize("m,k,n", [(1, 16, 64), (5, 50, 100), (32, 784, 256), (64, 33, 130)])
@pytest.mark.parametrize("tb", [0, 1])
def test_gemm_with_a_packed_frozen_weight(m, k, n, tb):
    A = randn(m, k)
    B = randn(n, k) if tb else randn(k, n)
    C = randn(n)
    want = A.astype(np.float64) @ (B.T if tb else B).astype(np.float64) + C
    (y,), _ = _core.run_op("Gemm", [A, B, C], {"transB": tb}, const_inputs=[1, 2])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    # the gradient of A still flows (it reads B as stored)
    check_backward("Gemm", [A, B, C], lambda a, b, c: a @ (b.T if tb else b) + c,
                   {"transB": tb}, const_inputs=[1, 2])


@pytest.mark.parametrize("tb", [0, 1])
def test_matmul_with_a_packed_frozen_weight(tb):
    A = randn(2, 3, 40)                      # 6 rows after folding the batch
    B = randn(70, 40) if tb else randn(40, 70)
    want = A.astype(np.float64) @ (B.T if tb else B).astype(np.float64)
    (y,), _ = _core.run_op("MatMul", [A, B], {"trans_b": tb}, domain="pyedge", const_inputs=[1])
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    check_backward("MatMul", [A, B], lambda a, b: a @ (b.transpose(-1, -2) if tb else b),
                   {"trans_b": tb}, domain="pyedge", const_inputs=[1])


def _sparse_rows_grad(shape, nonzero_rows, seed=3):
    """An output gradient [.., M, N] whose rows are all zero except `nonzero_rows` (flat)."""
    g = np.zeros(shape, np.float32)
    flat = g.reshape(-1, shape[-1])
    rng = np.random.default_rng(seed)
    for i in nonzero_rows:
        flat[i] = rng.standard_normal(shape[-1]).astype(np.float32)
    return g


# M = 4 x 64 = 256 rows: the skip gathers up to M/8 = 32 non-zero rows, more go dense.
SPARSE_ROW_SETS = {
    "cls_rows": [0, 64, 128, 192],            # one row per sequence, like a [CLS] classifier
    "at_cap": list(range(0, 256, 8)),         # exactly 32
    "over_cap": list(range(0, 256, 8)) + [5],  # 33: the dense path
    "none": [],                               # all zero: dA is 0 (fresh) or unchanged
    "last_row": [255],
}


@pytest.mark.parametrize("rows", list(SPARSE_ROW_SETS))
@pytest.mark.parametrize("tb", [0, 1])
def test_matmul_backward_skips_zero_gradient_rows(rows, tb):
    A = randn(4, 64, 24)
    B = randn(40, 24) if tb else randn(24, 40)
    g = _sparse_rows_grad((4, 64, 40), SPARSE_ROW_SETS[rows])
    # zeros / ones / fresh gradient buffers, against torch float64
    grads = check_backward("MatMul", [A, B], lambda a, b: a @ (b.T if tb else b),
                           {"trans_b": tb}, domain="pyedge", grad_outputs=[g])
    dA = grads[0].reshape(256, 24)
    zero = np.ones(256, bool)
    zero[SPARSE_ROW_SETS[rows]] = False
    assert not dA[zero].any() and (len(SPARSE_ROW_SETS[rows]) == 0 or dA[~zero].any())


def test_matmul_backward_keeps_nan_gradient_rows():
    A, B = randn(4, 64, 24), randn(24, 40)
    g = _sparse_rows_grad((4, 64, 40), [0, 64])
    g[1, 7, 3] = np.nan  # a row that is zero but for one NaN is not skipped
    _, (dA, _) = _core.run_op("MatMul", [A, B], {}, domain="pyedge", grad_outputs=[g],
                              grad_init="fresh")
    assert np.isnan(dA[1, 7]).all()
    assert np.isfinite(np.delete(dA.reshape(256, 24), 71, axis=0)).all()


@pytest.mark.parametrize("rows", ["cls_rows", "over_cap", "none"])
def test_lora_matmul_backward_skips_zero_gradient_rows(rows):
    x, W, A, B = randn(4, 64, 24), randn(40, 24), randn(8, 24), randn(40, 8)
    g = _sparse_rows_grad((4, 64, 40), SPARSE_ROW_SETS[rows])
    grads = check_backward("LoraMatMul", [x, W, A, B], _lora_ref(1, 0.5),
                           {"scale": 0.5, "trans_w": 1}, domain="pyedge", grad_outputs=[g],
                           rtol=1e-4, atol=1e-4)
    dx = grads[0].reshape(256, 24)
    zero = np.ones(256, bool)
    zero[SPARSE_ROW_SETS[rows]] = False
    assert not dx[zero].any()
