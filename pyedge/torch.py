"""Workstation helpers (PyTorch side): export a module for pyedge, load pyedge's adapters.

    import pyedge.torch
    pyedge.torch.export(model, {"input_ids": ids}, "model.onnx")
    peft_model = pyedge.torch.load_adapters(model, "runs/x/adapters")          # PeftModel
    merged = pyedge.torch.load_adapters(model, "runs/x/adapters", merge=True)   # plain module

Importing this module does not import torch; each function does (so `import pyedge.torch`
works, and fails with a clear message only when used, on a device without torch).
"""
from __future__ import annotations

import warnings

__all__ = ["export", "export_hf", "load_adapters", "load_factory", "merge_into"]


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("pyedge.torch needs PyTorch (pip install 'pyedge[torch]'); on the "
                          "device use pyedge.TrainingSession and the CLI instead") from e
    return torch


def export(model, example_inputs, path, input_names=None, output_names=None,
           dynamic_axes=None, exporter="dynamo", opset=None, **kwargs):
    """nn.Module -> one ONNX file with pyedge's parameter map (see
    pyedge.export.torch_export.export_module). A wrapper around a transformers
    PreTrainedModel (``self.m = model``) is unwrapped: the map's names are relative to the
    PreTrainedModel, so PEFT loads the adapters onto it (pyedge/export/hf_export.py)."""
    _torch()
    from pyedge.export.hf_export import unwrap_exported
    from pyedge.export.torch_export import export_module
    out = export_module(model, example_inputs, path, input_names=input_names,
                        output_names=output_names, dynamic_axes=dynamic_axes,
                        exporter=exporter, opset=opset, **kwargs)
    unwrap_exported(out, model)
    return out


def export_hf(model_dir, task, out_dir, **kwargs):
    """A save_pretrained folder -> out_dir/model.onnx + tokenizer and config files
    (task "causal-lm" or "seq-cls"; see pyedge.export.hf_export.export_hf)."""
    _torch()
    from pyedge.export.hf_export import export_hf as ex
    return ex(model_dir, task, out_dir, **kwargs)


def load_factory(spec, **kwargs):
    """(module, example_inputs) from 'pkg.mod:factory' or a model.py (see torch_export)."""
    _torch()
    from pyedge.export.torch_export import load_factory as lf
    return lf(spec, **kwargs)


def load_adapters(model, adapters_dir, merge: bool = False, use_peft: bool | None = None,
                  is_trainable: bool = False):
    """Loads a PEFT-format adapter folder (as pyedge writes it) into `model`.

    With peft installed (or use_peft=True): returns ``PeftModel.from_pretrained(model, dir)``,
    or its ``merge_and_unload()`` when merge=True. Tensors PEFT needs for modules_to_save that
    the folder lacks (an ONNX file from another exporter may have dropped e.g. a zero bias, so
    pyedge never trained it) are taken from `model` itself, with a warning. Without peft (or use_peft=False): merges by
    hand -- ``W += scaling * B @ A`` (transposed for transformers' Conv1D, i.e.
    fan_in_fan_out; the einsum of PEFT for Conv2d), modules_to_save tensors copied -- and
    returns `model` itself, modified in place (merge=False is then impossible: a warning says
    so).

    The folder is validated first (pyedge.export.adapter_files) and checked against `model`'s
    modules and shapes; PEFT then reads a copy of the validated tensors, never the folder
    itself. A refused folder leaves `model` untouched.
    """
    _torch()
    from pyedge.export.adapter_files import AdapterError, read_adapter_folder
    from pyedge.export.hf_export import adapter_target
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        # Its modules carry LoRA layers already: loading again would apply the adapters twice.
        raise AdapterError(
            "load_adapters was given a PeftModel (adapters already loaded); pass the plain "
            "model, or call .merge_and_unload() on the PeftModel to get merged weights")
    # Adapters of an exported wrapper are relative to the PreTrainedModel inside it.
    outer = model
    model, prefix = adapter_target(model, adapters_dir)
    ad = read_adapter_folder(adapters_dir)
    check_fits_module(model, ad)
    auto = use_peft is None
    if auto:
        try:
            import peft  # noqa: F401
            use_peft = True
        except ImportError:
            use_peft = False
    if use_peft:
        import tempfile

        from peft import PeftModel
        with tempfile.TemporaryDirectory(prefix="pyedge-adapters-") as tmp:
            _complete_for_peft(model, ad, tmp)
            pm = PeftModel.from_pretrained(model, tmp, is_trainable=is_trainable)
        if merge:
            merged = pm.merge_and_unload()
            if prefix:  # merged in place into the wrapper's inner model
                parent, _, attr = prefix.rpartition(".")
                setattr(outer.get_submodule(parent), attr, merged)
                return outer
            return merged
        return pm
    if not merge and auto:
        warnings.warn("peft is not installed: the adapters are merged into the weights",
                      stacklevel=2)
    _merge_files(model, ad)
    return outer


def _lora_delta_shape(mod, A, B) -> tuple[int, ...]:
    """Shape of the weight a LoRA pair updates: [out, in] for nn.Linear, [in, out] for
    transformers' Conv1D, [out, in, *k] for ConvNd (B is [out, r, 1...])."""
    if A.ndim == 2:
        shape = (B.shape[0], A.shape[1])
        return shape[::-1] if type(mod).__name__ == "Conv1D" else shape
    return (B.shape[0], *A.shape[1:])


def check_fits_module(model, ad) -> None:
    """AdapterError (one line, naming the tensor) unless every LoRA pair fits its module's
    weight and every whole tensor a parameter/buffer of `model` of the same shape."""
    from pyedge.export.adapter_files import AdapterError, q
    shown = ad.weights_path
    for module, ab in ad.lora.items():
        key_a, key_b = q(ad.key_of(module, "A")), q(ad.key_of(module, "B"))
        try:
            mod = model.get_submodule(module)
        except AttributeError:
            raise AdapterError(f"{shown}: tensor {key_a} adapts module {q(module)}, which the "
                               "model does not have") from None
        W = getattr(mod, "weight", None)
        if W is None or not hasattr(W, "dim") or W.dim() not in (2, 3, 4, 5):
            raise AdapterError(f"{shown}: tensor {key_a} adapts module {q(module)} "
                               f"({type(mod).__name__}), which has no weight LoRA can update")
        want = _lora_delta_shape(mod, ab["A"], ab["B"])
        if want != tuple(W.shape):
            raise AdapterError(f"{shown}: tensors {key_a} {list(ab['A'].shape)} and {key_b} "
                               f"{list(ab['B'].shape)} make a delta of shape {list(want)}, the "
                               f"weight of {q(module)} is {list(W.shape)}")
    state = model.state_dict()
    for name, arr in ad.whole.items():
        key = q(ad.key_of(name))
        t = state.get(name)
        if t is None:
            raise AdapterError(f"{shown}: tensor {key} matches no parameter or buffer of the "
                               "model")
        if tuple(arr.shape) != tuple(t.shape):
            raise AdapterError(f"{shown}: tensor {key} has shape {list(arr.shape)}, the "
                               f"model's is {list(t.shape)}")
        if t.is_floating_point() and arr.dtype.kind != "f":
            raise AdapterError(f"{shown}: tensor {key} is {arr.dtype}, the model's is {t.dtype}")


def _complete_for_peft(model, ad, tmp) -> str:
    """Writes the validated adapters to `tmp` for PEFT to read. PEFT needs every state_dict
    key of each modules_to_save module. A file exported by someone else may lack some (e.g. an
    all-zero bias the exporter's optimizer dropped, so pyedge never saw it); those tensors were
    not trained, so their values are the base model's (with a warning)."""
    from pyedge.export.adapter_files import PREFIX, saved_module_suffixes
    from pyedge.export.peft import write_adapters

    tensors = dict(ad.tensors)
    suffixes = saved_module_suffixes(ad.config)
    if suffixes:
        state = model.state_dict()
        modules = {n.rpartition(".")[0] for n in state}
        wrapped = {m for m in modules if any(m.endswith(t) for t in suffixes)}
        missing = {n: t for n, t in state.items() if n.rpartition(".")[0] in wrapped
                   and PREFIX + n not in tensors}
        if missing:
            warnings.warn(f"the adapters lack {sorted(missing)[:6]} (not in the ONNX file); "
                          "using the base model's values", stacklevel=3)
            for n, t in missing.items():
                tensors[PREFIX + n] = t.detach().cpu().numpy()
    write_adapters(tmp, ad.config, tensors)
    return tmp


def merge_into(model, adapters_dir):
    """W += s·B·A for every LoRA module and modules_to_save copied, without peft."""
    _torch()
    from pyedge.export.adapter_files import read_adapter_folder
    ad = read_adapter_folder(adapters_dir)
    check_fits_module(model, ad)
    return _merge_files(model, ad)


def _merge_files(model, ad):
    """merge_into for a validated folder: every delta is computed before any weight changes."""
    torch = _torch()
    from pyedge.export.adapter_files import AdapterError, module_scaling
    init = ad.config.get("init_lora_weights", True)
    if ad.config.get("use_dora") or init in ("pissa", "olora"):
        raise AdapterError(f"{ad.config_path}: merging use_dora / init_lora_weights={init!r} "
                           "adapters needs peft (use_peft=True) or `pyedge merge` on the ONNX "
                           "file; the no-peft merge knows plain LoRA only")
    state = model.state_dict(keep_vars=True)
    updates = []
    with torch.no_grad():
        for module_name, ab in ad.lora.items():
            mod = model.get_submodule(module_name)
            A = torch.from_numpy(ab["A"]).to(torch.float64)
            B = torch.from_numpy(ab["B"]).to(torch.float64)
            _, scale = module_scaling(ad.config, module_name)
            W = mod.weight
            if W.dim() == 2:
                delta = B @ A
                if type(mod).__name__ == "Conv1D":  # transformers: weight [in, out]
                    delta = delta.T
            else:  # ConvNd: A [r, in, *k], B [out, r, 1...]
                delta = torch.einsum("or,ri...->oi...", B.flatten(1), A)
            updates.append((W, (scale * delta).to(W.dtype), True))
        for name, arr in ad.whole.items():
            t = state[name]
            updates.append((t, torch.from_numpy(arr).to(t.dtype), False))
        for t, value, add in updates:
            if add:
                t.add_(value)
            else:
                t.data.copy_(value)
    return model
