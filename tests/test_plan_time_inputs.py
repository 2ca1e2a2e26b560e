"""Parameters fed as graph inputs (pyedge/plan_time_inputs.py: plans keyed on their value)
and int8 / int16 tensors computed in int64 with their wrap-around kept
(import_rewrites.widen_narrow_ints); both against onnxruntime."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import pyedge
from pyedge.plan_time_inputs import plan_time_inputs


def _model(nodes, inputs, outputs, inits=(), opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _ort(m, feeds):
    import onnxruntime as ort
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def vi(name, t, shape):
    return helper.make_tensor_value_info(name, t, shape)


def test_reshape_shape_and_slice_starts_as_graph_inputs():
    # y = Slice(Reshape(x, shape), starts, ends, axes); shape via shape arithmetic (Mul)
    m = _model([helper.make_node("Mul", ["shape", "one"], ["shape2"]),
                helper.make_node("Reshape", ["x", "shape2"], ["r"]),
                helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["y"])],
               [vi("x", TensorProto.FLOAT, [2, 6]), vi("shape", TensorProto.INT64, [2]),
                vi("starts", TensorProto.INT64, [1]), vi("ends", TensorProto.INT64, [1]),
                vi("axes", TensorProto.INT64, [1])],
               [vi("y", TensorProto.FLOAT, None)],
               [onnx.numpy_helper.from_array(np.array(1, np.int64), "one")])
    sess = pyedge.TrainingSession(m, loss=None)
    assert plan_time_inputs(sess.graph) == ["shape", "starts", "ends", "axes"]
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    cases = [([3, 4], [1], [3], [0]), ([4, 3], [0], [2], [1]), ([3, 4], [1], [3], [0]),
             ([12, 1], [-5], [100], [0])]
    for shape, st, en, ax in cases:
        feeds = {"x": x, "shape": np.array(shape, np.int64), "starts": np.array(st, np.int64),
                 "ends": np.array(en, np.int64), "axes": np.array(ax, np.int64)}
        got = sess.run(feeds)["y"]
        np.testing.assert_array_equal(got, _ort(m, feeds)[0])


def test_value_keyed_input_trains():
    """A training plan keyed on a fed Reshape shape: the loss falls, gradients flow."""
    w = onnx.numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    m = _model([helper.make_node("Reshape", ["x", "shape"], ["r"]),
                helper.make_node("MatMul", ["r", "w"], ["y"])],
               [vi("x", TensorProto.FLOAT, [2, 2, 2]), vi("shape", TensorProto.INT64, [2])],
               [vi("y", TensorProto.FLOAT, [2, 3])], [w])
    sess = pyedge.TrainingSession(m, train=["w"], optimizer=pyedge.SGD(lr=0.1))
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 2, 2)).astype(np.float32),
             "shape": np.array([2, 4], np.int64)}
    losses = [sess.step(feeds, np.array([0, 2])) for _ in range(5)]
    assert losses[-1] < losses[0]


def test_keyed_inputs_only_where_needed():
    m = _model([helper.make_node("Gather", ["emb", "ids"], ["y"], axis=0)],
               [vi("ids", TensorProto.INT64, [2, 3])], [vi("y", TensorProto.FLOAT, None)],
               [onnx.numpy_helper.from_array(np.ones((5, 2), np.float32), "emb")])
    assert plan_time_inputs(pyedge.load_onnx(m)) == []  # token ids are data, not parameters


@pytest.mark.parametrize("dtype,onnx_t", [(np.int8, TensorProto.INT8),
                                          (np.int16, TensorProto.INT16)])
def test_narrow_int_arithmetic_wraps_like_onnxruntime(dtype, onnx_t):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    a = rng.integers(info.min, info.max, (3, 4)).astype(dtype)
    b = rng.integers(info.min, info.max, (3, 4)).astype(dtype)
    b[b == 0] = 3
    # (a + b) * a - b, then Div, Max/Min, Clip, comparisons: chains wrap at every step
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("Mul", ["s", "a"], ["p"]),
             helper.make_node("Sub", ["p", "b"], ["d"]),
             helper.make_node("Div", ["d", "b"], ["q"]),
             helper.make_node("Max", ["q", "a"], ["mx"]),
             helper.make_node("Clip", ["mx", "lo", "hi"], ["c"]),
             helper.make_node("Less", ["c", "b"], ["lt"]),
             helper.make_node("Neg", ["a"], ["n"])]
    inits = [onnx.numpy_helper.from_array(np.array(-20, dtype), "lo"),
             onnx.numpy_helper.from_array(np.array(50, dtype), "hi")]
    outs = [vi(o, onnx_t, [3, 4]) for o in ("s", "p", "d", "q", "mx", "c", "n")]
    outs.append(vi("lt", TensorProto.BOOL, [3, 4]))
    m = _model(nodes, [vi("a", onnx_t, [3, 4]), vi("b", onnx_t, [3, 4])], outs, inits,
               opset=17)
    sess = pyedge.TrainingSession(m, loss=None)
    got = sess.run({"a": a, "b": b})
    # numpy's int8/int16 arithmetic wraps as ONNX's does; Div truncates toward zero
    with np.errstate(all="ignore"):
        s_ = a + b
        p_ = s_ * a
        d_ = p_ - b
        q_ = (np.trunc(d_.astype(np.float64) / b)).astype(np.int64).astype(dtype)
        mx = np.maximum(q_, a)
        c_ = np.clip(mx, dtype(-20), dtype(50))
        ref = {"s": s_, "p": p_, "d": d_, "q": q_, "mx": mx, "c": c_, "lt": c_ < b, "n": -a}
    for o, r in ref.items():
        assert got[o].dtype == r.dtype, o
        np.testing.assert_array_equal(got[o], r, err_msg=o)


def test_uint8_inputs_arithmetic_wraps():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (4, 5)).astype(np.uint8)
    b = rng.integers(1, 256, (4, 5)).astype(np.uint8)
    ops = ["Add", "Sub", "Mul", "Div", "Max", "Min", "Mod"]
    m = _model([helper.make_node(op, ["a", "b"], [op.lower()]) for op in ops],
               [vi("a", TensorProto.UINT8, [4, 5]), vi("b", TensorProto.UINT8, [4, 5])],
               [vi(op.lower(), TensorProto.UINT8, [4, 5]) for op in ops], opset=17)
    got = pyedge.TrainingSession(m, loss=None).run({"a": a, "b": b})
    with np.errstate(all="ignore"):
        ref = {"add": a + b, "sub": a - b, "mul": a * b, "div": a // b,
               "max": np.maximum(a, b), "min": np.minimum(a, b), "mod": a % b}
    for k, r in ref.items():
        assert got[k].dtype == np.uint8, k
        np.testing.assert_array_equal(got[k], r, err_msg=k)


def test_uint8_input_read_by_a_quantized_op_stays_uint8():
    m = _model([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
               [vi("q", TensorProto.UINT8, [3])], [vi("y", TensorProto.FLOAT, [3])],
               [onnx.numpy_helper.from_array(np.array(0.5, np.float32), "s"),
                onnx.numpy_helper.from_array(np.array(3, np.uint8), "z")])
    g = pyedge.load_onnx(m)
    assert g.inputs[0].dtype == "uint8"
