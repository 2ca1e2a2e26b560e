"""LoRA aggregation (pyedge/fleet/aggregate.py) against its definition, in float64 numpy:
FedAvg of the factors is biased, the exact rule equals the average of the products up to the
best rank-r truncation (Eckart–Young)."""
import numpy as np
import pytest

from pyedge.fleet.aggregate import aggregate, factor_errors, product_mean, refactor, weighted_mean

PAIRS = [("l.lora_A.weight", "l.lora_B.weight")]


def nodes(k=3, r=4, d_in=12, d_out=10, seed=0, share_a=False):
    rng = np.random.default_rng(seed)
    a0 = rng.normal(size=(r, d_in))
    out = []
    for _ in range(k):
        out.append({"l.lora_A.weight": a0.copy() if share_a else rng.normal(size=(r, d_in)),
                    "l.lora_B.weight": rng.normal(size=(d_out, r)),
                    "head.weight": rng.normal(size=(3, d_out)), "head.bias": rng.normal(size=3)})
    return out


def test_fedavg_is_the_weighted_mean_of_every_tensor():
    ups, w = nodes(), [10, 30, 60]
    got = aggregate(ups, w, PAIRS, "fedavg")
    for k in ups[0]:
        want = (10 * ups[0][k] + 30 * ups[1][k] + 60 * ups[2][k]) / 100
        np.testing.assert_allclose(got[k], want, rtol=1e-12, atol=1e-12)


def test_exact_is_the_best_rank_r_approximation_of_the_mean_product():
    ups, w = nodes(), [1, 2, 3]
    got = aggregate(ups, w, PAIRS, "exact")
    m = sum(wk / 6 * u["l.lora_B.weight"] @ u["l.lora_A.weight"] for wk, u in zip(w, ups))
    s = np.linalg.svd(m, compute_uv=False)
    err = np.linalg.norm(got["l.lora_B.weight"] @ got["l.lora_A.weight"] - m)
    assert err == pytest.approx(np.sqrt((s[4:] ** 2).sum()), rel=1e-9)   # the spectrum's tail
    # whole tensors: plain weighted mean in both rules
    np.testing.assert_allclose(got["head.bias"], weighted_mean(ups, w)["head.bias"], rtol=1e-12)
    e = factor_errors(ups, w, PAIRS)["l"]
    assert e["exact"] < e["fedavg"]
    assert e["fedavg"] > 0.1      # averaging unrelated factors is far from the mean update


def test_exact_is_exact_when_the_updates_share_a_rank_r_subspace():
    ups, w = nodes(share_a=True), [5, 5, 1]   # same A: Σ w B_k A = (Σ w B_k) A, rank r
    e = factor_errors(ups, w, PAIRS)["l"]
    assert e["exact"] < 1e-12 and e["fedavg"] < 1e-12
    one = aggregate(ups[:1], [7], PAIRS, "exact")  # one node: its own product back
    np.testing.assert_allclose(one["l.lora_B.weight"] @ one["l.lora_A.weight"],
                               ups[0]["l.lora_B.weight"] @ ups[0]["l.lora_A.weight"], atol=1e-10)


def test_refactor_keeps_shapes_when_r_exceeds_the_matrix_rank_limit():
    m = np.random.default_rng(1).normal(size=(3, 5))
    a, b = refactor(m, 4)
    assert a.shape == (4, 5) and b.shape == (3, 4)
    np.testing.assert_allclose(b @ a, m, atol=1e-12)


def test_product_mean_and_dtypes():
    ups = [{k: v.astype(np.float32) for k, v in u.items()} for u in nodes(k=2)]
    got = aggregate(ups, [1, 1], PAIRS, "exact")
    assert all(v.dtype == np.float32 for v in got.values())
    m = product_mean(ups, [1, 1], *PAIRS[0])
    assert m.dtype == np.float64 and m.shape == (10, 12)


def test_mismatched_replies_are_clear_errors():
    ups = nodes(k=2)
    del ups[1]["head.bias"]
    with pytest.raises(ValueError, match="head.bias"):
        aggregate(ups, [1, 1], PAIRS)
    with pytest.raises(ValueError, match="positive"):
        aggregate(nodes(k=2), [0, 0], PAIRS)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(nodes(k=2), [1, 1], PAIRS, "median")
