"""The Llama-family fusions (pyedge/decoder_fusions.py): RMSNorm, the gated MLP and SDPA
attention (causal, padding mask, grouped-query heads) are recognised in what the exporters
write, and the fused graph computes what the op-by-op graph computes (logits, loss, LoRA
gradients). Small hand-written chains check each rule and its guards (a changed constant or an
intermediate read elsewhere stops the rewrite); tiny config-built Llama / Qwen2 models exported
by the dynamo exporter check the whole decoder."""
import numpy as np
import pytest
from onnx import TensorProto, helper

import pyedge
from pyedge.fusions import fuse
from pyedge.onnx_import import load_onnx


def _const(name, v, shape=()):
    return helper.make_tensor(name, TensorProto.FLOAT, list(shape),
                              np.broadcast_to(np.float32(v), shape).ravel().tolist())


def _model(nodes, inits, inputs, outputs, opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _ops(graph):
    return [n.op_type for n in graph.nodes]


# ------------------------------------------------------------------------------ RMSNorm
def rmsnorm_model(power=2.0, eps=1e-6, weight="w", extra_output=None, axis=-1, reciprocal=True):
    """x [3, 5, 8] -> Linear -> RMSNorm as the dynamo exporter spells it -> y [3, 5, 8]."""
    rng = np.random.default_rng(0)
    inits = [helper.make_tensor("lw", TensorProto.FLOAT, [8, 8], rng.standard_normal(64).tolist()),
             _const("p", power), _const("eps", eps),
             helper.make_tensor("axes", TensorProto.INT64, [1], [axis]),
             helper.make_tensor("w", TensorProto.FLOAT, [8], (rng.standard_normal(8) + 1).tolist()),
             _const("one", 1.0)]
    nodes = [helper.make_node("MatMul", ["x", "lw"], ["h"]),
             helper.make_node("Pow", ["h", "p"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["rt"])]
    if reciprocal:
        nodes += [helper.make_node("Reciprocal", ["rt"], ["r"]),
                  helper.make_node("Mul", ["h", "r"], ["n"])]
    else:
        nodes += [helper.make_node("Div", ["h", "rt"], ["n"])]
    if weight == "w":
        nodes.append(helper.make_node("Mul", ["w", "n"], ["y"]))
    elif weight == "one_plus":
        nodes += [helper.make_node("Add", ["w", "one"], ["w1"]),
                  helper.make_node("Mul", ["n", "w1"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", ["n"], ["y"]))
    outs = [_f("y", [3, 5, 8])] + ([_f(extra_output, None)] if extra_output else [])
    return _model(nodes, inits, [_f("x", [3, 5, 8])], outs)


def _parity(model, train, feeds, out="y", rtol=1e-5, steps=2):
    """Fused and op-by-op sessions: outputs, losses and gradients of `train` agree."""
    rng = np.random.default_rng(3)
    kw = dict(train=train, loss="mse", optimizer=pyedge.SGD(lr=0.05))
    fused = pyedge.TrainingSession(model, **kw)
    plain = pyedge.TrainingSession(model, fuse=False, **kw)
    yf, yp = fused.run(feeds)[out], plain.run(feeds)[out]
    np.testing.assert_allclose(yf, yp, rtol=rtol, atol=rtol * np.abs(yp).max())
    labels = rng.standard_normal(yp.shape).astype(np.float32)
    for _ in range(steps):
        lf, lp = fused.step(feeds, labels), plain.step(feeds, labels)
        np.testing.assert_allclose(lf, lp, rtol=rtol)
        gf, gp = fused.gradients(), plain.gradients()
        for k in gp:
            np.testing.assert_allclose(gf[k], gp[k], rtol=0, atol=rtol * np.abs(gp[k]).max(),
                                       err_msg=k)
    return fused


@pytest.mark.parametrize("weight,reciprocal", [("w", True), ("one_plus", True), ("none", True),
                                               ("w", False)])
def test_rmsnorm_chain_becomes_one_op_and_trains_the_same(weight, reciprocal):
    model = rmsnorm_model(weight=weight, reciprocal=reciprocal)
    g = load_onnx(model)
    assert fuse(g)["rmsnorm"] == 1
    rms = [n for n in g.nodes if n.op_type == "RMSNorm"]
    assert len(rms) == 1 and rms[0].domain == "pyedge"
    assert rms[0].inputs == (["h"] if weight == "none" else ["h", "w"])
    assert rms[0].attrs.get("add_one", 0) == (weight == "one_plus")
    assert rms[0].attrs["epsilon"] == pytest.approx(1e-6)
    for op in ("Pow", "ReduceMean", "Sqrt"):
        assert op not in _ops(g)
    x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32)
    train = ["lw"] + (["w"] if weight != "none" else [])
    _parity(model, train, {"x": x})


@pytest.mark.parametrize("kw", [dict(power=3.0), dict(eps=-1e-6), dict(axis=1),
                                dict(extra_output="r"), dict(extra_output="ms")],
                         ids=["pow3", "negative_eps", "not_last_axis", "r_read", "mean_read"])
def test_rmsnorm_not_fused_when_a_guard_fails(kw):
    g = load_onnx(rmsnorm_model(**kw))
    assert fuse(g)["rmsnorm"] == 0
    assert "ReduceMean" in _ops(g)


# ---------------------------------------------------------------------------- gated MLP
def gated_model(act="silu", extra_output=None, up_shape=(2, 6, 12), batch=2):
    """x [2, 6, 8] -> gate, up projections -> act(gate) * up -> down -> y [2, 6, 8]."""
    rng = np.random.default_rng(4)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, s, rng.standard_normal(int(np.prod(s))).tolist())
             for n, s in (("wg", [8, 12]), ("wu", [8, up_shape[-1]]), ("wd", [12, 8]))]
    nodes = [helper.make_node("MatMul", ["x", "wg"], ["g"]),
             helper.make_node("MatMul", ["x", "wu"], ["u"])]
    if act == "silu":
        nodes += [helper.make_node("Sigmoid", ["g"], ["s"]),
                  helper.make_node("Mul", ["g", "s"], ["a"])]
    else:
        nodes.append(helper.make_node("Gelu", ["g"], ["a"], approximate="tanh" if act == "gelu_tanh"
                                      else "none"))
    nodes += [helper.make_node("Mul", ["a", "u"], ["m"]),
              helper.make_node("MatMul", ["m", "wd"], ["y"])]
    outs = [_f("y", [batch, 6, 8])] + ([_f(extra_output, None)] if extra_output else [])
    return _model(nodes, inits, [_f("x", [batch, 6, 8])], outs, opset=20)


@pytest.mark.parametrize("batch", [2, "b"], ids=["static", "symbolic_batch"])
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_gated_mlp_becomes_one_op_and_trains_the_same(act, batch):
    model = gated_model(act, batch=batch)
    g = load_onnx(model)
    assert fuse(g)["gated_mlp"] == 1
    (glu,) = [n for n in g.nodes if n.op_type == "SwiGLU"]
    assert glu.inputs == ["g", "u"] and glu.attrs["act"] == act
    assert "Sigmoid" not in _ops(g) and "Gelu" not in _ops(g)
    x = np.random.default_rng(1).standard_normal((2, 6, 8)).astype(np.float32)
    _parity(model, ["wg", "wu"], {"x": x})


@pytest.mark.parametrize("kw", [dict(extra_output="s"), dict(extra_output="a"),
                                dict(up_shape=(2, 6, 1))], ids=["sigmoid_read", "act_read",
                                                                "up_broadcasts"])
def test_gated_mlp_not_fused_when_a_guard_fails(kw):
    g = load_onnx(gated_model(**kw))
    assert fuse(g)["gated_mlp"] == 0


# ----------------------------------------------------------- exported Llama-family decoders
N_LAYERS = 2


def _export_decoder(path, family="llama", with_mask=False, seq=16, batch=2):
    """A config-built decoder (2 layers, hidden 64, 4 heads, 2 kv heads) exported by the
    dynamo exporter with pyedge.torch.export; returns the example input_ids."""
    import torch
    import transformers as tf
    import pyedge.torch as pt
    torch.manual_seed(0)
    kw = dict(num_hidden_layers=N_LAYERS, hidden_size=64, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, vocab_size=128,
              max_position_embeddings=64)
    if family == "llama":
        cfg, base = tf.LlamaConfig(**kw), tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg, base = tf.Qwen2Config(**kw), tf.Qwen2ForCausalLM
    else:  # Gemma: RMSNorm times 1 + w, GeGLU (gelu_pytorch_tanh)
        cfg, base = tf.GemmaConfig(head_dim=16, **kw), tf.GemmaForCausalLM

    class LM(base):  # a subclass keeps the parameter names PEFT expects
        def forward(self, input_ids, attention_mask=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False).logits
    model = LM(cfg).eval()
    with torch.no_grad():  # norm weights away from their init (1, or 0 in 1 + w)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 128, (batch, seq))
    args = (ids, torch.ones(batch, seq, dtype=torch.long)) if with_mask else (ids,)
    names = ["input_ids", "attention_mask"] if with_mask else ["input_ids"]
    pt.export(model, args, str(path), input_names=names)
    return ids.numpy()


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    cache = {}
    root = tmp_path_factory.mktemp("decoders")

    def get(family="llama", with_mask=False):
        key = (family, with_mask)
        if key not in cache:
            path = root / f"{family}_{int(with_mask)}.onnx"
            cache[key] = (str(path), _export_decoder(path, family, with_mask))
        return cache[key]
    return get


def _decoder_parity(path, feeds, targets, rtol=1e-5):
    lora = pyedge.LoraConfig(r=4, target_modules=targets)
    # SGD: AdamW's first steps are ±lr per element whatever the gradient's size, which turns
    # float32 noise in a near-zero gradient into a visible weight difference
    kw = dict(lora=lora, loss="causal_lm", optimizer=pyedge.SGD(lr=0.5))
    fused = pyedge.TrainingSession(path, **kw)
    plain = pyedge.TrainingSession(path, fuse=False, **kw)
    for sess in (fused, plain):  # the same nonzero B, so every adapter gets a gradient
        for i, (k, v) in enumerate(sorted(sess.trainable_parameters().items())):
            if ".lora_B" in k:
                v[...] = np.random.default_rng(i).standard_normal(v.shape) * 0.05
    logits_f = fused.run(feeds)[fused.output_name]
    logits_p = plain.run(feeds)[plain.output_name]
    np.testing.assert_allclose(logits_f, logits_p, rtol=0, atol=rtol * np.abs(logits_p).max())
    labels = feeds["input_ids"].astype(np.int64)
    for _ in range(2):  # gradients before the update (which clears them), then the update
        lf = fused.step(feeds, labels, update=False)
        lp = plain.step(feeds, labels, update=False)
        np.testing.assert_allclose(lf, lp, rtol=rtol)
        gf, gp = fused.gradients(), plain.gradients()
        assert gf.keys() == gp.keys() and len(gp) == 2 * len(targets) * N_LAYERS
        for k in gp:
            assert np.abs(gp[k]).max() > 0, k
            err = np.abs(gf[k] - gp[k]).max() / np.abs(gp[k]).max()
            assert err <= rtol, (k, err)
        fused.apply_update()
        plain.apply_update()
    return fused, plain


@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "padding_mask"])
def test_llama_fuses_every_layer_and_trains_the_same(decoders, with_mask):
    path, ids = decoders("llama", with_mask)
    feeds = {"input_ids": ids}
    if with_mask:
        am = np.ones(ids.shape, np.int64)
        am[1, -5:] = 0  # right padding in the second sequence
        feeds["attention_mask"] = am
    fused, plain = _decoder_parity(path, feeds, ["q_proj", "v_proj", "gate_proj", "up_proj"])
    f = fused.fusions
    assert f["attention"] == N_LAYERS
    assert f["rmsnorm"] == 2 * N_LAYERS + 1  # two per layer and the final norm
    assert f["gated_mlp"] == N_LAYERS
    ops = {(n.domain, n.op_type) for n in fused.graph.nodes}
    for gone in ("Softmax", "IsNaN", "Sigmoid", "ReduceMean", "Pow"):
        assert ("", gone) not in ops, gone
    att = [n for n in fused.graph.nodes if n.op_type == "Attention"]
    # the constant causal mask becomes the flag; a mask built from attention_mask stays
    assert all((n.attrs.get("causal") == 1) != with_mask for n in att)
    assert all(len(n.inputs) == (4 if with_mask else 3) for n in att)
    assert all(n.attrs["out_layout"] == "blhd" for n in att)
    # the LoRA-adapted projections stay fused GEMMs
    assert sum(n.op_type == "LoraMatMul" for n in fused.graph.nodes) == 4 * N_LAYERS
    stats = fused.plan_stats(feeds)
    assert stats["fusions"] == {k: v for k, v in f.items() if v}
    assert stats["arena_bytes"] < plain.plan_stats(feeds)["arena_bytes"]


@pytest.mark.slow
def test_qwen2_fuses_every_layer_and_trains_the_same(decoders):
    path, ids = decoders("qwen2")
    fused, _ = _decoder_parity(path, {"input_ids": ids}, ["q_proj", "v_proj"])
    assert fused.fusions["attention"] == N_LAYERS
    assert fused.fusions["rmsnorm"] == 2 * N_LAYERS + 1
    assert fused.fusions["gated_mlp"] == N_LAYERS


def _softmax_sites(g):
    return [n for n in g.nodes if n.op_type == "Softmax"]


def test_sdpa_guards(decoders):
    """Each guard of the attention rewrite, by mutating the exported graph: a NaN guard that
    writes something else than 0, a probability read outside the chain, and a constant mask
    that is not the causal one (kept as the mask input; the result unchanged)."""
    path, ids = decoders("llama")
    base = load_onnx(path)
    assert fuse(base.copy())["attention"] == N_LAYERS

    g = base.copy()  # Where(IsNaN(P), 1, P): not softmax's guard
    for n in g.nodes:
        if n.op_type == "Where" and n.inputs[0] in {o for x in g.nodes if x.op_type == "IsNaN"
                                                    for o in x.outputs}:
            g.initializers["pyedge_test_one"] = np.ones((), np.float32)
            n.inputs[1] = "pyedge_test_one"
            break
    assert fuse(g)["attention"] == N_LAYERS - 1

    g = base.copy()  # P is also a graph output
    from pyedge.graph import ValueInfo
    g.outputs.append(ValueInfo(_softmax_sites(g)[0].outputs[0], "float32", []))
    assert fuse(g)["attention"] == N_LAYERS - 1

    g = base.copy()  # the mask's "minus infinity" is -1: a constant mask, not causal
    for n in g.nodes:
        if n.op_type == "Where" and len(n.inputs) == 3:
            v = g.initializers.get(n.inputs[2])
            if v is not None and np.size(v) == 1 and float(np.ravel(v)[0]) < -1e37:
                g.initializers[n.inputs[2]] = np.full(np.shape(v), -1.0, np.float32)
    fused = pyedge.TrainingSession(g, loss=None)
    plain = pyedge.TrainingSession(g, loss=None, fuse=False)
    att = [n for n in fused.graph.nodes if n.op_type == "Attention"]
    assert len(att) == N_LAYERS and all(len(n.inputs) == 4 and "causal" not in n.attrs
                                        for n in att)
    yf = fused.run({"input_ids": ids})[fused.output_name]
    yp = plain.run({"input_ids": ids})[plain.output_name]
    np.testing.assert_allclose(yf, yp, rtol=0, atol=1e-5 * np.abs(yp).max())


@pytest.mark.slow
def test_gemma_fuses_every_layer_and_trains_the_same(decoders):
    path, ids = decoders("gemma")
    fused, _ = _decoder_parity(path, {"input_ids": ids}, ["q_proj", "v_proj"])
    assert fused.fusions["attention"] == N_LAYERS
    assert fused.fusions["rmsnorm"] == 2 * N_LAYERS + 1
    assert fused.fusions["gated_mlp"] == N_LAYERS
    rms = [n for n in fused.graph.nodes if n.op_type == "RMSNorm"]
    assert all(n.attrs.get("add_one") == 1 for n in rms)
    glu = [n for n in fused.graph.nodes if n.op_type == "SwiGLU"]
    assert all(n.attrs["act"] == "gelu_tanh" for n in glu)
