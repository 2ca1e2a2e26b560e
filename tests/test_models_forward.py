"""Whole reference models: pyedge's forward equals onnxruntime's (both exporters)."""
import numpy as np
import pytest

import pyedge

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

CASES = [(m, e) for m in ("mlp", "cnn", "gpt2", "minilm") for e in ("torchscript", "dynamo")]


def fresh_inputs(name, inputs, seed=5):
    """Inputs unlike the export example: another batch size, another sequence length."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in inputs.items():
        v = v.numpy()
        shape = list(v.shape)
        shape[0] += 1
        if name in ("gpt2", "minilm"):
            shape[1] = max(4, shape[1] - 3)
        if k == "input_ids":
            out[k] = rng.integers(0, 200, size=shape).astype(v.dtype)
        elif k == "attention_mask":
            m = np.ones(shape, v.dtype)
            m[0, shape[1] // 2:] = 0  # padding in the first row
            out[k] = m
        else:
            out[k] = rng.standard_normal(shape).astype(v.dtype)
    return out


@pytest.mark.parametrize("name,exporter", CASES)
def test_forward_matches_onnxruntime(exported, name, exporter):
    path, _, inputs = exported(name, exporter)
    feed = fresh_inputs(name, inputs)
    sess = pyedge.TrainingSession(path, loss=None)
    ours = sess.run(feed)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)
    for (k, y), r in zip(ours.items(), ref):
        assert y.shape == r.shape, k
        scale = max(1.0, float(np.abs(r).max()))
        err = float(np.abs(y - r).max()) / scale
        assert err < 1e-4, f"{name}/{exporter} output {k}: relative error {err:.2e}"
