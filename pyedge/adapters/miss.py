"""MiSS (PEFT's ``MissConfig``, Bone's successor) on MatMul/Gemm sites, PEFT's default variant.

PEFT (peft/tuners/miss/layer.py, 0.21, init_weights=True): a trained block M [r, out], zero at
the start; the input's features are summed in groups of r (x padded with zeros to a multiple
of r):

    y = x·Wᵀ + b + (Σ_blocks x.reshape(..., in/r, r))·M  =  x·Wᵀ + b + (x·S)·M

with S [in, r] the fixed 0/1 matrix S[j, j mod r] = 1 (the padding adds nothing). The rewrite
adds two MatMuls and an Add beside the module's own op: standard ops, no kernel of its own.

PEFT file: ``base_model.model.<module>.miss_block`` [r, out]; config peft_type MISS, r.
Merge (PEFT's get_delta_weight_miss): W[o, j] += M[j mod r, o]. init_weights "bat" / "mini"
and miss_dropout > 0 are refused.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from pyedge.adapters.base import AdapterMethod, register
from pyedge.adapters.patterns import any_match
from pyedge.graph import Graph, Node
from pyedge.param_names import module_of

SUFFIX = "miss_block"
_PEFT_PASSIVE = {"task_type": None, "inference_mode": None, "modules_to_save": None,
                 "base_model_name_or_path": None, "revision": None, "exclude_modules": None,
                 "peft_type": "MISS", "bias": "none", "layers_to_transform": None,
                 "layers_pattern": None, "miss_dropout": 0.0, "mini_r": None}


@dataclasses.dataclass(init=False)
class MissConfig:
    """MiSS settings, mirroring peft.MissConfig: r (block size), target_modules, init_weights
    (True: M = 0). The "bat" and "mini" variants and miss_dropout are not supported."""
    r: int = 64
    target_modules: Sequence[str] | str = ()
    init_weights: bool = True
    seed: int = 0

    def __init__(self, r: int = 64, target_modules: Sequence[str] | str = (),
                 init_weights: bool | str = True, seed: int = 0, **peft_fields):
        for k, v in peft_fields.items():
            if k not in _PEFT_PASSIVE:
                raise TypeError(f"MissConfig: unknown or unsupported field '{k}'")
            if _PEFT_PASSIVE[k] is not None and v not in (_PEFT_PASSIVE[k], None):
                raise ValueError(f"MissConfig: {k}={v!r} is not supported")
        if init_weights is not True:
            raise ValueError(f"MissConfig: init_weights={init_weights!r} is not supported (True)")
        if not target_modules:
            raise ValueError("MissConfig: target_modules is required")
        if r <= 0:
            raise ValueError(f"MissConfig: r must be positive, got {r}")
        self.r, self.target_modules, self.init_weights, self.seed = \
            int(r), target_modules, True, seed

    def targets(self, module: str) -> bool:
        tm = self.target_modules
        if isinstance(tm, str):
            return re.fullmatch(tm, module) is not None
        return any_match(module, tm)


@dataclasses.dataclass
class MissSite:
    module: str
    weight: str          # ONNX initializer of the base weight
    block: str           # the trained [r, out] initializer
    in_features: int
    out_features: int
    trans_w: bool        # the ONNX weight is [out, in]


def block_sum(in_features: int, r: int) -> np.ndarray:
    """S [in, r]: S[j, j mod r] = 1 (PEFT's sum over the input's r-wide blocks)."""
    S = np.zeros((in_features, r), np.float32)
    S[np.arange(in_features), np.arange(in_features) % r] = 1.0
    return S


def inject_miss(graph: Graph, cfg: MissConfig) -> list[MissSite]:
    from pyedge.adapters.lora import _linear_weight
    producers = graph.producer_map()
    sites: dict[str, MissSite] = {}
    after: dict[int, list[Node]] = {}
    with_weight = []
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
            raise ValueError(f"MiSS on '{module}': Gemm node '{node.name}' with transA/alpha is "
                             "not supported")
        via_t = node.inputs[1] != w
        trans_w = bool(node.attrs.get("transB", 0)) != via_t if node.op_type == "Gemm" \
            else via_t
        W = graph.initializers[w]
        k, n = (W.shape[1], W.shape[0]) if trans_w else (W.shape[0], W.shape[1])
        if cfg.r > k:
            raise ValueError(f"MiSS on '{module}': r={cfg.r} is larger than in_features={k}")
        site = sites.get(module)
        if site is None:
            name = f"{module}.{SUFFIX}"
            graph.initializers[name] = np.zeros((cfg.r, n), np.float32)
            site = sites[module] = MissSite(module, w, name, int(k), int(n), trans_w)
        tag = f"{node.name or module}/miss"
        S = graph.fresh_name(f"{tag}/S")
        graph.initializers[S] = block_sum(k, cfg.r)
        y = node.outputs[0]
        z, s, d = (graph.fresh_name(f"{tag}/{t}") for t in ("base", "xS", "delta"))
        node.outputs[0] = z
        after[id(node)] = [Node("MatMul", [node.inputs[0], S], [s], s),       # [..., r]
                           Node("MatMul", [s, site.block], [d], d),           # [..., out]
                           Node("Add", [z, d], [y], tag)]
    if not sites:
        mods = sorted(set(with_weight))
        raise ValueError(f"no module matches MiSS targets {cfg.target_modules!r}; modules with "
                         f"a weight: {', '.join(mods[:20]) or 'none'}")
    out: list[Node] = []
    for node in graph.nodes:
        out.append(node)
        out.extend(after.get(id(node), []))
    graph.nodes = out
    return list(sites.values())


class MissMethod(AdapterMethod):
    name = "miss"
    peft_type = "MISS"
    config_class = MissConfig
    op_rules = {}
    peft_suffixes = (SUFFIX,)

    def inject(self, graph, cfg) -> list[MissSite]:
        return inject_miss(graph, cfg)

    def trainable(self, sites) -> list[str]:
        return [s.block for s in sites]

    def peft_config(self, cfg, sites) -> dict:
        return {"r": int(cfg.r), "init_weights": True, "miss_dropout": 0.0, "bias": "none",
                "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}

    def peft_tensors(self, sites, params) -> dict:
        return {f"{s.module}.{SUFFIX}": np.array(params[s.block]) for s in sites}

    def config_from_peft(self, config: dict, target_modules) -> MissConfig:
        return MissConfig(r=int(config.get("r", 64)), target_modules=target_modules)

    def check_files(self, config, own, keys, shown, cfg_path):
        from pyedge.export.adapter_files import AdapterError, q
        if config.get("init_weights", True) is not True or config.get("miss_dropout"):
            raise AdapterError(f"{cfg_path}: MiSS with init_weights="
                               f"{config.get('init_weights')!r} / miss_dropout="
                               f"{config.get('miss_dropout')!r} is not supported")
        for module, ts in own.items():
            arr = ts.get(SUFFIX)
            if arr is not None and (arr.ndim != 2 or arr.shape[0] != int(config.get("r", 64))):
                raise AdapterError(f"{shown}: tensor {q(keys[(module, SUFFIX)])} has shape "
                                   f"{list(arr.shape)}, expected [r={config.get('r', 64)}, out]")

    def plan_load(self, session, ad, strict: bool):
        from pyedge.export.adapter_files import q
        params = session.trainable_parameters()
        writes, loaded, skipped, problems = {}, [], [], []
        sites = {s.module: s for s in session.adapter_sites}
        for module, ts in ad.extra.items():
            arr = ts.get(SUFFIX)
            if arr is None:
                continue
            site = sites.get(module)
            if site is None:
                (problems if strict else skipped).append(
                    f"MiSS for module {q(module)} which the session does not adapt" if strict
                    else module)
                continue
            if tuple(arr.shape) != tuple(params[site.block].shape):
                problems.append(f"{q(ad.key_of(module, SUFFIX))} has shape {list(arr.shape)}, "
                                f"expected {list(params[site.block].shape)}")
                continue
            writes[site.block] = arr
            loaded.append(site.block)
        for module in sites:
            if SUFFIX not in ad.extra.get(module, {}):
                (problems if strict else skipped).append(
                    f"no {SUFFIX} for module {q(module)}" if strict else module)
        return writes, loaded, skipped, problems

    def merge_deltas(self, graph, config: dict, ad) -> dict:
        from pyedge.export.adapter_files import AdapterError
        modules = [m for m, ts in ad.extra.items() if SUFFIX in ts]
        g = graph.copy()
        try:
            sites = inject_miss(g, MissConfig(r=int(config.get("r", 64)), target_modules=[
                "re:" + re.escape(m) for m in modules]))
        except ValueError as e:
            raise AdapterError(f"the MiSS modules {modules[:5]} are not in the model ({e})") \
                from e
        deltas = {}
        for s in sites:
            M = np.asarray(ad.extra[s.module][SUFFIX], np.float64)
            if M.shape != (int(config.get("r", 64)), s.out_features):
                raise AdapterError(f"'{s.module}': miss_block {list(M.shape)} does not fit the "
                                   f"weight ([r, {s.out_features}])")
            d = block_sum(s.in_features, M.shape[0]).astype(np.float64) @ M   # [in, out]
            deltas[s.weight] = d.T if s.trans_w else d
        missing = sorted(set(modules) - {s.module for s in sites})
        if missing:
            raise AdapterError(f"MiSS module(s) {missing[:8]} have no MatMul/Gemm weight")
        return deltas


register(MissMethod())
