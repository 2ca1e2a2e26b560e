"""Graph fusions (pyedge/fusions.py): which chains are rewritten, and that a fused session
computes what the op-by-op graph computes (forward, gradients, updates)."""
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import pyedge
from opcheck import check_backward, pyedge_run
from pyedge.fusions import fuse, fuse_transposed_matmul
from pyedge.onnx_import import load_onnx

SQRT2 = math.sqrt(2.0)
C_TANH = math.sqrt(2.0 / math.pi)


def _const(name, v):
    return helper.make_tensor(name, TensorProto.FLOAT, [], [v])


def gelu_erf_model(order="bert", half=0.5, extra_output=None):
    """x [4, 6] -> Linear -> GELU (erf form, spelled in one of three orders) -> y."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [6, 6], rng.standard_normal(36).tolist())
    inits = [w, _const("s2", SQRT2), _const("one", 1.0), _const("half", half)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Div", ["h", "s2"], ["u"], name="div"),
             helper.make_node("Erf", ["u"], ["e"], name="erf"),
             helper.make_node("Add", ["e", "one"], ["p"], name="add")]
    if order == "bert":    # 0.5 * (1 + erf) first, then x * that
        nodes += [helper.make_node("Mul", ["half", "p"], ["q"], name="m1"),
                  helper.make_node("Mul", ["h", "q"], ["y"], name="m2")]
    elif order == "x_first":  # (x * (1 + erf)) * 0.5
        nodes += [helper.make_node("Mul", ["p", "h"], ["q"], name="m1"),
                  helper.make_node("Mul", ["q", "half"], ["y"], name="m2")]
    else:                  # (0.5 * x) * (1 + erf)
        nodes += [helper.make_node("Mul", ["h", "half"], ["q"], name="m1"),
                  helper.make_node("Mul", ["q", "p"], ["y"], name="m2")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, [4, 6]))
    g = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def gelu_tanh_model():
    """GPT-2's NewGELU: 0.5*x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x^3)))."""
    rng = np.random.default_rng(1)
    w = helper.make_tensor("w", TensorProto.FLOAT, [6, 6], rng.standard_normal(36).tolist())
    inits = [w, _const("three", 3.0), _const("k", 0.044715), _const("c", C_TANH),
             _const("one", 1.0), _const("half", 0.5)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Mul", ["h", "half"], ["hh"]),
             helper.make_node("Pow", ["h", "three"], ["p3"]),
             helper.make_node("Mul", ["p3", "k"], ["kp"]),
             helper.make_node("Add", ["h", "kp"], ["a"]),
             helper.make_node("Mul", ["a", "c"], ["ca"]),
             helper.make_node("Tanh", ["ca"], ["t"]),
             helper.make_node("Add", ["t", "one"], ["tp"]),
             helper.make_node("Mul", ["hh", "tp"], ["y"])]
    g = helper.make_graph(nodes, "gelu_tanh",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _ops(graph):
    return [n.op_type for n in graph.nodes]


@pytest.mark.parametrize("order", ["bert", "x_first", "half_x_first"])
def test_erf_gelu_chain_becomes_one_gelu(order):
    g = load_onnx(gelu_erf_model(order))
    assert fuse(g)["gelu"] == 1
    assert _ops(g) == ["MatMul", "Gelu"]
    assert g.nodes[1].inputs == ["h"] and g.nodes[1].outputs == ["y"]
    assert g.nodes[1].attrs.get("approximate", "none") == "none"


def test_tanh_gelu_chain_becomes_one_gelu():
    g = load_onnx(gelu_tanh_model())
    assert fuse(g)["gelu"] == 1
    assert _ops(g) == ["MatMul", "Gelu"]
    assert g.nodes[1].attrs["approximate"] == "tanh"


def test_no_fusion_when_a_constant_differs_or_an_intermediate_is_used_elsewhere():
    g = load_onnx(gelu_erf_model(half=0.6))
    assert fuse(g)["gelu"] == 0
    assert "Erf" in _ops(g)
    g = load_onnx(gelu_erf_model(extra_output="e"))  # erf's output is also a graph output
    assert fuse(g)["gelu"] == 0
    assert "Erf" in _ops(g)


@pytest.mark.parametrize("model", [gelu_erf_model("bert"), gelu_erf_model("x_first"),
                                   gelu_tanh_model()], ids=["erf_bert", "erf_x_first", "tanh"])
def test_fused_gelu_computes_the_chain(model):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 6)).astype(np.float32) * 2
    y = rng.integers(0, 6, 4).astype(np.int64)
    fused = pyedge.TrainingSession(model, train=["w"], optimizer=pyedge.SGD(lr=0.1))
    plain = pyedge.TrainingSession(model, train=["w"], optimizer=pyedge.SGD(lr=0.1), fuse=False)
    assert fused.fusions["gelu"] == 1 and plain.fusions == {}
    assert "Gelu" in _ops(fused.graph) and "Gelu" not in _ops(plain.graph)
    np.testing.assert_allclose(fused.run({"x": x})["y"], plain.run({"x": x})["y"],
                               rtol=2e-6, atol=2e-6)
    for _ in range(2):
        lf, lp = fused.step({"x": x}, y), plain.step({"x": x}, y)
        np.testing.assert_allclose(lf, lp, rtol=1e-5)
        np.testing.assert_allclose(fused.gradients()["w"], plain.gradients()["w"],
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,exporter", [("minilm", "torchscript"), ("minilm", "dynamo"),
                                           ("gpt2", "torchscript"), ("gpt2", "dynamo")])
def test_reference_models_fuse_every_gelu_and_train_the_same(exported, name, exporter):
    path, model, inputs = exported(name, exporter)
    layers = model.config.num_hidden_layers if name == "minilm" else model.config.n_layer
    lora = pyedge.LoraConfig(r=4, target_modules=["query", "value"] if name == "minilm"
                             else ["c_attn"])
    loss = "cross_entropy" if name == "minilm" else "causal_lm"
    kw = dict(lora=lora, loss=loss, optimizer=pyedge.AdamW(lr=1e-2))
    fused = pyedge.TrainingSession(path, **kw)
    plain = pyedge.TrainingSession(path, fuse=False, **kw)
    assert fused.fusions["gelu"] == layers
    assert fused.fusions["masked_softmax"] == layers
    assert fused.fusions["attention"] == layers
    assert len(fused.graph.nodes) < len(plain.graph.nodes)
    rng = np.random.default_rng(0)
    for sess in (fused, plain):  # the same nonzero B, so every adapter gets a gradient
        for i, (k, v) in enumerate(sorted(sess.trainable_parameters().items())):
            if ".lora_B" in k:
                v[...] = np.random.default_rng(i).standard_normal(v.shape) * 0.02
    feeds = {k: np.asarray(v.numpy()) for k, v in inputs.items()}
    # Weights read through trans_b are not folded into transposed copies.
    cf = fused.plan_stats(feeds)["constant_bytes"]
    cp = plain.plan_stats(feeds)["constant_bytes"]
    assert cf <= cp
    if name == "minilm" and exporter == "dynamo":  # MatMul(x, Transpose(W)) per Linear
        assert fused.fusions["transposed_matmul"] >= 4 * layers and cf < cp
    if name == "minilm":  # every Linear's bias Add, LoRA-adapted query/value included
        assert fused.fusions["matmul_bias"] >= 6 * layers
    # the classifier reads [CLS] only: the last layer after attention runs on B rows
    # (from the output LayerNorm down to the attention's head-merge Reshape)
    assert (fused.fusions["gathered_rows"] >= 15) == (name == "minilm")
    if name == "minilm":
        labels = rng.integers(0, model.config.num_labels, feeds["input_ids"].shape[0])
    else:
        labels = feeds["input_ids"]
    for _ in range(3):
        lf = fused.step(feeds, labels.astype(np.int64))
        lp = plain.step(feeds, labels.astype(np.int64))
        np.testing.assert_allclose(lf, lp, rtol=1e-5)
        gf, gp = fused.gradients(), plain.gradients()
        for k in gp:
            scale = float(np.abs(gp[k]).max()) or 1.0
            np.testing.assert_allclose(gf[k], gp[k], rtol=1e-3, atol=1e-4 * scale, err_msg=k)


# --- pyedge.MaskedSoftmax: the op, then the rewrite -------------------------------------
@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, 7), (2, 1, 5, 7), (2, 3, 5, 7), (7,), (1,)])
def test_masked_softmax_matches_torch(mask_shape):
    import torch
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32) * 3
    inputs = [x]
    if mask_shape is not None:
        mask = rng.standard_normal(mask_shape).astype(np.float32)
        mask[..., 0] = -3.4e38  # the exporters' "minus infinity" for masked positions
        inputs.append(mask)
    attrs = {"scale": 0.35}

    def ref(xt, mt=None):
        s = 0.35 * xt + (mt if mt is not None else 0)
        return torch.softmax(s, dim=-1)
    (y,) = pyedge_run("MaskedSoftmax", inputs, attrs, domain="pyedge")
    want = ref(*[torch.tensor(a, dtype=torch.float64) for a in inputs]).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    # gradients of x and (when given) of the mask, each against torch autograd
    check_backward("MaskedSoftmax", inputs, ref, attrs, domain="pyedge")


def test_masked_softmax_rejects_a_mask_that_does_not_broadcast():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(pyedge.PyedgeError, match="does not broadcast"):
        pyedge_run("MaskedSoftmax", [x, np.zeros((3, 3), np.float32)], {}, domain="pyedge")


def attention_model(scale_op="Mul", with_mask=True, mask_from="input"):
    """q, k [2, 3, 5, 4] (+ mask [2, 1, 1, 5]) -> softmax(q k^T * s + mask) @ (k W)."""
    rng = np.random.default_rng(6)
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], rng.standard_normal(16).tolist()),
             _const("s", 0.5 if scale_op == "Mul" else 2.0)]
    nodes = [helper.make_node("MatMul", ["q", "w"], ["qw"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["qw", "kt"], ["scores"]),
             helper.make_node(scale_op, ["scores", "s"], ["scaled"])]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 3, 5, 4]),
              helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 3, 5, 4])]
    if with_mask:
        if mask_from == "input":
            inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [2, 1, 1, 5]))
            mask = "mask"
        else:  # a mask computed from the trained weight: not fused
            nodes.append(helper.make_node("ReduceSum", ["w"], ["mask"], keepdims=0))
            mask = "mask"
        nodes.append(helper.make_node("Add", ["scaled", mask], ["masked"]))
        last = "masked"
    else:
        last = "scaled"
    nodes += [helper.make_node("Softmax", [last], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "k"], ["y"])]
    g = helper.make_graph(nodes, "attn", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("scale_op,with_mask", [("Mul", True), ("Div", True), ("Mul", False)])
def test_attention_softmax_chain_is_fused_and_trains_the_same(scale_op, with_mask):
    rng = np.random.default_rng(7)
    feeds = {"q": rng.standard_normal((2, 3, 5, 4)).astype(np.float32),
             "k": rng.standard_normal((2, 3, 5, 4)).astype(np.float32)}
    if with_mask:
        mask = np.zeros((2, 1, 1, 5), np.float32)
        mask[1, ..., 3:] = -3.4e38
        feeds["mask"] = mask
    target = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    model = attention_model(scale_op, with_mask)
    fused = pyedge.TrainingSession(model, train=["w"], loss="mse", optimizer=pyedge.SGD(lr=0.1))
    plain = pyedge.TrainingSession(model, train=["w"], loss="mse", optimizer=pyedge.SGD(lr=0.1),
                                   fuse=False)
    # the MaskedSoftmax goes on into one Attention with Q·Kᵀ and P·V (attention_fusion.py)
    assert fused.fusions["attention"] == 1 and not fused.fusions.get("masked_softmax")
    assert "Softmax" not in _ops(fused.graph) and "Attention" in _ops(fused.graph)
    for _ in range(3):
        np.testing.assert_allclose(fused.step(feeds, target), plain.step(feeds, target), rtol=1e-5)
        np.testing.assert_allclose(fused.gradients()["w"], plain.gradients()["w"],
                                   rtol=1e-4, atol=1e-6)


def test_mask_computed_from_a_trained_tensor_is_not_fused():
    g = load_onnx(attention_model(mask_from="weight"))
    assert fuse(g, trainable={"w"})["masked_softmax"] == 0
    assert fuse(g, trainable={"w"})["attention"] == 0
    g = load_onnx(attention_model(mask_from="weight"))
    f = fuse(g, trainable=set())  # a frozen mask: the whole attention fuses
    assert f["attention"] == 1 and f["masked_softmax"] == 0


# --- multi-head attention -> pyedge.Attention ------------------------------------------
B, L, H, D = 2, 6, 3, 4
E = H * D


def mha_model(keys="trans_b", between="Identity", mask="input", merge=True, extra_output=None,
              L=L):
    """x [B, L, E] -> multi-head self-attention as the exporters write it -> y [B, L, E].

    keys: how Kᵀ is spelled, "trans_b" (head-split Transpose, then a last-two swap; dynamo)
    or "keys_last" (one Transpose 0 2 3 1; torchscript). between: the op between softmax and
    P·V (Identity, Cast or none). mask: "input" [B, 1, 1, L], "causal" constant [1, 1, L, L]
    or None. merge: whether the result goes through the head-merge Transpose."""
    rng = np.random.default_rng(11)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [E, E], (rng.standard_normal(E * E) * 0.4).tolist())
             for n in ("wq", "wk", "wv", "wo")]
    inits += [helper.make_tensor("split", TensorProto.INT64, [4], [B, L, H, D]),
              helper.make_tensor("merged", TensorProto.INT64, [3], [B, L, E]),
              _const("s", 1.0 / math.sqrt(D))]
    nodes = []
    for p in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}2"]),
                  helper.make_node("Reshape", [f"{p}2", "split"], [f"{p}4"])]
    nodes += [helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3])]
    if keys == "trans_b":
        nodes += [helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2])]
    else:
        nodes.append(helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]))
    nodes += [helper.make_node("MatMul", ["qh", "kt"], ["scores"]),
              helper.make_node("Mul", ["scores", "s"], ["scaled"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, L, E])]
    last = "scaled"
    if mask == "input":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [B, 1, 1, L]))
    elif mask == "causal":
        causal = np.triu(np.full((L, L), -3.4e38, np.float32), 1).reshape(1, 1, L, L)
        inits.append(helper.make_tensor("mask", TensorProto.FLOAT, causal.shape, causal.ravel().tolist()))
    if mask:
        nodes.append(helper.make_node("Add", ["scaled", "mask"], ["masked"]))
        last = "masked"
    nodes.append(helper.make_node("Softmax", [last], ["p"], axis=-1))
    p = "p"
    if between == "Identity":
        nodes.append(helper.make_node("Identity", ["p"], ["p2"]))
        p = "p2"
    elif between == "Cast":
        nodes.append(helper.make_node("Cast", ["p"], ["p2"], to=TensorProto.FLOAT))
        p = "p2"
    nodes.append(helper.make_node("MatMul", [p, "vh"], ["o"]))
    if merge:
        nodes += [helper.make_node("Transpose", ["o"], ["o4"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["o4", "merged"], ["o3"])]
    else:  # a head-major reshape instead of the merge (not the layout pyedge.Attention writes)
        nodes.append(helper.make_node("Reshape", ["o", "merged"], ["o3"]))
    nodes.append(helper.make_node("MatMul", ["o3", "wo"], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, L, E])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "mha", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _mha_feeds(mask):
    rng = np.random.default_rng(12)
    feeds = {"x": rng.standard_normal((B, L, E)).astype(np.float32)}
    if mask == "input":
        m = np.zeros((B, 1, 1, L), np.float32)
        m[1, ..., 4:] = -3.4e38   # padding of the second sequence
        feeds["mask"] = m
    return feeds, rng.standard_normal((B, L, E)).astype(np.float32)


@pytest.mark.parametrize("keys,between,mask", [
    ("trans_b", "Identity", "input"), ("keys_last", "Cast", "input"),
    ("trans_b", None, "causal"), ("keys_last", None, None)])
def test_multi_head_attention_becomes_one_op_and_trains_the_same(keys, between, mask):
    model = mha_model(keys, between, mask)
    kw = dict(train=["wq", "wk", "wv"], loss="mse", optimizer=pyedge.SGD(lr=0.05))
    fused = pyedge.TrainingSession(model, **kw)
    plain = pyedge.TrainingSession(model, fuse=False, **kw)
    assert fused.fusions["attention"] == 1
    ops = _ops(fused.graph)
    assert "Attention" in ops and "Transpose" not in ops and "MaskedSoftmax" not in ops
    att = next(n for n in fused.graph.nodes if n.op_type == "Attention")
    assert att.inputs[:3] == ["q4", "k4", "v4"] and att.outputs == ["o4"]
    assert att.attrs["layout"] == "blhd"
    feeds, target = _mha_feeds(mask)
    np.testing.assert_allclose(fused.run(feeds)["y"], plain.run(feeds)["y"], rtol=1e-5, atol=1e-5)
    for _ in range(3):
        np.testing.assert_allclose(fused.step(feeds, target), plain.step(feeds, target), rtol=1e-5)
        for w in ("wq", "wk", "wv"):
            g = plain.gradients()[w]
            np.testing.assert_allclose(fused.gradients()[w], g, rtol=1e-4,
                                       atol=1e-5 * float(np.abs(g).max()), err_msg=w)


def test_fused_attention_does_not_keep_the_probabilities():
    n = 64
    model = mha_model("trans_b", "Identity", "causal", L=n)
    kw = dict(train=["wq", "wv"], loss="mse", optimizer=pyedge.SGD(lr=0.05))
    fused, plain = pyedge.TrainingSession(model, **kw), pyedge.TrainingSession(model, fuse=False, **kw)
    shapes = {"x": [B, n, E], "labels": [B, n, E]}
    probabilities = B * H * n * n * 4
    assert fused.plan_stats(shapes=shapes)["arena_bytes"] + probabilities \
        <= plain.plan_stats(shapes=shapes)["arena_bytes"]


def test_only_the_first_layer_wants_some_attention_gradients():
    # Only wq trains: the fused op computes dQ alone (dK, dV are pruned) and matches the chain.
    model = mha_model("trans_b", "Identity", "input")
    kw = dict(train=["wq"], loss="mse", optimizer=pyedge.SGD(lr=0.05))
    fused, plain = pyedge.TrainingSession(model, **kw), pyedge.TrainingSession(model, fuse=False, **kw)
    feeds, target = _mha_feeds("input")
    for _ in range(2):
        np.testing.assert_allclose(fused.step(feeds, target), plain.step(feeds, target), rtol=1e-5)
        np.testing.assert_allclose(fused.gradients()["wq"], plain.gradients()["wq"], rtol=1e-4, atol=1e-6)


def test_attention_is_not_fused_when_the_pattern_is_incomplete():
    g = load_onnx(mha_model(extra_output="p"))  # the probabilities are read elsewhere
    done = fuse(g)
    assert done["attention"] == 0
    assert "Attention" not in _ops(g)


def test_attention_without_head_merge_writes_heads_first():
    """No head-merge Transpose after P·V: not this rule's pattern, but the decoder rule
    (attention_fusion.py) takes it with O in [B, H, L, D], the head-split Transposes kept."""
    model = mha_model(merge=False)
    g = load_onnx(model)
    assert fuse(g)["attention"] == 1
    (att,) = [n for n in g.nodes if n.op_type == "Attention"]
    assert att.attrs["layout"] == att.attrs["out_layout"] == "bhld"
    kw = dict(train=["wq", "wk"], loss="mse", optimizer=pyedge.SGD(lr=0.05))
    fused, plain = pyedge.TrainingSession(model, **kw), pyedge.TrainingSession(model, fuse=False, **kw)
    feeds, target = _mha_feeds("input")
    for _ in range(2):
        np.testing.assert_allclose(fused.step(feeds, target), plain.step(feeds, target), rtol=1e-5)
        for k in ("wq", "wk"):
            np.testing.assert_allclose(fused.gradients()[k], plain.gradients()[k], rtol=1e-4,
                                       atol=1e-6)


# --- pyedge.MatMul with trans_a / trans_b, and the Transpose -> MatMul rewrite ------------
@pytest.mark.parametrize("a_shape,b_shape,ta,tb", [
    ((5, 4), (3, 4), 0, 1),            # x · Wᵀ (a Linear's weight as stored)
    ((2, 6, 4), (3, 4), 0, 1),         # batch folded into M
    ((2, 3, 6, 4), (2, 3, 5, 4), 0, 1),  # attention Q · Kᵀ
    ((2, 3, 4, 6), (2, 3, 4, 5), 1, 0),
    ((2, 3, 4, 6), (1, 3, 5, 4), 1, 1),  # broadcast B batch
    ((1, 4, 6), (2, 5, 4), 1, 1),      # broadcast A batch
    ((4,), (3, 4), 0, 1),              # vector times Wᵀ
])
def test_transposed_matmul_matches_torch(a_shape, b_shape, ta, tb):
    import torch
    rng = np.random.default_rng(8)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    attrs = {"trans_a": ta, "trans_b": tb}

    def ref(x, y):
        return torch.matmul(x.transpose(-1, -2) if ta else x, y.transpose(-1, -2) if tb else y)
    (y,) = pyedge_run("MatMul", [a, b], attrs, domain="pyedge")
    want = ref(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    check_backward("MatMul", [a, b], ref, attrs, domain="pyedge")


def test_transposed_matmul_rejects_mismatched_inner_dims():
    with pytest.raises(pyedge.PyedgeError, match="inner dimensions differ"):
        pyedge_run("MatMul", [np.zeros((5, 4), np.float32), np.zeros((4, 3), np.float32)],
                   {"trans_b": 1}, domain="pyedge")


def test_matmul_of_a_transposed_weight_uses_the_weight_as_stored():
    model = attention_model()
    g = load_onnx(model)
    # the rule alone: in fuse() the decoder attention rule takes the whole chain
    assert fuse_transposed_matmul(g) == 1          # qw · Transpose(k)
    mm = [n for n in g.nodes if n.domain == "pyedge" and n.op_type == "MatMul"]
    assert mm[0].inputs == ["qw", "k"] and mm[0].attrs["trans_b"] == 1
    assert "Transpose" not in _ops(g)


# --- MatMul + bias Add -> pyedge.MatMul with a bias ------------------------------------
@pytest.mark.parametrize("a_shape,b_shape,tb", [
    ((5, 4), (4, 3), 0), ((2, 6, 4), (3, 4), 1),   # folded batch, Linear's stored weight
    ((2, 3, 6, 4), (2, 3, 4, 5), 0),               # batched products, bias after each
])
def test_matmul_with_bias_matches_torch(a_shape, b_shape, tb):
    import torch
    rng = np.random.default_rng(9)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    n = b_shape[-2] if tb else b_shape[-1]
    bias = rng.standard_normal(n).astype(np.float32)
    attrs = {"trans_b": tb}

    def ref(x, y, c):
        return torch.matmul(x, y.transpose(-1, -2) if tb else y) + c
    (y,) = pyedge_run("MatMul", [a, b, bias], attrs, domain="pyedge")
    want = ref(*[torch.tensor(v, dtype=torch.float64) for v in (a, b, bias)]).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    check_backward("MatMul", [a, b, bias], ref, attrs, domain="pyedge")


def test_matmul_bias_of_the_wrong_shape_is_refused():
    with pytest.raises(pyedge.PyedgeError, match=r"bias \[4\] must be \[N\] = \[3\]"):
        pyedge_run("MatMul", [np.zeros((5, 4), np.float32), np.zeros((4, 3), np.float32),
                              np.zeros(4, np.float32)], {}, domain="pyedge")


def linear_model(bias_shape=(3,), rows=5):
    """x [rows, 4] -> x·W0 -> (·W + b) -> Relu -> y; the fused Linear is the second."""
    rng = np.random.default_rng(10)
    inits = [helper.make_tensor("w0", TensorProto.FLOAT, [4, 4], rng.standard_normal(16).tolist()),
             helper.make_tensor("w", TensorProto.FLOAT, [4, 3], rng.standard_normal(12).tolist()),
             helper.make_tensor("b", TensorProto.FLOAT, list(bias_shape),
                                rng.standard_normal(int(np.prod(bias_shape))).tolist())]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["x0"]),
             helper.make_node("MatMul", ["x0", "w"], ["h"]),
             helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["y"])]
    g = helper.make_graph(nodes, "linear",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


# few rows with a frozen W: the packed weight, then the bias; many rows: rows pre-filled
# with the bias and the GEMM adding onto them; W trained: its gradient as well
@pytest.mark.parametrize("rows,train", [(5, ["w0"]), (300, ["w0"]), (300, ["w0", "w"])])
def test_linear_bias_is_fused_and_trains_the_same(rows, train):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, 4)).astype(np.float32)
    target = rng.standard_normal((rows, 3)).astype(np.float32)
    model = linear_model(rows=rows)
    kw = dict(train=train, loss="mse", optimizer=pyedge.SGD(lr=0.05))
    fused = pyedge.TrainingSession(model, **kw)
    plain = pyedge.TrainingSession(model, fuse=False, **kw)
    assert fused.fusions["matmul_bias"] == 1 and "Add" not in _ops(fused.graph)
    np.testing.assert_allclose(fused.run({"x": x})["y"], plain.run({"x": x})["y"],
                               rtol=1e-6, atol=1e-6)
    for _ in range(3):
        np.testing.assert_allclose(fused.step({"x": x}, target), plain.step({"x": x}, target),
                                   rtol=1e-6)
        for k in train:
            np.testing.assert_allclose(fused.gradients()[k], plain.gradients()[k],
                                       rtol=1e-5, atol=1e-6, err_msg=k)


def test_trained_or_broadcast_biases_are_not_fused():
    g = load_onnx(linear_model())
    assert fuse(g, trainable={"b"})["matmul_bias"] == 0 and "Add" in _ops(g)
    g = load_onnx(linear_model(bias_shape=(1,)))   # broadcasts, but is not [N]
    assert fuse(g)["matmul_bias"] == 0 and "Add" in _ops(g)
    g = load_onnx(linear_model())
    assert fuse(g)["matmul_bias"] == 1
    mm = g.nodes[1]
    assert (mm.domain, mm.inputs, mm.outputs) == ("pyedge", ["x0", "w", "b"], ["hb"])
