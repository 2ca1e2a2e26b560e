"""Whole reference models: pyedge's forward equals onnxruntime's (both exporters)."""
import numpy as np
import pytest

import pyedge

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

CASES = [(m, e) for m in ("mlp", "cnn", "gpt2", "minilm") for e in ("torchscript", "dynamo")]


def fresh_inputs(name, inputs, seed=5):
    """Inputs unlike the export example: another batch size, another sequence length."""
    from models.reference import unseen_inputs
    return unseen_inputs(name, inputs, np.random.default_rng(seed))


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
