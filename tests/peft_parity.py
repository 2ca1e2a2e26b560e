"""The llm.c check for a non-LoRA PEFT method (IA³, LN tuning, ...) against PyTorch + PEFT,
shared by the per-method test files (tests/test_ia3_peft.py, ...).

A case gives: the PEFT config, the pyedge config, how to make PEFT's initial values
non-identity (`perturb`), and the map pyedge trainable tensor -> PEFT parameter name. Then:
PEFT's save_pretrained folder loads into pyedge exactly; 20 AdamW steps on the same batches give
step-0 gradients <= 1e-4 and losses <= 1e-3 relative; pyedge's saved folder loads with
PeftModel.from_pretrained (no missing/unexpected keys) and gives pyedge's outputs (<= 1e-4);
`pyedge merge`'s ONNX in onnxruntime equals the adapted model."""
import copy
import os
import warnings

import numpy as np
import pytest

import pyedge

STEPS = 20
LR = 1e-3
LOSS = {"decoder": "causal_lm", "minilm": "cross_entropy"}


def max_rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def batches(name, model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if name == "decoder":
            ids = rng.integers(0, model.config.vocab_size, (2, 16)).astype(np.int64)
            out.append(({"input_ids": ids}, ids))
        else:
            ids = rng.integers(1000, model.config.vocab_size, (4, 16)).astype(np.int64)
            ids[:, 0] = 101
            mask = np.ones_like(ids)
            ids[2, 10:] = 0
            mask[2, 10:] = 0
            out.append(({"input_ids": ids, "attention_mask": mask},
                        rng.integers(0, 3, 4).astype(np.int64)))
    return out


def torch_loss(torch, name, logits, labels):
    y = torch.from_numpy(labels)
    if name == "decoder":
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))
    return torch.nn.functional.cross_entropy(logits, y)


def torch_logits(torch, pm, inputs):
    out = pm(*[torch.from_numpy(v) for v in inputs.values()])
    return out.logits if hasattr(out, "logits") else out


def make_peft_model(torch, peft, base, peft_config, perturb, seed=0):
    torch.manual_seed(seed)   # PEFT's own initialisation (LoRA's A, HRA's U, ...)
    pm = peft.get_peft_model(copy.deepcopy(base), peft_config)
    pm.eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                perturb(n, p, g)
    return pm


def peft_name(onnx_name):
    """pyedge's trainable tensor <module>.<suffix> -> PEFT's parameter (adapter "default")."""
    return f"base_model.model.{onnx_name}.default"


def session(path, name, pyedge_config):
    return pyedge.TrainingSession(path, adapter=pyedge_config, loss=LOSS[name],
                                  optimizer=pyedge.AdamW(lr=LR, weight_decay=0.01))


def check_parity(exported, tmp_path, name, peft_config, pyedge_config, perturb,
                 torch_name=peft_name, torch_optimizer=None, align=None):
    """PEFT folder -> pyedge; 20 AdamW steps side by side. Returns (session, data, path, base).

    torch_optimizer(pm): the PEFT side's optimizer (default AdamW over the trainable
    parameters); align(sess, pm): runs after loading, before the steps (PiSSA/OLoRA give pyedge
    PEFT's residual base)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    path, base, _ = exported(name, "torchscript")
    pm = make_peft_model(torch, peft, base, peft_config, perturb)
    folder = str(tmp_path / "peft")
    pm.save_pretrained(folder)
    sess = session(path, name, pyedge_config)
    info = sess.load_adapters(folder)
    tparams = dict(pm.named_parameters())
    params = sess.trainable_parameters()
    assert sorted(info["loaded"]) == sorted(params)
    assert params
    for k, v in params.items():  # the folder's values, exactly
        ref = tparams[torch_name(k)].detach().numpy()
        np.testing.assert_array_equal(v, ref.reshape(v.shape))
    if align is not None:
        align(sess, pm)
    opt = torch_optimizer(pm) if torch_optimizer is not None else torch.optim.AdamW(
        [p for p in pm.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    data = batches(name, base)
    grad_err, loss_err = {}, []
    for step in range(STEPS):
        inputs, labels = data[step % len(data)]
        ours = sess.step(inputs, labels, update=step > 0)
        opt.zero_grad()
        loss = torch_loss(torch, name, torch_logits(torch, pm, inputs), labels)
        loss.backward()
        if step == 0:
            for k, g in sess.gradients().items():
                ref = tparams[torch_name(k)].grad.numpy()
                grad_err[k] = max_rel(g, ref.reshape(g.shape))
            sess.apply_update()
        opt.step()
        loss_err.append(abs(ours - loss.item()) / abs(loss.item()))
    assert len(grad_err) == len(params)
    worst = sorted(grad_err.items(), key=lambda kv: -kv[1])[:3]
    assert worst[0][1] <= 1e-4, worst
    assert max(loss_err) <= 1e-3, loss_err
    return sess, data, path, base


def check_save_and_merge(sess, data, path, base, tmp_path, reference=None):
    """pyedge's adapters -> PeftModel.from_pretrained (strict) and -> pyedge merge, whose ONNX
    in onnxruntime must equal `sess`'s outputs, or reference(folder, inputs)'s when given.
    Returns (folder, its adapter_config.json)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    folder = sess.save_adapters(tmp_path / "ours")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower()
           or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    from peft.utils import get_peft_model_state_dict

    from pyedge.export.peft import read_adapters
    assert set(read_adapters(folder)[1]) == set(get_peft_model_state_dict(pm))
    pm.eval()
    inputs = data[1][0]
    ours = sess.run(inputs)[sess.output_name]
    with torch.no_grad():
        theirs = torch_logits(torch, pm, inputs).numpy()
    assert max_rel(ours, theirs) <= 1e-4
    ort = pytest.importorskip("onnxruntime")
    from pyedge.export.merge import merge_adapters
    merged = str(tmp_path / "merged.onnx")
    info = merge_adapters(path, folder, merged)
    assert info["lora"] or info["whole"]
    run = ort.InferenceSession(merged, providers=["CPUExecutionProvider"])
    feeds = {i.name: inputs[i.name] for i in run.get_inputs()}
    out = run.run([sess.output_name], feeds)[0]
    assert max_rel(out, ours if reference is None else reference(folder, inputs)) <= 1e-4
    return folder, os.path.join(folder, "adapter_config.json")


def run_method_case(exported, tmp_path, name, peft_config, pyedge_config, perturb, peft_type,
                    torch_name=peft_name):
    """check_parity then check_save_and_merge; the saved config's peft_type. Returns
    (session, the saved config)."""
    import json
    sess, data, path, base = check_parity(exported, tmp_path, name, peft_config, pyedge_config,
                                          perturb, torch_name)
    _, cfg_path = check_save_and_merge(sess, data, path, base, tmp_path)
    with open(cfg_path) as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == peft_type
    return sess, cfg
