"""Crash safety: SIGKILL at random points of `pyedge train --save-every 1` (also mid-save)
never leaves an unloadable latest checkpoint, and `--resume` always completes; a full disk
during a save keeps the previous checkpoint and raises a clear OSError."""
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pyedge import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
RUNS = int(os.environ.get("PYEDGE_KILL_RUNS", "20"))


def _cmd(out, data, extra=()):
    from pyedge.demo import model_path
    return [sys.executable, "-m", "pyedge", "train", str(model_path()), "--data", str(data),
            "--out", str(out), "--target", "layers.0", "--lora-r", "2", "--batch-size", "16",
            "--max-steps", "40", "--save-every", "1", "--keep-checkpoints", "2", "--seed", "3",
            "--no-plot", *extra]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path):
    from pyedge.demo import make_sensor_data
    x, y = make_sensor_data(320, seed=4, target=True)
    data = tmp_path / "train.npz"
    np.savez(data, x=x, labels=y)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYEDGE_NUM_THREADS="1")
    rng = random.Random(1234)
    killed_with_checkpoint = 0
    for run in range(RUNS):
        out = tmp_path / f"run{run}"
        proc = subprocess.Popen(_cmd(out, data), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        latest = out / "checkpoints" / "latest"
        # Wait for training to start (first checkpoint), then kill after a random delay.
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not latest.exists():
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.4))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        root = out / "checkpoints"
        if root.exists() and ck.has_checkpoints(root):
            c = ck.load_latest(root)
            assert c is not None and c.step >= 1, f"run {run}: latest checkpoint does not load"
            killed_with_checkpoint += 1
        r = subprocess.run(_cmd(out, data, ["--resume"]), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"run {run}: resume failed\n{r.stderr[-2000:]}"
        assert (out / "adapters" / ck.ADAPTERS).exists()
        assert ck.load_latest(out / "checkpoints").step == 40
    assert killed_with_checkpoint >= RUNS // 2


@pytest.mark.parametrize("where", ["fsync", "write", "safetensors"])
def test_disk_full_during_save_keeps_previous(tmp_path, monkeypatch, where):
    root = tmp_path / "checkpoints"
    t1 = {"a": np.ones(3, np.float32)}
    ck.save_checkpoint(root, 1, t1, {"a": {"m": np.zeros(3, np.float32)}}, {}, {})

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    if where == "fsync":
        monkeypatch.setattr(os, "fsync", enospc)
    elif where == "write":
        real_write = ck.write_file_synced

        def partial(path, data):  # half the bytes land, then the disk is full
            Path(path).write_bytes(data[: len(data) // 2])
            enospc()
        monkeypatch.setattr(ck, "write_file_synced", partial)
    else:
        monkeypatch.setattr(ck, "tensors_to_bytes", enospc)
    with pytest.raises(OSError) as e:
        ck.save_checkpoint(root, 2, {"a": np.full(3, 2, np.float32)},
                           {"a": {"m": np.ones(3, np.float32)}}, {}, {})
    assert e.value.errno == errno.ENOSPC and "No space left" in str(e.value)
    monkeypatch.undo()
    assert ck.read_latest_pointer(root) == "step-1"
    assert not (root / "step-2").exists()
    c = ck.load_latest(root)
    assert c.step == 1 and c.tensors["a"].tolist() == [1, 1, 1]
