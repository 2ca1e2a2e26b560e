"""Adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What `peft.PeftModel.from_pretrained(base_model, dir)` loads (checked against peft 0.21):

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
import re
import warnings

import numpy as np

from pyedge.checkpoint import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterError(ValueError):
    """The adapter folder does not fit the model/session (missing, extra or mis-shaped)."""


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
    """(config, {key: array}) from a PEFT adapter folder; safetensors and JSON only."""
    from safetensors.numpy import load_file

    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    w_path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{folder}: no {CONFIG_NAME}")
    if not os.path.isfile(w_path):
        other = [f for f in ("adapter_model.bin", "adapter_model.pt") if
                 os.path.exists(os.path.join(folder, f))]
        hint = f" ({other[0]} is a pickle file and is never loaded; re-save with " \
               "safe_serialization=True)" if other else ""
        raise AdapterError(f"{folder}: no {WEIGHTS_NAME}{hint}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    try:
        tensors = load_file(w_path)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise AdapterError(f"{w_path}: not a valid safetensors file ({e})") from e
    return config, tensors


# --------------------------------------------------------------------------------------------
# key helpers
# --------------------------------------------------------------------------------------------
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[\w-]+))?\.weight$")


def split_keys(tensors: dict[str, np.ndarray], adapter_name: str = "default"):
    """PEFT keys -> ({module: {"A": arr, "B": arr}}, {torch param name: arr}).

    Accepts both the saved form (``base_model.model.m.lora_A.weight``) and the in-memory one
    (``...lora_A.default.weight``, ``...modules_to_save.default.weight``)."""
    lora: dict[str, dict[str, np.ndarray]] = {}
    whole: dict[str, np.ndarray] = {}
    for key, arr in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _LORA_RE.match(name)
        if m and m.group("adapter") in (None, adapter_name):
            lora.setdefault(m.group("module"), {})[m.group("ab")] = arr
            continue
        if ".lora_" in name:
            raise AdapterError(f"unsupported LoRA tensor '{key}' (DoRA, LoRA bias or embedding "
                               "LoRA are not supported)")
        name = name.replace(f".modules_to_save.{adapter_name}.", ".")
        name = name.replace(".original_module.", ".")
        whole[name] = arr
    return lora, whole


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
    cfg = session.lora_config
    tensors: dict[str, np.ndarray] = {}
    target_modules: list[str] = []
    fan_in_fan_out = False
    for site in session.lora_sites:
        if site.weight not in graph.param_map:
            raise AdapterError(
                f"the LoRA site on '{site.weight}' has no PyTorch module name (the file keeps "
                "no parameter names there), so PEFT could not load it; export the model with "
                "pyedge.torch.export")
        tensors[f"{PREFIX}{site.module}.lora_A.weight"] = np.array(params[site.lora_a])
        tensors[f"{PREFIX}{site.module}.lora_B.weight"] = np.array(params[site.lora_b])
        target_modules.append(site.module)
        fan_in_fan_out |= bool(site.fan_in_fan_out)

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

    r, alpha, dropout, rslora = (cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora) if cfg \
        else (1, 1.0, 0.0, False)
    if not target_modules:
        if not modules_to_save:
            raise AdapterError("the session trains nothing that can be saved")
        target_modules, fan_in_fan_out = _noop_lora(graph, wrapped, tensors)
        r, alpha, dropout, rslora = 1, 1.0, 0.0, False
    _zero_lora_for_suffix_matches(graph, target_modules, int(r), tensors)
    alpha_out = int(alpha) if float(alpha).is_integer() else float(alpha)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": graph.metadata.get("pyedge.base_model_name_or_path") or None,
        "revision": None,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": alpha_out,
        "lora_dropout": float(dropout),
        "use_rslora": bool(rslora),
        "use_dora": False,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "bias": "none",
        "target_modules": target_modules,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
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


def _zero_lora_for_suffix_matches(graph, target_modules, r, tensors):
    """PEFT adapts every module equal to or ending in '.'+target; modules that match a saved
    full name by accident get an exact zero adapter so that no key is missing."""
    linear = {e["module"] for e in graph.param_map.values()
              if e.get("module") and e.get("kind") in ("linear", "conv1d_fan_in_fan_out")}
    for m in sorted(linear - set(target_modules)):
        if any(m.endswith("." + t) for t in target_modules):
            dims = _linear_dims(graph, m)
            if dims:
                tensors[f"{PREFIX}{m}.lora_A.weight"] = np.zeros((r, dims[0]), np.float32)
                tensors[f"{PREFIX}{m}.lora_B.weight"] = np.zeros((dims[1], r), np.float32)


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
def _scaling(r, alpha, rslora):
    return alpha / np.sqrt(r) if rslora else alpha / r


def check_config(config: dict, where: str = "adapters"):
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type is {config.get('peft_type')!r}; pyedge reads "
                           "LORA adapters only")
    if config.get("use_dora"):
        raise AdapterError(f"{where}: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={config['bias']!r} is not supported (use 'none')")
    for k in ("layer_replication",):
        if config.get(k):
            raise AdapterError(f"{where}: {k} is not supported")


def module_scaling(config: dict, module: str) -> tuple[int, float]:
    """(r, scaling) for a module, honouring rank_pattern/alpha_pattern like PEFT."""
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    for pat, v in (config.get("rank_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            r = int(v)
            break
    for pat, v in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            alpha = float(v)
            break
    return r, float(_scaling(r, alpha, bool(config.get("use_rslora", False))))


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
    """
    config, tensors = read_adapters(folder)
    check_config(config, os.fspath(folder))
    lora, whole = split_keys(tensors)
    params = session.trainable_parameters()
    graph = session.base_graph
    loaded: list[str] = []
    skipped: list[str] = []
    problems: list[str] = []

    # ---- LoRA
    sites = {s.module: s for s in session.lora_sites}
    cfg = session.lora_config
    if sites:
        want_scale = float(cfg.scaling)
        for module, ab in lora.items():
            site = sites.get(module)
            if site is None and not any(np.any(a) for a in ab.values()):
                skipped.append(module)  # an exact no-op (see _zero_lora_for_suffix_matches)
                continue
            if site is None:
                msg = f"LoRA for module '{module}' which the session does not adapt " \
                      f"(session targets: {', '.join(sorted(sites)[:8])})"
                (problems if strict else skipped).append(msg if strict else module)
                continue
            r, scale = module_scaling(config, module)
            if r != cfg.r:
                raise AdapterError(f"{folder}: module '{module}' has LoRA rank r={r}, the "
                                   f"session uses r={cfg.r}; create the session with "
                                   f"LoraConfig(r={r}, ...)")
            if not np.isclose(scale, want_scale, rtol=1e-6, atol=0):
                raise AdapterError(
                    f"{folder}: LoRA scaling of '{module}' is {scale:g} (lora_alpha="
                    f"{config.get('lora_alpha')}, r={r}, use_rslora="
                    f"{config.get('use_rslora', False)}), the session's is {want_scale:g} "
                    f"(alpha={cfg.alpha}, r={cfg.r}, use_rslora={cfg.use_rslora})")
            for ab_key, init, shape in (("A", site.lora_a, (cfg.r, site.in_features)),
                                        ("B", site.lora_b, (site.out_features, cfg.r))):
                arr = ab.get(ab_key)
                if arr is None:
                    problems.append(f"'{module}.lora_{ab_key}.weight' is missing")
                    continue
                if tuple(arr.shape) != tuple(params[init].shape):
                    problems.append(f"'{module}.lora_{ab_key}.weight' has shape "
                                    f"{list(arr.shape)}, expected {list(params[init].shape)}")
                    continue
                params[init][...] = arr.astype(np.float32, copy=False)
                loaded.append(init)
        for module in sites:
            if module not in lora:
                if strict:
                    problems.append(f"no LoRA tensors for module '{module}' (the adapters "
                                    f"adapt {', '.join(sorted(lora)[:8]) or 'nothing'})")
                else:
                    skipped.append(module)
    else:
        nonzero = [m for m, ab in lora.items() if any(np.any(a) for a in ab.values())]
        if nonzero and strict:
            problems.append(f"the adapters have LoRA for {', '.join(nonzero[:8])} but the "
                            "session has no LoRA config")
        skipped += sorted(lora)

    # ---- whole tensors (modules_to_save)
    name_map = torch_names_to_onnx(graph.param_map, graph.initializers)
    trained = set(session.whole_tensors)
    seen: set[str] = set()
    for tname, arr in whole.items():
        hit = name_map.get(tname)
        if hit is None:
            if arr.dtype.kind != "f" or arr.ndim == 0:
                skipped.append(tname)  # e.g. BatchNorm's num_batches_tracked
            elif strict:
                problems.append(f"'{tname}' matches no tensor of the model")
            else:
                skipped.append(tname)
            continue
        init, entry = hit
        value = to_onnx_layout(arr, entry)
        base = graph.initializers[init]
        if tuple(value.shape) != tuple(base.shape):
            problems.append(f"'{tname}' has shape {list(arr.shape)}, the model's "
                            f"{'(transposed) ' if entry.get('transposed') else ''}tensor "
                            f"'{init}' is {list(base.shape)}")
            continue
        if init in trained:
            params[init][...] = value.astype(np.float32, copy=False)
            loaded.append(init)
            seen.add(init)
        elif not np.array_equal(value.astype(base.dtype), base):
            is_buffer = entry.get("buffer") or tname.endswith(("running_mean", "running_var"))
            if strict and is_buffer:
                problems.append(f"'{tname}' is a buffer (running statistics) that changed in "
                                "training; pyedge keeps buffers frozen: fine-tune with the "
                                "module in eval mode, or merge the adapters in PyTorch")
            elif strict:
                problems.append(f"'{tname}' differs from the model's tensor but the session "
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
        raise AdapterError(f"{os.fspath(folder)} does not fit the session:\n  - " +
                           "\n  - ".join(problems))
    return {"loaded": loaded, "skipped": skipped}
