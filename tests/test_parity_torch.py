"""The llm.c check: whole models trained by pyedge and by PyTorch(+PEFT) from identical
initial adapters on identical batches agree on gradients at step 0 and on 20 AdamW losses."""
import copy

import numpy as np
import pytest

import pyedge

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

STEPS = 20


def max_rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def text_batches(vocab, n=4, batch=4, seq=16, labels=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1000, vocab, (batch, seq)).astype(np.int64)
        ids[:, 0] = 101
        mask = np.ones((batch, seq), np.int64)
        for i in range(1, batch):
            cut = seq - 3 * i
            ids[i, cut:] = 0
            mask[i, cut:] = 0
        out.append(({"input_ids": ids, "attention_mask": mask},
                    rng.integers(0, labels, batch).astype(np.int64)))
    return out


def run_parity(sess, model, batches, torch_trainable, name_map, lr=1e-3):
    """Trains both for STEPS; returns (grad errors at step 0, per-step loss errors)."""
    opt = torch.optim.AdamW(torch_trainable, lr=lr, weight_decay=0.01)
    params = dict(model.named_parameters())
    grad_err, loss_err = {}, []
    for step in range(STEPS):
        inputs, labels = batches[step % len(batches)]
        ours = sess.step(inputs, labels, update=(step > 0))
        if step == 0:
            grads = {k: v.copy() for k, v in sess.gradients().items()}
        opt.zero_grad()
        logits = model(*[torch.tensor(v) for v in inputs.values()])
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
        loss.backward()
        if step == 0:
            for onnx_name, torch_name in name_map.items():
                grad_err[onnx_name] = max_rel(grads[onnx_name], params[torch_name].grad.numpy())
            sess.apply_update()  # the step-0 update, after reading its gradients
        opt.step()
        loss_err.append(abs(ours - loss.item()) / abs(loss.item()))
    return grad_err, loss_err


@pytest.mark.slow
def test_minilm_lora_matches_peft(exported):
    path, base, _ = exported("minilm", "torchscript")
    model = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
    pm = peft.get_peft_model(model, cfg)
    pm.eval()
    for p in pm.base_model.model.classifier.parameters():
        p.requires_grad_(True)
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=8, alpha=16,
                                  target_modules=["query", "value"]), train=["classifier.*"],
                                  optimizer=pyedge.AdamW(lr=1e-3))
    # identical initial adapters; B nonzero so that A has a gradient at step 0
    torch_params = dict(pm.named_parameters())
    rng = np.random.default_rng(0)
    name_map = {}
    for onnx_name, arr in sess.trainable_parameters().items():
        if ".lora_" in onnx_name:
            module, which = onnx_name.split(".lora_")
            tname = f"base_model.model.{module}.lora_{which.split('.')[0]}.default.weight"
        else:
            tname = f"base_model.model.{onnx_name}"
        t = torch_params[tname]
        if ".lora_B" in onnx_name:
            with torch.no_grad():
                t.copy_(torch.tensor(rng.standard_normal(t.shape) * 0.01, dtype=torch.float32))
        arr[...] = t.detach().numpy()
        name_map[onnx_name] = tname
    assert len(name_map) == 6 * 2 * 2 + 2
    assert sess.fusions["gathered_rows"] >= 15  # the last layer runs on the [CLS] rows
    trainable = [p for p in pm.parameters() if p.requires_grad]
    grad_err, loss_err = run_parity(sess, pm, text_batches(model.config.vocab_size), trainable,
                                    {k: v for k, v in name_map.items()})
    worst = max(grad_err.values())
    assert worst < 1e-4, sorted(grad_err.items(), key=lambda kv: -kv[1])[:3]
    assert max(loss_err) < 1e-3, loss_err


def test_cnn_last_block_and_head_match_torch(exported):
    path, base, _ = exported("cnn", "torchscript")
    model = copy.deepcopy(base).eval()
    sess = pyedge.TrainingSession(path, train=["blocks.3.*", "head.*"],
                                  optimizer=pyedge.AdamW(lr=1e-3))
    trainable_names = set(sess.trainable_parameters())
    assert trainable_names == {"blocks.3.conv.weight", "blocks.3.bn.weight", "blocks.3.bn.bias",
                               "head.weight", "head.bias"}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable_names)
    rng = np.random.default_rng(0)
    batches = [({"x": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)},
                rng.integers(0, 10, 8).astype(np.int64)) for _ in range(4)]
    trainable = [p for n, p in model.named_parameters() if n in trainable_names]
    grad_err, loss_err = run_parity(sess, model, batches, trainable,
                                    {n: n for n in trainable_names})
    assert max(grad_err.values()) < 1e-4, grad_err
    assert max(loss_err) < 1e-3, loss_err
    # sparse: nothing before the last block gets a backward
    stats = sess.plan_stats(batches[0][0])
    assert not any("blocks.0" in n or "blocks.1" in n or "blocks.2" in n
                   for n in stats["backward_nodes"]), stats["backward_nodes"]
