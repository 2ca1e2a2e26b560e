"""FourierFT (PEFT's ``FourierFTConfig``): trained spectral coefficients at seeded positions.

PEFT (peft/tuners/fourierft/layer.py, 0.21), per targeted nn.Linear (in, out) with N = in·out:
positions p = torch.randperm(N, generator=manual_seed(random_loc_seed))[:n_frequency], row
u = p // in, column v = p % in; a dense [out, in] spectrum holds the trained coefficients c at
(u, v) and

    ΔW = Re(ifft2(spectrum))·scaling,   y = x·Wᵀ + b + x·ΔWᵀ

Written out, Re(ifft2)[o, i] = (1/N)·Σ_k c_k·cos(2π(o·u_k/out + i·v_k/in)), so with the fixed
matrices Ci[i, k] = cos(2π·i·v_k/in), Si (sin), Co, So (over o, u_k):

    x·ΔWᵀ = (s/N)·( ((x·Ci) ∘ c)·Coᵀ − ((x·Si) ∘ c)·Soᵀ )

four MatMuls with frozen [in, nf] / [nf, out] constants and the trained c [nf]: standard ops,
no [out, in] delta is ever formed. The positions are regenerated without torch (`positions`:
torch's CPU randperm is a forward Fisher-Yates over its MT19937, one 32-bit draw per step, and
only the first n_frequency steps are needed).

PEFT file: ``base_model.model.<module>.fourierft_spectrum`` [n_frequency]; config peft_type
FOURIERFT, n_frequency, scaling, random_loc_seed. Merge: ΔW computed in float64.
init_weights=False (PEFT's default) draws c from pyedge's generator, not torch's.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pyedge.adapters import common
from pyedge.adapters.base import register
from pyedge.graph import Graph, Node

SUFFIX = "fourierft_spectrum"
_PEFT_PASSIVE = {**common.PEFT_BOOKKEEPING, **common.PEFT_LAYER_DEFAULTS,
                 "peft_type": "FOURIERFT", "fan_in_fan_out": None, "n_frequency_pattern": {}}


def positions(n: int, seed: int, count: int) -> np.ndarray:
    """torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count] (CPU)."""
    bg = np.random.MT19937()
    bg._legacy_seeding(int(seed))
    raw = bg.random_raw(min(count, n - 1)) if n > 1 else np.zeros(0, np.uint64)
    swapped: dict[int, int] = {}
    out = np.empty(count, np.int64)
    for i in range(count):
        if i < n - 1:
            j = i + int(raw[i]) % (n - i)
            vi, vj = swapped.get(i, i), swapped.get(j, j)
            swapped[i], swapped[j] = vj, vi
        out[i] = swapped.get(i, i)
    return out


@dataclasses.dataclass(init=False)
class FourierFTConfig:
    """FourierFT settings, mirroring peft.FourierFTConfig: n_frequency, scaling,
    random_loc_seed, target_modules, init_weights (True: c = 0; False, PEFT's default: c
    normal from pyedge's generator)."""
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    target_modules: Sequence[str] | str = ()
    init_weights: bool = False
    seed: int = 0

    def __init__(self, n_frequency: int = 1000, scaling: float = 150.0,
                 random_loc_seed: int = 777, target_modules: Sequence[str] | str = (),
                 init_weights: bool = False, seed: int = 0, **peft_fields):
        common.check_peft_fields("FourierFTConfig", _PEFT_PASSIVE, peft_fields)
        if not target_modules:
            raise ValueError("FourierFTConfig: target_modules is required")
        if n_frequency <= 0:
            raise ValueError(f"FourierFTConfig: n_frequency must be positive, got {n_frequency}")
        self.n_frequency, self.scaling = int(n_frequency), float(scaling)
        self.random_loc_seed, self.target_modules = int(random_loc_seed), target_modules
        self.init_weights, self.seed = bool(init_weights), seed

    def targets(self, module: str) -> bool:
        return common.targets(self.target_modules, module)


@dataclasses.dataclass
class FourierSite:
    module: str
    weight: str
    spectrum: str        # trained [n_frequency]
    in_features: int
    out_features: int
    trans_w: bool


def bases(k: int, n: int, cfg_n: int, seed: int, dtype=np.float32):
    """(Ci [in, nf], Si, Co [out, nf], So) of the module's positions."""
    p = positions(k * n, seed, cfg_n)
    u, v = p // k, p % k
    ai = 2 * np.pi * np.outer(np.arange(k), v) / k
    ao = 2 * np.pi * np.outer(np.arange(n), u) / n
    return (np.cos(ai).astype(dtype), np.sin(ai).astype(dtype), np.cos(ao).astype(dtype),
            np.sin(ao).astype(dtype))


def inject_fourierft(graph: Graph, cfg: FourierFTConfig) -> list[FourierSite]:
    def fits(t):
        if cfg.n_frequency > t.in_features * t.out_features:
            raise ValueError(f"FourierFT on '{t.module}': n_frequency={cfg.n_frequency} is more "
                             f"than in·out = {t.in_features * t.out_features}")

    sites: dict[str, FourierSite] = {}
    after: dict[int, list[Node]] = {}
    rng = np.random.default_rng(cfg.seed)
    for t in common.linear_targets(graph, cfg, "FourierFT", check=fits):
        k, n = t.in_features, t.out_features
        site = sites.get(t.module)
        if site is None:
            name = f"{t.module}.{SUFFIX}"
            graph.initializers[name] = np.zeros(cfg.n_frequency, np.float32) if \
                cfg.init_weights else rng.standard_normal(cfg.n_frequency).astype(np.float32)
            site = sites[t.module] = FourierSite(t.module, t.weight, name, k, n, t.trans_w)
        node = t.node
        Ci, Si, Co, So = bases(k, n, cfg.n_frequency, cfg.random_loc_seed)
        s = np.float32(cfg.scaling / (k * n))
        tag = f"{node.name or t.module}/fourierft"
        consts = {}
        for nm, arr in (("Ci", Ci), ("Si", Si), ("CoT", (Co * s).T), ("SoT", (So * s).T)):
            consts[nm] = graph.fresh_name(f"{tag}/{nm}")
            graph.initializers[consts[nm]] = np.ascontiguousarray(arr, np.float32)
        z, y = common.beside_output(graph, node, tag)
        xc, xs, xcc, xsc, pc, ps, d = (graph.fresh_name(f"{tag}/{x}") for x in
                                       ("xC", "xS", "xCc", "xSc", "pc", "ps", "d"))
        x = node.inputs[0]
        after[id(node)] = [Node("MatMul", [x, consts["Ci"]], [xc], xc),           # [..., nf]
                           Node("MatMul", [x, consts["Si"]], [xs], xs),
                           Node("Mul", [xc, site.spectrum], [xcc], xcc),
                           Node("Mul", [xs, site.spectrum], [xsc], xsc),
                           Node("MatMul", [xcc, consts["CoT"]], [pc], pc),        # [..., out]
                           Node("MatMul", [xsc, consts["SoT"]], [ps], ps),
                           Node("Sub", [pc, ps], [d], d),
                           Node("Add", [z, d], [y], tag)]
    common.splice(graph, after=after)
    return list(sites.values())


class FourierFTMethod(common.OneTensorMethod):
    name = "fourierft"
    peft_type = "FOURIERFT"
    config_class = FourierFTConfig
    op_rules = {}
    suffix, site_attr, label = SUFFIX, "spectrum", "FourierFT"

    def inject(self, graph, cfg) -> list[FourierSite]:
        return inject_fourierft(graph, cfg)

    def peft_config(self, cfg, sites) -> dict:
        return {"n_frequency": int(cfg.n_frequency), "scaling": float(cfg.scaling),
                "random_loc_seed": int(cfg.random_loc_seed),
                "init_weights": bool(cfg.init_weights), "fan_in_fan_out": False,
                "bias": "none", "n_frequency_pattern": {}, "layers_to_transform": None,
                "layers_pattern": None}

    def config_from_peft(self, config: dict, target_modules) -> FourierFTConfig:
        return FourierFTConfig(n_frequency=int(config.get("n_frequency", 1000)),
                               scaling=float(config.get("scaling", 150.0)),
                               random_loc_seed=int(config.get("random_loc_seed", 777)),
                               target_modules=target_modules)

    def check_files(self, config, own, keys, shown, cfg_path):
        from pyedge.export.adapter_files import AdapterError
        if config.get("n_frequency_pattern"):
            raise AdapterError(f"{cfg_path}: FourierFT n_frequency_pattern is not supported")
        nf = common.config_int(config, "n_frequency", 1000, cfg_path, minimum=1)
        common.config_number(config, "scaling", 150.0, cfg_path)
        common.config_int(config, "random_loc_seed", 777, cfg_path, maximum=common.SEED_MAX)
        common.check_file_shapes(config, own, keys, shown, SUFFIX, lambda a: a.shape == (nf,),
                                 f"[n_frequency={nf}]")

    def plan_load(self, session, ad, strict: bool):
        from pyedge.export.adapter_files import AdapterError
        cfg = session.adapter_config
        for k in ("n_frequency", "random_loc_seed", "scaling"):
            theirs = ad.config.get(k, getattr(FourierFTConfig, k))
            if float(theirs) != float(getattr(cfg, k)):
                raise AdapterError(f"{ad.config_path}: {k}={theirs!r}, the session has "
                                   f"{getattr(cfg, k)!r}; create the session with the folder's")
        return super().plan_load(session, ad, strict)

    def merge_deltas(self, graph, config: dict, ad) -> dict:
        cfg, sites = common.inject_for_merge(
            graph.copy(), inject_fourierft, lambda tm: self.config_from_peft(config, tm),
            self.modules_in(ad), "FourierFT")
        deltas = {}
        for s in sites:
            c = np.asarray(ad.extra[s.module][SUFFIX], np.float64)
            Ci, Si, Co, So = bases(s.in_features, s.out_features, cfg.n_frequency,
                                   cfg.random_loc_seed, np.float64)
            d = cfg.scaling / (s.in_features * s.out_features) * \
                ((Co * c) @ Ci.T - (So * c) @ Si.T)                          # [out, in]
            deltas[s.weight] = d if s.trans_w else d.T
        return deltas


register(FourierFTMethod())
