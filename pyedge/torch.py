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
    """
    _torch()
    from pyedge.export.hf_export import adapter_target
    # Adapters of an exported wrapper are relative to the PreTrainedModel inside it.
    outer = model
    model, prefix = adapter_target(model, adapters_dir)
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
            folder = _complete_for_peft(model, str(adapters_dir), tmp)
            pm = PeftModel.from_pretrained(model, folder, is_trainable=is_trainable)
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
    merge_into(model, adapters_dir)
    return outer


def _complete_for_peft(model, folder, tmp):
    """PEFT needs every state_dict key of each modules_to_save module. A file exported by
    someone else may lack some (e.g. an all-zero bias the exporter's optimizer dropped, so
    pyedge never saw it); those tensors were not trained, so their values are the base
    model's: a completed copy of the folder is written to `tmp` and returned (else `folder`)."""
    from pyedge.export.peft import PREFIX, read_adapters, write_adapters

    config, tensors = read_adapters(folder)
    suffixes = list(config.get("modules_to_save") or [])
    if config.get("task_type") in ("SEQ_CLS", "TOKEN_CLS"):
        suffixes += ["classifier", "score"]
    if not suffixes:
        return folder
    state = model.state_dict()
    modules = {n.rpartition(".")[0] for n in state}
    wrapped = {m for m in modules if any(m.endswith(t) for t in suffixes)}
    missing = {n: t for n, t in state.items() if n.rpartition(".")[0] in wrapped
               and PREFIX + n not in tensors}
    if not missing:
        return folder
    warnings.warn(f"the adapters lack {sorted(missing)[:6]} (not in the ONNX file); "
                  "using the base model's values", stacklevel=3)
    for n, t in missing.items():
        tensors[PREFIX + n] = t.detach().cpu().numpy()
    write_adapters(tmp, config, tensors)
    return tmp


def merge_into(model, adapters_dir):
    """W += s·B·A for every LoRA module and modules_to_save copied, without peft."""
    torch = _torch()
    from pyedge.export.peft import check_config, module_scaling, read_adapters, split_keys

    config, tensors = read_adapters(adapters_dir)
    check_config(config, str(adapters_dir))
    lora, whole = split_keys(tensors)
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for module_name, ab in lora.items():
            try:
                mod = model.get_submodule(module_name)
            except AttributeError as e:
                raise KeyError(f"the model has no module '{module_name}'") from e
            A = torch.from_numpy(ab["A"]).to(torch.float64)
            B = torch.from_numpy(ab["B"]).to(torch.float64)
            _, scale = module_scaling(config, module_name)
            W = mod.weight
            if W.dim() == 2:
                delta = B @ A
                if type(mod).__name__ == "Conv1D":  # transformers: weight [in, out]
                    delta = delta.T
            elif W.dim() in (3, 4, 5):  # ConvNd: A [r, in, *k], B [out, r, 1...]
                delta = torch.einsum("or,ri...->oi...", B.flatten(1), A)
            else:
                raise ValueError(f"cannot merge LoRA into '{module_name}' ({type(mod).__name__})")
            if tuple(delta.shape) != tuple(W.shape):
                raise ValueError(f"'{module_name}': LoRA delta {list(delta.shape)} does not fit "
                                 f"the weight {list(W.shape)}")
            W.add_((scale * delta).to(W.dtype))
        for name, arr in whole.items():
            if name not in state:
                raise KeyError(f"the model has no parameter or buffer '{name}'")
            t = state[name]
            src = torch.from_numpy(arr)
            if tuple(src.shape) != tuple(t.shape):
                raise ValueError(f"'{name}': {list(src.shape)} vs the model's {list(t.shape)}")
            t.data.copy_(src.to(t.dtype))
    return model
