"""LN tuning (PEFT's ``LNTuningConfig``): the parameters of the targeted modules (LayerNorm,
RMSNorm, ...) train, everything else stays frozen.

PEFT (peft/tuners/ln_tuning, 0.21) wraps each targeted module in an LNTuningLayer holding a
trainable deep copy of it (``ln_tuning_layers.<adapter>``), so the forward is the module's own
with its parameters trainable. pyedge needs no graph rewrite: the module's initializers (its
weight and bias) become trainable tensors; the core's norm ops already have their backward.

PEFT file: ``base_model.model.<module>.ln_tuning_layers.<param>`` (PyTorch layout, the whole
tensor); config peft_type LN_TUNING, target_modules. Merge: the trained tensors replace the
base ones (delta = new - old).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from pyedge.adapters import common
from pyedge.adapters.base import AdapterMethod, register

PREFIX = "ln_tuning_layers"
_PEFT_PASSIVE = {**common.PEFT_BOOKKEEPING, "peft_type": "LN_TUNING"}


@dataclasses.dataclass(init=False)
class LNTuningConfig:
    """LN tuning settings, mirroring peft.LNTuningConfig: target_modules (module names, or a
    regex string on the whole name, as PEFT), e.g. ["input_layernorm",
    "post_attention_layernorm", "norm"] (Llama) or ["LayerNorm"] (BERT)."""
    target_modules: Sequence[str] | str = ()
    seed: int = 0

    def __init__(self, target_modules: Sequence[str] | str = (), seed: int = 0, **peft_fields):
        common.check_peft_fields("LNTuningConfig", _PEFT_PASSIVE, peft_fields)
        if not target_modules:
            raise ValueError("LNTuningConfig: target_modules is required (e.g. ['LayerNorm'] "
                             "or ['input_layernorm', 'post_attention_layernorm', 'norm'])")
        self.target_modules, self.seed = target_modules, seed

    def targets(self, module: str) -> bool:
        return common.targets(self.target_modules, module)


@dataclasses.dataclass
class LnSite:
    module: str                 # PyTorch module name
    weight: str                 # its first initializer (the protocol's `weight`)
    params: dict                # {PyTorch param name ("weight", "bias"): ONNX initializer}


def select_ln_sites(graph, cfg: LNTuningConfig) -> list[LnSite]:
    sites: dict[str, LnSite] = {}
    for name, arr in graph.initializers.items():
        e = graph.param_map.get(name) or {}
        module = e.get("module")
        if not module or arr.dtype.kind != "f" or e.get("buffer") or not cfg.targets(module):
            continue
        others = {a.rpartition(".")[0] for a in e.get("aliases", ())} - {module}
        if others:  # one tensor for several modules: PEFT trains them apart, we could not
            raise ValueError(f"LN tuning on '{module}': its tensor '{name}' is shared with "
                             f"{sorted(others)[:3]} in the ONNX file (the exporter merged equal "
                             "tensors); re-export keeping them apart")
        site = sites.setdefault(module, LnSite(module, name, {}))
        site.params[e.get("param", name)] = name
    if not sites:
        mods = sorted({e.get("module") for e in graph.param_map.values() if e.get("module")})
        raise ValueError(f"no module matches LN tuning targets {cfg.target_modules!r}; modules: "
                         f"{', '.join(mods[:20]) or 'none'}")
    return list(sites.values())


class LNTuningMethod(AdapterMethod):
    name = "ln_tuning"
    peft_type = "LN_TUNING"
    config_class = LNTuningConfig
    op_rules = {}
    peft_suffixes = (PREFIX,)   # keys "<module>.ln_tuning_layers.<param>"

    def inject(self, graph, cfg) -> list[LnSite]:
        return select_ln_sites(graph, cfg)   # no rewrite: the tensors train in place

    def trainable(self, sites) -> list[str]:
        return [init for s in sites for init in s.params.values()]

    def peft_config(self, cfg, sites) -> dict:
        return {"exclude_modules": None}

    def peft_tensors(self, sites, params) -> dict:
        return {f"{s.module}.{PREFIX}.{p}": np.array(params[init])
                for s in sites for p, init in s.params.items()}

    def config_from_peft(self, config: dict, target_modules) -> LNTuningConfig:
        return LNTuningConfig(target_modules=target_modules)

    @staticmethod
    def _own(ad) -> dict:
        """{(module, param): array} of the folder's ln_tuning_layers tensors (AdapterFiles.extra
        holds them as {module: {"ln_tuning_layers.<param>": array}})."""
        return {(module, k[len(PREFIX) + 1:]): arr for module, ts in ad.extra.items()
                for k, arr in ts.items() if k.startswith(PREFIX + ".")}

    def check_files(self, config, own, keys, shown, cfg_path):
        from pyedge.export.adapter_files import AdapterError, q, targets_module
        for module in own:
            if not targets_module(config, module):
                raise AdapterError(f"{shown}: LN tuning tensors for module {q(module)}, which "
                                   "target_modules does not select")

    def plan_load(self, session, ad, strict: bool):
        from pyedge.export.adapter_files import q
        params = session.trainable_parameters()
        writes, loaded, skipped, problems = {}, [], [], []
        by_key = {(s.module, p): init for s in session.adapter_sites
                  for p, init in s.params.items()}
        own = self._own(ad)
        for (module, param), arr in own.items():
            init = by_key.get((module, param))
            if init is None:
                (problems if strict else skipped).append(
                    f"{module}.{PREFIX}.{param}: module {q(module)} is not tuned by the session"
                    if strict else module)
                continue
            if tuple(arr.shape) != tuple(params[init].shape):
                problems.append(f"{q(module + '.' + PREFIX + '.' + param)} has shape "
                                f"{list(arr.shape)}, expected {list(params[init].shape)}")
                continue
            writes[init] = arr
            loaded.append(init)
        for key in by_key:
            if key not in own:
                (problems if strict else skipped).append(
                    f"no {PREFIX}.{key[1]} for module {q(key[0])}" if strict else key[0])
        return writes, loaded, skipped, problems

    def merge_deltas(self, graph, config: dict, ad) -> dict:
        from pyedge.export.adapter_files import AdapterError
        from pyedge.export.peft import torch_names_to_onnx
        names = torch_names_to_onnx(graph.param_map, graph.initializers)
        deltas = {}
        for (module, param), arr in self._own(ad).items():
            hit = names.get(f"{module}.{param}")
            if hit is None:
                raise AdapterError(f"LN tuning tensor '{module}.{param}' has no counterpart in "
                                   "the model")
            init, _ = hit
            base = graph.initializers[init]
            if tuple(arr.shape) != tuple(base.shape):
                raise AdapterError(f"LN tuning tensor '{module}.{param}' has shape "
                                   f"{list(arr.shape)}, the model's is {list(base.shape)}")
            deltas[init] = np.asarray(arr, np.float64) - base.astype(np.float64)
        return deltas


register(LNTuningMethod())
