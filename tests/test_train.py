"""Training loop (pyedge/train.py), schedules (pyedge/schedules.py) and progress output."""
import io
import json
import math

import numpy as np
import pytest

from pyedge.schedules import Schedule, lr_lambda
from pyedge.evaluation import loss_sums
from pyedge.train import ConfigError, TrainConfig, TrainingError, train


def has_loss():
    from pyedge import _core
    return "pyedge.CrossEntropyLoss" in _core.registered_ops()


requires_loss = pytest.mark.skipif(not has_loss(), reason="pyedge.CrossEntropyLoss not in this build")


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 10), (5, 37)])
def test_schedules_match_transformers(kind, warmup, total):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    make = {"constant": lambda: tf.get_constant_schedule_with_warmup(opt, warmup),
            "linear": lambda: tf.get_linear_schedule_with_warmup(opt, warmup, total),
            "cosine": lambda: tf.get_cosine_schedule_with_warmup(opt, warmup, total)}[kind]
    sched = make()
    ours = Schedule(kind, 0.5, warmup, total)
    for step in range(total + 3):
        assert ours.lr_at(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("exp", 1e-3)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_lambda("exp", 5, 0, 10)


# --------------------------------------------------------------------------- eval losses
def test_loss_sums_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = np.array([0, 4, -100, 2, 2, 1])
    s, n, c = loss_sums(logits, labels, "cross_entropy", -100, 0.1)
    ref = F.cross_entropy(torch.tensor(logits), torch.tensor(labels), label_smoothing=0.1)
    assert s / n == pytest.approx(float(ref), rel=1e-5) and n == 5
    assert c == int((logits.argmax(1) == labels)[labels != -100].sum())
    lm = rng.normal(size=(2, 4, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 4))
    s, n, _ = loss_sums(lm, ids, "causal_lm")
    ref = F.cross_entropy(torch.tensor(lm[:, :-1]).reshape(-1, 7), torch.tensor(ids[:, 1:]).reshape(-1))
    assert s / n == pytest.approx(float(ref), rel=1e-5) and n == 6
    y = rng.normal(size=(3, 2)).astype(np.float32)
    s, n, c = loss_sums(logits[:3, :2], y, "mse")
    assert s / n == pytest.approx(float(F.mse_loss(torch.tensor(logits[:3, :2]), torch.tensor(y))), rel=1e-5)
    assert c is None


# --------------------------------------------------------------------------- progress
def test_progress_plain_lines_and_tty_redraw():
    from pyedge.progress import Progress, format_duration
    buf = io.StringIO()
    p = Progress(25, stream=buf, every=10, tty=False)
    for s in range(1, 26):
        p.update(s, loss=1.0 / s, lr=1e-3)
    p.close()
    lines = buf.getvalue().splitlines()
    assert [l.split()[1] for l in lines] == ["10/25", "20/25", "25/25"]
    assert "loss 0.0400" in lines[-1] and "steps/s" in lines[-1] and "ETA" in lines[-1]
    buf = io.StringIO()
    p = Progress(5, stream=buf, tty=True, refresh=0)
    for s in range(1, 6):
        p.update(s, loss=0.5)
    p.write("eval ok")
    p.close()
    out = buf.getvalue()
    assert out.count("\n") == 2 and "\r" in out and "[" in out and "5/5" in out
    assert format_duration(3725) == "1:02:05" and format_duration(float("nan")) == "?"


# --------------------------------------------------------------------------- config checks
def test_config_validation():
    with pytest.raises(ConfigError, match="nothing to train"):
        TrainConfig(model="m.onnx", data="d.npz").validate()
    with pytest.raises(ConfigError, match="--grad-accum"):
        TrainConfig(model="m.onnx", data="d.npz", target=["q"], grad_accum=0).validate()
    with pytest.raises(ConfigError, match="unknown loss"):
        TrainConfig(model="m.onnx", data="d.npz", target=["q"], loss="hinge").validate()


# --------------------------------------------------------------------------- training
@pytest.fixture
def task(tmp_path):
    from pyedge.demo import make_sensor_data, model_path
    x, y = make_sensor_data(256, seed=1, target=True)
    xv, yv = make_sensor_data(128, seed=2, target=True)
    np.savez(tmp_path / "train.npz", x=x, labels=y)
    np.savez(tmp_path / "val.npz", x=xv, labels=yv)
    return {"model": str(model_path()), "data": str(tmp_path / "train.npz"),
            "eval_data": str(tmp_path / "val.npz")}


def cfg(task, out, **kw):
    base = dict(task, out=str(out), target=["layers.0", "layers.2"], train=["layers.4.*"],
                lora_r=4, lora_alpha=8.0, batch_size=32, lr=1e-2, max_steps=40, save_every=10,
                keep_checkpoints=2, log_every=5, progress=False, plot=False, deterministic=True)
    base.update(kw)
    return TrainConfig(**base)


@requires_loss
def test_train_end_to_end(task, tmp_path):
    res = train(cfg(task, tmp_path / "run", eval_every=20, eval_at_start=True), log=lambda m: None)
    assert res.steps == 40 and res.optimizer_steps == 40
    assert res.eval["accuracy"] > res.initial_eval["accuracy"] + 0.2
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-30", "step-40"]
    assert (out / "adapters" / "pyedge_adapters.safetensors").is_file()
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "train"] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [r["step"] for r in recs if r["type"] == "eval"] == [0, 20, 40]
    assert all(math.isfinite(r["loss"]) for r in recs)
    # the run directory refuses a second run without --resume
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg(task, out), log=lambda m: None)
    # eval through saved adapters reproduces the final accuracy
    from pyedge.evaluation import evaluate, load_data
    from pyedge.train import session_from_adapters
    sess, meta = session_from_adapters(task["model"], out / "adapters")
    ds = load_data(sess, task["eval_data"], loss=meta["loss"])
    assert evaluate(sess, ds)["accuracy"] == pytest.approx(res.eval["accuracy"])


@requires_loss
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_grad_accumulation_equals_big_batch(task, tmp_path, optimizer):
    kw = dict(optimizer=optimizer, shuffle=False, max_steps=8, max_grad_norm=0.5, weight_decay=0.1,
              momentum=0.9 if optimizer == "sgd" else 0.0, schedule="linear", warmup_steps=2)
    a = train(cfg(task, tmp_path / "a", batch_size=32, grad_accum=1, **kw), log=lambda m: None)
    b = train(cfg(task, tmp_path / "b", batch_size=16, grad_accum=2, **kw), log=lambda m: None)
    from safetensors.numpy import load_file
    ta = load_file(str(a.adapters / "pyedge_adapters.safetensors"))
    tb = load_file(str(b.adapters / "pyedge_adapters.safetensors"))
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=2e-4, atol=2e-5, err_msg=k)


@requires_loss
def test_nonfinite_loss_stops_or_skips(task, tmp_path):
    with pytest.raises(TrainingError, match="non-finite") as e:
        train(cfg(task, tmp_path / "nan", lr=1e30, optimizer="sgd", max_grad_norm=0.0),
              log=lambda m: None)
    assert "step" in str(e.value)
    latest = (tmp_path / "nan" / "checkpoints" / "latest")
    if latest.exists():  # a checkpoint written before the blow-up still loads
        from pyedge.checkpoint import load_latest
        assert all(np.isfinite(a).all() for a in load_latest(tmp_path / "nan" / "checkpoints").tensors.values())
    res = train(cfg(task, tmp_path / "skip", lr=1e30, optimizer="sgd", max_grad_norm=0.0,
                    skip_nonfinite=True), log=lambda m: None)
    assert res.skipped_nonfinite > 0 and res.steps == 40


@requires_loss
def test_resume_in_process_matches(task, tmp_path):
    from safetensors.numpy import load_file
    full = train(cfg(task, tmp_path / "full"), log=lambda m: None)
    c = cfg(task, tmp_path / "part")
    c.max_steps = 40
    # interrupt after the step-20 checkpoint by failing the data loader
    import pyedge.train as tr
    calls = {"n": 0}
    orig = tr.BatchLoader.next

    def flaky(self):
        calls["n"] += 1
        if calls["n"] > 25:
            raise KeyboardInterrupt
        return orig(self)
    tr.BatchLoader.next = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            train(c, log=lambda m: None)
    finally:
        tr.BatchLoader.next = orig
    c.resume = True
    res = train(c, log=lambda m: None)
    assert res.resumed_from == 20
    a = load_file(str(full.adapters / "pyedge_adapters.safetensors"))
    b = load_file(str(res.adapters / "pyedge_adapters.safetensors"))
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


@requires_loss
def test_a_kill_while_writing_the_final_adapters_keeps_one_generation(task, tmp_path,
                                                                      monkeypatch):
    """A --resume of a finished run rewrites out/adapters; killed after pyedge's raw files and
    before the PEFT ones, the folder must still be the first run's (raw and PEFT files of the
    same step), never new raw files beside old PEFT files."""
    import pyedge
    out = tmp_path / "run"
    train(cfg(task, out, max_steps=10, eval_data=None), log=lambda m: None)
    ad = out / "adapters"
    before = {p.name: p.read_bytes() for p in ad.iterdir()}
    assert json.loads(before["pyedge_adapters.json"])["step"] == 10
    assert "adapter_model.safetensors" in before

    class Killed(BaseException):
        pass

    def killed(self, folder):
        raise Killed()

    monkeypatch.setattr(pyedge.TrainingSession, "save_adapters", killed)
    with pytest.raises(Killed):
        train(cfg(task, out, max_steps=20, eval_data=None, resume=True), log=lambda m: None)
    assert {p.name: p.read_bytes() for p in ad.iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".trash-", ".old-"))]


@requires_loss
def test_fixed_batch_model(task, tmp_path):
    """A model exported without a dynamic batch axis trains with its batch size; evaluation
    pads the last partial batch."""
    import onnx
    m = onnx.load(task["model"])
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 8
    path = tmp_path / "fixed.onnx"
    onnx.save(m, path)
    t = dict(task, model=str(path))
    with pytest.raises(ConfigError, match="--batch-size 8"):
        train(cfg(t, tmp_path / "a", batch_size=32), log=lambda m: None)
    res = train(cfg(t, tmp_path / "b", batch_size=8, max_steps=5), log=lambda m: None)
    assert res.steps == 5 and res.eval["records"] == 128
