"""Gather pushdown (pyedge/row_pruning.py): ops after the last attention run only on the rows
the output reads. Checked against the same graph without the rewrite (fuse=False, itself
checked against torch elsewhere) and against onnxruntime."""
import numpy as np
import onnx
from optional_deps import optional
ort = optional("onnxruntime")
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyedge
from pyedge.onnx_import import load_onnx
from pyedge.row_pruning import push_gathers_up, value_ranks

B, L, D, H, C = 3, 5, 8, 16, 4


def _model(index=0, axis=1, extra_output=None, pos_shape=(1, L, D), second_reader=False,
           ln_axis=-1, decomposed_ln_opset=None, slice_axis=None):
    """x [B, L, D] -> h = LN(relu(x·W1 + b1)·W2 + x + pos) -> Gather(h, index, axis) ·Wc + bc."""
    rng = np.random.default_rng(0)
    inits = {
        "W1": rng.standard_normal((D, H)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(H).astype(np.float32) * 0.1,
        "W2": rng.standard_normal((H, D)).astype(np.float32) * 0.3,
        "pos": rng.standard_normal(pos_shape).astype(np.float32) * 0.1,
        "g": (1 + 0.1 * rng.standard_normal((L, D)[ln_axis:])).astype(np.float32),
        "beta": (0.1 * rng.standard_normal((L, D)[ln_axis:])).astype(np.float32),
        "Wc": rng.standard_normal((D, C)).astype(np.float32) * 0.3,
        "bc": np.zeros(C, np.float32),
        "idx": np.array(index, np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "W2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "x"], ["res"], name="residual"),
        helper.make_node("Add", ["res", "pos"], ["res2"], name="pos_add"),
        helper.make_node("LayerNormalization", ["res2", "g", "beta"], ["h"], name="ln",
                         axis=ln_axis),
        helper.make_node("Identity", ["h"], ["h2"], name="copy"),
        helper.make_node("Gather", ["h2", "idx"], ["cls"], name="select", axis=axis),
        helper.make_node("MatMul", ["cls", "Wc"], ["mc"], name="head"),
        helper.make_node("Add", ["mc", "bc"], ["logits"], name="head_bias"),
    ]
    opset = 17
    if slice_axis is not None:  # h2 = h[0:MAX] along slice_axis (dynamic-shape x[:, 0] exports)
        inits.update(s0=np.array([0], np.int64), s1=np.array([2**62], np.int64),
                     sa=np.array([slice_axis], np.int64))
        nodes[7] = helper.make_node("Slice", ["h", "s0", "s1", "sa"], ["h2"], name="slice")
    if decomposed_ln_opset:  # LayerNorm spelled out, as opset-14 exports have it
        opset = decomposed_ln_opset
        inits.update(two=np.array(2, np.float32), eps=np.array(1e-5, np.float32),
                     axes=np.array([-1] if ln_axis == -1 else [-2, -1], np.int64))

        def mean(x, y):
            if opset >= 18:
                return helper.make_node("ReduceMean", [x, "axes"], [y], keepdims=1)
            return helper.make_node("ReduceMean", [x], [y], axes=list(inits["axes"]), keepdims=1)
        ln_at = next(i for i, n in enumerate(nodes) if n.op_type == "LayerNormalization")
        nodes[ln_at:ln_at + 1] = [
            mean("res2", "mu"), helper.make_node("Sub", ["res2", "mu"], ["xc"]),
            helper.make_node("Pow", ["xc", "two"], ["sq"]), mean("sq", "var"),
            helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
            helper.make_node("Div", ["xc", "sd"], ["nx"]), helper.make_node("Mul", ["nx", "g"], ["sx"]),
            helper.make_node("Add", ["sx", "beta"], ["h"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [B, C])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None))
    if second_reader:  # a second reader of r1 keeps it whole
        nodes.append(helper.make_node("ReduceSum", ["r1"], ["r1_sum"], name="peek", keepdims=0))
        outputs.append(helper.make_tensor_value_info("r1_sum", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [B, L, D])], outputs,
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(m)


def _sessions(model, **kw):
    cfg = dict(train=["W1", "W2", "Wc", "bc"], loss="cross_entropy",
               optimizer=pyedge.SGD(lr=0.1), seed=0)
    cfg.update(kw)
    return (pyedge.TrainingSession(load_onnx(model), fuse=True, **cfg),
            pyedge.TrainingSession(load_onnx(model), fuse=False, **cfg))


def _data():
    rng = np.random.default_rng(1)
    return ({"x": rng.standard_normal((B, L, D)).astype(np.float32)},
            rng.integers(0, C, B).astype(np.int64))


def _assert_same_training(fused, plain, atol=2e-6):
    x, y = _data()
    np.testing.assert_allclose(fused.run(x)["logits"], plain.run(x)["logits"], atol=atol)
    for _ in range(3):
        lf, lp = fused.step(x, y, update=False), plain.step(x, y, update=False)
        assert lf == pytest.approx(lp, abs=atol)
        gf, gp = fused.gradients(), plain.gradients()
        assert gf.keys() == gp.keys()
        for k in gp:
            np.testing.assert_allclose(gf[k], gp[k], atol=atol, err_msg=k)
        fused.apply_update(), plain.apply_update()


def test_cls_rows_pushed_to_the_input_matches_the_whole_graph():
    fused, plain = _sessions(_model())
    # Identity, LN, pos Add, residual Add, fc2, Relu, bias Add, fc1: everything up to x
    assert fused.fusions["gathered_rows"] == 8
    ops = {n.name: n for n in fused.graph.nodes}
    gathers = [n for n in fused.graph.nodes if n.op_type == "Gather"]
    assert {g.inputs[0] for g in gathers} == {"x", "pos"}  # x read once: residual + fc1 merged
    assert ops["fc1"].inputs[0] == next(g.outputs[0] for g in gathers if g.inputs[0] == "x")
    _assert_same_training(fused, plain)


def test_rewritten_graph_runs_the_same_in_onnxruntime():
    model = _model()
    g = load_onnx(model)
    assert push_gathers_up(g) == 8
    x, _ = _data()
    want = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    # the rewritten graph as an ONNX model for onnxruntime
    nodes = [helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name, **n.attrs)
             for n in g.nodes]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in g.initializers.items()]
    m = helper.make_model(helper.make_graph(nodes, "r", list(model.graph.input),
                                            list(model.graph.output), inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    got = ort.InferenceSession(m.SerializeToString()).run(None, x)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_lora_matmul_rows_are_gathered_too():
    lora = pyedge.LoraConfig(r=2, alpha=4, target_modules=["W1", "W2"])
    fused, plain = _sessions(_model(), lora=lora, train=["Wc", "bc"])
    assert fused.fusions["gathered_rows"] == 8
    assert sum(n.op_type == "LoraMatMul" for n in fused.graph.nodes) == 2
    for s in (fused, plain):  # B = 0 at init: give the adapters a value so they count
        for k, v in s.trainable_parameters().items():
            if "lora_B" in k:
                v[...] = np.linspace(-0.2, 0.2, v.size, dtype=np.float32).reshape(v.shape)
    _assert_same_training(fused, plain)


def test_other_index_stops_at_ops_that_may_broadcast():
    # index 2: a size-1 operand (pos is [1, L, D] here, but ranks alone cannot tell) would
    # need index 0, so the move stops at the first Add with a gathered-axis operand
    fused, plain = _sessions(_model(index=2))
    assert fused.fusions["gathered_rows"] == 2  # Identity and LN only
    _assert_same_training(fused, plain)


@pytest.mark.parametrize("pos_shape", [(D,), (L, D), (B, L, D)])
def test_negative_axis_and_broadcast_operands(pos_shape):
    # pos lacks the axis ([D]: read as it is) or has it at another position ([L, D]: axis 0)
    fused, plain = _sessions(_model(axis=-2, pos_shape=pos_shape))
    assert fused.fusions["gathered_rows"] == 8
    gathered = {n.inputs[0] for n in fused.graph.nodes if n.op_type == "Gather"}
    assert gathered == ({"x"} if len(pos_shape) == 1 else {"x", "pos"})
    _assert_same_training(fused, plain)


@pytest.mark.parametrize("kw, moved", [
    ({"extra_output": "h"}, 1),          # h is a graph output: stops below the Identity
    ({"second_reader": True}, 5),        # r1 has another reader: stops at fc2's input
])
def test_values_read_elsewhere_stay_whole(kw, moved):
    fused, plain = _sessions(_model(**kw))
    assert fused.fusions["gathered_rows"] == moved
    x, y = _data()
    for name in [o.name for o in fused.graph.outputs]:
        np.testing.assert_allclose(fused.run(x)[name], plain.run(x)[name], atol=2e-6)
    _assert_same_training(fused, plain)


def test_without_value_info_ranks_come_from_propagation():
    g = load_onnx(_model())
    g.value_shapes.clear()  # as for a file without value_info
    assert value_ranks(g)["h2"] == 3
    assert push_gathers_up(g) == 8


def test_layernorm_over_the_gathered_axis_stops_the_move():
    fused, plain = _sessions(_model(ln_axis=-2))  # LN over [L, D]: every row counts
    assert fused.fusions["gathered_rows"] == 1     # the Identity only
    _assert_same_training(fused, plain)


@pytest.mark.parametrize("w_shape, axis", [((D, H), 2),      # a column of the product
                                           ((B, D, H), 1)])  # a batched W
def test_matmul_moves_only_rows_against_a_2d_weight(w_shape, axis):
    w = np.ones(w_shape, np.float32)
    out_shape = [B, L, H]
    del out_shape[axis]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]),
         helper.make_node("Gather", ["m", "idx"], ["y"], axis=axis)], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, L, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(1, np.int64), "idx")])
    model = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert push_gathers_up(load_onnx(model)) == 0


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMean's axes: attribute, then input
def test_spelled_out_layernorm_moves_through_its_reductions(opset):
    model = _model(decomposed_ln_opset=opset)
    fused, plain = _sessions(model)
    # Identity, the 9 ops of the LayerNorm, pos Add, residual, fc2, Relu, bias Add, fc1
    assert fused.fusions["gathered_rows"] == 16
    reduce = [n for n in fused.graph.nodes if n.op_type == "ReduceMean"]
    axes = [n.attrs["axes"] if opset < 18 else list(fused.graph.initializers[n.inputs[1]])
            for n in reduce]
    assert axes == [[1], [1]]  # -1 of [B, L, D] is now axis 1 of [B, D]
    x, _ = _data()
    want = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    np.testing.assert_allclose(fused.run(x)["logits"], want, atol=2e-6)
    _assert_same_training(fused, plain)


def test_a_reduction_over_the_gathered_axis_stops_the_move():
    fused, plain = _sessions(_model(decomposed_ln_opset=17, ln_axis=-2))  # mean over [L, D]
    # Identity, Add beta, Mul g, Div, Sqrt, Add eps; the variance's ReduceMean reads all rows
    assert fused.fusions["gathered_rows"] == 6
    _assert_same_training(fused, plain)


@pytest.mark.parametrize("slice_axis, moved", [(0, 8), (-3, 8), (1, 0)])
def test_slices_of_other_axes_commute(slice_axis, moved):
    fused, plain = _sessions(_model(slice_axis=slice_axis))
    assert fused.fusions["gathered_rows"] == moved
    _assert_same_training(fused, plain)
