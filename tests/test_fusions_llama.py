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
def gated_model(act="silu", extra_output=None, up_shape=(2, 6, 12)):
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
    outs = [_f("y", [2, 6, 8])] + ([_f(extra_output, None)] if extra_output else [])
    return _model(nodes, inits, [_f("x", [2, 6, 8])], outs, opset=20)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
def test_gated_mlp_becomes_one_op_and_trains_the_same(act):
    model = gated_model(act)
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
