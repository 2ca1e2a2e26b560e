"""pyedge.Attention's sliding window (`window`, with `causal`) and soft-capping (`softcap`, Gemma
2's attn_logit_softcapping), csrc/ops/attention.cpp and attention_kernels.h: forward against a
float64 reference (numpy; torch autograd for the backward, through opcheck.check_backward) on the
general path and on the fused per-slice kernels, both layouts, grouped K/V heads, Lk > L; the
fused kernels' SIMD path against the same kernels on the scalar reference (simd::Scalar,
_core.attention_slice_kernel); the window's skipped key blocks against the same window spelled as
a mask; pyedge.CachedAttention with both attributes against full attention over the sequence."""
import numpy as np
import pytest

import pyedge
from pyedge import _core

from opcheck import check_backward, pyedge_run

MASKED = -3.4e38


def keep_of(L, Lk, causal, window):
    """[L, Lk] keys each query row keeps: j <= i + Lk − L (causal), j > i + Lk − L − window."""
    i = np.arange(L)[:, None] + (Lk - L)
    j = np.arange(Lk)[None, :]
    keep = np.ones((L, Lk), bool)
    if causal:
        keep &= j <= i
    if window:
        keep &= j > i - window
    return keep


def ref_np(q, k, v, scale, causal=0, window=0, cap=0.0, mask=None, layout="bhld"):
    """float64 attention; q [B,H,L,D], k/v [B,Hkv,Lk,*] (or blhd)."""
    if layout == "blhd":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = scale * q @ np.swapaxes(k, -1, -2)
    if cap:
        s = cap * np.tanh(s / cap)
    if mask is not None:
        s = s + mask.astype(np.float64)
    s = np.where(keep_of(s.shape[-2], s.shape[-1], causal, window), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    o = (p / p.sum(-1, keepdims=True)) @ v
    return o.transpose(0, 2, 1, 3) if layout == "blhd" else o


def torch_ref(scale, causal=0, window=0, cap=0.0, layout="bhld", groups=1):
    import torch

    def f(q, k, v, mask=None):
        if layout == "blhd":
            q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        s = scale * q @ k.transpose(-1, -2)
        if cap:
            s = cap * torch.tanh(s / cap)
        if mask is not None:
            s = s + mask
        keep = torch.from_numpy(keep_of(s.shape[-2], s.shape[-1], causal, window))
        s = s.masked_fill(~keep, float("-inf"))
        o = torch.softmax(s, dim=-1) @ v
        return o.permute(0, 2, 1, 3) if layout == "blhd" else o
    return f


def make(B, H, Hkv, L, Lk, D, Dv, layout="bhld", mask_shape=None, seed=0, amp=1.0):
    rng = np.random.default_rng(seed)

    def t(heads, rows, cols):
        shape = (B, heads, rows, cols) if layout == "bhld" else (B, rows, heads, cols)
        return (rng.standard_normal(shape) * amp).astype(np.float32)
    inputs = [t(H, L, D), t(Hkv, Lk, D), t(Hkv, Lk, Dv)]
    if mask_shape is not None:
        m = (rng.standard_normal(mask_shape) * 0.5).astype(np.float32)
        m[..., -1] = MASKED  # the last key padded
        inputs.append(m)
    return inputs


# (B, H, Hkv, L, Lk, D, Dv, mask shape): the general path (sizes that are not whole vectors)
# and the fused kernels (Lk, D, Dv multiples of 16: whole vectors of AVX-512 and narrower)
CASES = [
    (2, 4, 2, 7, 7, 3, 5, None),
    (1, 2, 1, 5, 9, 4, 6, (1, 1, 1, 9)),        # Lk > L: the window aligned bottom right
    (2, 4, 2, 37, 48, 16, 32, None),           # fused: row blocks of 8, then 4, 2, 1
    (1, 2, 2, 64, 64, 32, 16, (1, 1, 64, 64)),  # fused, a mask per row and key
    (1, 4, 1, 24, 80, 16, 16, None),           # fused, Lk > L
]
IDS = [f"{c[3]}x{c[4]}x{c[5]}-{'fused' if c[4] % 16 == 0 and c[5] % 16 == 0 else 'general'}"
       f"-m{c[7] is not None}" for c in CASES]


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("window,cap", [(1, 0.0), (3, 0.0), (17, 0.0), (1000, 0.0), (0, 2.0),
                                        (5, 1.5)],
                         ids=["w1", "w3", "w17", "w-longer", "cap", "w5-cap"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_window_and_softcap_match_torch(case, window, cap, layout):
    B, H, Hkv, L, Lk, D, Dv, ms = case
    inputs = make(B, H, Hkv, L, Lk, D, Dv, layout, ms, seed=L + window)
    causal = 1 if window or L % 2 else 0  # softcap alone: with and without causal
    attrs = {"scale": 0.6, "layout": layout, "causal": causal, "window": window, "softcap": cap}
    (o,) = pyedge_run("Attention", inputs, attrs, domain="pyedge")
    want = ref_np(*inputs[:3], 0.6, causal, window, cap, inputs[3] if ms else None, layout)
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)
    check_backward("Attention", inputs, torch_ref(0.6, causal, window, cap, layout, H // Hkv),
                   attrs, domain="pyedge")


@pytest.mark.arm64
@pytest.mark.parametrize("window,cap", [(0, 0.0), (0, 3.0), (1, 0.0), (7, 0.0), (20, 2.5),
                                        (200, 0.0)])
@pytest.mark.parametrize("dims", [(37, 48, 16, 32), (16, 64, 32, 16), (64, 64, 16, 16)],
                         ids=["37x48", "16x64", "64x64"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_fused_kernels_simd_equal_scalar(dims, window, cap, with_mask):
    """The fused per-slice kernels on the native SIMD path (AVX-512, AVX2, NEON, SSE2) and on
    simd::Scalar (the same code, one lane): O, LSE, dQ, dK, dV agree to float rounding."""
    L, Lk, D, Dv = dims
    rng = np.random.default_rng(L * Lk + window)
    q = rng.standard_normal((L, D)).astype(np.float32)
    k = rng.standard_normal((Lk, D)).astype(np.float32)
    v = rng.standard_normal((Lk, Dv)).astype(np.float32)
    dO = rng.standard_normal((L, Dv)).astype(np.float32)
    dO[3:5] = 0  # rows whose gradient is 0 (skipped)
    mask = None
    if with_mask:
        mask = (rng.standard_normal((L, Lk)) * 0.3).astype(np.float32)
        mask[:, -3:] = MASKED
    causal = bool(window) or L < Lk
    kw = dict(mask=mask, scale=0.4, causal=causal, window=window, softcap=cap)
    simd = _core.attention_slice_kernel(q, k, v, dO, **kw, scalar=False)
    ref = _core.attention_slice_kernel(q, k, v, dO, **kw, scalar=True)
    for name, a, b in zip(["O", "LSE", "dQ", "dK", "dV"], simd, ref):
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(b).max()),
                                   err_msg=name)
    # and both are the float64 attention
    want = ref_np(q[None, None], k[None, None], v[None, None], 0.4, int(causal), window, cap,
                  mask)[0, 0]
    np.testing.assert_allclose(simd[0], want, rtol=1e-5, atol=2e-6)


@pytest.mark.arm64
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("dims", [(13, 13, 5, 6), (40, 48, 16, 32), (96, 96, 16, 16),
                                  (520, 528, 16, 16)],
                         ids=["general", "fused-40x48", "fused-96", "fused-beyond-512"])
@pytest.mark.parametrize("window", [1, 6, 33])
def test_window_equals_its_mask(layout, dims, window):
    """window = w (keys before the window never computed, dV and dK per key block over the rows
    that see it) gives what causal attention with the window spelled as an additive mask of
    -3.4e38 gives, forward and backward, on one and two threads."""
    L, Lk, D, Dv = dims
    inputs = make(2, 4, 2, L, Lk, D, Dv, layout, seed=window)
    mask = np.where(keep_of(L, Lk, True, window), 0.0, MASKED).astype(np.float32)[None, None]
    rng = np.random.default_rng(1)
    g = rng.standard_normal((2, 4, L, Dv) if layout == "bhld" else (2, L, 4, Dv)
                            ).astype(np.float32)
    before = _core.num_threads()
    try:
        res = {}
        for nt in (1, 2):
            _core.set_num_threads(nt)
            res[nt] = _core.run_op("Attention", inputs, {"scale": 0.5, "layout": layout,
                                                         "causal": 1, "window": window},
                                   domain="pyedge", grad_outputs=[g])
            want = _core.run_op("Attention", inputs + [mask], {"scale": 0.5, "layout": layout,
                                                               "causal": 1},
                                domain="pyedge", grad_outputs=[g])
            np.testing.assert_allclose(res[nt][0][0], want[0][0], rtol=1e-5, atol=1e-6)
            for a, b in zip(res[nt][1][:3], want[1][:3]):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(res[1][0][0], res[2][0][0])  # threads: the same bits
        for a, b in zip(res[1][1][:3], res[2][1][:3]):
            np.testing.assert_array_equal(a, b)
    finally:
        _core.set_num_threads(before)


@pytest.mark.arm64
def test_softcap_bounds_the_scores():
    """With a cap of c the weights are those of scores within (−c, c): huge logits (which
    without the cap give a one-hot row) stay soft, as Gemma 2 intends."""
    rng = np.random.default_rng(0)
    q = (rng.standard_normal((1, 2, 16, 16)) * 30).astype(np.float32)
    k = (rng.standard_normal((1, 2, 16, 16)) * 30).astype(np.float32)
    v = rng.standard_normal((1, 2, 16, 16)).astype(np.float32)
    (o,) = pyedge_run("Attention", [q, k, v], {"scale": 1.0, "softcap": 1.0}, domain="pyedge")
    np.testing.assert_allclose(o, ref_np(q, k, v, 1.0, cap=1.0), rtol=1e-5, atol=2e-6)
    (hard,) = pyedge_run("Attention", [q, k, v], {"scale": 1.0}, domain="pyedge")
    assert np.abs(o - hard).max() > 0.1
    # no row is one-hot: with |s| < 1 every weight is at least e^-2 / 16 of the row
    assert np.abs(o).max() < np.abs(v).max()


@pytest.mark.parametrize("attrs,match", [
    ({"window": 4}, "window must be 0"),
    ({"window": -1, "causal": 1}, "window must be 0"),
    ({"softcap": -2.0}, "softcap must be 0"),
])
def test_bad_attributes_name_the_node(attrs, match):
    z = np.zeros((1, 2, 5, 4), np.float32)
    with pytest.raises(pyedge.PyedgeError, match=match) as e:
        pyedge_run("Attention", [z, z, z], attrs, domain="pyedge")
    assert "'test'" in str(e.value)


# ------------------------------------------------------------------ pyedge.CachedAttention
def cached_graph(B, H, Hkv, D, Dv, T, attrs):
    from pyedge.graph import Graph, Node, ValueInfo
    inputs = [ValueInfo("q", "float32", [B, H, -1, D]), ValueInfo("k", "float32", [B, Hkv, -1, D]),
              ValueInfo("v", "float32", [B, Hkv, -1, Dv]),
              ValueInfo("ck", "float32", [B, Hkv, T, D]),
              ValueInfo("cv", "float32", [B, Hkv, T, Dv]), ValueInfo("past", "int64", [1])]
    node = Node("CachedAttention", ["q", "k", "v", "ck", "cv", "past"], ["o"], name="attn0",
                domain="pyedge", attrs={"scale": 0.3, **attrs})
    return Graph(nodes=[node], initializers={}, inputs=inputs,
                 outputs=[ValueInfo("o", "float32", [])], opsets={"": 17, "pyedge": 1})


@pytest.mark.arm64
@pytest.mark.parametrize("window,cap", [(3, 0.0), (0, 1.5), (4, 2.0), (100, 0.0)])
@pytest.mark.parametrize("prompt", [1, 6, 70])
def test_cached_attention_window_softcap(window, cap, prompt):
    """A prefill then one-token steps over the cache equal window/soft-capped causal attention
    over the whole sequence (the window at absolute positions)."""
    B, H, Hkv, D, Dv, steps = 1, 4, 2, 8, 8, 6
    N = prompt + steps
    T = N + 3
    rng = np.random.default_rng(prompt + window)
    q = (rng.standard_normal((B, H, N, D)) * 2).astype(np.float32)
    k = (rng.standard_normal((B, Hkv, N, D)) * 2).astype(np.float32)
    v = rng.standard_normal((B, Hkv, N, Dv)).astype(np.float32)
    want = ref_np(q, k, v, 0.3, 1, window, cap)
    sess = pyedge.TrainingSession(cached_graph(B, H, Hkv, D, Dv, T,
                                               {"window": window, "softcap": cap}),
                                  loss=None, fuse=False)
    ck = np.full((B, Hkv, T, D), np.nan, np.float32)  # rows not written yet are never read
    cv = np.full((B, Hkv, T, Dv), np.nan, np.float32)
    for a, b in [(0, prompt)] + [(p, p + 1) for p in range(prompt, N)]:
        if window and a:  # nor the rows before a step's window (0·NaN would show in O)
            ck[:, :, : max(0, a + 1 - window)] = np.nan
            cv[:, :, : max(0, a + 1 - window)] = np.nan
        o = sess.run({"q": q[:, :, a:b], "k": k[:, :, a:b], "v": v[:, :, a:b], "ck": ck,
                      "cv": cv, "past": np.array([a], np.int64)})["o"]
        np.testing.assert_allclose(o, want[:, :, a:b], rtol=2e-5, atol=2e-6)


def test_cached_attention_bad_attributes():
    g = cached_graph(1, 2, 1, 4, 4, 3, {"window": -2})
    x = np.zeros((1, 2, 1, 4), np.float32)
    kv = np.zeros((1, 1, 1, 4), np.float32)
    with pytest.raises(pyedge.PyedgeError, match="attn0.*window must be 0"):
        sess = pyedge.TrainingSession(g, loss=None, fuse=False)
        sess.run({"q": x, "k": kv, "v": kv, "ck": np.zeros((1, 1, 3, 4), np.float32),
                  "cv": np.zeros((1, 1, 3, 4), np.float32), "past": np.array([0])})
