"""Hugging Face model folders -> a pyedge model folder; wrapper modules unwrapped (workstation).

    pyedge export --hf DIR --task causal-lm -o OUTDIR
    pyedge.torch.export_hf(DIR, "causal-lm", OUTDIR)

DIR is what ``save_pretrained`` writes (config.json, model.safetensors, tokenizer files).
OUTDIR receives ``model.onnx`` (inputs ``input_ids``, ``attention_mask`` and, for
causal-lm, ``position_ids`` [batch, seq]; output ``logits``), the tokenizer files (tokenizer.json, tokenizer_config.json with its chat
template, chat_template.jinja, special_tokens_map.json, ...) and config.json, so the device
finds the tokenizer next to the model (pyedge/text_data.py).

Why unwrapping: exporting needs a module whose forward returns the logits tensor, and the
natural way to get one is a wrapper (``self.m = model``). Every recorded parameter name then
starts with ``m.``, and PEFT cannot load the adapters onto the plain ``PreTrainedModel``.
`unwrap_exported` rewrites the file's parameter map so that names are relative to the
``PreTrainedModel`` a pure wrapper holds (every parameter and buffer lies inside it);
`pyedge.torch.export` and `pyedge export` apply it to every export, so a user's own wrapper
behaves the same. A model with parameters of its own (a custom head around a PreTrainedModel)
keeps its names: its adapters belong to the whole model. The ONNX tensors keep their names: only
the map (``pyedge.param_map``, ``pyedge.extra_state``) and the class/base-path metadata change,
and ``pyedge.module_prefix`` records what was stripped.

Extra metadata for the device: ``pyedge.task`` (causal-lm | seq-cls), ``pyedge.vocab_size``
and ``pyedge.max_positions`` (from config.json), used to check a tokenizer and to report
truncation.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

TASKS = {
    # task -> (transformers auto class, PEFT task type)
    "causal-lm": ("AutoModelForCausalLM", "CAUSAL_LM"),
    "seq-cls": ("AutoModelForSequenceClassification", "SEQ_CLS"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json",
                   "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt")
CONFIG_FILES = ("config.json", "generation_config.json")
MODULE_PREFIX_KEY = "pyedge.module_prefix"
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


class HFExportError(ValueError):
    """The model folder or task cannot be exported (one line)."""


# --------------------------------------------------------------------------------------------
# wrappers
# --------------------------------------------------------------------------------------------
def _is_pretrained(mod) -> bool:
    # Duck-typed so this never imports transformers itself.
    return any(c.__name__ == "PreTrainedModel" for c in type(mod).__mro__)


def find_base_model(module) -> tuple[str, object] | None:
    """(attribute prefix, module) of the PreTrainedModel that `module` merely wraps: `module`
    itself ("", module) when it is one, else the outermost PreTrainedModel inside it that holds
    every parameter and buffer (a pure wrapper such as ``self.m = model``). None otherwise: a
    model with parameters of its own around a PreTrainedModel (a custom head) keeps its names,
    since the adapters then belong to the whole model."""
    if _is_pretrained(module):
        return "", module
    for name, sub in module.named_modules():
        if name and _is_pretrained(sub):
            owned = [n for n, _ in module.named_parameters()] + \
                [n for n, _ in module.named_buffers()]
            if all(n.startswith(name + ".") for n in owned):
                return name, sub
            return None
    return None


def _strip(name: str, prefix: str) -> str | None:
    return name[len(prefix) + 1:] if name.startswith(prefix + ".") else None


def strip_param_map(param_map: dict, extra: dict, prefix: str) -> tuple[dict, dict, list]:
    """Map and extra state with `prefix.` removed from module names; entries outside the
    prefix (the wrapper's own parameters) are kept as they are and returned as a list."""
    outside = []
    pm = {}
    for onnx_name, e in param_map.items():
        e = dict(e)
        full = f"{e['module']}.{e['param']}" if e.get("module") else e["param"]
        if e.get("module") == prefix:
            e["module"] = ""  # a parameter of the base model itself
        elif e.get("module") and _strip(e["module"], prefix) is not None:
            e["module"] = _strip(e["module"], prefix)
        else:
            outside.append(full)
        if e.get("aliases"):
            e["aliases"] = [_strip(a, prefix) or a for a in e["aliases"]]
        pm[onnx_name] = e
    ex = {(_strip(k, prefix) or k): v for k, v in extra.items()}
    return pm, ex, outside


def unwrap_exported(path, module, extra_meta: dict | None = None) -> str:
    """Rewrites the parameter map of the ONNX file `path` (exported from `module`) relative to
    the PreTrainedModel inside a wrapper; adds `extra_meta`. No-op without a wrapper and extra
    metadata. Returns the prefix stripped ("" for none)."""
    import onnx

    from pyedge.checkpoint import atomic_write
    from pyedge.export.torch_export import EXTRA_STATE_KEY, PARAM_MAP_KEY

    found = find_base_model(module)
    prefix = found[0] if found else ""
    if not prefix and not extra_meta:
        return ""
    # External data stays where it is: only the metadata of the proto changes.
    proto = onnx.load(os.fspath(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    new = dict(extra_meta or {})
    if prefix:
        pm, ex, outside = strip_param_map(json.loads(meta.get(PARAM_MAP_KEY, "{}")),
                                          json.loads(meta.get(EXTRA_STATE_KEY, "{}")), prefix)
        if outside:  # not expected: find_base_model saw every parameter under the prefix
            warnings.warn(f"names outside '{prefix}' kept as they are: {', '.join(outside[:4])}",
                          stacklevel=3)
        base = found[1]
        new[PARAM_MAP_KEY] = json.dumps(pm, sort_keys=True)
        new[EXTRA_STATE_KEY] = json.dumps(ex, sort_keys=True)
        new[MODULE_PREFIX_KEY] = prefix
        new["pyedge.torch_class"] = f"{type(base).__module__}.{type(base).__qualname__}"
        name = getattr(getattr(base, "config", None), "_name_or_path", None)
        if name and "pyedge.base_model_name_or_path" not in new \
                and "pyedge.base_model_name_or_path" not in meta:
            new["pyedge.base_model_name_or_path"] = name
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in new.items():
        if k in existing:
            existing[k].value = str(v)
        else:
            proto.metadata_props.add(key=k, value=str(v))
    atomic_write(os.fspath(path), proto.SerializeToString())
    return prefix


def adapter_target(model, adapters_dir=None):
    """(module PEFT should load pyedge's adapters onto, prefix): the PreTrainedModel inside a
    wrapper, since the adapters' keys are relative to it -- unless the folder's keys carry the
    wrapper's prefix (a file exported before unwrapping existed)."""
    found = find_base_model(model)
    if found is None or not found[0]:
        return model, ""
    if adapters_dir is not None:
        from pyedge.export.peft import PREFIX, read_adapters
        try:
            _, tensors = read_adapters(adapters_dir)
        except Exception:  # noqa: BLE001 - the loader itself reports a bad folder
            tensors = {}
        if any(k.startswith(f"{PREFIX}{found[0]}.") for k in tensors):
            return model, ""
    return found[1], found[0]


# --------------------------------------------------------------------------------------------
# Hugging Face folders
# --------------------------------------------------------------------------------------------
def _logits_module(model, task):
    import torch

    class Logits(torch.nn.Module):
        """forward(input_ids, attention_mask[, position_ids]) -> logits; unwrapped by
        `unwrap_exported`."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids=None):
            kw = {"use_cache": False} if task == "causal-lm" else {}
            if position_ids is not None:
                kw["position_ids"] = position_ids
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          return_dict=True, **kw).logits

    return Logits(model)


def read_config(model_dir) -> dict:
    p = os.path.join(os.fspath(model_dir), "config.json")
    if not os.path.isfile(p):
        raise HFExportError(f"{model_dir}: no config.json (expected a folder written by "
                            "save_pretrained)")
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise HFExportError(f"{p}: unreadable ({e})") from None


def max_positions(config: dict) -> int | None:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for src in (config, text):
        for k in POSITION_KEYS:
            v = src.get(k)
            if isinstance(v, int) and v > 0:
                return v
    return None


def export_hf(model_dir, task: str, out_dir, *, exporter: str = "dynamo", opset: int | None = None,
              attn_implementation: str | None = None) -> dict:
    """Exports the model in `model_dir` for `task` to `out_dir`/model.onnx and copies the
    tokenizer and config files; returns {"model": path, "files": [copied names]}."""
    if task not in TASKS:
        raise HFExportError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise HFExportError(f"{model_dir}: no such model folder")
    config = read_config(model_dir)
    import torch
    import transformers

    auto = getattr(transformers, TASKS[task][0])
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = auto.from_pretrained(model_dir, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise HFExportError(f"{model_dir}: transformers cannot load it as {TASKS[task][0]} "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    model.eval()
    vocab = int(getattr(model.config, "vocab_size", 0) or config.get("vocab_size") or 0)
    seq = 8
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(2, min(vocab or 2, 100)), (2, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # a padded row, so the mask path is traced
    dyn = {0: "batch", 1: "seq"}
    inputs = {"input_ids": ids, "attention_mask": mask}
    if task == "causal-lm":
        # positions as an input: generation with a key/value cache (pyedge/kv_cache.py) feeds
        # the true positions of the new tokens, so the rotary angles follow them; training
        # feeds 0..T-1 (pyedge/data.py, text_data.py), what transformers uses without them
        inputs["position_ids"] = torch.arange(seq).expand(ids.shape[0], seq).clone()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), "model.onnx")
    from pyedge.export.torch_export import export_module

    wrapper = _logits_module(model, task)
    with warnings.catch_warnings():
        # rotary embeddings keep inv_freq twice (two equal buffers): harmless, never trained
        warnings.filterwarnings("ignore", message=r".*inv_freq.*")
        export_module(wrapper, inputs, path, input_names=list(inputs), output_names=["logits"],
                      dynamic_axes={**{k: dyn for k in inputs}, "logits": dyn},
                      exporter=exporter, opset=opset, task_type=TASKS[task][1],
                      base_model_name_or_path=model_dir)
    extra = {"pyedge.task": task}
    if vocab:
        extra["pyedge.vocab_size"] = str(vocab)
    pos = max_positions(config)
    if pos:
        extra["pyedge.max_positions"] = str(pos)
    unwrap_exported(path, wrapper, extra)
    copied = []
    for name in TOKENIZER_FILES + CONFIG_FILES:
        src = os.path.join(model_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(os.fspath(out_dir), name))
            copied.append(name)
    if "tokenizer.json" not in copied:
        warnings.warn(f"{model_dir} has no tokenizer.json (a fast tokenizer): the device needs "
                      "one for text data (save it with PreTrainedTokenizerFast.save_pretrained)",
                      stacklevel=2)
    return {"model": path, "files": copied}


__all__ = ["export_hf", "unwrap_exported", "find_base_model", "adapter_target",
           "strip_param_map", "HFExportError", "TASKS"]
