"""Whole-model parity without torch: pyedge's forward equals onnxruntime's.

- Models exported elsewhere (scripts/arm64_export_models.py on an x86 host writes
  <name>.onnx + <name>.npz) in the folder named by PYEDGE_PARITY_MODELS; skipped when unset.
- A small attention block built with onnx.helper (MatMul, Add, LayerNormalization, Softmax,
  Gelu via Erf, Transpose, Reshape) that always runs where onnxruntime is installed.
"""
import glob
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyedge

pytestmark = pytest.mark.arm64
ort = pytest.importorskip("onnxruntime")

MODEL_DIR = os.environ.get("PYEDGE_PARITY_MODELS", "")
EXPORTED = sorted(glob.glob(os.path.join(MODEL_DIR, "*.onnx"))) if MODEL_DIR else []


def _compare(path, feed, tol=1e-4):
    ours = pyedge.TrainingSession(path, loss=None).run(feed)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)
    for (k, y), r in zip(ours.items(), ref):
        assert y.shape == r.shape, k
        scale = max(1.0, float(np.abs(r).max()))
        err = float(np.abs(y - r).max()) / scale
        assert err < tol, f"{os.path.basename(path)} output {k}: relative error {err:.2e}"


@pytest.mark.skipif(not EXPORTED, reason="PYEDGE_PARITY_MODELS not set or empty")
@pytest.mark.parametrize("path", EXPORTED, ids=[os.path.basename(p) for p in EXPORTED])
def test_exported_model_matches_onnxruntime(path):
    feed = dict(np.load(path[:-5] + ".npz"))
    _compare(path, feed)


def _attention_block(path, B=2, T=9, D=32, H=4, seed=0):
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("wq", D, D), init("wk", D, D), init("wv", D, D), init("wo", D, D),
             init("w1", D, 4 * D), init("w2", 4 * D, D), init("b1", 4 * D),
             init("ln_g", D, scale=1.0), init("ln_b", D),
             numpy_helper.from_array(np.array([B, T, H, D // H], np.int64), "heads"),
             numpy_helper.from_array(np.array([B, T, D], np.int64), "merged"),
             numpy_helper.from_array(np.array(1 / np.sqrt(D // H), np.float32), "scale"),
             numpy_helper.from_array(np.array(1 / np.sqrt(2), np.float32), "rsqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    N = helper.make_node
    nodes = [
        N("LayerNormalization", ["x", "ln_g", "ln_b"], ["h"], axis=-1),
        N("MatMul", ["h", "wq"], ["q0"]), N("MatMul", ["h", "wk"], ["k0"]),
        N("MatMul", ["h", "wv"], ["v0"]),
        N("Reshape", ["q0", "heads"], ["q1"]), N("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
        N("Reshape", ["k0", "heads"], ["k1"]), N("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]),
        N("Reshape", ["v0", "heads"], ["v1"]), N("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3]),
        N("MatMul", ["q", "kt"], ["s0"]), N("Mul", ["s0", "scale"], ["s"]),
        N("Softmax", ["s"], ["p"], axis=-1), N("MatMul", ["p", "v"], ["a0"]),
        N("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]), N("Reshape", ["a1", "merged"], ["a2"]),
        N("MatMul", ["a2", "wo"], ["a"]), N("Add", ["x", "a"], ["r1"]),
        N("MatMul", ["r1", "w1"], ["f0"]), N("Add", ["f0", "b1"], ["f1"]),
        N("Mul", ["f1", "rsqrt2"], ["f2"]), N("Erf", ["f2"], ["f3"]), N("Add", ["f3", "one"], ["f4"]),
        N("Mul", ["f1", "f4"], ["f5"]), N("Mul", ["f5", "half"], ["f6"]),
        N("MatMul", ["f6", "w2"], ["f7"]), N("Add", ["r1", "f7"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, T, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return {"x": rng.standard_normal((B, T, D)).astype(np.float32)}


def test_attention_block_matches_onnxruntime(tmp_path):
    path = str(tmp_path / "block.onnx")
    feed = _attention_block(path)
    _compare(path, feed)
