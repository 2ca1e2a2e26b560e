"""(IA)³ (PEFT's ``IA3Config``): a learned vector rescales a targeted linear layer.

PEFT (peft/tuners/ia3/layer.py, 0.21), per nn.Linear y = x·Wᵀ + b with W [out, in]:

    attention-side module (keys, values):  y = (x·Wᵀ + b) ∘ l,   l [out]  (saved as [out, 1])
    feed-forward module:                   y = (x ∘ l)·Wᵀ + b,   l [in]   (saved as [1, in])

l starts at 1 (init_ia3_weights=True), so the model starts unchanged. Feed-forward modules are
those ``feedforward_modules`` selects (a subset of target_modules; a list entry matches a
module whose name *ends with* it, a string is a regex on the whole name, as in PEFT).

The rewrite needs no op of its own: a broadcasting ``Mul`` by the 1-D vector, after the
module's output (after its bias Add, which PEFT scales too) or before its input. The core's
Mul has the backward (a reduction over the broadcast rows gives l's gradient).

PEFT file: ``base_model.model.<module>.ia3_l`` ([out, 1] or [1, in]); config peft_type IA3,
target_modules, feedforward_modules. Merge (PEFT's Linear.merge): W ∘ l along out (and b ∘ l)
or along in.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from pyedge.adapters import common
from pyedge.adapters.base import register
from pyedge.graph import Graph, Node

SUFFIX = "ia3_l"
_PEFT_PASSIVE = {**common.PEFT_BOOKKEEPING, "fan_in_fan_out": None, "peft_type": "IA3"}


@dataclasses.dataclass(init=False)
class IA3Config:
    """(IA)³ settings, mirroring peft.IA3Config: target_modules (module names, or a regex
    string), feedforward_modules (those of the targets whose *input* is scaled; list entries
    match by name suffix, a string by regex), init_ia3_weights (True: vectors of ones)."""
    target_modules: Sequence[str] | str = ()
    feedforward_modules: Sequence[str] | str = ()
    init_ia3_weights: bool = True
    seed: int = 0

    def __init__(self, target_modules: Sequence[str] | str = (),
                 feedforward_modules: Sequence[str] | str | None = None,
                 init_ia3_weights: bool = True, seed: int = 0, **peft_fields):
        common.check_peft_fields("IA3Config", _PEFT_PASSIVE, peft_fields)
        if not target_modules:
            raise ValueError("IA3Config: target_modules is required (e.g. ['k_proj', "
                             "'v_proj', 'down_proj'] with feedforward_modules=['down_proj'])")
        self.target_modules = target_modules
        self.feedforward_modules = feedforward_modules if feedforward_modules is not None \
            else []
        self.init_ia3_weights, self.seed = bool(init_ia3_weights), seed

    def targets(self, module: str) -> bool:
        return common.targets(self.target_modules, module)

    def is_feedforward(self, module: str) -> bool:
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, module) is not None
        return any(module.endswith(t) for t in ff)  # PEFT: plain suffix


@dataclasses.dataclass
class IA3Site:
    module: str           # PyTorch module name
    weight: str           # ONNX initializer of the base weight
    vector: str           # the trained initializer, 1-D [n]
    feedforward: bool     # l scales the input [in] (else the output [out])
    in_features: int
    out_features: int
    trans_w: bool         # the ONNX weight is [out, in]
    bias: str = ""        # the bias initializer scaled with the output (attention side)


def _bias_after(graph: Graph, consumers, node: Node, n: int) -> Node | None:
    """The Add of a 1-D [n] initializer that alone consumes a MatMul's output (the bias)."""
    users = consumers.get(node.outputs[0], [])
    if node.op_type != "MatMul" or len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    other = [i for i in add.inputs if i != node.outputs[0]]
    if len(other) == 1 and other[0] in graph.initializers and \
            graph.initializers[other[0]].shape == (n,):
        return add
    return None


def inject_ia3(graph: Graph, cfg: IA3Config) -> list[IA3Site]:
    """Rewrites `graph` in place (a Mul per targeted MatMul/Gemm); returns the sites."""
    consumers = graph.consumer_map()
    sites: dict[str, IA3Site] = {}
    before: dict[int, list[Node]] = {}    # id(node) -> Mul to insert before it (feed-forward)
    after: dict[int, list[Node]] = {}     # id(node) -> Mul to insert after it
    for t in common.linear_targets(graph, cfg, "(IA)³"):
        node, module, k, n = t.node, t.module, t.in_features, t.out_features
        ff = cfg.is_feedforward(module)
        site = sites.get(module)
        if site is None:
            name = f"{module}.{SUFFIX}"
            graph.initializers[name] = np.ones(k if ff else n, np.float32)
            if not cfg.init_ia3_weights:  # PEFT: torch.randn, here pyedge's generator
                rng = np.random.default_rng(cfg.seed + len(sites))
                graph.initializers[name] = rng.standard_normal(k if ff else n).astype(np.float32)
            site = sites[module] = IA3Site(module, t.weight, name, ff, k, n, t.trans_w)
        if ff:
            x = graph.fresh_name(f"{node.inputs[0]}/ia3")
            before[id(node)] = [Node("Mul", [node.inputs[0], site.vector], [x],
                                     f"{node.name or module}/ia3", "", {})]
            node.inputs[0] = x
            continue
        last = node
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2]:
            site.bias = node.inputs[2]
        else:
            add = _bias_after(graph, consumers, node, n)
            if add is not None:
                last = add
                site.bias = next(i for i in add.inputs if i != node.outputs[0])
        y = last.outputs[0]
        z = graph.fresh_name(f"{y}/pre_ia3")
        if last is not node:  # the bias Add reads the MatMul's output by name: keep it
            last.outputs[0] = z
        else:
            node.outputs[0] = z
        after[id(last)] = [Node("Mul", [z, site.vector], [y], f"{node.name or module}/ia3",
                                "", {})]
    common.splice(graph, before=before, after=after)
    return list(sites.values())


def _peft_shape(site: IA3Site) -> tuple[int, int]:
    return (1, site.in_features) if site.feedforward else (site.out_features, 1)


class IA3Method(common.OneTensorMethod):
    name = "ia3"
    peft_type = "IA3"
    config_class = IA3Config
    op_rules = {}           # standard Mul nodes: the generic passes already know them
    suffix, site_attr, label = SUFFIX, "vector", "(IA)³"

    def inject(self, graph, cfg) -> list[IA3Site]:
        return inject_ia3(graph, cfg)

    def file_shape(self, site, shape) -> tuple:
        return _peft_shape(site)

    def peft_config(self, cfg, sites) -> dict:
        return {"feedforward_modules": [s.module for s in sites if s.feedforward],
                "fan_in_fan_out": False, "init_ia3_weights": bool(cfg.init_ia3_weights),
                "exclude_modules": None}

    def config_from_peft(self, config: dict, target_modules) -> IA3Config:
        return IA3Config(target_modules=target_modules,
                         feedforward_modules=config.get("feedforward_modules") or [])

    def check_files(self, config, own, keys, shown, cfg_path):
        """adapter_files hook: ia3_l tensors are 2-D with one axis 1, for targeted modules."""
        from pyedge.export.adapter_files import AdapterError, q, targets_module
        for module, ts in own.items():
            for suffix, arr in ts.items():
                key = keys[(module, suffix)]
                if arr.ndim != 2 or 1 not in arr.shape:
                    raise AdapterError(f"{shown}: tensor {q(key)} has shape {list(arr.shape)}, "
                                       "expected [out, 1] or [1, in]")
                if not targets_module(config, module):
                    raise AdapterError(f"{shown}: tensor {q(key)} adapts module {q(module)}, "
                                       "which target_modules does not select")

    def check_site(self, ad, module, site) -> None:
        from pyedge.export.adapter_files import AdapterError, q
        ff = IA3Config(target_modules=["-"], feedforward_modules=ad.config.get(
            "feedforward_modules") or []).is_feedforward(module)
        if ff != site.feedforward:
            raise AdapterError(f"{ad.config_path}: module {q(module)} is "
                               f"{'' if ff else 'not '}in feedforward_modules, unlike in the "
                               "session")

    def merge_deltas(self, graph, config: dict, ad) -> dict:
        from pyedge.export.adapter_files import AdapterError
        _, sites = common.inject_for_merge(
            graph.copy(), inject_ia3, lambda tm: self.config_from_peft(config, tm),
            self.modules_in(ad), "(IA)³")
        deltas: dict[str, np.ndarray] = {}
        for s in sites:
            l = np.asarray(ad.extra[s.module][SUFFIX], np.float64)
            if l.shape != _peft_shape(s):
                raise AdapterError(f"'{s.module}': ia3_l {list(l.shape)} does not fit the "
                                   f"weight (expected {list(_peft_shape(s))})")
            l = l.reshape(-1)
            W = graph.initializers[s.weight].astype(np.float64)
            # W is [in, out] unless trans_w; scale its in or out axis
            axis_out = 0 if s.trans_w else 1
            axis = 1 - axis_out if s.feedforward else axis_out
            shape = [1, 1]
            shape[axis] = -1
            deltas[s.weight] = W * (l.reshape(shape) - 1.0)
            if s.bias and not s.feedforward:
                b = graph.initializers[s.bias].astype(np.float64)
                deltas[s.bias] = b * (l - 1.0)
        return deltas


register(IA3Method())
