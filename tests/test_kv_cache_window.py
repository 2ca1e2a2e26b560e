"""The key/value-cache rewrite (pyedge/kv_cache.py) with sliding windows and soft-capping, no
torch: an Attention's window/softcap attributes go to its CachedAttention; a mask input that is
the causal mask with a sliding window (built from position_ids and attention_mask, as exports
with an attention_mask input spell it) gives its window, also when the window is longer than
the probe (found at a length past the mask subgraph's constants), so cached decoding equals the
whole graph; a window too long to check refuses the cache instead of attending too far."""
import numpy as np
import pytest

import pyedge
from pyedge.graph import Graph, Node, ValueInfo
from pyedge.kv_cache import NoCache, add_kv_cache

MASKED = np.float32(-3.4028235e38)


def decoder(window=0, flags=None):
    """embedding + learned positions -> q, k, v -> pyedge.Attention -> head. window > 0: the
    Attention reads a mask built from position_ids and attention_mask, 0 on keys
    (i − window, i] that attention_mask keeps (transformers' sliding_window mask); flags:
    the Attention's own attributes instead (causal, window, softcap)."""
    rng = np.random.default_rng(0)
    V, C, H, Hkv, D = 11, 8, 2, 1, 4
    init = {"emb": rng.standard_normal((V, C)).astype(np.float32),
            "pos": rng.standard_normal((64, C)).astype(np.float32),
            "wq": (rng.standard_normal((C, H * D)) * 2).astype(np.float32),
            "wk": (rng.standard_normal((C, Hkv * D)) * 2).astype(np.float32),
            "wv": rng.standard_normal((C, Hkv * D)).astype(np.float32),
            "wo": rng.standard_normal((H * D, V)).astype(np.float32),
            "sq": np.array([1, -1, H, D], np.int64), "skv": np.array([1, -1, Hkv, D], np.int64),
            "so": np.array([1, -1, H * D], np.int64)}
    nodes = [Node("Gather", ["emb", "input_ids"], ["e"]),
             Node("Gather", ["pos", "position_ids"], ["pe"]),
             Node("Add", ["e", "pe"], ["x"])]
    for n, w, s in (("q", "wq", "sq"), ("k", "wk", "skv"), ("v", "wv", "skv")):
        nodes += [Node("MatMul", ["x", w], [f"{n}0"]), Node("Reshape", [f"{n}0", s], [n])]
    att_in, attrs = ["q", "k", "v"], {"scale": 0.5, "layout": "blhd"}
    if flags is not None:
        attrs.update(flags)
    else:
        init.update({"ax_q": np.array([2], np.int64), "ax_k": np.array([1], np.int64),
                     "ax_m": np.array([1], np.int64), "win": np.array(window, np.int64),
                     "zero": np.array(0.0, np.float32), "neg": np.array(MASKED)})
        nodes += [Node("Unsqueeze", ["position_ids", "ax_q"], ["qi"]),   # [1, n, 1]
                  Node("Unsqueeze", ["position_ids", "ax_k"], ["kj"]),   # [1, 1, n]
                  Node("LessOrEqual", ["kj", "qi"], ["past_keys"]),
                  Node("Sub", ["qi", "win"], ["lo"]),
                  Node("Greater", ["kj", "lo"], ["in_window"]),
                  Node("And", ["past_keys", "in_window"], ["band"]),
                  Node("Cast", ["attention_mask"], ["am"], attrs={"to": 9}),
                  Node("Unsqueeze", ["am", "ax_k"], ["am1"]),
                  Node("And", ["band", "am1"], ["keep"]),
                  Node("Where", ["keep", "zero", "neg"], ["m3"]),
                  Node("Unsqueeze", ["m3", "ax_m"], ["mask"])]           # [1, 1, n, n]
        att_in.append("mask")
    nodes += [Node("Attention", att_in, ["a"], name="attn", domain="pyedge", attrs=attrs),
              Node("Reshape", ["a", "so"], ["a2"]), Node("MatMul", ["a2", "wo"], ["logits"])]
    inputs = [ValueInfo("input_ids", "int64", [1, -1]), ValueInfo("attention_mask", "int64", [1, -1]),
              ValueInfo("position_ids", "int64", [1, -1])]
    g = Graph(nodes=nodes, initializers=init, inputs=inputs,
              outputs=[ValueInfo("logits", "float32", [1, -1, V])], opsets={"": 17, "pyedge": 1})
    g.value_shapes.update({"k": [1, -1, Hkv, D], "v": [1, -1, Hkv, D]})
    return g


def decode_like_full(g, n=16, prompt=5):
    """Prefill + one-token steps on the cached rewrite equal the whole graph's logits."""
    full = pyedge.TrainingSession(g, loss=None, fuse=False)
    cg = g.copy()
    spec = add_kv_cache(cg, max_len=32)
    sess = pyedge.TrainingSession(cg, loss=None, fuse=False)
    caches = spec.new_caches()
    ids = np.random.default_rng(1).integers(0, 11, (1, n))

    def feed(a, b):
        return {"input_ids": ids[:, a:b], "attention_mask": np.ones((1, b - a), np.int64),
                "position_ids": np.arange(a, b)[None]}
    ref = full.run(feed(0, n))["logits"]
    got = [sess.run({**feed(0, prompt), spec.past_input: np.array([0]), **caches})["logits"]]
    for p in range(prompt, n):
        got.append(sess.run({**feed(p, p + 1), spec.past_input: np.array([p]),
                             **caches})["logits"])
    np.testing.assert_allclose(np.concatenate(got, axis=1), ref, rtol=1e-5, atol=1e-5)
    return cg, ref


@pytest.mark.arm64
@pytest.mark.parametrize("window", [3, 4, 5, 9])  # shorter than, as long as, longer than the
# 5-position probe (a window of 5 cuts nothing there: found past the constant 5)
def test_sliding_window_mask_gives_the_window(window):
    g = decoder(window)
    cg, ref = decode_like_full(g)
    (node,) = [n for n in cg.nodes if n.op_type == "CachedAttention"]
    assert node.attrs["window"] == window
    # the window cuts at 16 positions: plain causal attention would differ
    plain = decoder(flags={"causal": 1})
    other = pyedge.TrainingSession(plain, loss=None, fuse=False).run(
        {"input_ids": np.random.default_rng(1).integers(0, 11, (1, 16)),
         "attention_mask": np.ones((1, 16), np.int64),
         "position_ids": np.arange(16)[None]})["logits"]
    assert np.abs(other - ref).max() > 1e-3


@pytest.mark.arm64
@pytest.mark.parametrize("flags", [{"causal": 1, "window": 4}, {"causal": 1, "softcap": 0.7},
                                   {"causal": 1, "window": 6, "softcap": 1.5}])
def test_flags_go_to_the_cached_attention(flags):
    cg, _ = decode_like_full(decoder(flags=flags))
    (node,) = [n for n in cg.nodes if n.op_type == "CachedAttention"]
    for k, v in flags.items():
        if k != "causal":
            assert node.attrs[k] == v


@pytest.mark.arm64
def test_a_window_too_long_to_check_refuses_the_cache():
    g = decoder(100_000)
    with pytest.raises(NoCache, match="sliding window longer"):
        add_kv_cache(g, max_len=8)
