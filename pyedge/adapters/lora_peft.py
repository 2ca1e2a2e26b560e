"""The LoRA family in PEFT's format: the tensors it saves, how a validated folder loads into a
session's LoRA sites, and the merge delta. pyedge/adapters/lora.py (LoraMethod) declares these
as the method's hooks; pyedge/export/peft.py and merge.py call them through the registry.

Keys (after ``base_model.model.``): ``<module>.lora_A.weight`` [r, in, k...] and
``<module>.lora_B.weight`` [out, r, 1...]. Merge: W += s·B·A in the initializer's layout
(PiSSA/OLoRA: minus the initial s·B0·A0, which the base lost to the residual).
"""
from __future__ import annotations

import re

import numpy as np

from pyedge.export.adapter_files import AdapterError, module_scaling, q


def lora_tensors(sites, params) -> dict[str, np.ndarray]:
    out = {}
    for site in sites:
        out[f"{site.module}.lora_A.weight"] = np.array(params[site.lora_a])
        out[f"{site.module}.lora_B.weight"] = np.array(params[site.lora_b])
    return out


def _base_init(init):
    """What an init_lora_weights value does to the base weights (only pissa/olora change it)."""
    return init if init in ("pissa", "olora") else None


def plan_lora_load(session, ad, strict: bool, method_tensors=()):
    """The LoRA part of loading `ad` into `session`: (writes, loaded, skipped, problems).
    method_tensors: [(suffix, site attribute)] a variant adds per module (DoRA's magnitude)."""
    config, lora, shown = ad.config, ad.lora, ad.weights_path
    params = session.trainable_parameters()
    writes: dict[str, np.ndarray] = {}
    loaded: list[str] = []
    skipped: list[str] = []
    problems: list[str] = []
    sites = {s.module: s for s in session.lora_sites}
    cfg = session.lora_config
    if not sites:
        nonzero = [m for m, ab in lora.items() if any(np.any(a) for a in ab.values())]
        if nonzero and strict:
            problems.append(f"the adapters have LoRA for {', '.join(nonzero[:8])} but the "
                            "session has no LoRA config")
        return writes, loaded, skipped + sorted(lora), problems
    want_scale = float(cfg.scaling)
    init = config.get("init_lora_weights", True)
    if _base_init(init) != _base_init(cfg.init_lora_weights):
        raise AdapterError(f"{shown}: init_lora_weights={init!r} (the base weights become a "
                           "residual for pissa/olora), the session has "
                           f"init_lora_weights={cfg.init_lora_weights!r}; create the session with "
                           f"LoraConfig(init_lora_weights={init!r}, ...)")
    for module, ab in lora.items():
        site = sites.get(module)
        if site is None and not any(np.any(a) for a in ab.values()):
            skipped.append(module)  # an exact no-op (see peft._zero_lora_for_suffix_matches)
            continue
        if site is None:
            msg = f"LoRA for module {q(module)} which the session does not adapt " \
                  f"(session targets: {', '.join(sorted(sites)[:8])})"
            (problems if strict else skipped).append(msg if strict else module)
            continue
        r, scale = module_scaling(config, module)
        if r != cfg.r:
            raise AdapterError(f"{shown}: module {q(module)} has LoRA rank r={r}, the "
                               f"session uses r={cfg.r}; create the session with "
                               f"LoraConfig(r={r}, ...)")
        if not np.isclose(scale, want_scale, rtol=1e-6, atol=0):
            raise AdapterError(
                f"{shown}: LoRA scaling of {q(module)} is {scale:g} (lora_alpha="
                f"{config.get('lora_alpha')}, r={r}, use_rslora="
                f"{config.get('use_rslora', False)}), the session's is {want_scale:g} "
                f"(alpha={cfg.alpha}, r={cfg.r}, use_rslora={cfg.use_rslora})")
        pairs = [(ab[k], init, ad.key_of(module, k)) for k, init in
                 (("A", site.lora_a), ("B", site.lora_b))]  # adapter_files checked both
        for suffix, attr in method_tensors:
            arr = ad.extra.get(module, {}).get(suffix)
            if arr is None:
                problems.append(f"no {suffix} for module {q(module)}")
                continue
            pairs.append((arr, getattr(site, attr), f"{module}.{suffix}"))
        for arr, init, key in pairs:
            if tuple(arr.shape) != tuple(params[init].shape):
                problems.append(f"{q(key)} has shape {list(arr.shape)}, expected "
                                f"{list(params[init].shape)}")
                continue
            writes[init] = arr
            loaded.append(init)
    for module in sites:
        if module not in lora:
            if strict:
                problems.append(f"no LoRA tensors for module {q(module)} (the adapters "
                                f"adapt {', '.join(sorted(lora)[:8]) or 'nothing'})")
            else:
                skipped.append(module)
    return writes, loaded, skipped, problems


def lora_deltas(graph, config: dict, lora: dict[str, dict[str, np.ndarray]],
                layouts: dict | None = None) -> dict[str, np.ndarray]:
    """{ONNX initializer: s·ΔW in the initializer's layout} for the LoRA modules. `layouts`,
    when given, receives {module: (initializer, trans_w)} for MatMul/Gemm sites."""
    from pyedge.adapters.lora import LoraConfig, inject_lora

    from pyedge.param_names import module_of

    from pyedge.adapters.lora_init import effective_weight, initial_adapters
    deltas: dict[str, np.ndarray] = {}
    found: set[str] = set()
    init = config.get("init_lora_weights", True)
    # Conv weights (PEFT's ConvNd LoRA: A = Conv(in, r, k), B = Conv(r, out, 1)):
    # ΔW[o, i, ...] = Σ_r B[o, r] A[r, i, ...], same layout in ONNX and PyTorch.
    conv_weights = {module_of(graph, n.inputs[1]): n.inputs[1] for n in graph.nodes
                    if n.op_type == "Conv" and len(n.inputs) > 1
                    and n.inputs[1] in graph.initializers}
    by_rank: dict[int, list[str]] = {}
    for module, ab in lora.items():
        if "A" not in ab or "B" not in ab:
            raise AdapterError(f"module '{module}' has only lora_{'A' if 'A' in ab else 'B'}")
        if module in conv_weights:
            w = conv_weights[module]
            W = graph.initializers[w]
            A = np.asarray(ab["A"], np.float64)
            B = np.asarray(ab["B"], np.float64)
            r = A.shape[0]
            if A.shape[1:] != W.shape[1:] or B.shape[:2] != (W.shape[0], r) or \
                    any(d != 1 for d in B.shape[2:]):
                raise AdapterError(f"'{module}': lora_A {list(A.shape)} / lora_B "
                                   f"{list(B.shape)} do not fit the conv weight {list(W.shape)}")
            _, scale = module_scaling(config, module)
            d = scale * np.einsum("or,ri...->oi...", B.reshape(B.shape[0], r), A)
            deltas[w] = deltas[w] + d if w in deltas else d
            found.add(module)
            continue
        by_rank.setdefault(int(ab["A"].shape[0]), []).append(module)
    for r, modules in by_rank.items():
        g = graph.copy()
        cfg = LoraConfig(r=r, alpha=float(r), target_modules=[
            "re:" + re.escape(m) for m in modules])
        try:
            sites = inject_lora(g, cfg)
        except ValueError as e:
            raise AdapterError(f"the adapted modules {modules[:5]} are not in the model "
                               f"({e})") from e
        trans = {n.inputs[2]: bool(n.attrs.get("trans_w", 0)) for n in g.nodes
                 if n.op_type == "LoraMatMul" and n.domain == "pyedge"}
        # quantized bases (merge_quantized.py): the delta stays [out, in] like their weight
        trans.update({n.inputs[1]: True for n in g.nodes
                      if n.op_type == "LoraQuantMatMul" and n.domain == "pyedge"})
        for site in sites:
            A = np.asarray(lora[site.module]["A"], np.float64)
            B = np.asarray(lora[site.module]["B"], np.float64)
            if A.shape != (r, site.in_features) or B.shape != (site.out_features, r):
                raise AdapterError(
                    f"'{site.module}': lora_A {list(A.shape)} / lora_B {list(B.shape)} do not "
                    f"fit the weight (expected [{r}, {site.in_features}] / "
                    f"[{site.out_features}, {r}])")
            _, scale = module_scaling(config, site.module)
            ba = scale * (B @ A)                       # [out, in]
            if init in ("pissa", "olora"):  # the base is the residual W - s·B0·A0 (lora_init.py)
                A0, B0 = initial_adapters(effective_weight(graph.initializers[site.weight],
                                                           trans[site.lora_a]), r, scale, init)
                ba = ba - scale * (B0.astype(np.float64) @ A0.astype(np.float64))
            d = ba if trans[site.lora_a] else ba.T     # initializer layout
            if site.weight in deltas:
                deltas[site.weight] = deltas[site.weight] + d
            else:
                deltas[site.weight] = d
            found.add(site.module)
            if layouts is not None:
                layouts[site.module] = (site.weight, bool(trans[site.lora_a]))
    missing = sorted(set(lora) - found)
    if missing:
        raise AdapterError(f"adapted module(s) {missing[:8]} have no MatMul/Gemm weight in the "
                           "model (different model, or a layer type pyedge cannot merge)")
    return deltas


