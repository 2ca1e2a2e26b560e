"""Adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What `peft.PeftModel.from_pretrained(base_model, dir)` loads (checked against peft 0.21). The
adapter method's tensors and config fields come from its module (pyedge/adapters/<method>.py:
peft_tensors, peft_config, plan_load); this module adds what every method shares:

* ``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]
  (the same layout for nn.Linear and transformers' Conv1D; PEFT transposes the product for
  fan_in_fan_out itself);
* whole trained tensors (PEFT's ``modules_to_save``) as ``base_model.model.<module>.<param>``
  -- PEFT strips the ``modules_to_save.default`` part when it saves -- in the PyTorch layout,
  with every other tensor of that module the graph has (e.g. BatchNorm running statistics),
  because PEFT replaces the whole module;
* the config: peft_type LORA, r, lora_alpha, lora_dropout, use_rslora, fan_in_fan_out,
  target_modules = the exact module names adapted, modules_to_save = the modules whose
  tensors were trained whole, bias "none", task_type and base_model_name_or_path from the
  ONNX metadata (``pyedge.task_type``, ``pyedge.base_model_name_or_path``) when known,
  inference_mode true. Only keys every PEFT >= 0.10 knows are written (unknown keys make PEFT
  warn).

PEFT cannot express "modules_to_save only" (a LoRA config must target a module), so a
session that trains whole tensors only is saved with a rank-1 LoRA whose A and B are zero on
one other linear module: an exact no-op that makes the folder loadable; `load_adapters`
accepts it back.

Only numpy, json and safetensors are used (no torch, no pickle): this runs on the device.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np

from pyedge.checkpoint import atomic_write
# Reading and checking a folder lives in adapter_files (one place for every reader); these
# names stay importable from here.
from pyedge.export.adapter_files import (CONFIG_NAME, PREFIX, WEIGHTS_NAME,  # noqa: F401
                                         AdapterError, AdapterFiles, check_config, module_scaling,
                                         q, read_adapter_folder, split_keys)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def write_adapters(folder, config: dict, tensors: dict[str, np.ndarray]) -> str:
    """Writes the two files atomically (weights first, then the config); returns `folder`."""
    from safetensors.numpy import save

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    # np.array, not np.ascontiguousarray: the latter turns 0-d arrays into 1-d ones
    arrays = {k: np.array(v, dtype=np.float32 if v.dtype.kind == "f" else v.dtype, order="C")
              for k, v in sorted(tensors.items())}
    atomic_write(os.path.join(folder, WEIGHTS_NAME), save(arrays, metadata={"format": "pt"}))
    atomic_write(os.path.join(folder, CONFIG_NAME),
                 (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder


def read_adapters(folder) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, {key: array}) from a PEFT adapter folder, validated (adapter_files)."""
    ad = read_adapter_folder(folder)
    return ad.config, ad.tensors


# --------------------------------------------------------------------------------------------
# key helpers
# --------------------------------------------------------------------------------------------
def torch_name(entry: dict | None, onnx_name: str) -> str:
    if not entry:
        return onnx_name
    return f"{entry['module']}.{entry['param']}" if entry.get("module") else entry["param"]


def torch_names_to_onnx(param_map: dict[str, dict], initializers) -> dict[str, tuple[str, dict]]:
    """{PyTorch name (incl. aliases): (ONNX initializer, map entry)}; ONNX names map to
    themselves when the map has no entry."""
    out: dict[str, tuple[str, dict]] = {}
    for name in initializers:
        e = param_map.get(name)
        out.setdefault(name, (name, e or {}))
        if e:
            out[torch_name(e, name)] = (name, e)
            for alias in e.get("aliases", ()):
                out.setdefault(alias, (name, e))
    return out


def to_torch_layout(arr: np.ndarray, entry: dict | None) -> np.ndarray:
    return np.ascontiguousarray(arr.T) if entry and entry.get("transposed") else arr


def to_onnx_layout(arr: np.ndarray, entry: dict | None) -> np.ndarray:
    return np.ascontiguousarray(arr.T) if entry and entry.get("transposed") else arr


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------
def adapter_state(session) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config, tensors) for the session's current adapters (copies)."""
    graph = session.base_graph
    params = session.trainable_parameters()
    cfg, method = session.adapter_config, session.adapter_method
    sites = session.adapter_sites
    for site in sites:
        if site.weight not in graph.param_map:
            raise AdapterError(
                f"the {method.name} site on '{site.weight}' has no PyTorch module name (the "
                "file keeps no parameter names there), so PEFT could not load it; export the "
                "model with pyedge.torch.export")
    # keys are below base_model.model., except a method's model-level ones (VeRA's base_model.vera_A)
    tensors: dict[str, np.ndarray] = {
        (k if k.startswith("base_model.") else PREFIX + k): v
        for k, v in (method.peft_tensors(sites, params) if method else {}).items()}
    target_modules: list[str] = [s.module for s in sites]

    # whole tensors -> modules_to_save (all tensors of those modules, in PyTorch layout)
    modules_to_save: list[str] = []
    trained = set(session.whole_tensors)
    for name in session.whole_tensors:
        entry = graph.param_map.get(name)
        if not entry or not entry.get("module"):
            raise AdapterError(
                f"trained tensor '{name}' has no PyTorch module name, so PEFT cannot load it; "
                "export the model with pyedge.torch.export (or keep parameter names)")
        if entry["module"] not in modules_to_save:
            modules_to_save.append(entry["module"])
    # PEFT wraps every module whose name *ends with* a modules_to_save entry (plain string
    # suffix), plus classifier/score for SEQ_CLS/TOKEN_CLS, and then needs all their tensors.
    task_type = graph.metadata.get("pyedge.task_type") or None
    suffixes = modules_to_save + (["classifier", "score"] if task_type in
                                  ("SEQ_CLS", "TOKEN_CLS") else [])
    extra = _extra_state(graph, tensors)
    known = {e["module"] for e in graph.param_map.values() if e.get("module")}
    known |= {n.rpartition(".")[0] for n in extra}
    wrapped = {m for m in known if any(m.endswith(t) for t in suffixes)}
    for name, arr in graph.initializers.items():
        entry = graph.param_map.get(name)
        if not entry or entry.get("module") not in wrapped or arr.dtype.kind != "f":
            continue
        value = params[name] if name in trained else arr
        tensors[PREFIX + torch_name(entry, name)] = np.array(to_torch_layout(value, entry),
                                                             dtype=np.float32)
    for name, e in extra.items():
        module = name.rpartition(".")[0]
        if module not in wrapped or PREFIX + name in tensors:
            continue
        if e.get("value") is None:
            raise AdapterError(
                f"PEFT needs '{name}' to load modules_to_save '{module}', but the ONNX file "
                "has neither the tensor nor its value (too large for the metadata); train "
                "this module's tensors through LoRA or a smaller module instead")
        tensors[PREFIX + name] = np.asarray(e["value"], dtype=e["dtype"]).reshape(e["shape"])

    if "pyedge.param_map" not in graph.metadata:
        no_bias = sorted(m for m in wrapped
                         if any(e.get("module") == m and e.get("param") == "weight"
                                and e.get("kind") in ("linear", "conv") for e in
                                graph.param_map.values())
                         and not any(e.get("module") == m and e.get("param") == "bias"
                                     for e in graph.param_map.values()))
        if no_bias:
            warnings.warn(
                f"the ONNX file has no bias for {no_bias[:5]} (not exported by pyedge: an "
                "exporter may drop a zero bias); if the PyTorch module has one, PEFT needs it: "
                "load with pyedge.torch.load_adapters, which fills it from the base model",
                stacklevel=3)

    if not target_modules:
        if not modules_to_save:
            raise AdapterError("the session trains nothing that can be saved")
        from pyedge.adapters.base import method_by_name
        from pyedge.adapters.lora import LoraConfig
        method, cfg = method_by_name("lora"), LoraConfig(r=1, alpha=1.0)
        target_modules, fan_in_fan_out = _noop_lora(graph, wrapped, tensors)
    method_fields = method.peft_config(cfg, sites)
    if method.peft_type == "LORA":
        if not sites:
            method_fields["fan_in_fan_out"] = bool(fan_in_fan_out)
        _zero_lora_for_suffix_matches(graph, target_modules, int(cfg.r), tensors, method)
    config = {
        "peft_type": method.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": graph.metadata.get("pyedge.base_model_name_or_path") or None,
        "revision": None,
        "inference_mode": True,
        **method_fields,
        "target_modules": target_modules,
        "modules_to_save": modules_to_save or None,
    }
    return config, tensors


def _extra_state(graph, tensors) -> dict[str, dict]:
    """state_dict entries the graph has no tensor for (PEFT needs them for modules_to_save):
    the exporter's ``pyedge.extra_state``, or, for files from other exporters, BatchNorm's
    num_batches_tracked = 0 next to each running_mean."""
    raw = graph.metadata.get("pyedge.extra_state")
    if raw:
        try:
            return json.loads(raw)
        except ValueError:
            pass
    extra = {}
    for name in graph.initializers:
        e = graph.param_map.get(name)
        tname = torch_name(e, name)
        if tname.endswith(".running_mean"):
            nbt = tname[:-len("running_mean")] + "num_batches_tracked"
            extra[nbt] = {"dtype": "int64", "shape": [], "value": [0]}
    return extra


def _linear_dims(graph, module) -> tuple[int, int] | None:
    """(in, out) of a linear/Conv1D module from its weight in the graph."""
    for name, arr in graph.initializers.items():
        e = graph.param_map.get(name)
        q = (e or {}).get("quantized")
        if e and e.get("module") == module and q and "K" in q:  # packed: from its attributes
            return int(q["K"]), int(q["N"])
        if e and e.get("module") == module and e.get("param") == "weight" and arr.ndim == 2:
            w = arr.T if e.get("transposed") else arr  # PyTorch layout
            if e.get("kind") == "conv1d_fan_in_fan_out":
                return int(w.shape[0]), int(w.shape[1])
            return int(w.shape[1]), int(w.shape[0])
    return None


def _zero_lora_for_suffix_matches(graph, target_modules, r, tensors, method):
    """PEFT adapts every module equal to or ending in '.'+target; modules that match a saved
    full name by accident get an exact zero adapter so that no key is missing."""
    linear = {e["module"] for e in graph.param_map.values()
              if e.get("module") and e.get("kind") in ("linear", "conv1d_fan_in_fan_out")}
    for m in sorted(linear - set(target_modules)):
        if any(m.endswith("." + t) for t in target_modules):
            dims = _linear_dims(graph, m)
            if dims:
                tensors.update({PREFIX + k: v for k, v in
                                method.noop_tensors(graph, m, dims[0], dims[1], r).items()})


def _noop_lora(graph, wrapped, tensors):
    """A zero rank-1 LoRA on one linear module outside modules_to_save (see module doc)."""
    for name, arr in graph.initializers.items():
        e = graph.param_map.get(name)
        q = (e or {}).get("quantized") or {}
        if not e or e.get("param") != "weight" or (arr.ndim != 2 and "K" not in q) or \
                e.get("kind") not in ("linear", "conv1d_fan_in_fan_out"):
            continue
        mod = e["module"]
        if any(mod == m or mod.startswith(m + ".") or m.startswith(mod + ".")
               for m in wrapped):
            continue
        fifo = e["kind"] == "conv1d_fan_in_fan_out"
        if "K" in q:  # a packed weight: its sizes are attributes
            n_in, n_out = int(q["K"]), int(q["N"])
        else:
            w = arr.T if e.get("transposed") else arr  # PyTorch layout
            n_in, n_out = (w.shape[0], w.shape[1]) if fifo else (w.shape[1], w.shape[0])
        tensors[f"{PREFIX}{mod}.lora_A.weight"] = np.zeros((1, n_in), np.float32)
        tensors[f"{PREFIX}{mod}.lora_B.weight"] = np.zeros((n_out, 1), np.float32)
        return [mod], fifo
    raise AdapterError("PEFT needs at least one LoRA target, and the model has no linear "
                       "module outside the trained ones to put a no-op adapter on; add LoRA")


def save_adapters(session, folder) -> str:
    """Writes the session's adapters to `folder` in PEFT's format; returns the folder."""
    config, tensors = adapter_state(session)
    return write_adapters(folder, config, tensors)


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------
def load_adapters(session, folder, strict: bool = True) -> dict:
    """Copies adapters from a PEFT folder into the session's trainable tensors.

    LoRA A/B go to the session's LoRA sites (same layout in both); whole tensors
    (modules_to_save) go to the session's whole trainable tensors, transposed back when the
    ONNX tensor is the transpose of the PyTorch one. Raises AdapterError for a LoRA module the
    session does not adapt or vice versa, a trained tensor missing from the folder, a tensor of
    another shape, a different r/alpha/rsLoRA, or a module tensor that changed but is frozen in
    the session. With strict=False, missing entries keep their current values and unknown
    ones are skipped (shape and scaling checks stay). Returns {"loaded": [...], "skipped":
    [...]} (ONNX initializer names / adapter keys).

    The folder is checked whole (adapter_files.read_adapter_folder), then against the session
    (plan_session_load), and only then written: a failed load leaves the session as it was.
    """
    return load_adapter_files(session, read_adapter_folder(folder), strict)


def load_adapter_files(session, ad: AdapterFiles, strict: bool = True) -> dict:
    """load_adapters for an already read folder."""
    writes, loaded, skipped = plan_session_load(session, ad, strict)
    params = session.trainable_parameters()
    for init, value in writes.items():
        params[init][...] = value
    return {"loaded": loaded, "skipped": skipped}


def plan_session_load(session, ad: AdapterFiles, strict: bool = True
                      ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """({trainable tensor: new value}, loaded, skipped) for loading `ad` into `session`;
    AdapterError (one line naming the file and tensors) when the folder does not fit. Nothing
    is written here."""
    config, whole, shown = ad.config, ad.whole, ad.weights_path
    graph = session.base_graph

    # ---- the adapter method's tensors (pyedge/adapters/<method>.py)
    from pyedge.adapters.base import method_for_peft
    method = session.adapter_method
    folder_method = method_for_peft(config, ad.config_path)
    if method is not None and folder_method is not method:
        raise AdapterError(f"{ad.config_path}: the adapters are {folder_method.name}, the session "
                           f"trains {method.name}; create the session with the folder's config")
    writes, loaded, skipped, problems = (method or folder_method).plan_load(session, ad, strict)

    # ---- whole tensors (modules_to_save)
    name_map = torch_names_to_onnx(graph.param_map, graph.initializers)
    trained = set(session.whole_tensors)
    seen: set[str] = set()
    for tname, arr in whole.items():
        key = q(ad.key_of(tname))
        hit = name_map.get(tname)
        if hit is None:
            if arr.dtype.kind != "f" or arr.ndim == 0:
                skipped.append(tname)  # e.g. BatchNorm's num_batches_tracked
            elif strict:
                problems.append(f"{key} matches no tensor of the model")
            else:
                skipped.append(tname)
            continue
        init, entry = hit
        value = to_onnx_layout(arr, entry)
        base = graph.initializers[init]
        if tuple(value.shape) != tuple(base.shape):
            problems.append(f"{key} has shape {list(arr.shape)}, the model's "
                            f"{'(transposed) ' if entry.get('transposed') else ''}tensor "
                            f"{q(init)} is {list(base.shape)}")
            continue
        if base.dtype.kind == "f" and value.dtype.kind != "f":
            problems.append(f"{key} is {value.dtype}, the model's tensor {q(init)} is "
                            f"{base.dtype}")
            continue
        if init in trained:
            writes[init] = value
            loaded.append(init)
            seen.add(init)
        elif not np.array_equal(value.astype(base.dtype), base):
            is_buffer = entry.get("buffer") or tname.endswith(("running_mean", "running_var"))
            if strict and is_buffer:
                problems.append(f"{key} is a buffer (running statistics) that changed in "
                                "training; pyedge keeps buffers frozen: fine-tune with the "
                                "module in eval mode, or merge the adapters in PyTorch")
            elif strict:
                problems.append(f"{key} differs from the model's tensor but the session "
                                "does not train it (add it to train=[...])")
            else:
                skipped.append(tname)
        else:
            skipped.append(tname)  # unchanged frozen tensor of a saved module
    missing = [n for n in session.whole_tensors if n not in seen]
    if missing and strict:
        problems.append("trained tensors missing from the adapters: " + ", ".join(
            torch_name(graph.param_map.get(n), n) for n in missing[:10]))
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise AdapterError(f"{shown} does not fit the session: " + "; ".join(problems[:3]) +
                           more)
    return writes, loaded, skipped
