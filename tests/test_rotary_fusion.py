"""The rotary-embedding fusion (pyedge/rotary_fusion.py): the exporters' Slice/Neg/Concat/Mul/
Add spelling of apply_rotary_pos_emb (full and partial rotary) becomes one pyedge.Rotary per
Q and K, and the fused graph computes what the op-by-op graph computes (outputs, loss,
gradients). Hand-written chains check each guard (a changed bound, a missing Neg, an
intermediate read elsewhere, tables computed from a trained tensor); tiny config-built
decoders check whole models of both exporters, static and dynamic shapes, with the attention
fusion on (fuse=True on the whole model: the rotated Q/K keep their names)."""
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyedge
from pyedge.fusions import fuse
from pyedge.onnx_import import load_onnx
from decoder_families import N_LAYERS, decoder_parity, export_family


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _ints(name, v):
    return numpy_helper.from_array(np.array(v, np.int64), name)


def rope_model(D=16, rd=16, half=None, neg=True, extra_output=None, order="xc_first",
               train_freq=False, B=2, H=3, T=5):
    """x [B, T, 8] -> Linear -> heads [B, H, T, D] -> rotary (the dynamo spelling; partial
    when rd < D) -> y. cos/sin [1, T, rd] come from positions × inv_freq in the graph, as
    transformers computes them (inv_freq an initializer that train_freq trains)."""
    rng = np.random.default_rng(0)
    h = rd // 2 if half is None else half
    inv = (1.0 / 10000 ** (np.arange(0, rd, 2) / rd)).astype(np.float32)
    inits = [numpy_helper.from_array(rng.standard_normal((8, H * D)).astype(np.float32), "w"),
             numpy_helper.from_array(inv.reshape(1, 1, rd // 2), "inv_freq"),
             numpy_helper.from_array(np.arange(T, dtype=np.float32).reshape(1, T, 1), "pos"),
             _ints("shape", [B, T, H, D]), _ints("z", [0]), _ints("h", [h]), _ints("rd", [rd]),
             _ints("end", [2 ** 63 - 1]), _ints("ax", [-1]), _ints("one", [1])]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]),
             helper.make_node("Reshape", ["p", "shape"], ["p4"]),
             helper.make_node("Transpose", ["p4"], ["q"], perm=[0, 2, 1, 3]),
             helper.make_node("Mul", ["pos", "inv_freq"], ["f"]),
             helper.make_node("Concat", ["f", "f"], ["emb"], axis=-1),
             helper.make_node("Cos", ["emb"], ["cos"]),
             helper.make_node("Sin", ["emb"], ["sin"]),
             helper.make_node("Unsqueeze", ["cos", "one"], ["c4"]),
             helper.make_node("Unsqueeze", ["sin", "one"], ["s4"])]
    xin = "q"
    if rd < D:
        nodes.append(helper.make_node("Slice", ["q", "z", "rd", "ax"], ["qr"]))
        xin = "qr"
    nodes += [helper.make_node("Mul", [xin, "c4"] if order == "xc_first" else ["c4", xin], ["xc"]),
              helper.make_node("Slice", [xin, "z", "h", "ax", "one"], ["x1"]),
              helper.make_node("Slice", [xin, "h", "end", "ax", "one"], ["x2"])]
    if neg:
        nodes.append(helper.make_node("Neg", ["x2"], ["nx2"]))
    else:
        nodes.append(helper.make_node("Identity", ["x2"], ["nx2"]))
    nodes += [helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
              helper.make_node("Mul", ["rot", "s4"], ["rs"]),
              helper.make_node("Add", ["xc", "rs"] if order == "xc_first" else ["rs", "xc"],
                               ["yr"])]
    if rd < D:
        nodes += [helper.make_node("Slice", ["q", "rd", "end", "ax"], ["qp"]),
                  helper.make_node("Concat", ["yr", "qp"], ["y"], axis=-1)]
    else:
        nodes.append(helper.make_node("Identity", ["yr"], ["y"]))
    outs = [_f("y", [B, H, T, D])] + ([_f(extra_output, None)] if extra_output else [])
    g = helper.make_graph(nodes, "rope", [_f("x", [B, T, 8])], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _parity(model, train, feeds, rtol=1e-5, steps=2):
    rng = np.random.default_rng(3)
    kw = dict(train=train, loss="mse", optimizer=pyedge.SGD(lr=0.05))
    fused = pyedge.TrainingSession(model, **kw)
    plain = pyedge.TrainingSession(model, fuse=False, **kw)
    yf, yp = fused.run(feeds)["y"], plain.run(feeds)["y"]
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


@pytest.mark.parametrize("D,rd,order", [(16, 16, "xc_first"), (16, 16, "swapped"),
                                        (24, 8, "xc_first"), (20, 10, "swapped")],
                         ids=["full", "full_swapped", "partial", "partial_h5"])
def test_rotary_chain_becomes_one_op_and_trains_the_same(D, rd, order):
    model = rope_model(D=D, rd=rd, order=order)
    g = load_onnx(model)
    assert fuse(g)["rotary"] == 1
    (rot,) = [n for n in g.nodes if n.op_type == "Rotary"]
    assert rot.domain == "pyedge" and rot.inputs == ["q", "cos", "sin"]
    assert rot.outputs == (["y"] if rd < D else ["yr"])  # the chain's own output name
    ops = [n.op_type for n in g.nodes]
    assert "Neg" not in ops and "Slice" not in ops and "Unsqueeze" not in ops
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    fused = _parity(model, ["w"], {"x": x})
    assert fused.fusions["rotary"] == 1


@pytest.mark.parametrize("kw", [dict(half=4), dict(neg=False), dict(extra_output="rot"),
                                dict(extra_output="x1"), dict(extra_output="xc")],
                         ids=["wrong_half", "no_neg", "rot_read", "slice_read", "product_read"])
def test_rotary_not_fused_when_a_guard_fails(kw):
    g = load_onnx(rope_model(**kw))
    assert fuse(g).get("rotary", 0) == 0
    assert "Neg" in [n.op_type for n in g.nodes] or not kw.get("neg", True)


def test_rotary_with_trained_tables_stays_op_by_op():
    """inv_freq trained: cos/sin need a gradient the op does not give, so no rewrite and the
    plain graph trains it."""
    model = rope_model()
    g = load_onnx(model)
    assert fuse(g, {"inv_freq"}).get("rotary", 0) == 0
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    sess = pyedge.TrainingSession(model, train=["inv_freq"], loss="mse")
    assert sess.fusions.get("rotary", 0) == 0
    sess.step({"x": x}, np.zeros((2, 3, 5, 16), np.float32), update=False)
    assert np.abs(sess.gradients()["inv_freq"]).max() > 0


def test_rotary_op_with_trained_table_is_refused_at_plan_time():
    """A graph holding pyedge.Rotary whose cos is trained: a plan-time error naming the node."""
    rng = np.random.default_rng(0)
    c = numpy_helper.from_array(rng.standard_normal((1, 5, 8)).astype(np.float32), "cos")
    s = numpy_helper.from_array(rng.standard_normal((1, 5, 8)).astype(np.float32), "sin")
    node = helper.make_node("Rotary", ["x", "cos", "sin"], ["y"], name="rope0", domain="pyedge")
    g = helper.make_graph([node], "g", [_f("x", [1, 2, 5, 8])], [_f("y", [1, 2, 5, 8])], [c, s])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                                helper.make_opsetid("pyedge", 1)])
    x = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    sess = pyedge.TrainingSession(model, train=["cos"], loss="mse")
    with pytest.raises(Exception, match="rope0.*cos and sin"):
        sess.step({"x": x}, np.zeros_like(x))


# ----------------------------------------------------------- exported decoders, end to end
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope_dec")
    cache = {}

    def get(family, exporter="dynamo", dynamic=False):
        key = (family, exporter, dynamic)
        if key not in cache:
            cache[key] = export_family(root, family, exporter, dynamic)
        return cache[key]
    return get


@pytest.mark.parametrize("exporter,dynamic", [("dynamo", False), ("torchscript", False),
                                              ("dynamo", True), ("torchscript", True)],
                         ids=["dynamo", "torchscript", "dynamo_dynamic", "torchscript_dynamic"])
def test_llama_rotary_fuses_on_q_and_k_of_every_layer(exported, exporter, dynamic):
    path, ids, rope_layers = exported("llama", exporter, dynamic)
    fused, _ = decoder_parity(path, ids, ["q_proj", "k_proj", "v_proj"])
    assert fused.fusions["rotary"] == 2 * rope_layers == 2 * N_LAYERS
    ops = [(n.domain, n.op_type) for n in fused.graph.nodes]
    assert ("", "Neg") not in ops
    rot = [n for n in fused.graph.nodes if n.op_type == "Rotary"]
    assert all(n.attrs.get("layout", "bhtd") == "bhtd" for n in rot)
    if exporter == "dynamo" and not dynamic:
        # composes with the attention fusion: it reads the rotated Q and K by name
        assert fused.fusions["attention"] == N_LAYERS
        att = [n for n in fused.graph.nodes if n.op_type == "Attention"]
        assert {n.inputs[0] for n in att} | {n.inputs[1] for n in att} \
            == {n.outputs[0] for n in rot}
    stats = fused.plan_stats({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert stats["fusions"]["rotary"] == 2 * N_LAYERS


def test_rotary_and_attention_fuse_in_either_order(exported):
    """Attention first, rotary second gives the same graph as the default order."""
    from pyedge import decoder_fusions as dec
    from pyedge.attention_fusion import fuse_decoder_attention
    from pyedge.fusions import (fuse_masked_softmax, fuse_transposed_matmul)
    from pyedge.rotary_fusion import fuse_rotary
    path, ids, _ = exported("llama")
    a = load_onnx(path)
    fuse(a)
    b = load_onnx(path)
    dec.fuse_rmsnorm(b)
    dec.fuse_gated_mlp(b)
    fuse_masked_softmax(b)
    fuse_transposed_matmul(b)
    assert fuse_decoder_attention(b) == N_LAYERS
    assert fuse_rotary(b) == 2 * N_LAYERS
    key = lambda g: sorted((n.op_type, tuple(n.inputs), tuple(n.outputs))  # noqa: E731
                           for n in g.nodes if n.domain == "pyedge")
    assert [k for k in key(a) if k[0] in ("Rotary", "Attention")] == \
        [k for k in key(b) if k[0] in ("Rotary", "Attention")]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["neox", "phi3_partial"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_partial_rotary_fuses_and_trains_the_same(exported, family, exporter):
    path, ids, rope_layers = exported(family, exporter)
    targets = ["query_key_value"] if family == "neox" else ["qkv_proj"]
    fused, _ = decoder_parity(path, ids, targets)
    assert fused.fusions["rotary"] == 2 * rope_layers
    assert ("", "Neg") not in {(n.domain, n.op_type) for n in fused.graph.nodes}
