"""VeRA (PEFT's ``VeraConfig``): shared frozen random projections, trained scaling vectors.

PEFT (peft/tuners/vera, 0.21), per targeted nn.Linear (in, out), with A [r, max_in] and
B [max_out, r] shared by every targeted layer (max over them):

    y = x·Wᵀ + b + λ_b ∘ ((λ_d ∘ (x·A[:, :in]ᵀ))·B[:out]ᵀ)        λ_b [out] = 0, λ_d [r] = d_initial

A and B come from torch.Generator().manual_seed(projection_prng_key): A then B, each
uniform(±√3·√2/√fan_in) (PEFT's _kaiming_init). pyedge regenerates them bit for bit without
torch (`torch_uniform`: torch's CPU generator is the 32-bit MT19937 numpy also has; a float
uniform takes the low 24 bits of one draw, scaled in double between float32 bounds), so a folder saved with save_projection=false
loads too; a folder's stored projections must equal the regenerated ones.

The rewrite: MatMul(x, A_sᵀ) → Mul λ_d → MatMul B_sᵀ → Mul λ_b → Add to the module's output,
with A_s, B_s the module's slices as frozen initializers. Standard ops only.

PEFT file: ``base_model.model.<module>.vera_lambda_b`` / ``vera_lambda_d`` and, with
save_projection, ``base_model.vera_A`` / ``base_model.vera_B``. Merge: ΔW = λ_b ∘ B_s·diag(λ_d)·A_s.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from pyedge.adapters import common
from pyedge.adapters.base import AdapterMethod, register
from pyedge.graph import Graph, Node

LB, LD = "vera_lambda_b", "vera_lambda_d"
_PEFT_PASSIVE = {**common.PEFT_BOOKKEEPING, **common.PEFT_LAYER_DEFAULTS, "peft_type": "VERA",
                 "fan_in_fan_out": None, "vera_dropout": 0.0, "init_weights": True}


def torch_uniform(seed: int, shapes_bounds) -> list[np.ndarray]:
    """What torch.Generator().manual_seed(seed) followed by tensor.uniform_(-b, b) per
    (shape, b) gives on the CPU, in float32, without torch."""
    bg = np.random.MT19937()
    bg._legacy_seeding(int(seed))     # init_genrand(seed), as torch's mt19937
    out = []
    for shape, b in shapes_bounds:
        raw = bg.random_raw(int(np.prod(shape))).astype(np.uint64)
        # torch: the bounds are float32 scalars; the draw is scaled in double, then rounded
        x = (raw & np.uint64((1 << 24) - 1)).astype(np.float64) * (1.0 / (1 << 24))
        lo, hi = float(np.float32(-b)), float(np.float32(b))
        out.append((x * (hi - lo) + lo).astype(np.float32).reshape(shape))
    return out


def projections(key: int, r: int, max_in: int, max_out: int):
    """PEFT's shared vera_A [r, max_in] and vera_B [max_out, r]."""
    bound = lambda fan_in: math.sqrt(3.0) * math.sqrt(2) / math.sqrt(fan_in)  # noqa: E731
    return torch_uniform(key, [((r, max_in), bound(max_in)), ((max_out, r), bound(r))])


@dataclasses.dataclass(init=False)
class VeraConfig:
    """VeRA settings, mirroring peft.VeraConfig: r, target_modules, projection_prng_key,
    save_projection, d_initial. vera_dropout > 0 is not supported."""
    r: int = 256
    target_modules: Sequence[str] | str = ()
    projection_prng_key: int = 0
    save_projection: bool = True
    d_initial: float = 0.1
    seed: int = 0

    def __init__(self, r: int = 256, target_modules: Sequence[str] | str = (),
                 projection_prng_key: int = 0, save_projection: bool = True,
                 d_initial: float = 0.1, seed: int = 0, **peft_fields):
        common.check_peft_fields("VeraConfig", _PEFT_PASSIVE, peft_fields)
        if not target_modules:
            raise ValueError("VeraConfig: target_modules is required")
        if r <= 0:
            raise ValueError(f"VeraConfig: r must be positive, got {r}")
        self.r, self.target_modules = int(r), target_modules
        self.projection_prng_key, self.save_projection = int(projection_prng_key), \
            bool(save_projection)
        self.d_initial, self.seed = float(d_initial), seed

    def targets(self, module: str) -> bool:
        return common.targets(self.target_modules, module)


@dataclasses.dataclass
class VeraSite:
    module: str
    weight: str
    lambda_b: str        # trained [out]
    lambda_d: str        # trained [r]
    in_features: int
    out_features: int
    trans_w: bool


def inject_vera(graph: Graph, cfg: VeraConfig) -> list[VeraSite]:
    found = common.linear_targets(graph, cfg, "VeRA")
    max_in = max(t.in_features for t in found)
    max_out = max(t.out_features for t in found)
    A, B = projections(cfg.projection_prng_key, cfg.r, max_in, max_out)
    graph.vera_projections = (A, B)   # for saving (save_projection) and checks on load
    sites: dict[str, VeraSite] = {}
    after: dict[int, list[Node]] = {}
    for t in found:
        node, module, k, n = t.node, t.module, t.in_features, t.out_features
        site = sites.get(module)
        if site is None:
            lb, ld = f"{module}.{LB}", f"{module}.{LD}"
            graph.initializers[lb] = np.zeros(n, np.float32)
            graph.initializers[ld] = np.full(cfg.r, cfg.d_initial, np.float32)
            site = sites[module] = VeraSite(module, t.weight, lb, ld, k, n, t.trans_w)
        tag = f"{node.name or module}/vera"
        a_s, b_s = graph.fresh_name(f"{tag}/A_T"), graph.fresh_name(f"{tag}/B_T")
        graph.initializers[a_s] = np.ascontiguousarray(A[:, :k].T)      # [in, r]
        graph.initializers[b_s] = np.ascontiguousarray(B[:n].T)         # [r, out]
        z, y = common.beside_output(graph, node, tag)
        t1, t2, t3, t4 = (graph.fresh_name(f"{tag}/{s}") for s in
                          ("xA", "xAd", "xAdB", "delta"))
        after[id(node)] = [Node("MatMul", [node.inputs[0], a_s], [t1], t1),   # [..., r]
                           Node("Mul", [t1, site.lambda_d], [t2], t2),
                           Node("MatMul", [t2, b_s], [t3], t3),               # [..., out]
                           Node("Mul", [t3, site.lambda_b], [t4], t4),
                           Node("Add", [z, t4], [y], tag)]
    common.splice(graph, after=after)
    return list(sites.values())


class VeraMethod(AdapterMethod):
    name = "vera"
    peft_type = "VERA"
    config_class = VeraConfig
    op_rules = {}
    peft_suffixes = (LB, LD, "vera_A", "vera_B")

    def inject(self, graph, cfg) -> list[VeraSite]:
        sites = inject_vera(graph, cfg)
        for s in sites:
            s.projections = graph.vera_projections
            s.save_projection = cfg.save_projection
        return sites

    def trainable(self, sites) -> list[str]:
        return [n for s in sites for n in (s.lambda_b, s.lambda_d)]

    def peft_config(self, cfg, sites) -> dict:
        return {"r": int(cfg.r), "projection_prng_key": int(cfg.projection_prng_key),
                "save_projection": bool(cfg.save_projection), "d_initial": float(cfg.d_initial),
                "vera_dropout": 0.0, "fan_in_fan_out": False, "bias": "none",
                "init_weights": True, "layers_to_transform": None, "layers_pattern": None}

    def peft_tensors(self, sites, params) -> dict:
        out = {}
        for s in sites:
            out[f"{s.module}.{LB}"] = np.array(params[s.lambda_b])
            out[f"{s.module}.{LD}"] = np.array(params[s.lambda_d])
        if sites and sites[0].save_projection:
            A, B = sites[0].projections   # outside base_model.model. (adapter_state keeps it)
            out["base_model.vera_A"], out["base_model.vera_B"] = A.copy(), B.copy()
        return out

    def config_from_peft(self, config: dict, target_modules) -> VeraConfig:
        return VeraConfig(r=int(config.get("r", 256)), target_modules=target_modules,
                          projection_prng_key=int(config.get("projection_prng_key", 0)),
                          save_projection=bool(config.get("save_projection", True)),
                          d_initial=float(config.get("d_initial", 0.1)))

    def check_files(self, config, own, keys, shown, cfg_path):
        from pyedge.export.adapter_files import AdapterError, q, targets_module
        common.config_int(config, "r", 256, cfg_path, minimum=1)
        common.config_int(config, "projection_prng_key", 0, cfg_path,
                          maximum=common.SEED_MAX)
        common.config_number(config, "d_initial", 0.1, cfg_path)
        common.config_bool(config, "save_projection", True, cfg_path)
        for module, ts in own.items():
            if module == "base_model":
                continue
            if not targets_module(config, module):
                raise AdapterError(f"{shown}: VeRA tensors for module {q(module)}, which "
                                   "target_modules does not select")
            for suffix, arr in ts.items():
                if arr.ndim != 1:
                    raise AdapterError(f"{shown}: tensor {q(keys[(module, suffix)])} has shape "
                                       f"{list(arr.shape)}, expected a vector")
            lacking = [s for s in (LB, LD) if s not in ts]
            if lacking:   # a module is adapted by both vectors or not at all
                raise AdapterError(f"{shown}: module {q(module)} has no {lacking[0]} beside "
                                   f"its {next(iter(ts))}")

    def _check_projections(self, ad, A, B):
        from pyedge.export.adapter_files import AdapterError
        stored = ad.extra.get("base_model", {})
        for nm, ours in (("vera_A", A), ("vera_B", B)):
            if nm in stored and (stored[nm].shape != ours.shape or
                                 not np.array_equal(stored[nm], ours)):
                raise AdapterError(f"{ad.weights_path}: base_model.{nm} differs from the "
                                   "projection regenerated from projection_prng_key="
                                   f"{ad.config.get('projection_prng_key', 0)} (shape "
                                   f"{list(stored[nm].shape)} vs {list(ours.shape)}); pyedge "
                                   "uses PEFT's seeded projections only")

    def plan_load(self, session, ad, strict: bool):
        from pyedge.export.adapter_files import q
        params = session.trainable_parameters()
        writes, loaded, skipped, problems = {}, [], [], []
        sites = {s.module: s for s in session.adapter_sites}
        if sites:
            self._check_projections(ad, *next(iter(sites.values())).projections)
        for module, ts in ad.extra.items():
            if module == "base_model":
                continue
            site = sites.get(module)
            if site is None:
                (problems if strict else skipped).append(
                    f"VeRA for module {q(module)} which the session does not adapt" if strict
                    else module)
                continue
            for suffix, init in ((LB, site.lambda_b), (LD, site.lambda_d)):
                arr = ts.get(suffix)
                if arr is None:
                    problems.append(f"no {suffix} for module {q(module)}")
                elif tuple(arr.shape) != tuple(params[init].shape):
                    problems.append(f"{q(ad.key_of(module, suffix))} has shape "
                                    f"{list(arr.shape)}, expected {list(params[init].shape)}")
                else:
                    writes[init] = arr
                    loaded.append(init)
        for module in sites:
            if module not in ad.extra:
                (problems if strict else skipped).append(
                    f"no VeRA tensors for module {q(module)}" if strict else module)
        return writes, loaded, skipped, problems

    def merge_deltas(self, graph, config: dict, ad) -> dict:
        modules = [m for m in ad.extra if m != "base_model"]
        g = graph.copy()
        cfg, sites = common.inject_for_merge(g, inject_vera,
                                             lambda tm: self.config_from_peft(config, tm),
                                             modules, "VeRA")
        A, B = g.vera_projections
        self._check_projections(ad, A, B)
        deltas = {}
        for s in sites:
            lb = np.asarray(ad.extra[s.module][LB], np.float64)
            ld = np.asarray(ad.extra[s.module][LD], np.float64)
            d = (lb[:, None] * B[:s.out_features].astype(np.float64)) @ \
                (ld[:, None] * A[:, :s.in_features].astype(np.float64))     # [out, in]
            deltas[s.weight] = d if s.trans_w else d.T
        return deltas


register(VeraMethod())
