"""Export reference models to ONNX on the (x86) host for the aarch64 parity tests.

    python scripts/arm64_export_models.py OUT_DIR [names...]   # default: mlp cnn gpt2 minilm decoder

Writes, per model:

* OUT_DIR/<name>.onnx and OUT_DIR/<name>.npz: the model and inputs for another batch size /
  sequence length than the export example (forward: pyedge vs onnxruntime);
* what a torch-free device needs to check one LoRA training step against PyTorch+PEFT
  (tests/test_arm64_parity.py, test_exported_model_trains_like_peft):
  - OUT_DIR/<name>.peft/: a PEFT ``save_pretrained`` folder, LoRA r=4 alpha=8 on every linear
    layer (nn.Linear, transformers' Conv1D, and nn.Conv2d for the CNN) except a tied output
    embedding, with B perturbed (fixed seed) so that A's gradients are non-zero too;
  - OUT_DIR/<name>.train.npz: one batch, arrays named after the graph inputs plus ``labels``
    (pyedge's data format; the labels its loss expects: class ids [B], or the input ids for
    causal_lm, which shifts them itself);
  - OUT_DIR/<name>.grads.npz: PyTorch's gradient of every LoRA tensor for that batch, keyed as
    in the adapter file (``base_model.model.<module>.lora_A.weight``), in its layout;
  - OUT_DIR/<name>.train.json: the loss kind, the optimizer, PyTorch's loss and its losses
    after each of 3 AdamW steps on that batch. Written last: the device test only trusts a
    model whose .train.json exists.

The PyTorch side runs in float64 from the float32 values saved in the folder (the ONNX weights
are float32 too): the reference is the exact math of the same parameters, not torch's float32
rounding. Only torch, transformers, peft and onnx are used here, never the `pyedge` package
(the host may have no build). One model failing does not stop the others.
"""
import json
import os
import shutil
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LORA_R, LORA_ALPHA = 4, 8
ADAMW = {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
STEPS = 3
# pyedge's loss per model (TrainingSession(loss=...)); torch_loss below computes the same
LOSS = {"mlp": "cross_entropy", "cnn": "cross_entropy", "minilm": "cross_entropy",
        "gpt2": "causal_lm", "decoder": "causal_lm"}


def main(argv):
    out = argv[0]
    names = argv[1:] or ["mlp", "cnn", "gpt2", "minilm", "decoder"]
    os.makedirs(out, exist_ok=True)
    from models import reference
    from models.export_reference import export

    rng = np.random.default_rng(7)
    for name in names:
        _remove_training_files(out, name)  # a stale reference must not outlive a failed run
        try:
            model, inputs, in_names, out_names, dyn = reference.FACTORIES[name]()
            path = os.path.join(out, f"{name}.onnx")
            export(model, inputs, path, exporter="torchscript", input_names=in_names,
                   output_names=out_names, dynamic_axes=dyn)
            feed = reference.unseen_inputs(name, inputs, rng)
            np.savez(os.path.join(out, f"{name}.npz"), **feed)
            print("exported", name, path)
        except Exception as e:  # one model failing must not stop the others
            print("FAILED", name, type(e).__name__, e)
            continue
        try:
            # its own generator: the forward feeds above stay what they were
            batch_rng = np.random.default_rng(zlib.crc32(name.encode()))
            info = write_training_reference(out, name, model, inputs, in_names, batch_rng)
            print("training reference", name, f"loss {info['loss']:.6f}",
                  f"{len(info['lora_tensors'])} LoRA tensors")
        except Exception as e:
            _remove_training_files(out, name)
            print("FAILED training reference", name, type(e).__name__, e)


def _remove_training_files(out, name):
    shutil.rmtree(os.path.join(out, f"{name}.peft"), ignore_errors=True)
    for suffix in (".train.json", ".train.npz", ".grads.npz"):
        p = os.path.join(out, name + suffix)
        if os.path.exists(p):
            os.remove(p)


def lora_targets(model):
    """Full names of the modules LoRA adapts: every nn.Linear, transformers Conv1D and
    nn.Conv2d except the output embedding (tied to the input one in GPT-2 and the decoder;
    PEFT's "all-linear" leaves it out too)."""
    from torch import nn
    kinds = [nn.Linear, nn.Conv2d]
    try:
        from transformers.pytorch_utils import Conv1D
        kinds.append(Conv1D)
    except ImportError:
        pass
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, tuple(kinds)) and m is not head]


def training_batch(name, model, inputs, rng):
    """(numpy inputs, labels): the inputs like reference.unseen_inputs (another batch size and
    sequence length than the export example), labels as pyedge's loss expects them."""
    import torch

    from models import reference
    feed = reference.unseen_inputs(name, inputs, rng)
    if LOSS[name] == "causal_lm":
        return feed, feed["input_ids"].copy()
    with torch.no_grad():
        classes = model(*[torch.from_numpy(v) for v in feed.values()]).shape[-1]
    n = next(iter(feed.values())).shape[0]
    return feed, rng.integers(0, classes, n).astype(np.int64)


def torch_loss(kind, logits, labels):
    """pyedge's cross_entropy / causal_lm (mean over the labelled rows; causal_lm predicts
    token t+1 from position t)."""
    import torch.nn.functional as F
    if kind == "causal_lm":
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1))
    return F.cross_entropy(logits, labels)


def write_training_reference(out, name, model, inputs, in_names, rng):
    """The PEFT folder, the batch, PyTorch's gradients and AdamW losses for `name` (see the
    module docstring); returns the .train.json content."""
    import copy

    import peft
    import torch
    from safetensors.numpy import load_file

    feed, labels = training_batch(name, model, inputs, rng)
    targets = lora_targets(model)
    cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                          target_modules=targets,
                          fan_in_fan_out=any(type(m).__name__ == "Conv1D"
                                             for m in model.modules()))
    torch.manual_seed(0)  # PEFT's kaiming-uniform A
    pm = peft.get_peft_model(copy.deepcopy(model), cfg).eval()  # eval: BatchNorm statistics
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and ".lora_B." in n:  # B = 0 would give A a zero gradient
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    folder = os.path.join(out, f"{name}.peft")
    pm.save_pretrained(folder)

    # float64 from here on: the saved float32 values are exactly representable
    pm = pm.double()
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    # PEFT's own key rule (get_peft_model_state_dict): drop the adapter name
    keys = {n: n.replace(".default.", ".") for n in trainable}
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    if set(keys.values()) != set(saved):
        raise RuntimeError(f"gradient keys {sorted(set(keys.values()) ^ set(saved))[:4]} do "
                           "not match the saved adapter's")
    args = [torch.from_numpy(feed[k]).double() if feed[k].dtype.kind == "f"
            else torch.from_numpy(feed[k]) for k in in_names]
    y = torch.from_numpy(labels)

    def loss_fn():
        out = pm(*args)
        return torch_loss(LOSS[name], out.logits if hasattr(out, "logits") else out, y)

    opt = torch.optim.AdamW(list(trainable.values()), lr=ADAMW["lr"],
                            betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"])
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    grads = {keys[n]: p.grad.detach().numpy().copy() for n, p in trainable.items()}
    zero = [k for k, v in grads.items() if not np.any(v)]
    if zero:
        raise RuntimeError(f"zero gradients for {zero[:4]}: the check would be weak")
    opt.step()
    losses = []
    for step in range(STEPS):  # the loss after each AdamW step
        opt.zero_grad()
        l_k = loss_fn()
        losses.append(float(l_k.item()))
        if step < STEPS - 1:
            l_k.backward()
            opt.step()

    np.savez(os.path.join(out, f"{name}.train.npz"), labels=labels, **feed)
    np.savez(os.path.join(out, f"{name}.grads.npz"), **grads)
    info = {"model": name, "loss_kind": LOSS[name], "optimizer": dict(ADAMW, kind="adamw"),
            "steps": STEPS, "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "modules": targets},
            "loss": float(loss.item()), "adamw_losses": losses,
            "lora_tensors": sorted(grads), "dtype": "float64",
            "versions": {"torch": torch.__version__, "peft": peft.__version__}}
    tmp = os.path.join(out, f"{name}.train.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(out, f"{name}.train.json"))
    return info


if __name__ == "__main__":
    main(sys.argv[1:])
