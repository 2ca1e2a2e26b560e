"""`pyedge demo`: fine-tune a bundled sensor classifier on a shifted task, end to end.

The bundled model (pyedge/demo_assets/sensor_mlp.onnx, built by models/demo/build_demo.py)
is a small MLP that classifies 8-channel sensor readings into 4 activities, "pretrained" on a
synthetic source task. The demo's target task is the same activities after a sensor
recalibration (channels swapped and rotated, gains and offsets changed): the pretrained model
gets about a third right. pyedge fine-tunes LoRA adapters on the two hidden layers plus the
head, on the CPU, without PyTorch; then (when torch and peft are installed) the adapters are
loaded back into the PyTorch model and its outputs compared with pyedge's.

Everything here is numpy + pyedge; torch is imported only inside the optional check.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

N_FEATURES = 8
CLASSES = ("idle", "walk", "run", "fall")
HIDDEN = 64
MODEL_NAME = "sensor_mlp"
TARGETS = ["layers.0", "layers.2"]
HEAD = "layers.4"


# --------------------------------------------------------------------------- the task
def _centers() -> np.ndarray:
    rng = np.random.default_rng(20241124)
    return rng.normal(0.0, 1.0, (len(CLASSES), N_FEATURES)) * 1.4


def _drift():
    """The recalibration between the source and the target task."""
    gain = np.array([1.8, 0.5, 1.0, 1.0, 1.6, 1.0, 0.6, 1.0])
    mix = np.eye(N_FEATURES)
    mix[2:4, 2:4] = [[0.0, -1.0], [1.0, 0.0]]  # channels 2 and 3 rotated by 90 degrees
    mix[[5, 7]] = mix[[7, 5]]                   # channels 5 and 7 swapped
    mix[[0, 6]] = mix[[6, 0]]                   # channels 0 and 6 swapped
    offset = np.array([1.5, -0.5, -1.5, 0.5, 0.0, 1.2, -1.0, 0.0])
    return gain, mix, offset


def make_sensor_data(n: int, seed: int, target: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [n, 8], labels int64 [n]) of the source task, or of the shifted target task."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    x = _centers()[y] + rng.normal(0.0, 1.0, (n, N_FEATURES))
    x[:, :4] += 0.8 * np.tanh(x[:, 4:] * x[:, :4])
    if target:
        gain, mix, offset = _drift()
        x = (x @ mix.T) * gain + offset
    return x.astype(np.float32), y.astype(np.int64)


def torch_model():
    """The PyTorch definition of the bundled model (parameter names layers.0/2/4)."""
    from torch import nn

    class SensorMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(N_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                nn.Linear(HIDDEN, len(CLASSES)))

        def forward(self, x):
            return self.layers(x)

    return SensorMLP()


# --------------------------------------------------------------------------- assets
def asset_dir() -> Path:
    return Path(__file__).resolve().parent / "demo_assets"


def model_path() -> Path:
    p = asset_dir() / f"{MODEL_NAME}.onnx"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: the bundled demo model is missing (rebuild it with "
                                "python models/demo/build_demo.py)")
    return p


def load_torch_model():
    """The pretrained PyTorch model from the bundled safetensors weights."""
    import torch
    from safetensors.numpy import load_file
    m = torch_model()
    state = {k: torch.from_numpy(v.copy()) for k, v in
             load_file(str(asset_dir() / f"{MODEL_NAME}.safetensors")).items()}
    m.load_state_dict(state)
    return m.eval()


# --------------------------------------------------------------------------- the demo
def _secs(t: float) -> str:
    """Seconds for the report: fast runs keep two significant digits instead of "0.0 s"."""
    return f"{t:.1f} s" if t >= 1 else f"{t:.2g} s"


def _say(msg: str = "") -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _prepare_out(out: Path) -> None:
    """The demo may rerun in its own folder; it never deletes anything it did not write."""
    marker = out / "demo.json"
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            if (out / "checkpoints").exists() or (out / "adapters").exists():
                raise FileExistsError(f"{out} holds another run; choose an empty --out")
        for name in ("checkpoints", "adapters", "data"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("metrics.jsonl", "metrics.png", "config.json", "demo.json"):
            try:
                (out / name).unlink()
            except FileNotFoundError:
                pass
    out.mkdir(parents=True, exist_ok=True)


def run_demo(out="pyedge-demo", steps: int = 300, seed: int = 0, threads: int | None = 1,
             torch_check: bool = True, n_train: int = 2000, n_val: int = 1000) -> dict:
    """Runs the demo; returns a summary dict (also written to <out>/demo.json)."""
    import pyedge
    from pyedge.evaluation import evaluate, load_data
    from pyedge.train import TrainConfig, train

    t0 = time.perf_counter()
    out = Path(out)
    _prepare_out(out)
    onnx_path = model_path()
    _say(f"pyedge demo: fine-tune a sensor-activity classifier ({', '.join(CLASSES)}) after a "
         "sensor recalibration")
    _say(f"  model: {onnx_path.name} ({onnx_path.stat().st_size / 1024:.0f} KB), pretrained on "
         "the original sensors")

    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    xt, yt = make_sensor_data(n_train, seed=1000 + seed, target=True)
    xv, yv = make_sensor_data(n_val, seed=2000 + seed, target=True)
    np.savez(data_dir / "train.npz", x=xt, labels=yt)
    np.savez(data_dir / "val.npz", x=xv, labels=yv)
    _say(f"  data: {n_train} training / {n_val} validation records of the recalibrated sensors "
         f"in {data_dir}")

    base = pyedge.TrainingSession(str(onnx_path), loss=None, threads=threads)
    val = load_data(base, data_dir / "val.npz", loss="cross_entropy")
    before = evaluate(base, val, 256, "cross_entropy")
    _say(f"accuracy before fine-tuning: {before['accuracy']:.1%}")

    cfg = TrainConfig(model=str(onnx_path), data=str(data_dir / "train.npz"),
                      eval_data=str(data_dir / "val.npz"), out=str(out), lora_r=4,
                      lora_alpha=8.0, target=list(TARGETS), train=[f"{HEAD}.*"],
                      loss="cross_entropy", max_steps=steps, batch_size=32, lr=1e-2,
                      schedule="cosine", warmup_steps=min(20, steps // 10), seed=seed,
                      threads=threads, deterministic=True, save_every=max(steps // 3, 1),
                      eval_every=0, log_every=max(steps // 10, 1), plot=False)
    _say(f"fine-tuning LoRA (r={cfg.lora_r}) on {', '.join(TARGETS)} + the {HEAD} head for "
         f"{steps} steps ...")
    res = train(cfg)
    after = res.eval
    _say(f"accuracy after fine-tuning:  {after['accuracy']:.1%}  (loss {before['loss']:.3f} -> "
         f"{after['loss']:.3f}, {_secs(res.seconds)})")
    fmt = ("PEFT format: adapter_config.json + adapter_model.safetensors, and pyedge_adapters.*"
           if res.peft else "pyedge format: pyedge_adapters.*")
    _say(f"adapters: {res.adapters} ({fmt})")

    summary = {"accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
               "loss_before": before["loss"], "loss_after": after["loss"], "steps": res.steps,
               "adapters": str(res.adapters), "peft": res.peft, "torch_max_abs_diff": None,
               "torch_check": "skipped"}
    if torch_check:
        summary.update(_torch_check(onnx_path, res.adapters, xv, threads, res.peft))
    summary["seconds"] = time.perf_counter() - t0
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    _say(f"done in {_secs(summary['seconds'])}; summary in {out / 'demo.json'}")
    return summary


def _torch_check(onnx_path, adapters, x, threads, peft_written) -> dict:
    try:
        import torch
    except ImportError:
        _say("PyTorch check skipped: torch is not installed")
        return {"torch_check": "torch not installed"}
    from pyedge.train import session_from_adapters
    sess, _ = session_from_adapters(str(onnx_path), str(adapters), threads=threads)
    ours = sess.run({"x": x})[sess.output_name]
    model = load_torch_model()
    how = ""
    if peft_written:
        try:
            from peft import PeftModel
        except ImportError:
            peft_written = False
        else:
            model = PeftModel.from_pretrained(model, str(adapters)).eval()
            how = "PeftModel.from_pretrained"
    if not peft_written:  # fold the raw pyedge adapters in by hand: W += s * B @ A
        from pyedge.checkpoint import read_adapters_dir
        tensors, meta = read_adapters_dir(adapters)
        lora = meta["lora"]
        scale = lora["alpha"] / (lora["r"] ** 0.5 if lora.get("use_rslora") else lora["r"])
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        for mod in lora["target_modules"]:
            a = torch.from_numpy(tensors[f"{mod}.lora_A.weight"].copy())
            b = torch.from_numpy(tensors[f"{mod}.lora_B.weight"].copy())
            sd[f"{mod}.weight"] += scale * (b @ a)
        for k in (f"{HEAD}.weight", f"{HEAD}.bias"):
            sd[k] = torch.from_numpy(tensors[k].copy())
        model.load_state_dict(sd)
        how = "merged by hand (PEFT writer not available in this build)"
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(ref - ours).max())
    agree = float(np.mean(ref.argmax(1) == ours.argmax(1)))
    _say(f"PyTorch check ({how}): max |torch - pyedge| = {diff:.2e} over {len(x)} records, "
         f"predictions agree on {agree:.1%}")
    return {"torch_max_abs_diff": diff, "torch_check": how, "torch_agreement": agree}
