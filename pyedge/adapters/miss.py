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
from typing import Sequence

import numpy as np

from pyedge.adapters import common
from pyedge.adapters.base import register
from pyedge.graph import Graph, Node

SUFFIX = "miss_block"
_PEFT_PASSIVE = {**common.PEFT_BOOKKEEPING, **common.PEFT_LAYER_DEFAULTS, "peft_type": "MISS",
                 "miss_dropout": 0.0, "mini_r": None}


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
        common.check_peft_fields("MissConfig", _PEFT_PASSIVE, peft_fields)
        if init_weights is not True:
            raise ValueError(f"MissConfig: init_weights={init_weights!r} is not supported (True)")
        if not target_modules:
            raise ValueError("MissConfig: target_modules is required")
        if r <= 0:
            raise ValueError(f"MissConfig: r must be positive, got {r}")
        self.r, self.target_modules, self.init_weights, self.seed = \
            int(r), target_modules, True, seed

    def targets(self, module: str) -> bool:
        return common.targets(self.target_modules, module)


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
    def fits(t):
        if cfg.r > t.in_features:
            raise ValueError(f"MiSS on '{t.module}': r={cfg.r} is larger than in_features="
                             f"{t.in_features}")

    sites: dict[str, MissSite] = {}
    after: dict[int, list[Node]] = {}
    for t in common.linear_targets(graph, cfg, "MiSS", check=fits):
        site = sites.get(t.module)
        if site is None:
            name = f"{t.module}.{SUFFIX}"
            graph.initializers[name] = np.zeros((cfg.r, t.out_features), np.float32)
            site = sites[t.module] = MissSite(t.module, t.weight, name, t.in_features,
                                              t.out_features, t.trans_w)
        node = t.node
        tag = f"{node.name or t.module}/miss"
        S = graph.fresh_name(f"{tag}/S")
        graph.initializers[S] = block_sum(t.in_features, cfg.r)
        z, y = common.beside_output(graph, node, tag)
        s, d = (graph.fresh_name(f"{tag}/{x}") for x in ("xS", "delta"))
        after[id(node)] = [Node("MatMul", [node.inputs[0], S], [s], s),       # [..., r]
                           Node("MatMul", [s, site.block], [d], d),           # [..., out]
                           Node("Add", [z, d], [y], tag)]
    common.splice(graph, after=after)
    return list(sites.values())


class MissMethod(common.OneTensorMethod):
    name = "miss"
    peft_type = "MISS"
    config_class = MissConfig
    op_rules = {}
    suffix, site_attr, label = SUFFIX, "block", "MiSS"

    def inject(self, graph, cfg) -> list[MissSite]:
        return inject_miss(graph, cfg)

    def peft_config(self, cfg, sites) -> dict:
        return {"r": int(cfg.r), "init_weights": True, "miss_dropout": 0.0, "bias": "none",
                "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None}

    def config_from_peft(self, config: dict, target_modules) -> MissConfig:
        return MissConfig(r=int(config.get("r", 64)), target_modules=target_modules)

    def check_files(self, config, own, keys, shown, cfg_path):
        from pyedge.export.adapter_files import AdapterError
        if config.get("init_weights", True) is not True or config.get("miss_dropout"):
            raise AdapterError(f"{cfg_path}: MiSS with init_weights="
                               f"{config.get('init_weights')!r} / miss_dropout="
                               f"{config.get('miss_dropout')!r} is not supported")
        r = int(config.get("r", 64))
        common.check_file_shapes(config, own, keys, shown, SUFFIX,
                                 lambda a: a.ndim == 2 and a.shape[0] == r, f"[r={r}, out]")

    def merge_deltas(self, graph, config: dict, ad) -> dict:
        from pyedge.export.adapter_files import AdapterError
        r = int(config.get("r", 64))
        _, sites = common.inject_for_merge(
            graph.copy(), inject_miss, lambda tm: MissConfig(r=r, target_modules=tm),
            self.modules_in(ad), "MiSS")
        deltas = {}
        for s in sites:
            M = np.asarray(ad.extra[s.module][SUFFIX], np.float64)
            if M.shape != (r, s.out_features):
                raise AdapterError(f"'{s.module}': miss_block {list(M.shape)} does not fit the "
                                   f"weight ([r, {s.out_features}])")
            d = block_sum(s.in_features, M.shape[0]).astype(np.float64) @ M   # [in, out]
            deltas[s.weight] = d.T if s.trans_w else d
        return deltas


register(MissMethod())
