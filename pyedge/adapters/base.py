"""The adapter protocol: what one fine-tuning method (LoRA, DoRA, IA³, ...) declares, and the
registry that finds it from a config object or from a PEFT ``adapter_config.json``.

A method is one module under ``pyedge/adapters/`` holding one `AdapterMethod` subclass,
registered with `register()` (see `_load_builtin`), and its C++ op(s) in ``csrc/ops/``. The
rest of pyedge (session, PEFT save/load, merge, fusions, row pruning) asks the method through
this interface and holds no method-specific code. What a method module must provide:

* ``name`` (short, for ``pyedge train --method``), ``peft_type`` (PEFT's ``peft_type``
  string, e.g. "LORA"), ``config_class`` (a config mirroring PEFT's class name and fields;
  see `peft_field` for accepting PEFT's long field names beside pyedge's short ones);
* ``accepts_peft(config: dict) -> bool``: whether a PEFT config (peft_type already equal to
  ``peft_type``) is this method, for flags that select a variant (``use_dora``);
  ``accepts(cfg) -> bool``: the same for a config object;
* ``inject(graph, cfg) -> list[site]``: the graph rewrite, in place. It creates the
  trainable tensors as initializers with their initial values (exactly PEFT's initialisation,
  seeded by ``cfg.seed``) and may replace frozen initializers (PiSSA's residual base). Sites
  are method-defined records; each has ``module`` (the PyTorch module name) and ``weight``
  (the ONNX initializer of the base weight);
* ``trainable(sites) -> list[str]``: initializer names the optimizer updates;
  ``lr_scales(sites, cfg) -> {name: factor}``: per-tensor learning-rate factors (LoRA+);
* ``peft_config(cfg, sites) -> dict``: the method's fields of ``adapter_config.json``
  (pyedge adds peft_type, task_type, target_modules, modules_to_save, ...);
  ``peft_tensors(sites, params) -> {key without "base_model.model.": array}``: what PEFT's
  ``save_pretrained`` writes (float32, PyTorch layout);
  ``config_from_peft(config: dict, target_modules) -> cfg``: the config a session needs to
  load such a folder; ``plan_load(session, ad, strict) -> (writes, loaded, skipped,
  problems)``: the trainable values a validated folder (export/adapter_files.AdapterFiles)
  gives a session, checked against its sites, nothing written;
* ``merge_deltas(graph, config: dict, ad) -> {initializer: delta}``: float64 deltas, in the
  initializer's layout, that fold the adapters into the base weights (pyedge merge);
* ``op_rules: {(domain, op_type): OpRule}``: how the generic graph passes treat the
  method's ops (fusions: which input is an optional bias [N]; row pruning: which input the
  output's rows follow and whether rows may be dropped, e.g. not under per-row dropout masks).

Adding a method touches its module, its op and its tests; nothing else branches on methods.
What methods built from standard ops share (PEFT's bookkeeping config fields, target matching,
finding the targeted MatMul/Gemm layers, splicing nodes, and the load plan / PEFT tensors /
merge re-injection of a method that trains one tensor per module: `OneTensorMethod`) lives in
``pyedge/adapters/common.py``; a method uses it, the contract above stays the same.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from pyedge.graph import Node


@dataclasses.dataclass(frozen=True)
class OpRule:
    """How generic passes (pyedge/fusions.py, pyedge/row_pruning.py) treat an adapter op.

    row_input: the output has this input's leading (row) axes, and output row i depends on
        that input's row i only (the other inputs are per-column constants): row pruning may
        move a Gather of output rows onto this input.
    rows_movable(node): False where rows are not independent (dropout masks are drawn over
        the whole [M, K] input, so gathering rows would change which mask a row gets).
    bias_input: index of an optional bias [N] input that fusions may fill from a following
        Add (None: the op takes no bias).
    weight_input / trans_attr: where the [K, N] (or [N, K] when the attribute is 1) weight is,
        so a pass can tell N.
    """
    row_input: int = 0
    rows_movable: Callable[[Node], bool] = lambda node: True
    bias_input: int | None = None
    weight_input: int | None = None
    trans_attr: str = ""


class AdapterMethod:
    """Base of every method (see the module doc for the contract)."""
    name: str = ""
    peft_type: str = ""
    config_class: type = object
    op_rules: dict = {}
    # tensor suffixes (after "<module>.") a non-LoRA method saves, e.g. ("ia3_l",): the folder
    # reader hands them to the method (AdapterFiles.extra, checked by `check_files`)
    peft_suffixes: tuple = ()

    def check_files(self, config: dict, own: dict, keys: dict, shown: str, cfg_path: str):
        """Checks the method's own tensors ({module: {suffix: array}}) of a folder."""

    def accepts(self, cfg) -> bool:
        return isinstance(cfg, self.config_class)

    def accepts_peft(self, config: dict) -> bool:
        return True

    def inject(self, graph, cfg) -> list:
        raise NotImplementedError

    def trainable(self, sites) -> list[str]:
        raise NotImplementedError

    def lr_scales(self, sites, cfg) -> dict[str, float]:
        return {}

    def peft_config(self, cfg, sites) -> dict:
        raise NotImplementedError

    def peft_tensors(self, sites, params) -> dict:
        raise NotImplementedError

    def config_from_peft(self, config: dict, target_modules):
        raise NotImplementedError

    def plan_load(self, session, ad, strict: bool):
        raise NotImplementedError

    def merge_deltas(self, graph, config: dict, ad) -> dict:
        raise NotImplementedError


_METHODS: list[AdapterMethod] = []


def register(method: AdapterMethod) -> AdapterMethod:
    """Adds a method; the most recently registered one wins when two accept a config (a
    variant such as DoRA registers after the LoRA it refines)."""
    _METHODS.insert(0, method)
    return method


_BUILTIN = ("pyedge.adapters.lora", "pyedge.adapters.dora", "pyedge.adapters.ia3",
            "pyedge.adapters.ln_tuning", "pyedge.adapters.hra",
            "pyedge.adapters.miss", "pyedge.adapters.vera",
            "pyedge.adapters.fourierft")


def _load_builtin():
    """Imports the built-in method modules (each registers itself on import)."""
    import importlib
    for mod in _BUILTIN:
        importlib.import_module(mod)


def methods() -> list[AdapterMethod]:
    _load_builtin()
    return list(_METHODS)


def method_for_config(cfg) -> AdapterMethod:
    for m in methods():
        if m.accepts(cfg):
            return m
    raise ValueError(f"{type(cfg).__name__} is not an adapter config pyedge knows "
                     f"(methods: {', '.join(m.name for m in methods())})")


def method_by_name(name: str) -> AdapterMethod:
    for m in methods():
        if m.name == name.lower():
            return m
    raise ValueError(f"unknown adapter method '{name}'; choose one of "
                     f"{', '.join(sorted(m.name for m in methods()))}")


def method_for_peft(config: dict, where: str = "adapters") -> AdapterMethod:
    """The method of a PEFT adapter_config.json; AdapterError naming PEFT's method when pyedge
    has none for it."""
    from pyedge.export.adapter_files import AdapterError
    pt = config.get("peft_type", "LORA")
    if not isinstance(pt, str):
        raise AdapterError(f"{where}: peft_type {pt!r} is not a string")
    same = [m for m in methods() if m.peft_type == pt.upper()]
    for m in same:
        if m.accepts_peft(config):
            return m
    known = sorted({m.peft_type for m in methods()})
    if same:
        raise AdapterError(f"{where}: this {pt} variant is not one pyedge can load (it has "
                           f"{', '.join(m.name for m in same)})")
    raise AdapterError(f"{where}: peft_type is {pt!r}, a PEFT method pyedge cannot load (it "
                       f"reads {', '.join(known)} adapters)")


def op_rule(node: Node) -> OpRule | None:
    """The rule of an adapter op (None for every other op)."""
    for m in methods():
        rule = m.op_rules.get((node.domain, node.op_type))
        if rule is not None:
            return rule
    return None


def peft_field(kwargs: dict, short: str, long: str, value, default):
    """`short` (pyedge's name, given as `value`) or `long` (PEFT's, in kwargs): one of them."""
    if long in kwargs:
        other = kwargs.pop(long)
        if value is not None and value != other:
            raise TypeError(f"both {short}={value!r} and {long}={other!r} given; use one")
        value = other
    return default if value is None else value
