"""`pyedge demo`: end to end on the bundled model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def has_loss():
    from pyedge import _core
    return "pyedge.CrossEntropyLoss" in _core.registered_ops()


def test_bundled_model_matches_torch_weights():
    """The committed ONNX file and safetensors are the same model (and small)."""
    import pyedge
    from pyedge import demo
    path = demo.model_path()
    assert path.stat().st_size < 300_000
    s = pyedge.TrainingSession(str(path), loss=None)
    x, _ = demo.make_sensor_data(16, seed=3)
    ours = s.run({"x": x})["logits"]
    from safetensors.numpy import load_file
    w = load_file(str(demo.asset_dir() / "sensor_mlp.safetensors"))
    h = x
    for i in (0, 2, 4):
        h = h @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
        if i < 4:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(ours, h, rtol=1e-4, atol=1e-4)


def test_demo_data_is_seeded_and_shifted():
    from pyedge.demo import make_sensor_data
    a = make_sensor_data(50, seed=1, target=True)
    b = make_sensor_data(50, seed=1, target=True)
    c = make_sensor_data(50, seed=1, target=False)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert np.array_equal(a[1], c[1]) and not np.allclose(a[0], c[0])


@pytest.mark.skipif(not has_loss(), reason="pyedge.CrossEntropyLoss not in this build")
def test_demo_cli(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "pyedge", "demo", "--out", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "accuracy before fine-tuning" in r.stdout and "accuracy after fine-tuning" in r.stdout
    summary = json.loads((out / "demo.json").read_text())
    assert summary["accuracy_before"] < 0.6 and summary["accuracy_after"] > 0.9
    assert summary["seconds"] < 60
    assert (out / "adapters" / "pyedge_adapters.safetensors").is_file()
    if summary["peft"]:
        assert (out / "adapters" / "adapter_config.json").is_file()
        assert (out / "adapters" / "adapter_model.safetensors").is_file()
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        assert summary["torch_max_abs_diff"] is not None and summary["torch_max_abs_diff"] < 1e-3
    # rerunning into the same folder works (the demo replaces its own results) and is deterministic
    r2 = subprocess.run([sys.executable, "-m", "pyedge", "demo", "--out", str(out),
                         "--no-torch-check"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
    assert r2.returncode == 0, r2.stderr
    again = json.loads((out / "demo.json").read_text())
    assert again["accuracy_after"] == summary["accuracy_after"]
    assert again["loss_after"] == summary["loss_after"]
