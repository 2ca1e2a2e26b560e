"""Whole-model parity without torch: pyedge's forward equals onnxruntime's, and pyedge trains
like PyTorch+PEFT.

- Models exported elsewhere (scripts/arm64_export_models.py on an x86 host writes
  <name>.onnx + <name>.npz) in the folder named by PYEDGE_PARITY_MODELS; skipped when unset.
- The same models trained (the llm.c check, with the host's numbers): pyedge loads the ONNX
  file and the host's PEFT folder (<name>.peft/, LoRA r=4 with B != 0) and runs the host's batch
  (<name>.train.npz); its loss, every LoRA gradient and the losses after 3 AdamW steps equal
  what PyTorch+PEFT computed on the host in float64 (<name>.train.json, <name>.grads.npz).
  numpy, onnx, safetensors and pyedge only: this runs on a device without torch.
- A small attention block built with onnx.helper (MatMul, Add, LayerNormalization, Softmax,
  Gelu via Erf, Transpose, Reshape) that always runs where onnxruntime is installed.
"""
import glob
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import pyedge

pytestmark = pytest.mark.arm64
try:  # the forward checks need it; the training check does not
    import onnxruntime as ort
except ImportError:
    ort = None
needs_ort = pytest.mark.skipif(ort is None, reason="needs onnxruntime (not installed)")

MODEL_DIR = os.environ.get("PYEDGE_PARITY_MODELS", "")
EXPORTED = sorted(glob.glob(os.path.join(MODEL_DIR, "*.onnx"))) if MODEL_DIR else []


def _compare(path, feed, tol=1e-4):
    ours = pyedge.TrainingSession(path, loss=None).run(feed)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)
    for (k, y), r in zip(ours.items(), ref):
        assert y.shape == r.shape, k
        scale = max(1.0, float(np.abs(r).max()))
        err = float(np.abs(y - r).max()) / scale
        assert err < tol, f"{os.path.basename(path)} output {k}: relative error {err:.2e}"


@needs_ort
@pytest.mark.skipif(not EXPORTED, reason="PYEDGE_PARITY_MODELS not set or empty")
@pytest.mark.parametrize("path", EXPORTED, ids=[os.path.basename(p) for p in EXPORTED])
def test_exported_model_matches_onnxruntime(path):
    feed = dict(np.load(path[:-5] + ".npz"))
    _compare(path, feed)


# ------------------------------------------------------------------- training vs PyTorch+PEFT
LOSS_TOL, GRAD_TOL, STEP_TOL = 1e-5, 1e-4, 1e-4


def _max_rel(ours, ref):
    """max |ours - ref| over max |ref|: a tensor-wide relative error (gradients have zeros)."""
    return float(np.abs(ours - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def _session_from_peft(path, folder, info):
    """A session whose adapters are the PEFT folder's: the config it needs comes from the
    folder (as `pyedge eval --adapters` does), the optimizer from the host's reference."""
    from pyedge.adapters.base import method_for_peft
    from pyedge.export.adapter_files import read_adapter_folder
    from pyedge.export.peft import load_adapter_files

    ad = read_adapter_folder(folder)
    targets = ad.config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    cfg = method_for_peft(ad.config, folder).config_from_peft(ad.config, targets)
    o = info["optimizer"]
    assert o["kind"] == "adamw", o
    sess = pyedge.TrainingSession(
        path, adapter=cfg, loss=info["loss_kind"],
        optimizer=pyedge.AdamW(lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                               weight_decay=o["weight_decay"]))
    loaded = load_adapter_files(sess, ad)["loaded"]
    assert sorted(loaded) == sorted(sess.trainable_parameters()), "folder did not load whole"
    return sess


@pytest.mark.skipif(not EXPORTED, reason="PYEDGE_PARITY_MODELS not set or empty")
@pytest.mark.parametrize("path", EXPORTED, ids=[os.path.basename(p) for p in EXPORTED])
def test_exported_model_trains_like_peft(path):
    stem = path[:-5]
    if not os.path.exists(stem + ".train.json"):
        pytest.skip(f"no {os.path.basename(stem)}.train.json: the host exported no training "
                    "reference (no peft there, or it failed: see the export log)")
    with open(stem + ".train.json") as f:
        info = json.load(f)
    batch = dict(np.load(stem + ".train.npz"))
    labels = batch.pop("labels")
    ref_grads = dict(np.load(stem + ".grads.npz"))
    name = os.path.basename(stem)
    sess = _session_from_peft(path, stem + ".peft", info)

    loss = sess.step(batch, labels, update=False)
    rel = abs(loss - info["loss"]) / abs(info["loss"])
    assert rel <= LOSS_TOL, f"{name}: loss {loss!r} vs torch {info['loss']!r} (rel {rel:.2e})"

    # pyedge's trainable tensors -> the adapter file's keys: the mapping save_adapters uses
    from pyedge.export.adapter_files import PREFIX
    ours = {PREFIX + k: v for k, v in
            sess.adapter_method.peft_tensors(sess.adapter_sites, sess.gradients()).items()}
    assert sorted(ours) == sorted(ref_grads), (
        f"{name}: missing {sorted(set(ref_grads) - set(ours))[:4]}, "
        f"extra {sorted(set(ours) - set(ref_grads))[:4]}")
    errs = {k: _max_rel(g, ref_grads[k].reshape(g.shape)) for k, g in ours.items()}
    worst = sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    assert worst[0][1] <= GRAD_TOL, f"{name}: worst LoRA gradients {worst}"

    # the losses after each of the host's AdamW steps on the same batch
    sess.apply_update()
    steps = info["adamw_losses"]
    losses = [sess.step(batch, labels, update=i < len(steps) - 1) for i in range(len(steps))]
    rels = [abs(a - b) / abs(b) for a, b in zip(losses, steps)]
    assert max(rels) <= STEP_TOL, f"{name}: AdamW losses {losses} vs torch {steps}"


def _attention_block(path, B=2, T=9, D=32, H=4, seed=0):
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [init("wq", D, D), init("wk", D, D), init("wv", D, D), init("wo", D, D),
             init("w1", D, 4 * D), init("w2", 4 * D, D), init("b1", 4 * D),
             init("ln_g", D, scale=1.0), init("ln_b", D),
             numpy_helper.from_array(np.array([B, T, H, D // H], np.int64), "heads"),
             numpy_helper.from_array(np.array([B, T, D], np.int64), "merged"),
             numpy_helper.from_array(np.array(1 / np.sqrt(D // H), np.float32), "scale"),
             numpy_helper.from_array(np.array(1 / np.sqrt(2), np.float32), "rsqrt2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    N = helper.make_node
    nodes = [
        N("LayerNormalization", ["x", "ln_g", "ln_b"], ["h"], axis=-1),
        N("MatMul", ["h", "wq"], ["q0"]), N("MatMul", ["h", "wk"], ["k0"]),
        N("MatMul", ["h", "wv"], ["v0"]),
        N("Reshape", ["q0", "heads"], ["q1"]), N("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
        N("Reshape", ["k0", "heads"], ["k1"]), N("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]),
        N("Reshape", ["v0", "heads"], ["v1"]), N("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3]),
        N("MatMul", ["q", "kt"], ["s0"]), N("Mul", ["s0", "scale"], ["s"]),
        N("Softmax", ["s"], ["p"], axis=-1), N("MatMul", ["p", "v"], ["a0"]),
        N("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]), N("Reshape", ["a1", "merged"], ["a2"]),
        N("MatMul", ["a2", "wo"], ["a"]), N("Add", ["x", "a"], ["r1"]),
        N("MatMul", ["r1", "w1"], ["f0"]), N("Add", ["f0", "b1"], ["f1"]),
        N("Mul", ["f1", "rsqrt2"], ["f2"]), N("Erf", ["f2"], ["f3"]), N("Add", ["f3", "one"], ["f4"]),
        N("Mul", ["f1", "f4"], ["f5"]), N("Mul", ["f5", "half"], ["f6"]),
        N("MatMul", ["f6", "w2"], ["f7"]), N("Add", ["r1", "f7"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, T, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return {"x": rng.standard_normal((B, T, D)).astype(np.float32)}


@needs_ort
def test_attention_block_matches_onnxruntime(tmp_path):
    path = str(tmp_path / "block.onnx")
    feed = _attention_block(path)
    _compare(path, feed)
