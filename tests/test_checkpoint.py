"""Atomic checkpoints (pyedge/checkpoint.py) and kill-and-resume determinism."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pyedge import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]


def has_loss():
    from pyedge import _core
    return "pyedge.CrossEntropyLoss" in _core.registered_ops()


requires_loss = pytest.mark.skipif(not has_loss(), reason="pyedge.CrossEntropyLoss not in this build")


def tensors(v):
    return {"m.lora_A.weight": np.full((2, 3), v, np.float32), "head.bias": np.arange(4, dtype=np.float32) + v}


def optim(v):
    return {k: {"exp_avg": a * 0 + v, "exp_avg_sq": a * 0 + 2 * v} for k, a in tensors(v).items()}


def save(root, step, v, keep=3):
    return ck.save_checkpoint(root, step, tensors(v), optim(v), {"note": "x", "data": {"epoch": 0}},
                              {"format": "pyedge-adapters"}, keep=keep)


def test_roundtrip(tmp_path):
    root = tmp_path / "checkpoints"
    p = save(root, 7, 1.5)
    assert p == root / "step-7" and (root / "latest").read_text().strip() == "step-7"
    c = ck.load_latest(root)
    assert c.step == 7 and c.state["note"] == "x" and c.adapter_meta["format"] == "pyedge-adapters"
    for k, a in tensors(1.5).items():
        np.testing.assert_array_equal(c.tensors[k], a)
        np.testing.assert_array_equal(c.optimizer_state[k]["exp_avg_sq"], optim(1.5)[k]["exp_avg_sq"])
    assert sorted(os.listdir(p)) == sorted([ck.ADAPTERS, ck.ADAPTERS_META, ck.OPTIMIZER, ck.STATE])
    assert not [f for f in os.listdir(root) if f.startswith(".")]


def test_keep_last_k(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (10, 20, 30, 40):
        save(root, s, s, keep=2)
    assert [s for s, _ in ck.list_checkpoints(root)] == [30, 40]
    assert ck.load_latest(root).step == 40
    save(root, 50, 50, keep=0)
    assert [s for s, _ in ck.list_checkpoints(root)] == [30, 40, 50]


def test_write_interrupted_midway_keeps_previous(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(root, 1, 1.0)

    def boom(name):
        if name == ck.OPTIMIZER:  # the adapters are written, the rest is not
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck, "_after_file_write", boom)
    with pytest.raises(OSError):
        save(root, 2, 2.0)
    monkeypatch.setattr(ck, "_after_file_write", None)
    assert ck.read_latest_pointer(root) == "step-1"
    assert not (root / "step-2").exists()
    assert not [f for f in os.listdir(root) if f.startswith(".tmp-")]  # temp dir removed
    c = ck.load_latest(root)
    assert c.step == 1
    np.testing.assert_array_equal(c.tensors["head.bias"], tensors(1.0)["head.bias"])


def test_killed_during_write_keeps_previous(tmp_path):
    """SIGKILL in the middle of writing step-2: latest still loads step-1."""
    root = tmp_path / "checkpoints"
    script = f"""
import os, signal, numpy as np
from pyedge import checkpoint as ck
root = {str(root)!r}
t = {{"a": np.ones(3, np.float32)}}
ck.save_checkpoint(root, 1, t, {{"a": {{"m": np.zeros(3, np.float32)}}}}, {{}}, {{}})
def die(name):
    if name == ck.OPTIMIZER:
        os.kill(os.getpid(), signal.SIGKILL)
ck._after_file_write = die
ck.save_checkpoint(root, 2, {{"a": np.full(3, 2, np.float32)}}, {{"a": {{"m": np.ones(3, np.float32)}}}}, {{}}, {{}})
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    assert any(f.startswith(".tmp-step-2") for f in os.listdir(root))  # half-written leftovers
    c = ck.load_latest(root)
    assert c.step == 1 and c.tensors["a"].tolist() == [1, 1, 1]
    ck.cleanup_temp(root)
    assert sorted(os.listdir(root)) == ["latest", "step-1"]


def test_corrupt_latest_falls_back(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 1, 1.0)
    save(root, 2, 2.0)
    (root / "latest").write_text("../../etc\n")            # garbage pointer: newest valid dir
    assert ck.load_latest(root).step == 2
    data = bytearray((root / "step-2" / ck.ADAPTERS).read_bytes())
    data[-1] ^= 0xFF
    (root / "step-2" / ck.ADAPTERS).write_bytes(bytes(data))  # bit rot: checksum catches it
    warnings = []
    assert ck.load_latest(root, warn=warnings.append).step == 1
    assert "checksum mismatch" in warnings[0]
    with pytest.raises(ck.CheckpointError, match="checksum"):
        ck.load_checkpoint(root / "step-2")


def test_nothing_is_unpickled():
    for name in ("checkpoint.py", "data.py", "train.py", "cli.py", "demo.py"):
        src = (ROOT / "pyedge" / name).read_text()
        assert "import pickle" not in src and "allow_pickle=True" not in src, name
        assert not re.search(r"torch\.load\(", src), name


# --------------------------------------------------------------------------- kill and resume
def _train_cmd(out, data, extra=()):
    from pyedge.demo import model_path
    return [sys.executable, "-m", "pyedge", "train", str(model_path()), "--data", str(data),
            "--out", str(out), "--target", "layers.0,layers.2", "--train", "layers.4.*",
            "--lora-r", "4", "--batch-size", "64", "--lr", "3e-3", "--max-steps", "1500",
            "--save-every", "100", "--keep-checkpoints", "2", "--deterministic", "--seed", "5",
            "--schedule", "cosine", "--warmup-steps", "50", "--grad-accum", "2",
            "--no-plot", *extra]


def _adapters(out):
    from safetensors.numpy import load_file
    return load_file(str(Path(out) / "adapters" / ck.ADAPTERS))


@requires_loss
def test_kill_and_resume_is_bit_identical(tmp_path):
    from pyedge.demo import make_sensor_data
    x, y = make_sensor_data(3000, seed=9, target=True)
    data = tmp_path / "train.npz"
    np.savez(data, x=x, labels=y)
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    straight = tmp_path / "straight"
    r = subprocess.run(_train_cmd(straight, data), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, data), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            name = latest.read_text().strip() if latest.exists() else ""
            if name and 200 <= int(name.split("-")[1]) < 1500:
                break
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not (killed / "adapters").exists()
    step = int(latest.read_text().strip().split("-")[1])
    assert 200 <= step < 1500

    r = subprocess.run(_train_cmd(killed, data, ["--resume"]), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resumed from" in r.stderr and "warning" not in r.stderr
    a, b = _adapters(straight), _adapters(killed)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    # The metrics log holds each step once, also across the kill.
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 1500


def test_kill_between_replace_dir_renames_restores_the_old_directory(tmp_path):
    """replace_dir renames the old directory away, then the new one in: a kill between the
    two leaves the name free; cleanup_temp puts the old (whole) directory back and drops the
    new one's temp copy, so the folder a user reads is never simply gone. A half-deleted
    .trash- directory (a prune killed mid-delete) is never put back."""
    root = tmp_path / "out"
    (root / "adapters").mkdir(parents=True)
    (root / "adapters" / "a.txt").write_text("old")
    new = root / ".tmp-adapters-1"
    new.mkdir()
    (new / "a.txt").write_text("new")
    os.rename(root / "adapters", root / ".old-adapters-4242")  # replace_dir's first rename
    ck.cleanup_temp(root)
    assert sorted(os.listdir(root)) == ["adapters"]
    assert (root / "adapters" / "a.txt").read_text() == "old"
    # and a complete replace_dir leaves only the new one
    new.mkdir()
    (new / "a.txt").write_text("new")
    ck.replace_dir(new, root / "adapters")
    ck.cleanup_temp(root)
    assert sorted(os.listdir(root)) == ["adapters"]
    assert (root / "adapters" / "a.txt").read_text() == "new"
    half = root / ".trash-step-3-77"  # prune's rename, then a kill inside rmtree
    half.mkdir()
    (half / "model.safetensors").write_text("x")
    ck.cleanup_temp(root)
    assert sorted(os.listdir(root)) == ["adapters"]
