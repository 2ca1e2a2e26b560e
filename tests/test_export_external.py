"""pyedge export: weights in the file (64-byte aligned, mapped in place on load) or, above a
threshold, in `<file>.data`; nothing else left in the folder, also when the export fails."""
import os

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from pyedge.export import torch_export  # noqa: E402
from pyedge.onnx_wire import map_model  # noqa: E402


def _mlp():
    from models.reference import mlp
    model, inputs, names, outs, dyn = mlp(sizes=(32, 64, 64, 10), batch=4)
    return model, inputs, dyn


def _train_two_steps(path):
    import pyedge
    s = pyedge.TrainingSession(str(path), lora=pyedge.LoraConfig(r=2, target_modules=["layers.0"]),
                               train=["layers.4.*"], loss="cross_entropy")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    y = rng.integers(0, 10, 4).astype(np.int64)
    return s, [s.step(x, y) for _ in range(2)]


def test_external_data_above_threshold(tmp_path):
    model, inputs, dyn = _mlp()
    out = tmp_path / "model.onnx"
    torch_export.export_module(model, inputs, out, dynamic_axes=dyn,
                               external_data_threshold=1000)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    header = onnx.load(str(out), load_external_data=False)
    ext = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {t.name for t in ext} >= {"layers.0.weight", "layers.2.weight", "layers.4.weight"}
    for t in ext:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "model.onnx.data" and int(info["offset"]) % 64 == 0
    s, losses = _train_two_steps(out)
    for name, entry in s.graph.param_map.items():  # the weights are the module's
        ref = dict(model.named_parameters())[f"{entry['module']}.{entry['param']}"]
        ref = ref.detach().numpy()
        np.testing.assert_array_equal(s.base_graph.initializers[name],
                                      ref.T if entry["transposed"] else ref)
    assert np.isfinite(losses).all() and losses[1] < losses[0]
    # the same weights as a single-file export
    single = tmp_path / "single" / "model.onnx"
    torch_export.export_module(model, inputs, single, dynamic_axes=dyn, external_data=False)
    s1, losses1 = _train_two_steps(single)
    assert losses1 == losses


def test_single_file_is_aligned_and_mapped(tmp_path):
    model, inputs, dyn = _mlp()
    out = tmp_path / "model.onnx"
    torch_export.export_module(model, inputs, out, dynamic_axes=dyn)
    assert os.listdir(tmp_path) == ["model.onnx"]  # default threshold: one file, no temp
    _, mapped = map_model(out)
    assert all(r[0] % 64 == 0 for r in mapped.ranges if r is not None)
    from pyedge.onnx_import import load_onnx
    g = load_onnx(out)
    w = g.initializers["layers.0.weight"]
    assert not w.flags.writeable and w.base is not None


def test_failed_export_leaves_nothing(tmp_path):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow on purpose
                raise RuntimeError("forward fails midway")
            return self.lin(x)

    with pytest.raises(Exception):
        torch_export.export_module(Broken(), torch.ones(2, 4), tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """The weights file is written, then the model file fails: both temporaries go."""
    from pyedge import onnx_wire
    model, inputs, dyn = _mlp()
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("model.onnx"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(onnx_wire.os, "replace", flaky_replace)
    with pytest.raises(OSError):
        torch_export.export_module(model, inputs, tmp_path / "model.onnx",
                                   external_data_threshold=1000)
    assert os.listdir(tmp_path) == [] and calls
    with pytest.raises(OSError):
        torch_export.export_module(model, inputs, tmp_path / "model.onnx", external_data=False)
    assert os.listdir(tmp_path) == []
