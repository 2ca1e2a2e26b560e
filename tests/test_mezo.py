"""MeZO (pyedge/mezo.py): forward-only zeroth-order training.

Against a numpy reference of the same seeded algorithm (z regenerated from
default_rng([seed, step, tensor index])), on the demo task (accuracy), on the plans (no
backward, no gradient or optimizer-state buffers) and through the CLI (kill + resume)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyedge
from pyedge import demo
from pyedge.mezo import perturbed_count

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- a tiny model
def tiny_model(seed=0) -> onnx.ModelProto:
    """y = tanh(x @ W1 + b1) @ W2: [B, 5] -> [B, 3]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (5, 4)).astype(np.float32)
    b1 = rng.normal(0, 0.5, (4,)).astype(np.float32)
    w2 = rng.normal(0, 0.5, (4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Tanh", ["h1"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["y"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                        ["B", 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])],
                          [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b1, "b1"),
                           numpy_helper.from_array(w2, "W2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def ref_loss(p, x, t):
    """MSE of the tiny model in float64."""
    h = np.tanh(x.astype(np.float64) @ p["W1"] + p["b1"])
    return float(np.mean((h @ p["W2"] - t) ** 2))


def ref_mezo(params: dict, batches, seed, lr, eps, wd=0.0, sparsity=1.0, mask="random"):
    """The seeded MeZO algorithm written out independently (float32 parameters)."""
    p = {k: v.astype(np.float32).copy() for k, v in params.items()}
    names = list(p)
    eps32, lr32, wd32 = np.float32(eps), np.float32(lr), np.float32(wd)
    for step, (x, t) in enumerate(batches):
        idx = {}
        for i, n in enumerate(names):
            size = p[n].size
            k = size if sparsity >= 1 else max(1, int(round(sparsity * size)))
            idx[n] = (None if k == size else
                      np.argsort(np.abs(p[n].reshape(-1)), kind="stable")[:k]
                      if mask == "magnitude" else "random", k)

        def z_of(i, n):
            rng = np.random.default_rng([seed, step, i])
            ix, k = idx[n]
            if isinstance(ix, str):
                ix = np.sort(rng.permutation(p[n].size)[:k])
            return ix, rng.standard_normal(k, dtype=np.float32)

        def shift(s):
            for i, n in enumerate(names):
                ix, z = z_of(i, n)
                f = p[n].reshape(-1)
                if ix is None:
                    f += s * z
                else:
                    f[ix] += s * z
        shift(eps32)
        lp = ref_loss(p, x, t)
        shift(np.float32(-2.0) * eps32)
        lm = ref_loss(p, x, t)
        g = np.float32((lp - lm) / (2.0 * eps))
        for i, n in enumerate(names):
            ix, z = z_of(i, n)
            f = p[n].reshape(-1)
            sel = slice(None) if ix is None else ix
            f[sel] += eps32 * z
            f[sel] -= lr32 * (g * z + wd32 * f[sel]) if wd else lr32 * (g * z)
    return p


def tiny_session(opt, seed=7):
    return pyedge.TrainingSession(tiny_model(), train=["W1", "b1", "W2"], loss="mse",
                                  optimizer=opt, seed=seed, threads=1)


def tiny_batches(n=4):
    rng = np.random.default_rng(3)
    return [(rng.normal(size=(6, 5)).astype(np.float32),
             rng.normal(size=(6, 3)).astype(np.float32)) for _ in range(n)]


@pytest.mark.parametrize("kw", [dict(), dict(wd=0.1), dict(sparsity=0.5),
                                dict(sparsity=0.3, mask="magnitude", wd=0.05)])
def test_update_matches_numpy_reference(kw):
    opt = pyedge.MeZO(lr=0.05, eps=1e-2, weight_decay=kw.get("wd", 0.0),
                      sparsity=kw.get("sparsity", 1.0), mask=kw.get("mask", "random"))
    s = tiny_session(opt)
    start = {k: v.copy() for k, v in s.trainable_parameters().items()}
    batches = tiny_batches()
    for x, t in batches:
        s.step({"x": x}, t)
    assert s.step_count == len(batches)
    want = ref_mezo(start, batches, 7, 0.05, 1e-2, **kw)
    moved = 0.0
    for n, v in s.trainable_parameters().items():
        np.testing.assert_allclose(v, want[n], rtol=0, atol=1e-6, err_msg=n)
        moved = max(moved, float(np.abs(v - start[n]).max()))
    assert moved > 1e-3  # the steps did something


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failing_loss_leaves_the_parameters_unperturbed(monkeypatch, fail_at):
    """A batch the core refuses (or an interrupt) during one of the two losses must not leave
    theta at theta ± eps·z (eps 0.5: a leftover perturbation would be plain to see)."""
    s = tiny_session(pyedge.MeZO(lr=0.05, eps=0.5))
    start = {k: v.copy() for k, v in s.trainable_parameters().items()}
    real, calls = s._forward_loss, []

    def flaky(arrays):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("the core refused the batch")
        return real(arrays)

    monkeypatch.setattr(s, "_forward_loss", flaky)
    x, t = tiny_batches(1)[0]
    with pytest.raises(RuntimeError, match="refused"):
        s.step({"x": x}, t)
    assert s.step_count == 0
    for n, v in s.trainable_parameters().items():
        np.testing.assert_allclose(v, start[n], rtol=0, atol=1e-6, err_msg=n)


def test_sparse_perturbs_exactly_the_fraction():
    opt = pyedge.MeZO(lr=0.0, eps=1e-2, sparsity=0.25)  # lr 0: only the perturbation moves
    s = tiny_session(opt)
    seen = []
    orig = s._forward_loss

    def spy(arrays):
        seen.append({k: v.copy() for k, v in s.trainable_parameters().items()})
        return orig(arrays)
    s._forward_loss = spy
    start = {k: v.copy() for k, v in s.trainable_parameters().items()}
    x, t = tiny_batches(1)[0]
    s.step({"x": x}, t)
    plus = seen[0]
    for n, v in start.items():
        changed = int(np.count_nonzero(plus[n] != v))
        assert changed == perturbed_count(v.size, 0.25) == max(1, round(0.25 * v.size)), n
        # L- sees the same entries moved the other way
        assert np.array_equal(seen[1][n] != v, plus[n] != v), n
    # magnitude: the smallest |w| entries
    s2 = tiny_session(pyedge.MeZO(lr=0.0, eps=1e-2, sparsity=0.5, mask="magnitude"))
    w = s2.trainable_parameters()["W1"].copy()
    seen.clear()
    orig2 = s2._forward_loss
    s2._forward_loss = lambda a: (seen.append(s2.trainable_parameters()["W1"].copy()),
                                  orig2(a))[1]
    s2.step({"x": x}, t)
    moved = np.flatnonzero(seen[0].reshape(-1) != w.reshape(-1))
    want = np.sort(np.argsort(np.abs(w.reshape(-1)), kind="stable")[:10])
    assert np.array_equal(moved, want)


def test_deterministic_given_the_seed():
    def run(seed):
        s = tiny_session(pyedge.MeZO(lr=0.05, eps=1e-2), seed=seed)
        for x, t in tiny_batches():
            s.step({"x": x}, t)
        return {k: v.copy() for k, v in s.trainable_parameters().items()}
    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_forward_only_session_has_no_gradients_or_state_and_refuses_backward():
    s = tiny_session(pyedge.MeZO())
    assert s._sess.forward_only
    assert s.gradients() == {}
    assert all(d == {} for d in s.optimizer_state().values())
    x, t = tiny_batches(1)[0]
    with pytest.raises(pyedge.PyedgeError, match="forward-only"):
        s._sess.train_step(s._input_list({"x": x}, t), True, 0.0, 1.0)
    with pytest.raises(ValueError, match="accumulate"):
        s.step({"x": x}, t, update=False)
    for bad in (dict(eps=0.0), dict(sparsity=0.0), dict(sparsity=1.5), dict(mask="top"),
                dict(lr=-1.0)):
        with pytest.raises(ValueError):
            pyedge.MeZO(**bad)


def test_nonfinite_loss_restores_parameters():
    s = tiny_session(pyedge.MeZO(lr=0.05, eps=1e-2))
    start = {k: v.copy() for k, v in s.trainable_parameters().items()}
    x, t = tiny_batches(1)[0]
    t = t.copy()
    t[0, 0] = np.inf
    with pytest.raises(FloatingPointError, match="restored"):
        s.step({"x": x}, t)
    for k, v in s.trainable_parameters().items():
        np.testing.assert_allclose(v, start[k], rtol=0, atol=1e-6)
    assert s.step_count == 0


# --------------------------------------------------------------------------- demo task
def demo_session(opt, seed=0):
    return pyedge.TrainingSession(
        str(demo.model_path()), lora=pyedge.LoraConfig(r=4, alpha=8,
                                                       target_modules=demo.TARGETS),
        train=[f"{demo.HEAD}.*"], optimizer=opt, seed=seed, threads=1)


def test_demo_accuracy_rises_by_20_points():
    xt, yt = demo.make_sensor_data(2000, 1000, target=True)
    xv, yv = demo.make_sensor_data(1000, 2000, target=True)
    s = demo_session(pyedge.MeZO(lr=2e-3, eps=1e-3))

    def acc():
        return float((s.run({"x": xv})[s.output_name].argmax(1) == yv).mean())
    before = acc()
    rng = np.random.default_rng(0)
    for _ in range(300):
        i = rng.integers(0, len(xt), 64)
        s.step({"x": xt[i]}, yt[i])
    after = acc()
    print(f"\ndemo accuracy with MeZO, 300 steps: {before:.3f} -> {after:.3f}")
    assert after - before >= 0.20, (before, after)


def test_planned_memory_is_the_inference_plan():
    x, _ = demo.make_sensor_data(64, 1, target=True)
    m = demo_session(pyedge.MeZO())
    a = demo_session(pyedge.AdamW())
    mt, mi = m.plan_stats({"x": x}, training=True), m.plan_stats({"x": x}, training=False)
    at = a.plan_stats({"x": x}, training=True)
    params = sum(v.nbytes for v in m.trainable_parameters().values())
    # the forward plan to the loss: the inference arena (+ the loss's few bytes, here 0)
    assert mt["arena_bytes"] <= mi["arena_bytes"] + 64 * 8 + 64
    assert mt["planned_peak_bytes"] <= mi["planned_peak_bytes"] + 64 * 8 + 64
    assert mt["recompute_ops"] == 0
    # no gradient or optimizer-state buffers: the parameters once, beside what was resident
    assert mt["fixed_bytes"] == m._resident_bytes + params
    assert at["fixed_bytes"] == a._resident_bytes + 4 * params  # AdamW: value, grad, 2 moments
    assert mt["parameter_gradient_bytes"] == mt["optimizer_state_bytes"] == 0
    assert at["arena_bytes"] > mt["arena_bytes"]  # the backward's activations


# --------------------------------------------------------------------------- CLI + resume
def _cli(*args, env_extra=None, code=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYEDGE_DEBUG", None)
    cmd = [sys.executable, "-m", "pyedge", *map(str, args)] if code is None else \
        [sys.executable, "-c", code, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# the CLI, SIGKILLed right after its first checkpoint is on disk
KILL_AFTER_FIRST_SAVE = """
import os, signal, sys
import pyedge.checkpoint as ck
orig = ck.save_checkpoint
def save(*a, **k):
    r = orig(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
ck.save_checkpoint = save
from pyedge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_mezo_trains_and_resumes_bit_identically(tmp_path):
    from pyedge.checkpoint import read_adapters_dir
    xt, yt = demo.make_sensor_data(512, 1000, target=True)
    np.savez(tmp_path / "train.npz", x=xt, labels=yt)
    common = ["train", demo.model_path(), "--data", tmp_path / "train.npz", "--target",
              ",".join(demo.TARGETS), "--train", f"{demo.HEAD}.*", "--lora-r", "4",
              "--optimizer", "mezo", "--lr", "2e-3", "--mezo-eps", "1e-3",
              "--mezo-sparsity", "0.5", "--max-steps", "20", "--save-every", "10",
              "--batch-size", "32", "--schedule", "cosine", "--deterministic", "-q"]
    full = _cli(*common, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    killed = _cli(*common, "--out", tmp_path / "cut", code=KILL_AFTER_FIRST_SAVE)
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    assert (tmp_path / "cut" / "checkpoints" / "step-10").is_dir()
    assert not (tmp_path / "cut" / "adapters").exists()
    resumed = _cli(*common, "--out", tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, _ = read_adapters_dir(tmp_path / "full" / "adapters")
    b, _ = read_adapters_dir(tmp_path / "cut" / "adapters")
    start = demo_session(pyedge.MeZO()).trainable_parameters()
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert any(not np.array_equal(a[k], start[k]) for k in a if k in start)


def test_other_adapter_methods_and_dropout():
    # DoRA (adapters/dora.py): its magnitude vector is one more trainable tensor to perturb
    xt, yt = demo.make_sensor_data(1000, 1000, target=True)
    s = pyedge.TrainingSession(
        str(demo.model_path()), adapter=pyedge.LoraConfig(r=4, alpha=8, use_dora=True,
                                                          target_modules=demo.TARGETS),
        train=[f"{demo.HEAD}.*"], optimizer=pyedge.MeZO(lr=2e-3, eps=1e-3), threads=1)
    start = {k: v.copy() for k, v in s.trainable_parameters().items()}
    assert any("magnitude" in k for k in start)
    first = s.run({"x": xt[:256]}, [s.output_name])[s.output_name]
    rng = np.random.default_rng(0)
    for _ in range(150):
        i = rng.integers(0, len(xt), 64)
        s.step({"x": xt[i]}, yt[i])
    after = s.run({"x": xt[:256]}, [s.output_name])[s.output_name]
    acc0 = float((first.argmax(1) == yt[:256]).mean())
    acc1 = float((after.argmax(1) == yt[:256]).mean())
    assert acc1 > acc0 + 0.2, (acc0, acc1)
    assert all(not np.array_equal(v, start[k]) for k, v in s.trainable_parameters().items())
    with pytest.raises(ValueError, match="dropout"):
        pyedge.TrainingSession(str(demo.model_path()),
                               lora=pyedge.LoraConfig(r=4, dropout=0.1,
                                                      target_modules=demo.TARGETS),
                               optimizer=pyedge.MeZO())
