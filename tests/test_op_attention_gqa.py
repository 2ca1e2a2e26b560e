"""pyedge.Attention's grouped-query heads (K, V with fewer heads than Q, never expanded), its
causal flag (no mask tensor) and out_layout, forward and backward against torch autograd in
float64 (opcheck.check_backward: zeroed, accumulated and fresh gradient buffers), on the
general path and on the fused per-slice kernels (Lk, D, Dv whole SIMD vectors)."""
import numpy as np
import pytest

from pyedge import _core

from opcheck import check_backward, pyedge_run

MASKED = -3.4e38


def torch_ref(scale, layout, out_layout, causal, groups):
    import torch

    def f(q, k, v, mask=None):
        if layout == "blhd":
            q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
        k = k.repeat_interleave(groups, dim=1)  # kv head h // groups for query head h
        v = v.repeat_interleave(groups, dim=1)
        s = scale * q @ k.transpose(-1, -2)
        L, Lk = s.shape[-2:]
        if causal:
            keep = torch.ones(L, Lk, dtype=torch.bool).tril(diagonal=Lk - L)
            s = s.masked_fill(~keep, float("-inf"))
        if mask is not None:
            s = s + mask
        o = torch.softmax(s, dim=-1) @ v
        return o.permute(0, 2, 1, 3) if out_layout == "blhd" else o
    return f


# (B, H, Hkv, L, Lk, D, Dv, mask shape or None)
CASES = [
    (2, 4, 2, 5, 5, 3, 6, None),               # general path
    (2, 4, 1, 5, 7, 3, 6, (2, 1, 1, 7)),       # one kv head, key padding
    (1, 6, 3, 19, 19, 16, 16, (1, 1, 19, 19)),
    (2, 4, 2, 37, 48, 16, 32, None),           # fused kernels (Lk, D, Dv whole vectors)
    (2, 4, 2, 37, 48, 16, 32, (2, 1, 1, 48)),
    (1, 2, 1, 64, 64, 32, 32, (1, 1, 64, 64)),
    (2, 4, 4, 16, 16, 16, 16, None),           # no grouping
]


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("layout,out_layout", [("bhld", "bhld"), ("bhld", "blhd"),
                                               ("blhd", "blhd")])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}h{c[2]}kv-{c[3]}x{c[4]}-m{c[7] is not None}"
                                              for c in CASES])
def test_gqa_causal_attention_matches_torch(case, layout, out_layout, causal):
    import torch
    B, H, Hkv, L, Lk, D, Dv, ms = case
    rng = np.random.default_rng(L + Lk)

    def t(heads, rows, cols):
        shape = (B, heads, rows, cols) if layout == "bhld" else (B, rows, heads, cols)
        return rng.standard_normal(shape).astype(np.float32)
    inputs = [t(H, L, D), t(Hkv, Lk, D), t(Hkv, Lk, Dv)]
    if ms is not None:
        mask = (rng.standard_normal(ms) * 0.5).astype(np.float32)
        mask[..., -1] = MASKED  # the last key padded
        inputs.append(mask)
    attrs = {"scale": 0.3, "layout": layout, "out_layout": out_layout, "causal": causal}
    ref = torch_ref(0.3, layout, out_layout, causal, H // Hkv)
    (o,) = pyedge_run("Attention", inputs, attrs, domain="pyedge")
    want = ref(*[torch.tensor(x, dtype=torch.float64) for x in inputs]).numpy()
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)
    check_backward("Attention", inputs, ref, attrs, domain="pyedge")


@pytest.mark.arm64
@pytest.mark.parametrize("causal", [0, 1])
def test_gqa_equals_expanded_kv(causal):
    """Grouped K/V heads give what the same op gives on K/V repeated per query head, forward
    and backward (dK, dV summed over the group): torch-free, so it runs on ARM (NEON kernels)."""
    rng = np.random.default_rng(3)
    B, H, Hkv, L, D = 2, 4, 2, 24, 16
    q = rng.standard_normal((B, H, L, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, L, D)).astype(np.float32) for _ in range(2))
    ke, ve = (np.repeat(t, H // Hkv, axis=1) for t in (k, v))
    attrs = {"scale": 0.25, "causal": causal}
    dy = [rng.standard_normal((B, H, L, D)).astype(np.float32)]
    outs_g, grads_g = _core.run_op("Attention", [q, k, v], attrs, domain="pyedge",
                                   grad_outputs=dy, grad_init="zeros")
    outs_e, grads_e = _core.run_op("Attention", [q, ke, ve], attrs, domain="pyedge",
                                   grad_outputs=dy, grad_init="zeros")
    np.testing.assert_allclose(outs_g[0], outs_e[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads_g[0], grads_e[0], rtol=1e-4, atol=1e-5)
    for g, e in zip(grads_g[1:3], grads_e[1:3]):
        np.testing.assert_allclose(g, e.reshape(B, Hkv, H // Hkv, L, D).sum(2), rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.arm64
def test_causal_equals_the_mask_it_replaces():
    """causal = 1 gives what an additive mask of -3.4e38 above the diagonal gives (and the
    exporters' mask form), on the fused path."""
    rng = np.random.default_rng(0)
    B, H, L, D = 2, 2, 32, 16
    q, k, v = (rng.standard_normal((B, H, L, D)).astype(np.float32) for _ in range(3))
    mask = np.where(np.tril(np.ones((L, L), bool)), 0.0, MASKED).astype(np.float32)[None, None]
    (a,) = pyedge_run("Attention", [q, k, v], {"scale": 0.25, "causal": 1}, domain="pyedge")
    (b,) = pyedge_run("Attention", [q, k, v, mask], {"scale": 0.25}, domain="pyedge")
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert not np.allclose(a, pyedge_run("Attention", [q, k, v], {"scale": 0.25},
                                         domain="pyedge")[0], atol=1e-3)


def test_gqa_errors():
    q = np.zeros((1, 3, 4, 8), np.float32)
    k = np.zeros((1, 2, 4, 8), np.float32)
    with pytest.raises(Exception, match="a divisor of Q.s"):
        pyedge_run("Attention", [q, k, k], {}, domain="pyedge")
    q = np.zeros((1, 2, 6, 8), np.float32)
    with pytest.raises(Exception, match="causal"):
        pyedge_run("Attention", [q, k, k], {"causal": 1}, domain="pyedge")
