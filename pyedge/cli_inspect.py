"""`pyedge inspect`: what a model holds, what would train and what a step would need."""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

from pyedge.cli_common import EXIT_OK, fmt_bytes, fmt_shape, out


def add_commands(sub, common) -> None:
    """The inspect subcommand."""
    # inspect --------------------------------------------------------------------------------
    i = sub.add_parser("inspect", parents=[common], help="ops, parameters, LoRA targets, planned memory",
                       description="Show a model's inputs/outputs, op histogram, unsupported ops, "
                                   "parameters and LoRA target modules; with adapter flags also "
                                   "the trainable parameter count and the planned memory.")
    i.add_argument("model")
    i.add_argument("--lora-r", type=int, default=8)
    i.add_argument("--lora-alpha", type=float, default=16.0)
    i.add_argument("--target", help="LoRA target modules (comma-separated, or 'all-linear')")
    i.add_argument("--train", help="whole tensors to train (comma-separated patterns)")
    i.add_argument("--loss", choices=("cross_entropy", "mse", "causal_lm"), default="cross_entropy")
    i.add_argument("--output", help="graph output the loss reads")
    i.add_argument("--batch-size", type=int, default=1, help="batch for the planned memory (default 1)")
    i.add_argument("--seq-len", type=int, default=16, help="size of symbolic non-batch dims (default 16)")
    i.add_argument("--max-memory", help="memory budget for the planned step ('2.5G', bytes)")
    i.add_argument("--recompute", choices=("auto", "none", "cheap", "full"), default="auto")
    i.add_argument("--json", action="store_true", help="print a JSON report")
    i.set_defaults(func=cmd_inspect)


def inspect_report(model, lora_r=8, lora_alpha=16.0, target=None, train=None,
                   loss="cross_entropy", output=None, batch_size=1, seq_len=16,
                   max_memory=None, recompute="auto") -> dict:
    """Everything `pyedge inspect` prints, as a dict."""
    import pyedge
    from pyedge import _core
    from pyedge.data import DataSpec, example_batch
    from pyedge.train import expand_targets, split_list, weight_modules

    graph = pyedge.load_onnx(model)
    registered = set(_core.registered_ops())
    hist = collections.Counter()
    unsupported: dict[str, list[str]] = {}
    for n in graph.nodes:
        key = f"{n.domain}.{n.op_type}" if n.domain else n.op_type
        hist[key] += 1
        if key not in registered:
            unsupported.setdefault(key, []).append(n.name)
    from pyedge.import_quantized import is_quant_node, quant_weight_inputs
    quant_tensors = {x for n in graph.nodes if is_quant_node(n) for x in quant_weight_inputs(n)}
    float_inits = {k: v for k, v in graph.initializers.items() if v.dtype.kind == "f"
                   and k not in quant_tensors}  # scales and zero points are no parameters
    rep = {
        "model": str(model), "file_bytes": os.path.getsize(model), "opsets": graph.opsets,
        "inputs": [{"name": v.name, "dtype": v.dtype, "shape": v.shape} for v in graph.inputs],
        "outputs": [{"name": v.name, "dtype": v.dtype, "shape": v.shape} for v in graph.outputs],
        "nodes": len(graph.nodes), "ops": dict(sorted(hist.items())),
        "unsupported": unsupported,
        "parameters": int(sum(a.size for a in float_inits.values())),
        "parameter_tensors": len(float_inits),
        "modules": weight_modules(graph),
    }
    quant = [m for m in rep["modules"] if "bits" in m]
    rep["parameters"] += int(sum(m["shape"][0] * m["shape"][1] for m in quant))
    rep["parameter_tensors"] += len(quant)
    rep.update({
        "weight_bytes": int(sum(a.nbytes for a in graph.initializers.values())),
        "quantized": {"layers": len(quant),
                      "resident_bytes": int(sum(m["resident_bytes"] for m in quant)),
                      "float32_bytes": int(sum(4 * m["shape"][0] * m["shape"][1]
                                               for m in quant))},
    })
    # attention layers fused or not (the training session's graph replaces this below)
    from pyedge.fusion_report import attention_coverage
    from pyedge.fusions import fuse
    probe = graph.copy()
    fuse(probe)
    rep["attention"] = attention_coverage(probe)
    targets, patterns = split_list(target), split_list(train)
    if targets or patterns:
        lora = pyedge.LoraConfig(r=lora_r, alpha=lora_alpha,
                                 target_modules=expand_targets(graph, targets)) if targets else None
        sess = pyedge.TrainingSession(graph, lora=lora, train=patterns, loss=loss, output=output,
                                      max_memory=max_memory, recompute=recompute)
        params = sess.trainable_parameters()
        ntrain = int(sum(p.size for p in params.values()))
        rep["trainable"] = {"parameters": ntrain, "tensors": len(params),
                            "percent": 100.0 * ntrain / max(rep["parameters"], 1),
                            "lora_modules": [s.module for s in sess.lora_sites],
                            "names": sorted(params),
                            "fusions": {k: v for k, v in sess.fusions.items() if v}}
        rep["attention"] = attention_coverage(sess.graph)
        missing = sorted({f"{n.domain}.{n.op_type}" if n.domain else n.op_type
                          for n in sess.graph.nodes} - registered)
        if missing:
            rep["plan_error"] = f"ops without kernels: {', '.join(missing)}"
        else:
            spec = DataSpec.from_session(sess)
            ex = example_batch(spec, batch_size, seq_len)
            shapes = {k: list(v.shape) for k, v in ex.items()}
            if spec.labels is not None:
                shapes["labels"] = [d if d > 0 else (batch_size if i == 0 else seq_len)
                                    for i, d in enumerate(spec.labels.shape)]
            st = sess.plan_stats(shapes=shapes, training=True)
            total = (st["arena_bytes"] + st["weight_bytes"] + st["parameter_gradient_bytes"]
                     + st["optimizer_state_bytes"])
            rep["plan"] = {"batch_shapes": shapes, "arena_bytes": st["arena_bytes"],
                           "activation_bytes": st["activation_bytes"],
                           "gradient_bytes": st["gradient_bytes"],
                           "weight_bytes": st["weight_bytes"],
                           "parameter_gradient_bytes": st["parameter_gradient_bytes"],
                           "optimizer_state_bytes": st["optimizer_state_bytes"],
                           "total_bytes": total, "forward_ops": st["forward_ops"],
                           "backward_ops": st["backward_ops"], "pruned_nodes": st["pruned_nodes"],
                           "planned_peak_bytes": st["planned_peak_bytes"],
                           "memory_budget_bytes": sess.max_memory,
                           "arena_bytes_no_recompute": st["arena_bytes_no_recompute"],
                           "recompute_choice": st["recompute_choice"],
                           "recompute_ops": st["recompute_ops"],
                           "recompute_op_types": st["recompute_op_types"],
                           "recompute_flops": st["recompute_flops"],
                           "forward_flops": st["forward_flops"]}
    return rep


def cmd_inspect(args) -> int:
    import pyedge
    if not Path(args.model).is_file():
        raise FileNotFoundError(f"{args.model}: no such model file")
    rep = inspect_report(args.model, args.lora_r, args.lora_alpha, args.target, args.train,
                         args.loss, args.output, args.batch_size, args.seq_len,
                         args.max_memory, args.recompute)
    if args.json:
        out(json.dumps(rep, indent=1, default=str))
        return EXIT_OK
    opsets = ", ".join(f"{k or 'ai.onnx'}:{v}" for k, v in rep["opsets"].items())
    out(f"model: {rep['model']} ({fmt_bytes(rep['file_bytes'])}, opsets {opsets})")
    out("inputs:")
    for v in rep["inputs"]:
        out(f"  {v['name']}: {v['dtype']} {fmt_shape(v['shape'])}")
    out("outputs:")
    for v in rep["outputs"]:
        out(f"  {v['name']}: {v['dtype']} {fmt_shape(v['shape'])}")
    out(f"ops ({rep['nodes']} nodes): " + ", ".join(f"{k} x{c}" for k, c in rep["ops"].items()))
    if rep["unsupported"]:
        out("unsupported ops (pyedge has no kernel yet):")
        for op, names in rep["unsupported"].items():
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            out(f"  {op} x{len(names)}: {', '.join(names[:5])}{more}")
    else:
        out("unsupported ops: none")
    from pyedge.fusion_report import attention_line
    line = attention_line(rep["attention"])
    if line:
        out(line)
    out(f"parameters: {rep['parameters']:,} in {rep['parameter_tensors']} tensors "
         f"({fmt_bytes(rep['weight_bytes'])} of weights)")
    mods = rep["modules"]
    out(f"modules with weights ({len(mods)}; LoRA targets are the linear ones):")
    for m in mods:
        tag = "" if m["lora"] else "  (no LoRA yet)"
        if "bits" in m:  # quantized: bits, block and what it occupies
            tag = (f"  {m['bits']}-bit, blocks of {m['block_size']}, "
                   f"{fmt_bytes(m['resident_bytes'])} resident") + tag
        out(f"  {m['module']}  {m['op']} {fmt_shape(m['shape'])}{tag}")
    qi = rep["quantized"]
    if qi["layers"]:
        out(f"quantized: {qi['layers']} layers, {fmt_bytes(qi['resident_bytes'])} resident "
             f"(float32: {fmt_bytes(qi['float32_bytes'])})")
    tr = rep.get("trainable")
    if tr:
        out(f"trainable: {tr['parameters']:,} parameters in {tr['tensors']} tensors "
             f"({tr['percent']:.3f}% of the model); LoRA on {len(tr['lora_modules'])} modules")
        pl = rep.get("plan")
        if pl:
            shp = ", ".join(f"{k}{fmt_shape(v)}" for k, v in pl["batch_shapes"].items())
            out(f"planned memory for one training step ({shp}): {fmt_bytes(pl['total_bytes'])} "
                 f"= weights {fmt_bytes(pl['weight_bytes'])} + arena "
                 f"{fmt_bytes(pl['arena_bytes'])} (reused by liveness for {fmt_bytes(pl['activation_bytes'])} of activations"
                 f" and {fmt_bytes(pl['gradient_bytes'])} of gradients) + parameter gradients "
                 f"{fmt_bytes(pl['parameter_gradient_bytes'])} + optimizer state "
                 f"{fmt_bytes(pl['optimizer_state_bytes'])}")
            out(f"plan: {pl['forward_ops']} forward ops, {pl['backward_ops']} backward ops, "
                 f"{pl['pruned_nodes']} nodes pruned")
            budget = pl["memory_budget_bytes"]
            out(f"planned peak: {fmt_bytes(pl['planned_peak_bytes'])} (weights and what the "
                 f"process holds + parameters, gradients, optimizer state + arena"
                 + (f"; budget {fmt_bytes(budget)}" if budget else "") + ")")
            types = ", ".join(f"{k} x{v}" for k, v in sorted(pl["recompute_op_types"].items()))
            extra = 100.0 * pl["recompute_flops"] / max(pl["forward_flops"], 1.0)
            out(f"recompute: {pl['recompute_choice']}"
                 + (f"; {pl['recompute_ops']} ops ({types}), +{extra:.0f}% of the forward's "
                    f"FLOPs, arena {fmt_bytes(pl['arena_bytes_no_recompute'])} without"
                    if pl["recompute_ops"] else ""))
        else:
            out(f"planned memory: unavailable ({rep.get('plan_error', 'no plan')})")
        fused = tr.get("fusions") or {}
        out("fused chains: " + (", ".join(f"{k} x{v}" for k, v in fused.items()) or "none")
             + f"; GEMM kernels: OpenBLAS {pyedge._core.blas_core()}"
             + f"; core build: {_core_build()}")
    return EXIT_OK


def _core_build() -> str:
    """Which build of the core runs (pyedge/core_variant.py): its -march and SIMD backend."""
    from pyedge import _core
    info = _core.simd_info()
    return f"{info['target']} ({info['backend']}, {info['width']} floats)"
