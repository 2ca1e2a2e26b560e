"""pyedge train --method ia3 / ln_tuning on the demo model, then eval and merge of the run's
adapters (the CLI side of pyedge/adapters/ia3.py and ln_tuning.py)."""
import json

import numpy as np
import pytest

from cli_inproc import run_cli as run   # in this process: no interpreter start-up per call


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from pyedge.demo import make_sensor_data, model_path
    d = tmp_path_factory.mktemp("methods_cli")
    x, y = make_sensor_data(200, seed=1, target=True)
    np.savez(d / "train.npz", x=x, labels=y)
    return str(model_path()), d


def test_train_ia3_eval_merge(demo, tmp_path):
    model, d = demo
    out = tmp_path / "run"
    r = run("train", model, "--data", d / "train.npz", "--method", "ia3", "--target",
            "layers.0,layers.2", "--feedforward-modules", "layers.2", "--max-steps", "30",
            "--lr", "0.05", "--out", out)
    assert r.returncode == 0, r.stderr
    peft_dir = next(p.parent for p in out.rglob("adapter_config.json"))
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["layers.2"]
    r = run("eval", model, "--adapters", out / "adapters", "--data", d / "train.npz", "--json")
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    base = json.loads(run("eval", model, "--data", d / "train.npz", "--json").stdout)
    assert ours["loss"] < base["loss"]
    merged = tmp_path / "merged.onnx"
    r = run("merge", model, "--adapters", peft_dir, "-o", merged)
    assert r.returncode == 0, r.stderr
    r = run("eval", merged, "--data", d / "train.npz", "--json")
    assert r.returncode == 0, r.stderr
    assert abs(json.loads(r.stdout)["loss"] - ours["loss"]) <= 1e-4 * abs(ours["loss"])


@pytest.mark.parametrize("method", ["ln_tuning", "hra", "miss", "vera"])
def test_train_other_methods(demo, tmp_path, method):
    """LN tuning has no norm in the demo MLP, so it tunes a Linear's tensors (PEFT allows any
    module); HRA reflects layers.2's input; MiSS adds a block; VeRA
    scales shared random projections. The run's PEFT folder names the method."""
    model, d = demo
    out = tmp_path / "run"
    r = run("train", model, "--data", d / "train.npz", "--method", method, "--target",
            "layers.2", "--lora-r", "2", "--max-steps", "10", "--out", out)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(next(out.rglob("adapter_config.json")).read_text())
    assert cfg["peft_type"] == method.upper()
    r = run("eval", model, "--adapters", out / "adapters", "--data", d / "train.npz", "--json")
    assert r.returncode == 0, r.stderr


def test_unknown_method_is_a_usage_error(demo):
    model, d = demo
    r = run("train", model, "--data", d / "train.npz", "--method", "boft", "--target", "layers.0")
    assert r.returncode == 2 and "--method" in r.stderr
