"""PyTorch module -> one ONNX file that carries its own parameter map (workstation only;
weights above 1.8 GB go to ``<file>.data`` beside it).

    from pyedge.torch import export
    export(model, {"input_ids": ids}, "model.onnx", dynamic_axes={"input_ids": {0: "b", 1: "s"}})

The file's `metadata_props` hold:

* ``pyedge.param_map``: JSON ``{onnx initializer: {"module", "param", "transposed", "kind"}}``
  (plus ``"aliases"``: other PyTorch names of the same tensor, e.g. a tied ``lm_head.weight``,
  and ``"buffer": true`` for buffers such as BatchNorm running statistics),
  built from the torch module itself: ``module.param`` is the name PEFT and ``state_dict`` use
  (for tied weights the first name ``named_parameters()`` yields, e.g. GPT-2's
  ``transformer.wte.weight``); ``transposed`` says the ONNX tensor is the transpose of the
  PyTorch parameter; ``kind`` is "linear" (nn.Linear), "conv1d_fan_in_fan_out"
  (transformers Conv1D, weight [in, out]), "conv" (nn.ConvNd), "embedding" (nn.Embedding),
  else "other".
* ``pyedge.extra_state``: JSON ``{state_dict name: {"dtype", "shape", "value"}}`` for the
  state entries the graph has no initializer for (BatchNorm's ``num_batches_tracked``, unused
  parameters; values up to 4096 elements), which PEFT's modules_to_save needs.
* ``pyedge.exporter`` ("dynamo" | "torchscript"), ``pyedge.torch_class`` (module.qualname),
  ``pyedge.base_model_name_or_path`` (from ``model.config._name_or_path`` or
  ``model.name_or_path`` when known), ``pyedge.task_type`` (when given).

Exporter settings, chosen so that initializer names stay the PyTorch parameter names:
dynamo with ``optimize=False`` (optimisation renames transposed weights ``val_N``);
TorchScript with ``do_constant_folding=False`` (folding renames them ``onnx::MatMul_N``) and
``keep_initializers_as_inputs=True`` -- the only switch that turns off TorchScript's
deduplication of *identical-valued* initializers (fresh LayerNorm weights, zero biases would
otherwise collapse into one tensor and the map would break); the initializers are then removed
from the graph inputs again, so the file looks like any other export. Initializers whose names
the exporter changed anyway are matched to parameters by value (exactly, or transposed). If one
initializer still stands for several distinct parameters, all their names are recorded
(``aliases``) and a warning is given.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

PARAM_MAP_KEY = "pyedge.param_map"
EXTRA_STATE_KEY = "pyedge.extra_state"
EXTRA_STATE_MAX_VALUES = 4096
DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}
# Above this many bytes of weights an export writes external data (protobuf's hard limit is
# 2 GiB for the whole file; the graph itself needs some room too).
EXTERNAL_DATA_THRESHOLD = int(1.8e9)


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------
def _dynamic_shapes(input_names, dynamic_axes, args=None):
    """dynamic_axes ({name: {axis: label}} or {name: [axes]}) -> dynamo dynamic_shapes.

    A label whose example sizes (in `args`, the inputs in `input_names` order) are all >= 2
    gets ``min=2``. torch specialises sizes 0 and 1, and models that branch on a size of 1
    (transformers' causal mask at seq == 1) leave a ``!= 1`` guard that torch before 2.10
    refuses for an unbounded Dim ("Constraints violated"; 2.10+ refines the range itself and
    retries). The ONNX file keeps no range, so the graph is the same either way."""
    from torch.export import Dim

    labels: dict[str, list] = {}  # label -> [(input index, axis)]
    specs = []
    for i, n in enumerate(input_names):
        axes = (dynamic_axes or {}).get(n, {})
        if isinstance(axes, (list, tuple)):
            axes = {a: f"{n}_{a}" for a in axes}
        specs.append({int(a): str(label) for a, label in axes.items()})
        for a, label in specs[-1].items():
            labels.setdefault(label, []).append((i, a))

    def size(i, a):
        shape = getattr(args[i], "shape", None) if args is not None and i < len(args) else None
        return int(shape[a]) if shape is not None and -len(shape) <= a < len(shape) else None

    dims = {}  # one Dim per label: equal labels are equal sizes
    for label, where in labels.items():
        sizes = [size(i, a) for i, a in where]
        at_least_two = all(s is not None and s >= 2 for s in sizes)
        dims[label] = Dim(label, min=2) if at_least_two else Dim(label)
    return tuple({a: dims[label] for a, label in spec.items()} or None for spec in specs)


def _export_error_text(exc):
    """The messages of `exc` and its causes, joined (torch wraps the ConstraintViolation)."""
    texts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts.append(str(getattr(exc, "msg", "") or exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(texts)


# "Not all values of seq = L['input_ids'].size()[1] in the specified range seq <= 512 satisfy
# the generated guard L['input_ids'].size()[1] != 1." -- torch suggests no fix for it
_NOT_ONE = re.compile(r"Not all values of (\w+) = [^\n]*? in the specified range ([^\n]*?) "
                      r"satisfy the generated guard [^\n]*?!= 1\.")


def _dim_bounds(d):
    lo, hi = getattr(d, "min", None), getattr(d, "max", None)
    return (lo if isinstance(lo, int) else 0), (hi if isinstance(hi, int) else None)


def _tightened(dynamic_shapes, bounds):
    """dynamic_shapes with each plain Dim named in `bounds` ({name: (min, max)}) replaced by
    one with the intersection of its range and that one."""
    from torch.export import Dim

    made = {}

    def tighten(d):
        name = getattr(d, "__name__", None)
        if name not in bounds or not hasattr(d, "min"):
            return d
        if name not in made:
            lo, hi = _dim_bounds(d)
            blo, bhi = bounds[name]
            new = (max(lo, blo), bhi if hi is None else (hi if bhi is None else min(hi, bhi)))
            made[name] = d if new == (lo, hi) else Dim(name, min=new[0], max=new[1])
        return made[name]
    def spec_of(spec):
        return None if spec is None else {a: tighten(d) for a, d in spec.items()}
    if isinstance(dynamic_shapes, dict):  # {input name: spec}
        return {k: spec_of(v) for k, v in dynamic_shapes.items()}
    return type(dynamic_shapes)(spec_of(spec) for spec in dynamic_shapes)


def _ranges(dynamic_shapes):
    """[(input, axis, name, min, max)] of a dynamic_shapes spec (a tuple, list or dict)."""
    items = dynamic_shapes.items() if isinstance(dynamic_shapes, dict) else \
        enumerate(dynamic_shapes)
    return [(k, a, getattr(d, "__name__", d), *_dim_bounds(d))
            for k, spec in items if spec for a, d in sorted(spec.items())]


def _refined(msg, dynamic_shapes):
    """The next dynamic_shapes to try after the export failed with `msg`, or None: torch's
    suggested fixes (ranges only), kept within the ranges already asked for (torch's own
    retry drops a min of 2 when it adds a max), and a min of 2 for an axis whose `!= 1`
    guard torch suggests nothing for."""
    specs = lambda ds: ds.values() if isinstance(ds, dict) else ds  # noqa: E731
    bounds = {}
    for name, rng in _NOT_ONE.findall(msg):
        lo = re.search(r"(\d+) <= " + name, rng)
        hi = re.search(name + r" <= (\d+)", rng)
        bounds[name] = (max(2, int(lo.group(1)) if lo else 0), int(hi.group(1)) if hi else None)
    refined = None
    if "Suggested fixes:" in msg:
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes
        try:
            refined = refine_dynamic_shapes_from_suggested_fixes(msg, dynamic_shapes)
        except Exception:  # a suggestion torch's own parser does not take: bounds alone
            refined = None
        if refined is not None and any(isinstance(d, int) for spec in specs(refined) if spec
                                       for d in spec.values()):
            return None  # it would fix an axis to one size: the file would be static there
    if refined is not None:
        before = {getattr(d, "__name__", None): _dim_bounds(d)
                  for spec in specs(dynamic_shapes) if spec for d in spec.values()}
        dynamic_shapes = _tightened(refined, {n: b for n, b in before.items() if n})
    elif not bounds:
        return None
    return _tightened(dynamic_shapes, bounds)


def export_dynamo(model, args, path, dynamic_shapes=None, **kw):
    """torch.onnx.export(dynamo=True) that takes the ranges torch.export asks of dynamic axes
    and tries again, as torch >= 2.10 does itself: a model's guards need e.g. `seq <= 512`
    (learned positions) and `seq != 1`; torch 2.9 applies one round of its suggested fixes
    (dropping the min of 2 it was given) and fails on the next. Only ranges are taken: a fix
    that fixes an axis to one size would make the file static there, so the error is raised
    instead."""
    import torch

    for attempt in range(4):
        try:
            return torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=dynamic_shapes,
                                     **kw)
        except Exception as e:  # torch's TorchExportError wrapping a ConstraintViolation
            nxt = None if dynamic_shapes is None or attempt == 3 else \
                _refined(_export_error_text(e), dynamic_shapes)
            if nxt is None or _ranges(nxt) == _ranges(dynamic_shapes):  # nothing new to try
                raise
            dynamic_shapes = nxt


def _normalize_inputs(example_inputs, input_names):
    import torch

    if isinstance(example_inputs, Mapping):
        names = list(input_names or example_inputs)
        missing = [n for n in names if n not in example_inputs]
        if missing:
            raise ValueError(f"example_inputs has no entry for input(s) {missing}")
        return tuple(example_inputs[n] for n in names), names
    if isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    else:
        args = tuple(example_inputs)
    names = list(input_names) if input_names else None
    return args, names


def export_module(model, example_inputs, path, input_names: Sequence[str] | None = None,
                  output_names: Sequence[str] | None = None,
                  dynamic_axes: Mapping | None = None, exporter: str = "dynamo",
                  opset: int | None = None, task_type: str | None = None,
                  base_model_name_or_path: str | None = None,
                  external_data: bool | None = None,
                  external_data_threshold: int | None = None) -> str:
    """Exports `model` to the ONNX file `path` with pyedge's metadata; returns `path`.

    Weights go into the file itself (each aligned to 64 bytes, so pyedge uses them in place
    from a memory map), or, when `external_data` is True or None and they exceed
    `external_data_threshold` bytes (default EXTERNAL_DATA_THRESHOLD, 1.8 GB; protobuf files
    cannot pass 2 GB), into `path` + ".data"
    beside it. Nothing but those two files is left in the folder, also when the export fails.

    example_inputs: a tensor, a tuple of tensors (positional forward arguments) or a dict
    {input name: tensor} in forward-argument order (its keys become the input names).
    dynamic_axes: ``{input/output name: {axis: label}}`` (torch.onnx's format; for dynamo it is
    converted to ``dynamic_shapes``, equal labels meaning equal sizes, starting at 2 where the
    examples allow; the ranges torch.export then asks for, e.g. ``seq <= 512``, are taken and
    the export retried, so torch 2.9 exports what 2.10+ does).
    exporter: "dynamo" (default opset 18) or "torchscript" (default opset 17).
    task_type: a PEFT task type ("SEQ_CLS", "CAUSAL_LM", ...) written to the adapters later.
    """
    import onnx
    import torch

    if exporter not in DEFAULT_OPSET:
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', not {exporter!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    opset = opset or DEFAULT_OPSET[exporter]
    args, names = _normalize_inputs(example_inputs, input_names)
    if names is None:
        names = _forward_arg_names(model, len(args))
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # each submodule's own mode, restored after: model.train(flag) would set them all alike
    # (an eval-mode encoder inside a training-mode wrapper would come back with dropout on)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    # The exporter writes its file (and, for large models, its own external data files)
    # into a private folder that goes away whatever happens.
    tmp_dir = tempfile.mkdtemp(dir=folder, prefix=".pyedge-export-")
    tmp = os.path.join(tmp_dir, "model.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                dyn = _dynamic_shapes(names or [f"input_{i}" for i in range(len(args))],
                                      dynamic_axes, args) if dynamic_axes else None
                export_dynamo(model, args, tmp, dynamic_shapes=dyn, input_names=names,
                              output_names=list(output_names) if output_names else None,
                              opset_version=opset, optimize=False, external_data=True,
                              verbose=False)
            else:
                torch.onnx.export(model, args, tmp, input_names=names,
                                  output_names=list(output_names) if output_names else None,
                                  opset_version=opset, dynamo=False, do_constant_folding=False,
                                  keep_initializers_as_inputs=True,
                                  dynamic_axes=dict(dynamic_axes) if dynamic_axes else None)
        proto = onnx.load(tmp)  # with its external data, if the exporter wrote any
    finally:
        import shutil
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for m, training in modes:
            m.training = training
    if len(proto.functions):
        from onnx import inliner
        proto = inliner.inline_local_functions(proto)
    # keep_initializers_as_inputs: take the weights out of the graph inputs again
    init_names = {t.name for t in proto.graph.initializer}
    kept = [v for v in proto.graph.input if v.name not in init_names]
    if len(kept) != len(proto.graph.input):
        del proto.graph.input[:]
        proto.graph.input.extend(kept)

    param_map = build_param_map(model, proto)
    meta = {PARAM_MAP_KEY: json.dumps(param_map, sort_keys=True),
            EXTRA_STATE_KEY: json.dumps(extra_state(model, param_map), sort_keys=True),
            "pyedge.exporter": exporter,
            "pyedge.torch_class": f"{type(model).__module__}.{type(model).__qualname__}"}
    base = base_model_name_or_path or _name_or_path(model)
    if base:
        meta["pyedge.base_model_name_or_path"] = base
    if task_type:
        meta["pyedge.task_type"] = str(task_type)
    existing = {p.key: p for p in proto.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            proto.metadata_props.add(key=k, value=v)
    if external_data is None:
        from pyedge.onnx_wire import initializer_bytes
        limit = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None \
            else external_data_threshold
        external_data = initializer_bytes(proto) > limit
    _save_atomic(proto, path, external_data)
    return path


def _forward_arg_names(model, n):
    """Names of the first n positional parameters of model.forward (None if unclear)."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:n] if len(names) >= n else None


def _name_or_path(model) -> str | None:
    cfg = getattr(model, "config", None)
    for v in (getattr(cfg, "_name_or_path", None), getattr(model, "name_or_path", None)):
        if isinstance(v, str) and v:
            return v
    return None


def _save_atomic(proto, path, external_data: bool = False):
    import onnx

    from pyedge.onnx_wire import save_aligned, save_external
    if external_data:
        save_external(proto, path)
    else:
        save_aligned(proto, path)
    onnx.checker.check_model(path)


# --------------------------------------------------------------------------------------------
# parameter map
# --------------------------------------------------------------------------------------------
def module_kind(mod) -> str:
    import torch.nn as nn

    if isinstance(mod, nn.Linear):
        return "linear"
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # transformers.pytorch_utils
        return "conv1d_fan_in_fan_out"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    return "other"


def extra_state(model, param_map) -> dict[str, dict]:
    """state_dict entries with no ONNX initializer (e.g. BatchNorm's num_batches_tracked):
    {name: {"dtype", "shape", "value" (flat list, or None above EXTRA_STATE_MAX_VALUES)}}.

    PEFT's modules_to_save needs every state_dict key of a saved module, so the adapters
    must carry them even though the graph does not."""
    in_graph = set()
    for e in param_map.values():
        in_graph.add(f"{e['module']}.{e['param']}" if e["module"] else e["param"])
        in_graph.update(e.get("aliases", ()))
    out = {}
    for name, t in model.state_dict(keep_vars=False).items():
        if name in in_graph:
            continue
        a = t.detach().cpu().numpy()
        out[name] = {"dtype": a.dtype.name, "shape": list(a.shape),
                     "value": a.reshape(-1).tolist() if a.size <= EXTRA_STATE_MAX_VALUES
                     else None}
    return out


def _digest(arr) -> str:
    import numpy as np

    a = np.ascontiguousarray(arr)
    return hashlib.sha1(a.tobytes()).hexdigest() + str(a.shape) + a.dtype.str


def build_param_map(model, proto) -> dict[str, dict]:
    """{ONNX initializer: {"module", "param", "transposed", "kind"[, "aliases"]}} for every
    initializer that is a parameter or buffer of `model` (by name, else by value)."""
    from onnx import numpy_helper

    modules = dict(model.named_modules(remove_duplicate=False))
    # tensor identity -> all of its names, first the one named_parameters()/buffers() yields
    groups: dict[int, list[str]] = {}
    tensors: dict[int, Any] = {}
    buffers: set[int] = set()
    for n, t in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(t), []).append(n)
        tensors[id(t)] = t
    for n, t in model.named_buffers(remove_duplicate=False):
        groups.setdefault(id(t), []).append(n)
        tensors[id(t)] = t
        buffers.add(id(t))
    by_name = {n: k for k, names in groups.items() for n in names}

    def entry(key, transposed, extra_keys=()):
        names = list(groups[key])
        for k in extra_keys:
            names += [n for n in groups[k] if n not in names]
        canon = names[0]
        module, _, param = canon.rpartition(".")
        e = {"module": module, "param": param, "transposed": bool(transposed),
             "kind": module_kind(modules.get(module)) if module in modules else "other"}
        if len(names) > 1:
            e["aliases"] = names[1:]
        if key in buffers:
            e["buffer"] = True  # running statistics etc.: never trained
        return e

    result: dict[str, dict] = {}
    claimed: set[int] = set()
    unnamed = []
    for init in proto.graph.initializer:
        key = by_name.get(init.name)
        if key is not None:
            result[init.name] = entry(key, False)
            claimed.add(key)
        else:
            unnamed.append(init)
    # Initializers the exporter renamed (or deduplicated): match by value.
    values: dict[str, list[tuple[int, bool]]] = {}
    for key, t in tensors.items():
        if not t.dtype.is_floating_point or t.numel() == 0:
            continue
        a = t.detach().cpu().numpy()
        values.setdefault(_digest(a), []).append((key, False))
        if a.ndim == 2 and a.shape[0] != a.shape[1]:
            values.setdefault(_digest(a.T), []).append((key, True))
    dedup_warned = []
    for init in unnamed:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind != "f" or arr.size < 2:
            continue
        hits = values.get(_digest(arr), [])
        if not hits:
            continue
        free = [h for h in hits if h[0] not in claimed] or hits
        if len(free) > 1 and arr.size > 1:
            # One ONNX tensor, several distinct parameters with identical values.
            keys = [k for k, _ in free]
            result[init.name] = entry(keys[0], free[0][1], keys[1:])
            dedup_warned.append(init.name)
        else:
            result[init.name] = entry(free[0][0], free[0][1])
        claimed.update(k for k, _ in free)
    # Parameters with no initializer of their own whose value equals a named initializer's:
    # the exporter merged them into it (TorchScript's deduplication, if it ran anyway).
    digest_of_init = {}
    for init in proto.graph.initializer:
        key = by_name.get(init.name)
        if key is not None and init.name in result and tensors[key].dtype.is_floating_point \
                and tensors[key].numel() > 1:
            digest_of_init.setdefault(_digest(tensors[key].detach().cpu().numpy()), init.name)
    for key, t in tensors.items():
        if key in claimed or not t.dtype.is_floating_point or t.numel() < 2:
            continue
        name = digest_of_init.get(_digest(t.detach().cpu().numpy()))
        if name is None:
            continue
        e = result[name]
        e.setdefault("aliases", [])
        e["aliases"] += [n for n in groups[key] if n not in e["aliases"]]
        claimed.add(key)
        if name not in dedup_warned:
            dedup_warned.append(name)
    if dedup_warned:
        warnings.warn("the exporter merged identical-valued parameters into one initializer "
                      f"({', '.join(dedup_warned[:5])}); all their names are recorded as "
                      "aliases, but training such a tensor trains all of them together",
                      stacklevel=3)
    return result


# --------------------------------------------------------------------------------------------
# factories for the CLI
# --------------------------------------------------------------------------------------------
class FactorySpec(NamedTuple):
    module: Any
    example_inputs: Any
    input_names: list | None = None
    output_names: list | None = None
    dynamic_axes: dict | None = None


def load_factory_spec(spec: str, **kwargs) -> FactorySpec:
    """Like `load_factory`, but also returns the optional names and dynamic axes."""
    import importlib
    import importlib.util

    import torch

    if spec.endswith(".py") or os.path.isfile(spec):
        file = os.path.abspath(spec)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{spec}: no such file")
        mod_name = "pyedge_user_model_" + hashlib.sha1(file.encode()).hexdigest()[:8]
        sp = importlib.util.spec_from_file_location(mod_name, file)
        mod = importlib.util.module_from_spec(sp)
        import sys
        sys.path.insert(0, os.path.dirname(file))
        try:
            sp.loader.exec_module(mod)
        finally:
            sys.path.remove(os.path.dirname(file))
        if hasattr(mod, "build"):
            obj = mod.build(**kwargs)
        elif hasattr(mod, "model"):
            obj = mod.model
            if not isinstance(obj, torch.nn.Module) and callable(obj):
                obj = obj(**kwargs)
            ex = getattr(mod, "example_inputs", None)
            if ex is not None and isinstance(obj, torch.nn.Module):
                obj = (obj, ex() if callable(ex) else ex)
        else:
            raise ValueError(f"{spec}: defines neither build() nor model")
    else:
        if ":" not in spec:
            raise ValueError(f"'{spec}' is neither 'package.module:factory' nor a .py file")
        mod_path, _, attr = spec.partition(":")
        mod = importlib.import_module(mod_path)
        obj = mod
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"module '{mod_path}' has no attribute '{attr}'")
            obj = getattr(obj, part)
        if isinstance(obj, type) or not isinstance(obj, torch.nn.Module):
            obj = obj(**kwargs) if callable(obj) else obj
    return _as_spec(obj, spec)


def _as_spec(obj, spec) -> FactorySpec:
    import torch

    if isinstance(obj, torch.nn.Module):
        return FactorySpec(obj, None)
    if isinstance(obj, tuple) and obj and isinstance(obj[0], torch.nn.Module) \
            and 2 <= len(obj) <= 5:
        return FactorySpec(*obj)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), torch.nn.Module):
        return FactorySpec(obj["model"], obj.get("example_inputs"), obj.get("input_names"),
                           obj.get("output_names"), obj.get("dynamic_axes"))
    raise TypeError(f"{spec}: the factory returned {type(obj).__name__}; expected an "
                    "nn.Module, (module, example_inputs[, input_names, output_names, "
                    "dynamic_axes]) or a dict with 'model' and 'example_inputs'")


def load_factory(spec: str, **kwargs) -> tuple[Any, Any]:
    """Imports a model factory and returns ``(module, example_inputs)``.

    `spec` is either

    * ``"package.module:factory"`` -- ``factory`` is imported from the importable module and
      called with ``**kwargs`` (a class is instantiated; an nn.Module instance is used as is);
    * a path to a ``.py`` file that defines ``build(**kwargs)`` (called), or a module-level
      ``model`` (an nn.Module, or a callable returning one) with an optional
      ``example_inputs`` (a value or a zero-argument callable). The file's folder is on
      ``sys.path`` while it is executed.

    The factory returns one of: an ``nn.Module`` (example_inputs is then ``None``: the caller
    must build them, e.g. from the CLI's ``--example``); ``(module, example_inputs)``;
    ``(module, example_inputs, input_names, output_names, dynamic_axes)`` (the format of
    ``models/reference.py``); or ``{"model": ..., "example_inputs": ..., "input_names": ...,
    "output_names": ..., "dynamic_axes": ...}``. example_inputs is a tensor, a tuple of tensors
    or a dict {input name: tensor} in forward-argument order. Use `load_factory_spec` to get
    the names and dynamic axes too.
    """
    s = load_factory_spec(spec, **kwargs)
    return s.module, s.example_inputs


Factory = Callable[..., Any]
