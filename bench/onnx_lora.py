"""LoRA injected into an ONNX graph with plain ONNX ops, for onnxruntime-training (whose
artifact generator only knows standard ops), and the trainable-set / loss plumbing it needs.

For every MatMul/Gemm whose weight is an initializer (directly or through Transpose) of a
targeted module, ``y = op(x, W)`` becomes::

    y_base = op(x, W)                          (unchanged node, output renamed)
    y      = y_base + s * ((x · Aᵀ) · Bᵀ)      (MatMul, MatMul, Mul, Add)

with initializers ``<module>.lora_AT`` = Aᵀ [in, r] and ``<module>.lora_BT`` = Bᵀ [r, out],
A kaiming-uniform(a=√5) (bound 1/√in, as PEFT and pyedge), B = 0, s = alpha / r.
Works with onnx 1.16 (the ORT venv) and newer; needs onnx + numpy only.
"""
from __future__ import annotations

import fnmatch
import re

import numpy as np


def matches(module: str, pattern: str) -> bool:
    """pyedge's rule (pyedge/adapters/patterns.py): glob on the full path, re:..., or an
    exact name / dot-suffix like PEFT's target_modules."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], module) is not None
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(module, pattern)
    return module == pattern or module.endswith("." + pattern)


def _module(name: str) -> str:
    return name[:-len(".weight")] if name.endswith(".weight") else name


def inject_lora(model, targets, r=8, alpha=16.0, seed=0) -> list[str]:
    """Rewrites `model` (onnx.ModelProto) in place; returns the new trainable tensor names."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    rng = np.random.default_rng(seed)
    scale_name = "lora_scaling"
    g.initializer.append(numpy_helper.from_array(np.array(alpha / r, np.float32), scale_name))
    new_nodes, trainable = [], []
    for node in g.node:
        new_nodes.append(node)
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        w, transposed = node.input[1], False
        if w not in inits:
            p = producers.get(w)
            if p is None or p.op_type != "Transpose" or p.input[0] not in inits:
                continue
            perm = [list(a.ints) for a in p.attribute if a.name == "perm"]
            if perm and perm[0] != [1, 0]:
                continue
            w, transposed = p.input[0], True
        if node.op_type == "Gemm":
            at = {a.name: (a.i if a.type == 2 else a.f) for a in node.attribute}
            if at.get("transA", 0) or at.get("alpha", 1.0) != 1.0:
                continue
            transposed = bool(at.get("transB", 0)) != transposed
        dims = list(inits[w].dims)
        module = _module(w)
        if len(dims) != 2 or not any(matches(module, t) for t in targets):
            continue
        k, n = (dims[1], dims[0]) if transposed else (dims[0], dims[1])  # in, out
        bound = 1.0 / np.sqrt(k)
        a = rng.uniform(-bound, bound, size=(r, k)).astype(np.float32)
        at_name, bt_name = f"{module}.lora_AT", f"{module}.lora_BT"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(a.T), at_name))
        g.initializer.append(numpy_helper.from_array(np.zeros((r, n), np.float32), bt_name))
        trainable += [at_name, bt_name]
        y = node.output[0]
        base = f"{y}_lora_base"
        node.output[0] = base
        x = node.input[0]
        new_nodes += [
            helper.make_node("MatMul", [x, at_name], [f"{module}.lora_xa"], name=f"{module}.lora_a"),
            helper.make_node("MatMul", [f"{module}.lora_xa", bt_name], [f"{module}.lora_xab"],
                             name=f"{module}.lora_b"),
            helper.make_node("Mul", [f"{module}.lora_xab", scale_name], [f"{module}.lora_out"],
                             name=f"{module}.lora_scale"),
            helper.make_node("Add", [base, f"{module}.lora_out"], [y], name=f"{module}.lora_add"),
        ]
    if not trainable:
        raise ValueError(f"no MatMul/Gemm weight matches LoRA targets {list(targets)}")
    del g.node[:]
    g.node.extend(new_nodes)
    return trainable


BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "position_ids")


def select_whole(model, patterns) -> list[str]:
    """Float initializers whose (torch) name matches a pattern, buffers excluded."""
    out = []
    for i in model.graph.initializer:
        if i.data_type != 1 or i.name.endswith(BUFFER_SUFFIXES) or ".lora_" in i.name:
            continue
        if any(matches(i.name, p) or matches(_module(i.name), p) for p in patterns):
            out.append(i.name)
    missing = [p for p in patterns if not any(matches(n, p) or matches(_module(n), p) for n in out)]
    if missing:
        raise ValueError(f"train pattern(s) {missing} match no initializer")
    return out


def shift_for_causal_lm(model, output="logits", new_output="shift_logits"):
    """Replaces the [B, S, V] output by logits[:, :-1] reshaped to [B*(S-1), V], so that a
    plain cross-entropy against labels[:, 1:].reshape(-1) is the causal-LM loss."""
    from onnx import helper, numpy_helper, TensorProto

    g = model.graph
    out = next(o for o in g.output if o.name == output)
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    vocab = dims[-1]
    consts = {"causal_starts": [0], "causal_ends": [-1], "causal_axes": [1],
              "causal_shape": [-1, vocab]}
    for name, v in consts.items():
        g.initializer.append(numpy_helper.from_array(np.array(v, np.int64), name))
    g.node.extend([
        helper.make_node("Slice", [output, "causal_starts", "causal_ends", "causal_axes"],
                         ["causal_sliced"], name="causal_slice"),
        helper.make_node("Reshape", ["causal_sliced", "causal_shape"], [new_output],
                         name="causal_reshape"),
    ])
    rows = dims[0] * (dims[1] - 1) if all(dims) else None
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(new_output, TensorProto.FLOAT, [rows, vocab]))


def decompose_batchnorm(model) -> int:
    """Inference-mode BatchNormalization -> x * s + t with s = scale / sqrt(var + eps),
    t = bias - mean * s (per channel, from the initializers, each step), as plain ops.

    onnxruntime-training's gradient graph runs BatchNormalization in training mode (batch
    statistics), which is not what a frozen-statistics fine-tune (PyTorch eval mode, pyedge)
    computes; with the decomposition all three compute the same function and scale/bias
    stay trainable."""
    from onnx import helper, numpy_helper

    g = model.graph
    new_nodes, count = [], 0
    for node in g.node:
        at = {a.name: a for a in node.attribute}
        if node.op_type != "BatchNormalization" or len(node.output) > 1 and node.output[1] or \
                ("training_mode" in at and at["training_mode"].i):
            new_nodes.append(node)
            continue
        eps = at["epsilon"].f if "epsilon" in at else 1e-5
        x, scale, bias, mean, var = node.input[:5]
        p = f"{node.name or node.output[0]}_bn"
        g.initializer.append(numpy_helper.from_array(np.array(eps, np.float32), p + "_eps"))
        g.initializer.append(numpy_helper.from_array(np.array([-1, 1, 1], np.int64),
                                                     p + "_cshape"))
        mk = helper.make_node
        new_nodes += [
            mk("Add", [var, p + "_eps"], [p + "_ve"]),
            mk("Sqrt", [p + "_ve"], [p + "_std"]),
            mk("Div", [scale, p + "_std"], [p + "_s"]),
            mk("Mul", [mean, p + "_s"], [p + "_ms"]),
            mk("Sub", [bias, p + "_ms"], [p + "_t"]),
            mk("Reshape", [p + "_s", p + "_cshape"], [p + "_s3"]),
            mk("Reshape", [p + "_t", p + "_cshape"], [p + "_t3"]),
            mk("Mul", [x, p + "_s3"], [p + "_xs"]),
            mk("Add", [p + "_xs", p + "_t3"], [node.output[0]], name=node.name),
        ]
        count += 1
    del g.node[:]
    g.node.extend(new_nodes)
    return count


def prepare_for_ort(model, workload) -> list[str]:
    """LoRA, BatchNorm decomposition and causal shift applied to the ORT copy; returns the
    requires_grad names."""
    decompose_batchnorm(model)
    trainable = []
    if workload.lora_targets:
        trainable += inject_lora(model, workload.lora_targets, workload.lora_r,
                                 workload.lora_alpha)
    if workload.train:
        trainable += select_whole(model, workload.train)
    if workload.loss == "causal_lm":
        shift_for_causal_lm(model)
    return trainable
