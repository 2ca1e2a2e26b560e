"""HRA (Householder reflection adaptation, PEFT's ``HRAConfig``) on MatMul/Gemm sites.

PEFT (peft/tuners/hra/layer.py, 0.21, apply_GS=False), per nn.Linear with W [out, in] and a
trained U [in, r] whose columns are normalised (û_i = u_i / ‖u_i‖):

    R = H_0·H_1·…·H_{r-1},  H_i = I - 2·û_i·û_iᵀ        W' = W·R,   y = x·W'ᵀ + b

so y = (x·H_{r-1}·…·H_0)·Wᵀ + b: the rewrite reflects the input r times before the module's
own MatMul, never forming R ([in, in]). Standard ops only (Mul, ReduceSum, Sqrt, Div, Slice,
MatMul, Sub): the core's backward rules give U's gradient through the normalisation.

Initialisation: PEFT's symmetric one (r even: columns repeated in pairs, so the reflections
cancel and R = I). PEFT file: ``base_model.model.<module>.hra_u`` [in, r]; config peft_type
HRA, r, apply_GS false. Merge: W' = W·R in PyTorch's layout. apply_GS (Gram-Schmidt) and odd r
are refused.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from pyedge.adapters import common
from pyedge.adapters.base import register
from pyedge.graph import Graph, Node

SUFFIX = "hra_u"
_PEFT_PASSIVE = {**common.PEFT_BOOKKEEPING, **common.PEFT_LAYER_DEFAULTS, "peft_type": "HRA",
                 "apply_GS": False}


@dataclasses.dataclass(init=False)
class HRAConfig:
    """HRA settings, mirroring peft.HRAConfig: r (number of reflections, even), target_modules,
    init_weights (True: PEFT's symmetric initialisation, R = I). apply_GS is not supported."""
    r: int = 8
    target_modules: Sequence[str] | str = ()
    init_weights: bool = True
    seed: int = 0

    def __init__(self, r: int = 8, target_modules: Sequence[str] | str = (),
                 init_weights: bool = True, seed: int = 0, **peft_fields):
        common.check_peft_fields("HRAConfig", _PEFT_PASSIVE, peft_fields)
        if not target_modules:
            raise ValueError("HRAConfig: target_modules is required")
        if r <= 0 or r % 2:
            raise ValueError(f"HRAConfig: r must be a positive even number, got {r}")
        self.r, self.target_modules, self.init_weights, self.seed = \
            int(r), target_modules, bool(init_weights), seed

    def targets(self, module: str) -> bool:
        return common.targets(self.target_modules, module)


@dataclasses.dataclass
class HRASite:
    module: str
    weight: str          # ONNX initializer of the base weight
    u: str               # the trained [in, r] initializer
    in_features: int
    out_features: int
    trans_w: bool        # the ONNX weight is [out, in]


def _const(graph: Graph, base: str, arr) -> str:
    name = graph.fresh_name(base)
    graph.initializers[name] = np.asarray(arr)
    return name


def _reflect_nodes(graph: Graph, x: str, u: str, r: int, tag: str) -> tuple[list[Node], str]:
    """Nodes computing x·H_{r-1}·…·H_0 (x [..., in], u [in, r]); returns (nodes, output)."""
    nodes = []

    def fresh(s):
        return graph.fresh_name(f"{tag}/{s}")

    axes0 = _const(graph, f"{tag}/axes0", np.array([0], np.int64))
    sq, ss, nrm, uh = fresh("u2"), fresh("sumsq"), fresh("norm"), fresh("u_hat")
    nodes += [Node("Mul", [u, u], [sq], sq), Node("ReduceSum", [sq, axes0], [ss], ss, "",
                                                  {"keepdims": 1}),
              Node("Sqrt", [ss], [nrm], nrm), Node("Div", [u, nrm], [uh], uh)]   # [in, r]
    two = _const(graph, f"{tag}/two", np.array(2.0, np.float32))
    one = _const(graph, f"{tag}/axes1", np.array([1], np.int64))
    cur = x
    for i in range(r - 1, -1, -1):
        st = _const(graph, f"{tag}/s{i}", np.array([i], np.int64))
        en = _const(graph, f"{tag}/e{i}", np.array([i + 1], np.int64))
        ui, uit, p, q, q2, nxt = (fresh(f"{s}{i}") for s in ("u", "uT", "p", "q", "q2", "x"))
        nodes += [Node("Slice", [uh, st, en, one], [ui], ui),                # [in, 1]
                  Node("Transpose", [ui], [uit], uit, "", {"perm": [1, 0]}),  # [1, in]
                  Node("MatMul", [cur, ui], [p], p),                        # [..., 1]
                  Node("MatMul", [p, uit], [q], q),                         # [..., in]
                  Node("Mul", [q, two], [q2], q2),
                  Node("Sub", [cur, q2], [nxt], nxt)]
        cur = nxt
    return nodes, cur


def inject_hra(graph: Graph, cfg: HRAConfig) -> list[HRASite]:
    sites: dict[str, HRASite] = {}
    before: dict[int, list[Node]] = {}
    rng = np.random.default_rng(cfg.seed)
    for t in common.linear_targets(graph, cfg, "HRA"):
        site = sites.get(t.module)
        if site is None:
            name = f"{t.module}.{SUFFIX}"
            # PEFT: kaiming_uniform(a=√5) on [in, r/2] (bound 1/√(r/2)), columns repeated
            bound = 1.0 / math.sqrt(cfg.r // 2)
            half = rng.uniform(-bound, bound, size=(t.in_features, cfg.r // 2)).astype(np.float32)
            graph.initializers[name] = np.repeat(half, 2, axis=1) if cfg.init_weights else \
                rng.uniform(-bound, bound, size=(t.in_features, cfg.r)).astype(np.float32)
            site = sites[t.module] = HRASite(t.module, t.weight, name, t.in_features,
                                             t.out_features, t.trans_w)
        node = t.node
        nodes, x = _reflect_nodes(graph, node.inputs[0], site.u, cfg.r,
                                  f"{node.name or t.module}/hra")
        before[id(node)] = nodes
        node.inputs[0] = x
    common.splice(graph, before=before)
    return list(sites.values())


def reflection(u: np.ndarray) -> np.ndarray:
    """R = H_0·…·H_{r-1} [in, in] in float64 (PEFT's get_delta_weight, apply_GS=False)."""
    u = np.asarray(u, np.float64)
    u = u / np.linalg.norm(u, axis=0)
    R = np.eye(u.shape[0])
    for i in range(u.shape[1]):
        ui = u[:, i:i + 1]
        R = R - 2 * (R @ ui) @ ui.T
    return R


class HRAMethod(common.OneTensorMethod):
    name = "hra"
    peft_type = "HRA"
    config_class = HRAConfig
    op_rules = {}
    suffix, site_attr, label = SUFFIX, "u", "HRA"

    def inject(self, graph, cfg) -> list[HRASite]:
        return inject_hra(graph, cfg)

    def peft_config(self, cfg, sites) -> dict:
        return {"r": int(cfg.r), "apply_GS": False, "init_weights": bool(cfg.init_weights),
                "bias": "none", "layers_to_transform": None, "layers_pattern": None,
                "exclude_modules": None}

    def config_from_peft(self, config: dict, target_modules) -> HRAConfig:
        return HRAConfig(r=int(config.get("r", 8)), target_modules=target_modules)

    def check_files(self, config, own, keys, shown, cfg_path):
        from pyedge.export.adapter_files import AdapterError
        if config.get("apply_GS"):
            raise AdapterError(f"{cfg_path}: HRA with apply_GS=true is not supported")
        r = int(config.get("r", 8))
        common.check_file_shapes(config, own, keys, shown, SUFFIX,
                                 lambda a: a.ndim == 2 and a.shape[1] == r, f"[in, r={r}]")

    def merge_deltas(self, graph, config: dict, ad) -> dict:
        _, sites = common.inject_for_merge(
            graph.copy(), inject_hra,
            lambda tm: HRAConfig(r=int(config.get("r", 8)), target_modules=tm),
            self.modules_in(ad), "HRA")
        deltas = {}
        for s in sites:
            W = graph.initializers[s.weight].astype(np.float64)
            Wt = W if s.trans_w else W.T                          # [out, in]
            merged = Wt @ reflection(ad.extra[s.module][SUFFIX])
            deltas[s.weight] = (merged if s.trans_w else merged.T) - W
        return deltas


register(HRAMethod())
