"""pyedge.CachedAttention (csrc/ops/cached_attention.cpp) and the key/value-cache rewrite
(pyedge/kv_cache.py) on hand-built graphs, no torch: a prefill then one-token steps over
caches the caller owns equal causal attention over the whole sequence (numpy, float64);
grouped-query heads, both layouts; one plan serves every decoding step; a cache overflow is
an error naming the node; graphs that cannot be cached say why."""
import numpy as np
import pytest

import pyedge
from pyedge.graph import Graph, Node, ValueInfo
from pyedge.kv_cache import NoCache, add_kv_cache


def reference(q, k, v, scale):
    """Causal attention over the whole sequence, float64; q [B,H,N,D], k/v [B,Hkv,N,*]."""
    G = q.shape[1] // k.shape[1]
    k = np.repeat(k.astype(np.float64), G, axis=1)
    v = np.repeat(v.astype(np.float64), G, axis=1)
    s = scale * q.astype(np.float64) @ np.swapaxes(k, -1, -2)
    n = s.shape[-1]
    s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def cached_graph(B, H, Hkv, D, Dv, T, layout, out_layout):
    def vi(name, heads, cols):
        shape = [B, -1, heads, cols] if layout == "blhd" else [B, heads, -1, cols]
        return ValueInfo(name, "float32", shape)
    inputs = [vi("q", H, D), vi("k", Hkv, D), vi("v", Hkv, Dv),
              ValueInfo("ck", "float32", [B, Hkv, T, D]),
              ValueInfo("cv", "float32", [B, Hkv, T, Dv]), ValueInfo("past", "int64", [1])]
    node = Node("CachedAttention", ["q", "k", "v", "ck", "cv", "past"], ["o"], name="attn0",
                domain="pyedge", attrs={"scale": 0.3, "layout": layout, "out_layout": out_layout})
    return Graph(nodes=[node], initializers={}, inputs=inputs,
                 outputs=[ValueInfo("o", "float32", [])], opsets={"": 17, "pyedge": 1})


def to_layout(x, layout):  # [B, heads, N, cols] -> the layout's order
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3) if layout == "blhd" else x)


@pytest.mark.parametrize("layout,out_layout", [("bhld", "bhld"), ("bhld", "blhd"),
                                               ("blhd", "blhd")])
@pytest.mark.parametrize("B,H,Hkv,D,Dv,prompt", [(1, 4, 2, 8, 8, 5), (2, 6, 3, 16, 8, 70),
                                                   (1, 2, 2, 4, 4, 1)])
def test_prefill_then_steps_equal_full_causal_attention(B, H, Hkv, D, Dv, prompt, layout,
                                                        out_layout):
    rng = np.random.default_rng(prompt)
    steps, T = 6, prompt + 9
    N = prompt + steps
    q = rng.standard_normal((B, H, N, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, N, D)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, N, Dv)).astype(np.float32)
    ref = reference(q, k, v, 0.3)                                  # [B, H, N, Dv]
    sess = pyedge.TrainingSession(cached_graph(B, H, Hkv, D, Dv, T, layout, out_layout),
                                  loss=None, fuse=False)
    ck = np.full((B, Hkv, T, D), np.nan, np.float32)  # rows not written yet are never read
    cv = np.full((B, Hkv, T, Dv), np.nan, np.float32)
    spans = [(0, prompt)] + [(p, p + 1) for p in range(prompt, N)]
    for a, b in spans:
        feed = {"q": to_layout(q[:, :, a:b], layout), "k": to_layout(k[:, :, a:b], layout),
                "v": to_layout(v[:, :, a:b], layout), "ck": ck, "cv": cv,
                "past": np.array([a], np.int64)}
        o = sess.run(feed)["o"]
        want = to_layout(ref[:, :, a:b], out_layout)
        np.testing.assert_allclose(o, want, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(ck[:, :, :N], k)  # the cache holds every position's keys
    np.testing.assert_array_equal(cv[:, :, :N], v)
    assert np.isnan(ck[:, :, N:]).all()
    # one plan for the prefill, one for all the steps
    assert len(sess._planned_shapes) == (1 if prompt == 1 else 2)


def test_overflowing_the_cache_is_an_error_naming_the_node():
    sess = pyedge.TrainingSession(cached_graph(1, 2, 1, 4, 4, 3, "bhld", "bhld"), loss=None,
                                  fuse=False)
    x = np.zeros((1, 2, 1, 4), np.float32)
    kv = np.zeros((1, 1, 1, 4), np.float32)
    ck, cv = np.zeros((1, 1, 3, 4), np.float32), np.zeros((1, 1, 3, 4), np.float32)
    for p in range(3):
        sess.run({"q": x, "k": kv, "v": kv, "ck": ck, "cv": cv, "past": np.array([p])})
    with pytest.raises(pyedge.PyedgeError, match=r"attn0.*holds 3 positions; 3 cached \+ 1 new"):
        sess.run({"q": x, "k": kv, "v": kv, "ck": ck, "cv": cv, "past": np.array([3])})


def decoder_like(causal=1, positions=True, mask=False):
    """embedding -> q, k, v projections -> pyedge.Attention -> head: the shape of a fused
    decoder layer, with position_ids feeding the embedding like a learned position table."""
    rng = np.random.default_rng(0)
    V, C, H, Hkv, D = 11, 8, 2, 1, 4
    init = {"emb": rng.standard_normal((V, C)).astype(np.float32),
            "pos": rng.standard_normal((32, C)).astype(np.float32),
            "wq": rng.standard_normal((C, H * D)).astype(np.float32),
            "wk": rng.standard_normal((C, Hkv * D)).astype(np.float32),
            "wv": rng.standard_normal((C, Hkv * D)).astype(np.float32),
            "wo": rng.standard_normal((H * D, V)).astype(np.float32),
            "sq": np.array([1, -1, H, D], np.int64), "skv": np.array([1, -1, Hkv, D], np.int64),
            "so": np.array([1, -1, H * D], np.int64)}
    nodes = [Node("Gather", ["emb", "input_ids"], ["e"]),
             Node("Gather", ["pos", "position_ids" if positions else "input_ids"], ["pe"]),
             Node("Add", ["e", "pe"], ["x"])]
    for n, w, s in (("q", "wq", "sq"), ("k", "wk", "skv"), ("v", "wv", "skv")):
        nodes += [Node("MatMul", ["x", w], [f"{n}0"]), Node("Reshape", [f"{n}0", s], [n])]
    att_in = ["q", "k", "v"]
    if mask:  # a mask input of the right shape that is not the causal one
        init["zero"] = np.zeros((1, 1, 1, 1), np.float32)
        att_in.append("zero")
    nodes += [Node("Attention", att_in, ["a"], name="attn", domain="pyedge",
                   attrs={"scale": 0.5, "layout": "blhd", "causal": causal}),
              Node("Reshape", ["a", "so"], ["a2"]), Node("MatMul", ["a2", "wo"], ["logits"])]
    inputs = [ValueInfo("input_ids", "int64", [1, -1])]
    if positions:
        inputs.append(ValueInfo("position_ids", "int64", [1, -1]))
    g = Graph(nodes=nodes, initializers=init, inputs=inputs,
              outputs=[ValueInfo("logits", "float32", [1, -1, V])], opsets={"": 17, "pyedge": 1})
    g.value_shapes.update({"k": [1, -1, Hkv, D], "v": [1, -1, Hkv, D]})
    return g


def test_rewrite_decodes_like_the_full_graph():
    g = decoder_like()
    full = pyedge.TrainingSession(g, loss=None, fuse=False)
    cg = g.copy()
    spec = add_kv_cache(cg, max_len=16)
    assert [n.op_type for n in cg.nodes].count("CachedAttention") == 1
    sess = pyedge.TrainingSession(cg, loss=None, fuse=False)
    caches = spec.new_caches()
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int64)
    ref = full.run({"input_ids": ids, "position_ids": np.arange(8)[None]})["logits"]
    got = [sess.run({"input_ids": ids[:, :5], "position_ids": np.arange(5)[None],
                     spec.past_input: np.array([0]), **caches})["logits"]]
    for p in range(5, 8):
        got.append(sess.run({"input_ids": ids[:, p:p + 1], "position_ids": np.array([[p]]),
                             spec.past_input: np.array([p]), **caches})["logits"])
    np.testing.assert_allclose(np.concatenate(got, axis=1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,reason", [
    ({"positions": False}, "no position_ids input"),
    ({"causal": 0}, "not causal"),
    ({"causal": 0, "mask": True}, "not the causal mask"),
])
def test_graphs_that_cannot_be_cached_say_why(kw, reason):
    g = decoder_like(**kw)
    before = [n.op_type for n in g.nodes]
    with pytest.raises(NoCache, match=reason):
        add_kv_cache(g, max_len=8)
    assert [n.op_type for n in g.nodes] == before and len(g.inputs) == (2 if kw.get("positions", True) else 1)
