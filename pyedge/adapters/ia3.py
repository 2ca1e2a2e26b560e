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

from pyedge.adapters.base import AdapterMethod, register
from pyedge.adapters.patterns import any_match
from pyedge.graph import Graph, Node
from pyedge.param_names import module_of

SUFFIX = "ia3_l"
_PEFT_PASSIVE = {"task_type": None, "fan_in_fan_out": None, "inference_mode": None,
                 "modules_to_save": None, "base_model_name_or_path": None, "revision": None,
                 "exclude_modules": None, "peft_type": "IA3"}


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
        for k, v in peft_fields.items():
            if k not in _PEFT_PASSIVE:
                raise TypeError(f"IA3Config: unknown or unsupported field '{k}'")
            if _PEFT_PASSIVE[k] is not None and v not in (_PEFT_PASSIVE[k], None):
                raise ValueError(f"IA3Config: {k}={v!r} is not supported")
        if not target_modules:
            raise ValueError("IA3Config: target_modules is required (e.g. ['k_proj', "
                             "'v_proj', 'down_proj'] with feedforward_modules=['down_proj'])")
        self.target_modules = target_modules
        self.feedforward_modules = feedforward_modules if feedforward_modules is not None \
            else []
        self.init_ia3_weights, self.seed = bool(init_ia3_weights), seed

    def targets(self, module: str) -> bool:
        tm = self.target_modules
        if isinstance(tm, str):  # PEFT: a string is a regex on the whole name
            return re.fullmatch(tm, module) is not None
        return any_match(module, tm)

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
    from pyedge.adapters.lora import _linear_weight
    producers, consumers = graph.producer_map(), graph.consumer_map()
    sites: dict[str, IA3Site] = {}
    before: dict[int, Node] = {}    # id(node) -> Mul to insert before it (feed-forward)
    after: dict[int, Node] = {}     # id(node) -> Mul to insert after it
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
            raise ValueError(f"(IA)³ on '{module}': Gemm node '{node.name}' with transA/alpha "
                             "is not supported")
        via_t = node.inputs[1] != w
        trans_w = bool(node.attrs.get("transB", 0)) != via_t if node.op_type == "Gemm" \
            else via_t
        W = graph.initializers[w]
        k, n = (W.shape[1], W.shape[0]) if trans_w else (W.shape[0], W.shape[1])
        ff = cfg.is_feedforward(module)
        site = sites.get(module)
        if site is None:
            name = f"{module}.{SUFFIX}"
            graph.initializers[name] = np.ones(k if ff else n, np.float32)
            if not cfg.init_ia3_weights:  # PEFT: torch.randn, here pyedge's generator
                rng = np.random.default_rng(cfg.seed + len(sites))
                graph.initializers[name] = rng.standard_normal(k if ff else n).astype(np.float32)
            site = sites[module] = IA3Site(module, w, name, ff, int(k), int(n), trans_w)
        if ff:
            x = graph.fresh_name(f"{node.inputs[0]}/ia3")
            before[id(node)] = Node("Mul", [node.inputs[0], site.vector], [x],
                                    f"{node.name or module}/ia3", "", {})
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
        after[id(last)] = Node("Mul", [z, site.vector], [y], f"{node.name or module}/ia3",
                               "", {})
    if not sites:
        mods = sorted(set(with_weight))
        raise ValueError(f"no module matches (IA)³ targets {cfg.target_modules!r}; modules "
                         f"with a weight: {', '.join(mods[:20]) or 'none'}")
    nodes: list[Node] = []
    for node in graph.nodes:
        if id(node) in before:
            nodes.append(before[id(node)])
        nodes.append(node)
        if id(node) in after:
            nodes.append(after[id(node)])
    graph.nodes = nodes
    return list(sites.values())


def _peft_shape(site: IA3Site) -> tuple[int, int]:
    return (1, site.in_features) if site.feedforward else (site.out_features, 1)


class IA3Method(AdapterMethod):
    name = "ia3"
    peft_type = "IA3"
    config_class = IA3Config
    op_rules = {}           # standard Mul nodes: the generic passes already know them
    peft_suffixes = (SUFFIX,)

    def inject(self, graph, cfg) -> list[IA3Site]:
        return inject_ia3(graph, cfg)

    def trainable(self, sites) -> list[str]:
        return [s.vector for s in sites]

    def peft_config(self, cfg, sites) -> dict:
        return {"feedforward_modules": [s.module for s in sites if s.feedforward],
                "fan_in_fan_out": False, "init_ia3_weights": bool(cfg.init_ia3_weights),
                "exclude_modules": None}

    def peft_tensors(self, sites, params) -> dict:
        return {f"{s.module}.{SUFFIX}": np.array(params[s.vector]).reshape(_peft_shape(s))
                for s in sites}

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

    def plan_load(self, session, ad, strict: bool):
        from pyedge.export.adapter_files import AdapterError, q
        params = session.trainable_parameters()
        writes, loaded, skipped, problems = {}, [], [], []
        sites = {s.module: s for s in session.adapter_sites}
        ff_cfg = IA3Config(target_modules=["-"],
                           feedforward_modules=ad.config.get("feedforward_modules") or [])
        for module, ts in ad.extra.items():
            arr = ts.get(SUFFIX)
            if arr is None:
                continue
            key = ad.key_of(module, SUFFIX)
            site = sites.get(module)
            if site is None:
                (problems if strict else skipped).append(
                    f"{q(key)}: module {q(module)} is not adapted by the session" if strict
                    else module)
                continue
            if ff_cfg.is_feedforward(module) != site.feedforward:
                raise AdapterError(f"{ad.config_path}: module {q(module)} is "
                                   f"{'' if ff_cfg.is_feedforward(module) else 'not '}in "
                                   "feedforward_modules, unlike in the session")
            if tuple(arr.shape) != _peft_shape(site):
                problems.append(f"{q(key)} has shape {list(arr.shape)}, expected "
                                f"{list(_peft_shape(site))}")
                continue
            writes[site.vector] = arr.reshape(params[site.vector].shape)
            loaded.append(site.vector)
        for module, site in sites.items():
            if SUFFIX not in ad.extra.get(module, {}):
                (problems if strict else skipped).append(
                    f"no {SUFFIX} for module {q(module)}" if strict else module)
        return writes, loaded, skipped, problems

    def merge_deltas(self, graph, config: dict, ad) -> dict:
        from pyedge.export.adapter_files import AdapterError
        modules = [m for m, ts in ad.extra.items() if SUFFIX in ts]
        g = graph.copy()
        try:
            sites = inject_ia3(g, IA3Config(
                target_modules=["re:" + re.escape(m) for m in modules],
                feedforward_modules=config.get("feedforward_modules") or []))
        except ValueError as e:
            raise AdapterError(f"the (IA)³ modules {modules[:5]} are not in the model ({e})") \
                from e
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
        missing = sorted(set(modules) - {s.module for s in sites})
        if missing:
            raise AdapterError(f"(IA)³ module(s) {missing[:8]} have no MatMul/Gemm weight in "
                               "the model")
        return deltas


register(IA3Method())
