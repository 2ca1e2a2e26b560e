"""LoRA as a graph rewrite: each targeted MatMul/Gemm whose weight is an initializer becomes a
fused `pyedge.LoraMatMul(x, W, A, B[, bias])` computing x·W + s·(x·Aᵀ)·Bᵀ, with PEFT's layout
(A [r, in], B [out, r]), initialisation (A kaiming-uniform(a=√5), B = 0) and scaling
(alpha/r, or alpha/√r with rsLoRA).

Which base ops can carry LoRA is one table (`_rules`): MatMul/Gemm here, Conv in lora_conv.py,
the quantized MatMulNBits/MatMulBnb4 in lora_quant.py (-> pyedge.LoraQuantMatMul)."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from pyedge.adapters.base import AdapterMethod, OpRule, register
from pyedge.adapters.patterns import any_match
from pyedge.graph import Graph, Node
from pyedge.param_names import module_of


# PEFT LoraConfig fields pyedge accepts and ignores: they describe the PyTorch side (task,
# layout, inference flag) or equal pyedge's behaviour at these values.
_PEFT_PASSIVE = {"task_type": None, "fan_in_fan_out": None, "inference_mode": None,
                 "bias": "none", "modules_to_save": None, "base_model_name_or_path": None,
                 "revision": None, "layers_to_transform": None, "layers_pattern": None,
                 "rank_pattern": {}, "alpha_pattern": {}, "peft_type": "LORA"}
INIT_CHOICES = (True, False, "gaussian", "pissa", "olora")


@dataclasses.dataclass(init=False)
class LoraConfig:
    """LoRA settings, mirroring peft.LoraConfig: r, lora_alpha (or alpha), lora_dropout (or
    dropout), target_modules, use_rslora (scale alpha/sqrt(r)), use_dora (DoRA: a trained
    magnitude per output feature, pyedge/adapters/dora.py), init_lora_weights (True: A
    kaiming-uniform, B = 0; "gaussian": A ~ N(0, 1/r); "pissa" / "olora": A and B from the SVD / QR
    of the base weight, which becomes the residual; pyedge/adapters/lora_init.py) and
    loraplus_lr_ratio (LoRA+: B trains with lr x ratio, as peft.optimizers.
    create_loraplus_optimizer). seed: pyedge's generator for A (PEFT uses torch's)."""
    r: int = 8
    alpha: float = 16.0
    target_modules: Sequence[str] = ("query", "value")
    dropout: float = 0.0
    use_rslora: bool = False
    seed: int = 0
    use_dora: bool = False
    init_lora_weights: bool | str = True
    loraplus_lr_ratio: float | None = None

    def __init__(self, r: int = 8, alpha: float | None = None,
                 target_modules: Sequence[str] | str = ("query", "value"),
                 dropout: float | None = None, use_rslora: bool = False, seed: int = 0,
                 use_dora: bool = False, init_lora_weights: bool | str = True,
                 loraplus_lr_ratio: float | None = None, **peft_fields):
        from pyedge.adapters.base import peft_field
        self.r = r
        self.alpha = peft_field(peft_fields, "alpha", "lora_alpha", alpha, 16.0)
        self.dropout = peft_field(peft_fields, "dropout", "lora_dropout", dropout, 0.0)
        self.target_modules = [target_modules] if isinstance(target_modules, str) \
            else target_modules
        self.use_rslora, self.seed, self.use_dora = use_rslora, seed, use_dora
        self.init_lora_weights, self.loraplus_lr_ratio = init_lora_weights, loraplus_lr_ratio
        from pyedge.adapters.common import check_peft_fields
        check_peft_fields("LoraConfig", _PEFT_PASSIVE, peft_fields)
        if init_lora_weights not in INIT_CHOICES:
            raise ValueError(f"LoraConfig: init_lora_weights={init_lora_weights!r} is not one "
                             f"of {INIT_CHOICES}")
        if loraplus_lr_ratio is not None and not loraplus_lr_ratio > 0:
            raise ValueError(f"LoraConfig: loraplus_lr_ratio must be positive, got "
                             f"{loraplus_lr_ratio!r}")

    @property
    def lora_alpha(self) -> float:
        return self.alpha

    @property
    def lora_dropout(self) -> float:
        return self.dropout

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


@dataclasses.dataclass
class LoraSite:
    module: str          # PyTorch module name
    weight: str          # ONNX initializer of the base weight
    lora_a: str          # initializer names of the adapter tensors
    lora_b: str
    in_features: int
    out_features: int
    fan_in_fan_out: bool  # the PyTorch weight is [in, out] (transformers Conv1D)
    trans_w: bool = False  # the ONNX weight is [out, in] (what LoraMatMul's trans_w says)
    magnitude: str = ""    # DoRA's magnitude vector [out] (pyedge/adapters/dora.py)


def _weight_source(graph: Graph, producers, name: str):
    """(initializer, transposed_by_graph) for a MatMul B input, looking through Transpose."""
    if name in graph.initializers:
        return name, False
    p = producers.get(name)
    if p is not None and p.op_type == "Transpose" and p.inputs[0] in graph.initializers:
        perm = p.attrs.get("perm", [1, 0])
        if list(perm) == [1, 0] and graph.initializers[p.inputs[0]].ndim == 2:
            return p.inputs[0], True
    return None, False


def _linear_weight(graph: Graph, producers, node: Node) -> str | None:
    if len(node.inputs) < 2:
        return None
    w, _ = _weight_source(graph, producers, node.inputs[1])
    return w if w is not None and graph.initializers[w].ndim == 2 else None


def _conv_weight(graph: Graph, producers, node: Node) -> str | None:
    return node.inputs[1] if len(node.inputs) >= 2 and node.inputs[1] in graph.initializers \
        else None


def _rewrite_linear(graph, node, w, module, cfg, rng, sites):
    fused = _rewrite(graph, node, w, node.inputs[1] != w, module, cfg, rng, sites)
    return [fused] if fused else None


def _rules() -> dict:
    """(domain, op type) -> (weight of the node or None, rewrite into LoRA nodes or None).
    One entry per base op; a new base op is one more entry."""
    from pyedge.adapters.lora_conv import rewrite_conv  # they build on this module
    from pyedge.adapters.lora_quant import quant_weight, rewrite_quant
    conv = (_conv_weight, lambda g, n, w, m, c, r, s: rewrite_conv(g, n, m, c, r, s))
    quant = (quant_weight, rewrite_quant)
    return {("", "MatMul"): (_linear_weight, _rewrite_linear),
            ("", "Gemm"): (_linear_weight, _rewrite_linear),
            ("", "Conv"): conv,
            ("com.microsoft", "MatMulNBits"): quant,
            ("com.microsoft", "MatMulBnb4"): quant}


def inject_lora(graph: Graph, cfg: LoraConfig) -> list[LoraSite]:
    """Rewrites `graph` in place; returns the adapted sites (in graph order)."""
    if cfg.r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {cfg.r}")
    rng = np.random.default_rng(cfg.seed)
    rules = _rules()
    producers = graph.producer_map()
    sites: list[LoraSite] = []
    new_nodes: list[Node] = []
    with_weight: list[str] = []
    for node in graph.nodes:
        replacement = None
        rule = rules.get((node.domain, node.op_type))
        w = rule[0](graph, producers, node) if rule else None
        if w is not None:
            module = module_of(graph, w)
            with_weight.append(module)
            if any_match(module, cfg.target_modules):
                replacement = rule[1](graph, node, w, module, cfg, rng, sites)
        new_nodes.extend(replacement or [node])
    graph.nodes = new_nodes
    if not sites:
        mods = sorted(set(with_weight))
        raise ValueError(f"no module matches LoRA targets {list(cfg.target_modules)}; "
                         f"modules with a weight: {', '.join(mods[:20]) or 'none'}")
    return sites


def _rewrite(graph, node, w, via_transpose, module, cfg, rng, sites):
    W = graph.initializers[w]
    trans_w = via_transpose
    bias = ""
    if node.op_type == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0:
            return None
        trans_w = bool(node.attrs.get("transB", 0)) != via_transpose
        if len(node.inputs) > 2 and node.inputs[2]:
            c = graph.initializers.get(node.inputs[2])
            if c is None or c.ndim != 1 or node.attrs.get("beta", 1.0) != 1.0:
                return None
            bias = node.inputs[2]
    k, n = (W.shape[1], W.shape[0]) if trans_w else (W.shape[0], W.shape[1])
    entry = graph.param_map.get(w, {})
    # The ONNX weight is [in, out] when not transposed; PyTorch's is [out, in] for nn.Linear,
    # unless the exporter kept a transposed copy. transformers' Conv1D stores [in, out].
    torch_is_in_out = not trans_w and not entry.get("transposed", False)
    a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    if a_name not in graph.initializers:  # a module applied twice shares one adapter
        bound = 1.0 / math.sqrt(k)
        graph.initializers[a_name] = rng.uniform(-bound, bound, size=(cfg.r, k)).astype(np.float32)
        graph.initializers[b_name] = np.zeros((n, cfg.r), np.float32)
        sites.append(LoraSite(module, w, a_name, b_name, int(k), int(n),
                              fan_in_fan_out=torch_is_in_out, trans_w=bool(trans_w)))
        if cfg.init_lora_weights is not True:
            from pyedge.adapters.lora_init import initialise
            initialise(graph, sites[-1], cfg, rng)
    attrs = {"scale": float(cfg.scaling), "trans_w": int(trans_w)}
    if cfg.dropout > 0:
        attrs["dropout"] = float(cfg.dropout)
        attrs["salt"] = len(sites)
    inputs = [node.inputs[0], w, a_name, b_name] + ([bias] if bias else [])
    return Node("LoraMatMul", inputs, list(node.outputs), name=node.name, domain="pyedge",
                attrs=attrs)


# --------------------------------------------------------------------------------------------
# the method (pyedge/adapters/base.py)
# --------------------------------------------------------------------------------------------
def _no_dropout(node: Node) -> bool:
    return not float(node.attrs.get("dropout", 0.0))


class LoraMethod(AdapterMethod):
    """LoRA (and rsLoRA, LoRA+, PiSSA/OLoRA/gaussian initialisation) on MatMul/Gemm, Conv and
    quantized MatMulNBits/MatMulBnb4 bases. Ops: pyedge.LoraMatMul (csrc/ops/lora_matmul.cpp),
    pyedge.LoraQuantMatMul (csrc/ops/quant_lora_matmul.cpp); Conv sites use standard ops."""
    name = "lora"
    peft_type = "LORA"
    config_class = LoraConfig
    op_rules = {
        # x [..., K] -> y [..., N]: rows independent unless dropout draws a mask over x
        ("pyedge", "LoraMatMul"): OpRule(row_input=0, rows_movable=_no_dropout, bias_input=4,
                                         weight_input=1, trans_attr="trans_w"),
        ("pyedge", "LoraQuantMatMul"): OpRule(row_input=0, rows_movable=_no_dropout),
    }

    def accepts(self, cfg) -> bool:
        return isinstance(cfg, LoraConfig) and not cfg.use_dora

    def accepts_peft(self, config: dict) -> bool:
        return not config.get("use_dora")

    def inject(self, graph, cfg) -> list[LoraSite]:
        return inject_lora(graph, cfg)

    def trainable(self, sites) -> list[str]:
        return [n for s in sites for n in (s.lora_a, s.lora_b)]

    def lr_scales(self, sites, cfg) -> dict[str, float]:
        # LoRA+ (peft.optimizers.create_loraplus_optimizer): B at lr·ratio, A at lr
        if not cfg.loraplus_lr_ratio:
            return {}
        return {s.lora_b: float(cfg.loraplus_lr_ratio) for s in sites}

    def peft_config(self, cfg, sites) -> dict:
        return {"r": int(cfg.r), "lora_alpha": _number(cfg.alpha),
                "lora_dropout": float(cfg.dropout), "use_rslora": bool(cfg.use_rslora),
                "use_dora": bool(cfg.use_dora), "init_lora_weights": cfg.init_lora_weights,
                "fan_in_fan_out": any(s.fan_in_fan_out for s in sites), "bias": "none",
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                "alpha_pattern": {}}

    def peft_tensors(self, sites, params) -> dict:
        from pyedge.adapters.lora_peft import lora_tensors
        return lora_tensors(sites, params)

    def noop_tensors(self, graph, module: str, n_in: int, n_out: int, r: int) -> dict:
        """Tensors of an exact no-op adapter on `module` (PEFT needs one for modules it
        adapts by suffix, and for a session that trains whole tensors only)."""
        return {f"{module}.lora_A.weight": np.zeros((r, n_in), np.float32),
                f"{module}.lora_B.weight": np.zeros((n_out, r), np.float32)}

    def config_from_peft(self, config: dict, target_modules) -> LoraConfig:
        return LoraConfig(r=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                          target_modules=target_modules,
                          use_rslora=bool(config.get("use_rslora", False)),
                          use_dora=bool(config.get("use_dora", False)),
                          init_lora_weights=config.get("init_lora_weights", True))

    def plan_load(self, session, ad, strict: bool):
        from pyedge.adapters.lora_peft import plan_lora_load
        return plan_lora_load(session, ad, strict)

    def merge_deltas(self, graph, config: dict, ad) -> dict:
        from pyedge.adapters.lora_peft import lora_deltas
        return lora_deltas(graph, config, ad.lora)


def _number(x):
    return int(x) if float(x).is_integer() else float(x)


register(LoraMethod())
