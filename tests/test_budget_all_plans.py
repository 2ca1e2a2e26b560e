"""Every plan under the memory budget (csrc/graph/plan_recompute.cpp, plan.cpp's Arena).

- Forward-only plans (run(), evaluation, plan_stats(training=False)) are planned under the
  budget like training plans, counting the outputs copied to the caller; one that cannot fit
  is a plan-time error naming its minimum. A causal LM is evaluated through its fused loss
  (TrainingSession.evaluate_loss, train.evaluate): no logits.
- The arena is not grown past what the system reports available: OutOfMemoryError naming the
  bytes needed and available (the reading faked with PYEDGE_TEST_MEM_AVAILABLE).
- LoraMatMul's merged K×N weight (scratch) is counted; under a budget only its unmerged path
  meets, the op takes that path (results equal up to rounding).
- T = 2048 plans stay within the budget (attention probabilities recomputed).
- Measured VmHWM of child processes stays under the budget, with an eval and a run() call.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

import pyedge
from llama_export import export_llama
from tests.quant_models import linear_model

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def wide_vocab_llama(tmp_path_factory):
    """2 Llama layers at width 64 with a 16k vocabulary: the logits dwarf the activations."""
    return export_llama(tmp_path_factory.mktemp("llama16k") / "m.onnx", 16384)


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    """2 Llama layers at width 64, positions up to 2048 (rotary computed from position ids)."""
    return export_llama(tmp_path_factory.mktemp("llama2k") / "m.onnx", 256, max_pos=2048)


def session(path, **kw):
    # 32-row loss chunks: the fused loss's scratch (2 MiB at V = 16k) well below the logits
    return pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=8, alpha=16,
                                  target_modules=LLAMA_TARGETS), loss="causal_lm",
                                  loss_chunk_rows=32, **kw)


def ids_batch(vocab, b, t, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int64)


def minimum_from(err) -> int:
    return int(re.search(r"the minimum(?: \(with recomputation\))? is (\d+) bytes",
                         str(err)).group(1))


# --------------------------------------------------------------------------- forward plans
def test_forward_with_logits_is_budgeted(wide_vocab_llama):
    B, T = 4, 64
    ids = ids_batch(16384, B, T)
    sess = session(wide_vocab_llama)
    assert sess.fused_loss
    train_shapes = {"input_ids": [B, T], "labels": [B, T]}
    fwd = sess.plan_stats(shapes={"input_ids": [B, T]}, training=False)
    logits_bytes = B * T * 16384 * 4
    assert fwd["output_copy_bytes"] == logits_bytes
    assert fwd["planned_peak_bytes"] == (fwd["fixed_bytes"] + fwd["arena_bytes"] +
                                         fwd["constant_bytes"] + logits_bytes)
    train = sess.plan_stats(shapes=dict(train_shapes))
    # The fused loss: the training plan holds no logits, the forward holds them twice.
    assert fwd["planned_peak_bytes"] - train["planned_peak_bytes"] > logits_bytes // 2

    # A budget the training plan meets without recomputing; run() would exceed it.
    budget = train["planned_peak_bytes"] + (1 << 20)
    sess.max_memory = budget
    st = sess.plan_stats(shapes=dict(train_shapes))
    assert st["planned_peak_bytes"] <= budget and st["recompute_ops"] == 0
    loss = sess.step({"input_ids": ids}, ids, update=False)
    with pytest.raises(pyedge.PyedgeError, match="forward pass returning 'logits'") as e:
        sess.run({"input_ids": ids})
    minimum = minimum_from(e.value)
    assert budget < minimum <= fwd["planned_peak_bytes"]
    # Evaluation goes through the fused loss: no logits, under the same budget.
    ev = sess.evaluate_loss({"input_ids": ids}, ids)
    assert ev == pytest.approx(loss, rel=1e-6)

    # The minimum itself is accepted, one byte less is not.
    sess.max_memory = minimum
    out = sess.run({"input_ids": ids})["logits"]
    assert out.shape == (B, T, 16384)
    sess.max_memory = minimum - 1
    with pytest.raises(pyedge.PyedgeError, match=str(minimum)):
        sess.run({"input_ids": ids})


def test_evaluate_uses_the_fused_loss(wide_vocab_llama, monkeypatch):
    """train.evaluate on a causal LM with the fused head under a budget never asks for
    logits; its loss is the token-weighted mean of the plain computation. Without a budget
    (and small logits) it keeps the logits path, which also gives the top-1 accuracy."""
    from pyedge.train import evaluate, loss_sums
    sess = session(wide_vocab_llama)
    ids = ids_batch(16384, 5, 24, seed=1)
    labels = ids.copy()
    labels[1, 10:] = -100  # ignored labels count for nothing
    ref_sum, ref_n = 0.0, 0
    for lo in range(0, 5, 2):
        out = sess.run({"input_ids": ids[lo:lo + 2]})["logits"]
        s, n, _ = loss_sums(out, labels[lo:lo + 2], "causal_lm")
        ref_sum, ref_n = ref_sum + s, ref_n + n

    class Batches:  # what evaluate() reads of a Dataset
        path = "mem"

        def __len__(self):
            return 5

        def batch(self, idx):
            return {"input_ids": ids[idx]}, labels[idx]

    plain = evaluate(sess, Batches(), batch_size=2, loss="causal_lm")
    assert plain["accuracy"] is not None
    assert plain["loss"] == pytest.approx(ref_sum / ref_n, rel=1e-6)

    def no_logits(*a, **k):
        raise AssertionError("evaluate() ran the logits")
    sess.max_memory = "4G"
    monkeypatch.setattr(sess, "run", no_logits)
    res = evaluate(sess, Batches(), batch_size=2, loss="causal_lm")
    assert res["tokens"] == ref_n
    assert res["loss"] == pytest.approx(ref_sum / ref_n, rel=1e-5)
    assert res["accuracy"] is None  # top-1 accuracy would need the logits


# --------------------------------------------------------------------------- running out
def test_arena_growth_checks_what_the_system_has(wide_vocab_llama, monkeypatch):
    B, T = 2, 32
    ids = ids_batch(16384, B, T)
    sess = session(wide_vocab_llama)
    monkeypatch.setenv("PYEDGE_TEST_MEM_AVAILABLE", str(4096))
    assert pyedge._core.available_memory() == (4096, "PYEDGE_TEST_MEM_AVAILABLE")
    with pytest.raises(pyedge.OutOfMemoryError) as e:  # no budget: the smallest plan, refused
        sess.step({"input_ids": ids}, ids)
    assert isinstance(e.value, MemoryError) and isinstance(e.value, pyedge.PyedgeError)
    msg = str(e.value)
    m = re.search(r"needs (\d+) bytes more .* reports only 4096 bytes available", msg)
    assert m and int(m.group(1)) > 4096, msg
    # Under a budget the plan fits too, but the system still lacks it.
    sess.max_memory = "2G"
    with pytest.raises(pyedge.OutOfMemoryError, match="4096 bytes available"):
        sess.run({"input_ids": ids})
    monkeypatch.delenv("PYEDGE_TEST_MEM_AVAILABLE")
    loss = sess.step({"input_ids": ids}, ids)  # the memory is back: the same session trains
    assert np.isfinite(loss)


# --------------------------------------------------------------------------- LoRA scratch
def test_lora_unmerged_under_a_tight_budget(tmp_path):
    """Two LoRA projections 512x512 on 5 rows: the backward's merged weight (1 MiB scratch)
    dominates the arena. Under a budget only the unmerged path meets, the ops take it; losses
    and gradients equal the merged plan's up to rounding."""
    m, _ = linear_model(K=512, H=512, M=512, form="matmul", seed=3)
    path = tmp_path / "lin.onnx"
    onnx.save(m, path)
    kw = dict(lora=pyedge.LoraConfig(r=4, alpha=8, target_modules=["layers.0.fc",
                                                                     "layers.1.out"]),
              loss="mse", seed=1)
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((1, 5, 512)).astype(np.float32),
                rng.standard_normal((1, 5, 512)).astype(np.float32)) for _ in range(3)]
    shapes = {"x": [1, 5, 512], "labels": [1, 5, 512]}

    def train(sess):
        out = []
        for x, y in batches:
            out.append(sess.step({"x": x}, y, update=False))
            out.append({k: v.copy() for k, v in sess.gradients().items()})
            sess.apply_update()
        return out

    ref = pyedge.TrainingSession(str(path), **kw)
    free = ref.plan_stats(shapes=dict(shapes))
    assert free["scratch_reduced_ops"] == 0
    merged = train(ref)

    tight = pyedge.TrainingSession(str(path), **kw)
    tight.max_memory = tight._sess.fixed_bytes + 1024
    with pytest.raises(pyedge.PyedgeError, match="minimum") as e:
        tight.plan_stats(shapes=dict(shapes))
    minimum = minimum_from(e.value)
    tight.max_memory = minimum
    st = tight.plan_stats(shapes=dict(shapes))
    assert st["scratch_reduced_ops"] == 2, st["recompute_choice"]
    assert "LoRA unmerged" in st["recompute_choice"]
    # the merged K×N weight (1 MiB) was the arena's largest part
    assert free["arena_bytes"] > 512 * 512 * 4 > 10 * st["arena_bytes"]
    assert st["planned_peak_bytes"] <= minimum
    unmerged = train(tight)
    for a, b in zip(merged, unmerged):
        if isinstance(a, float):
            assert b == pytest.approx(a, rel=1e-5)
        else:
            for k in a:
                np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert tight.last_step_allocations == 0


# --------------------------------------------------------------------------- T = 2048
@pytest.mark.parametrize("fuse", [False, True], ids=["op-by-op", "fused"])
def test_t2048_plans_meet_the_budget(long_llama, fuse):
    """At T = 2048, op by op, the eager attention's B·H·T² scores and probabilities per layer
    dominate and a budget a tenth of the way from the smallest plan to none recomputes them;
    fused (pyedge.Attention keeps a log-sum-exp per row) they are gone, and the same kind of
    budget still holds."""
    shapes = {"input_ids": [1, 2048], "labels": [1, 2048]}
    sess = session(long_llama, recompute="full", fuse=fuse)
    full = sess.plan_stats(shapes=dict(shapes))
    sess.set_memory_budget(None, "none")
    none = sess.plan_stats(shapes=dict(shapes))
    probs = 4 * 2048 * 2048 * 4  # one layer's probabilities
    if fuse:
        assert sess.fusions["attention"] == 2
        # what is left of T² size is the mask chain built from the positions (a few 2048²
        # tensors of bool/float), not the two layers' scores and probabilities
        assert none["arena_bytes"] < 2 * probs
    else:
        assert none["arena_bytes"] > 2 * probs
        assert full["arena_bytes"] < none["arena_bytes"] - probs
    budget = full["planned_peak_bytes"] + (none["planned_peak_bytes"] -
                                           full["planned_peak_bytes"]) // 10
    sess.set_memory_budget(budget, "auto")
    st = sess.plan_stats(shapes=dict(shapes))
    assert st["planned_peak_bytes"] <= budget and st["recompute_ops"] > 0
    if not fuse:
        assert any("Softmax" in k or "Attention" in k for k in st["recompute_op_types"]), \
            st["recompute_op_types"]


# --------------------------------------------------------------------------- measured
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pyedge
    path, extra, B, T, RB, vocab = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:7])
    s = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=8, alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        loss="causal_lm", loss_chunk_rows=32)
    budget = s._sess.fixed_bytes + extra
    s.max_memory = budget
    ids = np.random.default_rng(0).integers(0, vocab, (B, T)).astype(np.int64)
    s.step({"input_ids": ids}, ids)
    ev = s.evaluate_loss({"input_ids": ids}, ids)
    out = s.run({"input_ids": ids[:RB]})["logits"]
    shape = list(out.shape)
    del out
    st = s.plan_stats(shapes={"input_ids": [B, T], "labels": [B, T]})
    fwd = s.plan_stats(shapes={"input_ids": [RB, T]}, training=False)
    hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")]
    print(json.dumps({"hwm": hwm[0], "budget": budget, "peak": st["planned_peak_bytes"],
                      "fwd_peak": fwd["planned_peak_bytes"], "ops": st["recompute_ops"],
                      "eval": ev, "shape": shape}))
""")


def run_child(path, extra, B, T, RB, vocab):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(pyedge.__file__)), os.environ.get("PYTHONPATH", "")]))
    env.pop("PYEDGE_TEST_MEM_AVAILABLE", None)
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(extra), str(B), str(T),
                          str(RB), str(vocab)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_vmhwm_with_eval_and_run_stays_under_the_budget(wide_vocab_llama):
    """The budget is what the run() of 2 of the 4 rows needs (its logits, twice): training
    (no logits), evaluation (fused loss) and that run() all fit; the process's VmHWM too."""
    B, T, RB = 4, 128, 2
    sess = session(wide_vocab_llama)
    fwd = sess.plan_stats(shapes={"input_ids": [RB, T]}, training=False)
    train = sess.plan_stats(shapes={"input_ids": [B, T], "labels": [B, T]})
    extra_fwd = fwd["arena_bytes"] + fwd["constant_bytes"] + fwd["output_copy_bytes"]
    extra_train = train["arena_bytes"] + train["constant_bytes"]
    assert extra_fwd > extra_train + (16 << 20)  # the forward sets the peak, by > 16 MiB
    r = run_child(wide_vocab_llama, extra_fwd, B, T, RB, 16384)
    assert r["shape"] == [RB, T, 16384] and np.isfinite(r["eval"])
    assert r["peak"] <= r["budget"] and r["fwd_peak"] <= r["budget"]
    assert r["hwm"] <= r["budget"], r


@pytest.mark.slow
def test_vmhwm_at_t2048_stays_under_the_budget(long_llama):
    B, T = 1, 2048
    sess = session(long_llama, recompute="full")
    full = sess.plan_stats(shapes={"input_ids": [B, T], "labels": [B, T]})
    extra = full["constant_bytes"] + (full["arena_bytes"] +
                                      full["arena_bytes_no_recompute"]) // 2
    fwd = sess.plan_stats(shapes={"input_ids": [B, T]}, training=False)
    extra = max(extra, fwd["arena_bytes"] + fwd["constant_bytes"] + fwd["output_copy_bytes"])
    r = run_child(long_llama, extra, B, T, B, 256)
    assert r["ops"] > 0
    assert r["hwm"] <= r["budget"], r
