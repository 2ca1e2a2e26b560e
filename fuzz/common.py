"""Shared by the fuzz harnesses and tests/test_fuzz_regressions.py.

run_model(data) feeds bytes (or a ModelProto) through the untrusted-model path:
pyedge.load_onnx -> TrainingSession(loss=None) -> run() on small inputs matching the declared
shapes. Anything wrong with the model must surface as one of EXPECTED; any other exception,
a crash, an abort or a hang is a finding.
"""
from __future__ import annotations

import os
import zlib

os.environ.setdefault("PYEDGE_MAX_MEMORY", "1G")   # a hostile shape must be refused, not OOM
os.environ.setdefault("PYEDGE_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import pyedge  # noqa: E402
from pyedge import ModelLoadError, PyedgeError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The documented failure types for an unusable model or input (ModelLoadError is a ValueError;
# FloatingPointError: a non-finite result the caller asked to check).
EXPECTED = (PyedgeError, ModelLoadError, ValueError, FloatingPointError)
MAX_TENSOR_BYTES = 64 << 20
MAX_INPUT_ELEMENTS = 1 << 16


def _input_array(v, rng):
    shape = [d if d >= 0 else 2 for d in v.shape]
    if any(d > 4096 for d in shape) or int(np.prod(shape, dtype=np.float64)) > MAX_INPUT_ELEMENTS:
        return None
    dt = np.dtype(v.dtype)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(dt)
    return rng.integers(0, 3, shape).astype(dt)   # small: valid indices for most Gathers


def run_model(data) -> None:
    """Raises only EXPECTED exceptions (or returns) for any input."""
    graph = pyedge.load_onnx(data if isinstance(data, onnx.ModelProto) else bytes(data),
                             max_tensor_bytes=MAX_TENSOR_BYTES)
    sess = pyedge.TrainingSession(graph, loss=None)
    seed = zlib.crc32(data.SerializeToString() if isinstance(data, onnx.ModelProto) else bytes(data))
    rng = np.random.default_rng(seed)
    feed = {}
    for v in sess.graph.inputs:
        a = _input_array(v, rng)
        if a is None:
            return  # declared input too large for a fuzz run: nothing to learn
        feed[v.name] = a
    sess.run(feed)


def checked(data) -> None:
    """run_model, swallowing the documented exceptions only."""
    try:
        run_model(data)
    except EXPECTED:
        pass


# --- seed models ---------------------------------------------------------------------------

def _f(name, shape, seed=0):
    return numpy_helper.from_array(
        np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _i(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "fuzz", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _vi(name, shape, et=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, et, shape)


def seed_models() -> dict[str, onnx.ModelProto]:
    """Small models covering the op families; plus the bundled demo model."""
    ms = {}
    ms["mlp"] = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["h2"]),
         helper.make_node("Relu", ["h2"], ["h3"]), helper.make_node("Gemm", ["h3", "w2", "b2"], ["z"], transB=1),
         helper.make_node("Softmax", ["z"], ["y"], axis=-1)],
        [_vi("x", ["n", 4])], [_vi("y", None)],
        [_f("w1", [4, 8]), _f("b1", [8], 1), _f("w2", [3, 8], 2), _f("b2", [3], 3)])
    ms["shapes"] = _model(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("ConstantOfShape", ["s"], ["c"], value=numpy_helper.from_array(np.array([1.5], np.float32))),
         helper.make_node("Add", ["x", "c"], ["a"]),
         helper.make_node("Reshape", ["a", "rs"], ["r"]),
         helper.make_node("Expand", ["r", "es"], ["e"]),
         helper.make_node("Transpose", ["e"], ["t"], perm=[1, 0, 2]),
         helper.make_node("ReduceSum", ["t", "ax"], ["y"], keepdims=0)],
        [_vi("x", [2, 6])], [_vi("y", None)],
        [_i("rs", [3, 1, 4]), _i("es", [3, 2, 4]), _i("ax", [2])])
    ms["conv"] = _model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1]),
         helper.make_node("BatchNormalization", ["c", "g", "bb", "m", "v"], ["n"]),
         helper.make_node("MaxPool", ["n"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("GlobalAveragePool", ["p"], ["q"]),
         helper.make_node("Flatten", ["q"], ["y"])],
        [_vi("x", [1, 2, 6, 6])], [_vi("y", None)],
        [_f("w", [3, 2, 3, 3]), _f("b", [3], 1), _f("g", [3], 2), _f("bb", [3], 3),
         _f("m", [3], 4), numpy_helper.from_array(np.ones(3, np.float32), "v")])
    ms["embed"] = _model(
        [helper.make_node("Gather", ["emb", "ids"], ["e"], axis=0),
         helper.make_node("LayerNormalization", ["e", "g", "b"], ["n"], axis=-1),
         helper.make_node("Slice", ["n", "st", "en", "axs"], ["s"]),
         helper.make_node("Concat", ["s", "s"], ["c"], axis=1),
         helper.make_node("Tanh", ["c"], ["y"])],
        [_vi("ids", [1, 5], TensorProto.INT64)], [_vi("y", None)],
        [_f("emb", [7, 4]), _f("g", [4], 1), _f("b", [4], 2), _i("st", [1]), _i("en", [4]),
         _i("axs", [1])])
    ms["attn"] = _model(
        [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
         helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
         helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Div", ["s", "d"], ["sd"]),
         helper.make_node("Where", ["mask", "sd", "ninf"], ["sm"]),
         helper.make_node("Softmax", ["sm"], ["p"], axis=-1),
         helper.make_node("MatMul", ["p", "x"], ["o"]),
         helper.make_node("Unsqueeze", ["o", "ua"], ["u"]), helper.make_node("Squeeze", ["u", "ua"], ["y"])],
        [_vi("x", [1, 3, 4])], [_vi("y", None)],
        [_f("wq", [4, 4]), _f("wk", [4, 4], 1),
         numpy_helper.from_array(np.array(2.0, np.float32), "d"),
         numpy_helper.from_array(np.tril(np.ones((3, 3), bool)), "mask"),
         numpy_helper.from_array(np.array(-1e9, np.float32), "ninf"), _i("ua", [0])])
    demo = os.path.join(ROOT, "pyedge", "demo_assets", "sensor_mlp.onnx")
    if os.path.exists(demo):
        ms["sensor_mlp"] = onnx.load(demo)
    return ms


def write_corpus(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, m in seed_models().items():
        with open(os.path.join(directory, f"seed_{name}.onnx"), "wb") as f:
            f.write(m.SerializeToString())
