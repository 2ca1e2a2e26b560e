"""What the PEFT methods built from standard ops share (IA³, HRA, MiSS, VeRA, FourierFT, LN
tuning; LoRA/DoRA have their own fused ops and files): PEFT config fields accepted at their
defaults, target matching, finding the targeted MatMul/Gemm layers, splicing the rewrite's
nodes into the graph, and — for methods that train one tensor per module — the trainable list,
the PEFT tensors, the load plan and the merge's re-injection.

Each method module still holds what is its own: the config's own fields and checks, the
rewrite, the initialisation, the file shape checks and the merge delta.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from pyedge.adapters.base import AdapterMethod
from pyedge.adapters.patterns import any_match
from pyedge.graph import Graph, Node
from pyedge.param_names import module_of

# PEFT config fields that describe the PyTorch side or the folder (task, inference flag,
# where the base came from): every config accepts them, whatever their value.
PEFT_BOOKKEEPING = {"task_type": None, "inference_mode": None, "modules_to_save": None,
                    "base_model_name_or_path": None, "revision": None, "exclude_modules": None}
# layer selection PEFT offers on most methods; pyedge supports only the defaults
PEFT_LAYER_DEFAULTS = {"bias": "none", "layers_to_transform": None, "layers_pattern": None}


def check_peft_fields(cls_name: str, passive: dict, fields: dict) -> None:
    """PEFT's extra config fields (`fields`, the **kwargs of a config class): each must be one
    of `passive`, at its supported value there (None: any value) or None."""
    for k, v in fields.items():
        if k not in passive:
            raise TypeError(f"{cls_name}: unknown or unsupported field '{k}'")
        if passive[k] is not None and v not in (passive[k], None):
            raise ValueError(f"{cls_name}: {k}={v!r} is not supported (pyedge has "
                             f"{passive[k]!r})")


def targets(target_modules, module: str) -> bool:
    """PEFT's target_modules rule on configs: a string is a regex on the whole name; a list
    holds pyedge patterns (pyedge/adapters/patterns.py: names, suffixes, globs, re:)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any_match(module, target_modules)


@dataclasses.dataclass
class LinearTarget:
    """A targeted MatMul/Gemm whose weight is an initializer (directly or via Transpose)."""
    node: Node
    weight: str          # ONNX initializer of the base weight
    module: str          # PyTorch module name
    in_features: int     # k
    out_features: int    # n
    trans_w: bool        # the ONNX weight is [out, in] (PyTorch's layout)


def linear_targets(graph: Graph, cfg, label: str,
                   check: Callable[[LinearTarget], None] | None = None) -> list[LinearTarget]:
    """The MatMul/Gemm nodes (graph order) whose module `cfg.targets`; ValueError naming the
    modules that have a weight when none matches, or naming a Gemm with transA/alpha (which
    the rewrites cannot feed). `check(target)` runs on each target as it is found (a method's
    own size limits), so errors come in graph order."""
    from pyedge.adapters.lora import _linear_weight
    producers = graph.producer_map()
    out: list[LinearTarget] = []
    with_weight: list[str] = []
    for node in graph.nodes:
        if node.domain != "" or node.op_type not in ("MatMul", "Gemm"):
            continue
        w = _linear_weight(graph, producers, node)
        if w is None:
            continue
        module = module_of(graph, w)
        with_weight.append(module)
        if not cfg.targets(module):
            continue
        if node.op_type == "Gemm" and (node.attrs.get("transA", 0) or
                                       node.attrs.get("alpha", 1.0) != 1.0):
            raise ValueError(f"{label} on '{module}': Gemm node '{node.name}' with transA/alpha "
                             "is not supported")
        via_t = node.inputs[1] != w
        trans_w = bool(node.attrs.get("transB", 0)) != via_t if node.op_type == "Gemm" \
            else via_t
        W = graph.initializers[w]
        k, n = (W.shape[1], W.shape[0]) if trans_w else (W.shape[0], W.shape[1])
        t = LinearTarget(node, w, module, int(k), int(n), trans_w)
        if check is not None:
            check(t)
        out.append(t)
    if not out:
        mods = sorted(set(with_weight))
        raise ValueError(f"no module matches {label} targets {cfg.target_modules!r}; modules "
                         f"with a weight: {', '.join(mods[:20]) or 'none'}")
    return out


def splice(graph: Graph, before: dict[int, list[Node]] | None = None,
           after: dict[int, list[Node]] | None = None) -> None:
    """Inserts nodes before / after existing ones (keys: id(node)), keeping graph order."""
    before, after = before or {}, after or {}
    out: list[Node] = []
    for node in graph.nodes:
        out.extend(before.get(id(node), ()))
        out.append(node)
        out.extend(after.get(id(node), ()))
    graph.nodes = out


def beside_output(graph: Graph, node: Node, tag: str) -> tuple[str, str]:
    """For a rewrite that adds a delta to a node's output y: renames the output to a fresh
    `<tag>/base` z and returns (z, y); the rewrite then inserts, after the node, the nodes of
    the delta d (reading the node's inputs, never y) and Add(z, d) -> y named `tag`."""
    y = node.outputs[0]
    z = graph.fresh_name(f"{tag}/base")
    node.outputs[0] = z
    return z, y


def inject_for_merge(g: Graph, inject, make_cfg, modules: list[str], label: str) -> tuple:
    """(cfg, sites) of `inject(g, cfg)` on `g`, a copy of the model (merge never keeps the
    rewrite), with cfg = make_cfg(target_modules selecting exactly the folder's `modules`);
    AdapterError when they are not in the model or one of them has no MatMul/Gemm weight
    (a merge never drops a folder's tensors silently)."""
    from pyedge.export.adapter_files import AdapterError
    try:
        cfg = make_cfg(["re:" + re.escape(m) for m in modules])
        sites = inject(g, cfg)
    except ValueError as e:
        raise AdapterError(f"the {label} modules {modules[:5]} are not in the model ({e})") \
            from e
    missing = sorted(set(modules) - {s.module for s in sites})
    if missing:
        raise AdapterError(f"{label} module(s) {missing[:8]} have no MatMul/Gemm weight in the "
                           "model")
    return cfg, sites


def check_file_shapes(config: dict, own: dict, keys: dict, shown: str, suffix: str,
                      fits: Callable[[np.ndarray], bool], expected: str) -> None:
    """adapter_files hook helper: each module's `suffix` tensor must satisfy `fits`, for a
    module that the config's target_modules selects (PEFT's rule, as for LoRA's tensors)."""
    from pyedge.export.adapter_files import AdapterError, q, targets_module
    for module, ts in own.items():
        arr = ts.get(suffix)
        if arr is None:
            continue
        if not targets_module(config, module):
            raise AdapterError(f"{shown}: tensor {q(keys[(module, suffix)])} adapts module "
                               f"{q(module)}, which target_modules does not select")
        if not fits(arr):
            raise AdapterError(f"{shown}: tensor {q(keys[(module, suffix)])} has shape "
                               f"{list(arr.shape)}, expected {expected}")


def config_int(config: dict, key: str, default: int, where: str, minimum: int = 0,
               maximum: int | None = None) -> int:
    """An integer field of adapter_config.json (not a bool, in [minimum, maximum]);
    AdapterError naming the file and the key otherwise."""
    from pyedge.export.adapter_files import AdapterError
    v = config.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum or             (maximum is not None and v > maximum):
        upto = f" and <= {maximum}" if maximum is not None else ""
        raise AdapterError(f"{where}: {key} must be an integer >= {minimum}{upto}, got {v!r}")
    return v


SEED_MAX = 2**32 - 1   # the seeds regenerate torch's MT19937 streams, 32-bit seeded


def config_number(config: dict, key: str, default: float, where: str) -> float:
    """A finite number field of adapter_config.json; AdapterError naming the file and key."""
    import math

    from pyedge.export.adapter_files import AdapterError
    v = config.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise AdapterError(f"{where}: {key} must be a finite number, got {v!r}")
    return float(v)


def config_bool(config: dict, key: str, default: bool, where: str) -> bool:
    from pyedge.export.adapter_files import AdapterError
    v = config.get(key, default)
    if not isinstance(v, bool):
        raise AdapterError(f"{where}: {key} must be true or false, got {v!r}")
    return v


class OneTensorMethod(AdapterMethod):
    """A method that trains one tensor per module, saved as ``<module>.<suffix>``.

    Subclasses set `suffix`, `site_attr` (the site field naming the trained initializer) and
    `label` (the method's name in messages); `file_shape(site, shape)` maps the trained
    tensor's shape to the file's (IA³ saves [n] as [n, 1] or [1, n])."""
    suffix: str = ""
    site_attr: str = ""
    label: str = ""

    @property
    def peft_suffixes(self) -> tuple:
        return (self.suffix,)

    def file_shape(self, site, shape: tuple) -> tuple:
        return tuple(shape)

    def trainable(self, sites) -> list[str]:
        return [getattr(s, self.site_attr) for s in sites]

    def peft_tensors(self, sites, params) -> dict:
        return {f"{s.module}.{self.suffix}": np.array(params[getattr(s, self.site_attr)])
                .reshape(self.file_shape(s, params[getattr(s, self.site_attr)].shape))
                for s in sites}

    def check_site(self, ad, module: str, site) -> None:
        """Raises AdapterError when the folder's module does not fit the session's site in a
        way a shape cannot tell (IA³: feed-forward or not)."""

    def plan_load(self, session, ad, strict: bool):
        from pyedge.export.adapter_files import q
        params = session.trainable_parameters()
        writes, loaded, skipped, problems = {}, [], [], []
        sites = {s.module: s for s in session.adapter_sites}
        for module, ts in ad.extra.items():
            arr = ts.get(self.suffix)
            if arr is None:
                continue
            site = sites.get(module)
            if site is None:
                (problems if strict else skipped).append(
                    f"{self.label} for module {q(module)} which the session does not adapt"
                    if strict else module)
                continue
            self.check_site(ad, module, site)
            init = getattr(site, self.site_attr)
            want = self.file_shape(site, params[init].shape)
            if tuple(arr.shape) != want:
                problems.append(f"{q(ad.key_of(module, self.suffix))} has shape "
                                f"{list(arr.shape)}, expected {list(want)}")
                continue
            writes[init] = arr.reshape(params[init].shape)
            loaded.append(init)
        for module in sites:
            if self.suffix not in ad.extra.get(module, {}):
                (problems if strict else skipped).append(
                    f"no {self.suffix} for module {q(module)}" if strict else module)
        return writes, loaded, skipped, problems

    def modules_in(self, ad) -> list[str]:
        """The folder's modules that hold this method's tensor."""
        return [m for m, ts in ad.extra.items() if self.suffix in ts]
