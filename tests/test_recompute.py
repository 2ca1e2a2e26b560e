"""Recomputation and the memory budget (csrc/graph/plan_recompute.cpp, pyedge/memory_budget.py).

Recomputing re-runs forward steps inside the backward with the same op, inputs, seed and
node index, so losses and gradients must be bitwise those of the plan that keeps every
activation: checked on MiniLM (with LoRA dropout, whose masks must come out the same), GPT-2
and a config-built Llama, forced to full recomputation and at a budget half way. A budget
changes the plan (smaller arena), is met (planned peak, and a child process's VmHWM), and
one below the minimum fails naming it."""
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pyedge
from llama_export import export_llama
from pyedge.memory_budget import RUNTIME_RESERVE, parse_memory_size

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS = 3


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    """A 2-layer Llama decoder (GQA, tied embeddings) from a LlamaConfig, exported."""
    return export_llama(tmp_path_factory.mktemp("llama") / "llama.onnx", 256)


def text_batches(vocab, batch, seq, seed=0, classes=None):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(1000 if classes else 0, vocab, (batch, seq)).astype(np.int64)
        if classes:  # MiniLM: [CLS] first, padded rows
            ids[:, 0] = 101
            mask = np.ones_like(ids)
            mask[1:, seq - 5:] = 0
            ids[1:, seq - 5:] = 0
            out.append(({"input_ids": ids, "attention_mask": mask},
                        rng.integers(0, classes, batch).astype(np.int64)))
        else:
            out.append(({"input_ids": ids}, ids))
    return out


@pytest.fixture(params=["minilm", "gpt2", "llama"])
def case(request, exported):
    """(onnx path, TrainingSession kwargs, batches, plan shapes) of one model."""
    name = request.param
    if name == "minilm":
        path = exported("minilm", "torchscript")[0]
        kw = dict(lora=pyedge.LoraConfig(r=8, alpha=16, target_modules=["query", "value"],
                                         dropout=0.1), train=["classifier.*"])
        batches = text_batches(30000, 4, 24, classes=3)
        shapes = {"input_ids": [4, 24], "attention_mask": [4, 24], "labels": [4]}
    elif name == "gpt2":
        path = exported("gpt2", "torchscript")[0]
        kw = dict(lora=pyedge.LoraConfig(r=8, alpha=16, target_modules=["c_attn", "c_fc"]),
                  loss="causal_lm")
        batches = text_batches(256, 2, 32)
        shapes = {"input_ids": [2, 32], "labels": [2, 32]}
    else:
        path = request.getfixturevalue("llama_path")
        kw = dict(lora=pyedge.LoraConfig(r=8, alpha=16, target_modules=LLAMA_TARGETS),
                  loss="causal_lm")
        batches = text_batches(256, 2, 32)
        shapes = {"input_ids": [2, 32], "labels": [2, 32]}
    return path, kw, batches, shapes


def train(sess, batches):
    """Losses and per-step gradients of STEPS AdamW steps."""
    losses, grads = [], []
    for inputs, labels in batches:
        losses.append(sess.step(inputs, labels, update=False))
        grads.append({k: v.copy() for k, v in sess.gradients().items()})
        sess.apply_update()
    return losses, grads


def assert_bitwise(a, b):
    assert a[0] == b[0]  # float losses, exactly
    for ga, gb in zip(a[1], b[1]):
        assert ga.keys() == gb.keys()
        for k in ga:
            assert np.array_equal(ga[k], gb[k]), k


def test_recompute_is_bitwise(case):
    path, kw, batches, shapes = case
    ref_sess = pyedge.TrainingSession(path, recompute="none", seed=3, **kw)
    ref = train(ref_sess, batches)
    st_none = ref_sess.plan_stats(shapes=dict(shapes))
    assert st_none["recompute_ops"] == 0
    assert any(np.abs(g).max() > 0 for g in ref[1][0].values())

    full = pyedge.TrainingSession(path, recompute="full", seed=3, **kw)
    st_full = full.plan_stats(shapes=dict(shapes))
    assert st_full["recompute_ops"] > 0 and st_full["recompute_flops"] > 0
    assert st_full["arena_bytes"] < st_none["arena_bytes"]
    # LoRA's dropout masks (MiniLM's adapters) are drawn again in the backward: same seed
    # and node index, so the same mask.
    assert "pyedge.LoraMatMul" in st_full["recompute_op_types"]
    assert_bitwise(train(full, batches), ref)
    assert full.last_step_allocations == 0  # recompute steps run in the planned arena

    # A budget half way between the smallest plan and the one without recomputation: some
    # steps are recomputed, not all, and the planned peak meets the budget.
    mid = pyedge.TrainingSession(path, seed=3, **kw)
    mid.set_memory_budget(None, "full")
    smallest = mid.plan_stats(shapes=dict(shapes))["planned_peak_bytes"]
    mid.set_memory_budget(None, "none")
    largest = mid.plan_stats(shapes=dict(shapes))["planned_peak_bytes"]
    budget = (smallest + largest) // 2
    mid.set_memory_budget(budget, "auto")
    st_mid = mid.plan_stats(shapes=dict(shapes))
    assert 0 < st_mid["recompute_ops"] < st_full["recompute_ops"], st_mid["recompute_choice"]
    assert st_mid["planned_peak_bytes"] <= budget
    assert_bitwise(train(mid, batches), ref)


def test_budget_shapes_the_plan(exported):
    path = exported("minilm", "torchscript")[0]
    shapes = {"input_ids": [8, 64], "attention_mask": [8, 64], "labels": [8]}
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=8, alpha=16,
                                  target_modules=["query", "value"]), train=["classifier.*"])
    free = sess.plan_stats(shapes=dict(shapes))
    fixed, consts = free["fixed_bytes"], free["constant_bytes"]
    assert free["recompute_ops"] == 0
    assert free["planned_peak_bytes"] == fixed + free["arena_bytes"] + consts
    top = free["planned_peak_bytes"]
    arenas, ops = [], []
    for frac in (1.0, 0.8, 0.6, 0.45):
        budget = fixed + consts + int(free["arena_bytes"] * frac)
        sess.max_memory = budget
        st = sess.plan_stats(shapes=dict(shapes))
        assert st["planned_peak_bytes"] <= budget
        assert st["fixed_bytes"] == fixed  # measured once per session
        arenas.append(st["arena_bytes"])
        ops.append(st["recompute_ops"])
    assert arenas == sorted(arenas, reverse=True) and arenas[-1] < 0.5 * arenas[0], arenas
    assert ops[0] == 0 and ops == sorted(ops) and ops[-1] > ops[1], ops

    # Below the minimum: a plan-time error naming it; the minimum itself is accepted.
    sess.max_memory = fixed + consts + 1024
    with pytest.raises(Exception, match="minimum") as e:
        sess.plan_stats(shapes=dict(shapes))
    minimum = int(re.search(r"the minimum \(with recomputation\) is (\d+) bytes",
                            str(e.value)).group(1))
    assert fixed + consts < minimum < top
    sess.max_memory = minimum
    st = sess.plan_stats(shapes=dict(shapes))
    assert st["planned_peak_bytes"] == minimum
    sess.max_memory = minimum - 1
    with pytest.raises(Exception, match=str(minimum)):
        sess.plan_stats(shapes=dict(shapes))

    # recompute="none" under a budget it cannot meet says so instead of recomputing.
    sess.set_memory_budget(top - 1, "none")
    with pytest.raises(Exception, match="recompute='none'"):
        sess.plan_stats(shapes=dict(shapes))


def test_forward_only_plans_ignore_the_budget(exported):
    path = exported("gpt2", "torchscript")[0]
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=4, target_modules=["c_attn"]),
                                  loss="causal_lm", recompute="full")
    ids = np.arange(64, dtype=np.int64).reshape(2, 32) % 256
    before = sess.run({"input_ids": ids})["logits"]
    st = sess.plan_stats(shapes={"input_ids": [2, 32]}, training=False)
    assert st["recompute_ops"] == 0
    sess.step({"input_ids": ids}, ids)
    assert sess.plan_stats(shapes={"input_ids": [2, 32], "labels": [2, 32]})["recompute_ops"] > 0
    assert not np.array_equal(sess.run({"input_ids": ids})["logits"], before)  # it trained


CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pyedge
    path, extra, B, T = sys.argv[1], int(sys.argv[2]), 8, 512
    s = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=8, alpha=16,
                               target_modules=["c_attn"]), loss="causal_lm")
    budget = None if extra < 0 else s._sess.fixed_bytes + extra
    s.max_memory = budget
    ids = np.random.default_rng(0).integers(0, 256, (B, T)).astype(np.int64)
    s.step({"input_ids": ids}, ids)
    st = s.plan_stats(shapes={"input_ids": [B, T], "labels": [B, T]})
    hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")]
    print(json.dumps({"hwm": hwm[0], "budget": budget, "fixed": st["fixed_bytes"],
                      "peak": st["planned_peak_bytes"], "ops": st["recompute_ops"],
                      "no_recompute_peak": st["fixed_bytes"] + st["arena_bytes_no_recompute"]
                      + st["constant_bytes"]}))
""")


@pytest.fixture(scope="module")
def attention_heavy_gpt2(exported):
    """6 layers of GPT-2 at width 64 and 512 positions: B x T = 8 x 512 keeps ~70 MB of
    attention probabilities, little compute."""
    path = exported("gpt2", "torchscript", n_layer=6, n_embd=64, n_head=4, seq=512, batch=1)[0]
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=8, alpha=16,
                                  target_modules=["c_attn"]), loss="causal_lm", recompute="full")
    shapes = {"input_ids": [8, 512], "labels": [8, 512]}
    full = sess.plan_stats(shapes=dict(shapes))
    # Arena + constants half way between the smallest plan and none recomputed.
    extra = full["constant_bytes"] + (full["arena_bytes"] + full["arena_bytes_no_recompute"]) // 2
    return path, extra


def run_child(path, extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(pyedge.__file__)), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(extra)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_vmhwm_stays_under_the_budget(attention_heavy_gpt2):
    path, extra = attention_heavy_gpt2
    r = run_child(path, extra)
    assert r["ops"] > 0
    assert r["no_recompute_peak"] > r["budget"] + 20 * 2**20  # the budget bites, by > 20 MB
    assert r["peak"] <= r["budget"]
    assert r["hwm"] <= r["budget"], r


@pytest.mark.slow
def test_vmhwm_without_budget_is_over_it(attention_heavy_gpt2):
    path, extra = attention_heavy_gpt2
    budgeted = run_child(path, extra)
    free = run_child(path, -1)
    assert free["ops"] == 0
    assert free["hwm"] > budgeted["budget"] > budgeted["hwm"]


def test_parse_memory_size():
    assert parse_memory_size("2.5GB") == parse_memory_size("2.5G") == int(2.5 * 2**30)
    assert parse_memory_size("800MiB") == 800 * 2**20
    assert parse_memory_size("1500000000") == parse_memory_size(1500000000) == 1500000000
    assert parse_memory_size("64k") == 65536
    for bad in ("lots", "-1G", "0", "2.5X", True, "1.5 PB"):
        with pytest.raises(ValueError):
            parse_memory_size(bad)
    assert RUNTIME_RESERVE > 0


def test_cli_and_toml_reach_the_session(tmp_path, exported):
    from pyedge.cli import build_parser, read_toml_config, train_config_from_args
    from pyedge.train import ConfigError, build_session
    path = exported("gpt2", "torchscript")[0]
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{path}"\ndata = "x.npz"\ntarget = "c_attn"\nloss = "causal_lm"\n'
                    'max_memory = "2.5G"\nrecompute = "cheap"\n')
    assert read_toml_config(toml)["max_memory"] == "2.5G"
    args = build_parser().parse_args(["train", "--config", str(toml), "--max-memory", "3G"])
    cfg = train_config_from_args(args)
    assert (cfg.max_memory, cfg.recompute) == ("3G", "cheap")  # flags win over the file
    sess = build_session(cfg)
    assert sess.max_memory == 3 * 2**30
    toml.write_text(f'model = "{path}"\ndata = "x.npz"\ntarget = "c_attn"\nmax_memory = 2000000000\n')
    cfg = train_config_from_args(build_parser().parse_args(["train", "--config", str(toml)]))
    assert build_session(cfg).max_memory == 2000000000
    cfg.max_memory = "two gigs"
    with pytest.raises(ConfigError, match="max-memory"):
        cfg.validate()


def test_plan_memory_limit_is_met_by_recomputing(exported, monkeypatch):
    """PYEDGE_MAX_MEMORY caps a plan's arena + constants: with no budget the planner now
    recomputes to fit under it instead of refusing the plan (and still refuses below the
    smallest plan, with the old message)."""
    path = exported("minilm", "torchscript")[0]
    shapes = {"input_ids": [8, 64], "attention_mask": [8, 64], "labels": [8]}
    kw = dict(lora=pyedge.LoraConfig(r=8, alpha=16, target_modules=["query", "value"]),
              train=["classifier.*"])
    sess = pyedge.TrainingSession(path, **kw)
    free = sess.plan_stats(shapes=dict(shapes))
    full = pyedge.TrainingSession(path, recompute="full", **kw).plan_stats(shapes=dict(shapes))
    limit = (free["arena_bytes"] + full["arena_bytes"]) // 2 + free["constant_bytes"]
    monkeypatch.setenv("PYEDGE_MAX_MEMORY", str(limit))
    sess.set_memory_budget(None, "auto")
    st = sess.plan_stats(shapes=dict(shapes))
    assert st["recompute_ops"] > 0 and "PYEDGE_MAX_MEMORY" in st["recompute_choice"]
    assert st["arena_bytes"] + st["constant_bytes"] <= limit
    monkeypatch.setenv("PYEDGE_MAX_MEMORY", str(full["arena_bytes"] // 2))
    sess.set_memory_budget(None, "auto")
    with pytest.raises(Exception, match="over the memory limit"):
        sess.plan_stats(shapes=dict(shapes))


def test_available_memory_reads_the_system():
    avail, source = pyedge._core.available_memory()
    meminfo = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/meminfo")}
    assert 0 < avail <= meminfo["MemTotal"]
    assert source == "MemAvailable" or "cgroup" in source
    if source == "MemAvailable":  # it moves with other processes: within 10%
        assert abs(avail - meminfo["MemAvailable"]) < 0.1 * meminfo["MemAvailable"]
    assert pyedge._core.memory_limit() > 0


def test_train_logs_the_memory_plan_under_a_budget(tmp_path):
    """`pyedge train --max-memory` (here through train()) says what the budget made of the
    plan; without a budget and with nothing recomputed it says nothing."""
    from pyedge.demo import make_sensor_data, model_path
    from pyedge.train import TrainConfig, train as run_training
    x, y = make_sensor_data(64, seed=1, target=True)
    np.savez(tmp_path / "train.npz", x=x, labels=y)
    for budget, expect in (("6G", True), (None, False)):
        lines = []
        cfg = TrainConfig(model=str(model_path()), data=str(tmp_path / "train.npz"),
                          target=["layers.0"], max_steps=2, batch_size=16, out=str(tmp_path / str(budget)),
                          max_memory=budget, progress=False, plot=False)
        run_training(cfg, log=lines.append)
        said = [l for l in lines if l.startswith("memory plan:")]
        assert bool(said) == expect, lines
        if expect:
            assert "recompute: none (fits" in said[0] and "max_memory" in said[0], said


def test_mapped_weights_count_as_held(tmp_path):
    """A memory-mapped model's weights are not in the resident set when the session is made,
    but page in during the first step: the budget counts them on top of it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pyedge.memory_budget import mapped_bytes
    from pyedge.onnx_import import load_onnx
    from pyedge.onnx_wire import save_aligned

    w = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
                          [numpy_helper.from_array(w, "w")])
    path = tmp_path / "m.onnx"
    save_aligned(helper.make_model(g), str(path))
    arrays = list(load_onnx(str(path)).initializers.values())
    assert mapped_bytes(arrays) == w.nbytes
    assert mapped_bytes([w, w.copy()]) == 0
