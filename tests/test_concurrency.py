"""Two TrainingSessions in one process, stepped from two threads, give bit-identical losses and
parameters to the same sessions run alone. The core keeps no per-session global state: the op
registry is read-only after load, the heap-allocation counter is only a counter, and
_core.set_num_threads is process-wide (set it once, before starting threads; a fixed thread
count is what makes results bit-identical)."""
import threading

import numpy as np
import pytest

import pyedge
from pyedge import _core
from pyedge.demo import make_sensor_data, model_path

STEPS = 15


def make_session(seed):
    return pyedge.TrainingSession(str(model_path()), lora=pyedge.LoraConfig(
        r=4, alpha=8, target_modules=["layers.0", "layers.2"]), train=["layers.4.*"],
        optimizer=pyedge.AdamW(lr=3e-3), seed=seed)


def batches(seed):
    x, y = make_sensor_data(32 * STEPS, seed=seed, target=True)
    return [(x[i:i + 32].astype(np.float32), y[i:i + 32].astype(np.int64))
            for i in range(0, len(x), 32)]


def train(sess, data, out, barrier=None):
    if barrier is not None:
        barrier.wait()
    losses = [sess.step({"x": x}, y) for x, y in data]
    out["losses"] = losses
    out["params"] = {k: v.copy() for k, v in sess.trainable_parameters().items()}
    out["run"] = sess.run({"x": data[0][0]})


@pytest.mark.parametrize("threads", [1, 2])
def test_two_sessions_two_threads_bit_identical(threads):
    before = _core.num_threads()
    _core.set_num_threads(threads)
    try:
        data = [batches(1), batches(2)]
        alone = []
        for i in range(2):
            out = {}
            train(make_session(10 + i), data[i], out)
            alone.append(out)
        sessions = [make_session(10), make_session(11)]
        outs = [{}, {}]
        barrier = threading.Barrier(2)
        ts = [threading.Thread(target=train, args=(sessions[i], data[i], outs[i], barrier))
              for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=300)
        for i in range(2):
            assert outs[i]["losses"] == alone[i]["losses"]
            assert sorted(outs[i]["params"]) == sorted(alone[i]["params"])
            for k, v in alone[i]["params"].items():
                assert v.tobytes() == outs[i]["params"][k].tobytes(), k
            for k, v in alone[i]["run"].items():
                assert v.tobytes() == outs[i]["run"][k].tobytes(), k
        assert alone[0]["losses"] != alone[1]["losses"]   # the two really differ
    finally:
        _core.set_num_threads(before)


def test_same_model_shared_graph_two_threads():
    """Sessions built from one Graph object (shared numpy weights) do not interfere."""
    g = pyedge.load_onnx(str(model_path()))
    x, _ = make_sensor_data(64, seed=3, target=True)
    x = x.astype(np.float32)
    ref = pyedge.TrainingSession(g, loss=None).run({"x": x})
    sessions = [pyedge.TrainingSession(g, loss=None) for _ in range(2)]
    results = [None, None]

    def go(i):
        for _ in range(30):
            results[i] = sessions[i].run({"x": x})
    ts = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    for r in results:
        for k in ref:
            assert r[k].tobytes() == ref[k].tobytes()
