"""Export the reference models to ONNX and report what the exporters produce.

    python -m models.export_reference --out /tmp/x [--models mlp,cnn] [--exporters dynamo]

Library use::

    from models.export_reference import export, summarize, check_ort
    path = export(model, example_inputs, "m.onnx", exporter="dynamo", opset=18,
                  input_names=[...], output_names=[...], dynamic_axes={...})
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings

import numpy as np
import torch


def _load_torch_export():
    """pyedge/export/torch_export.py (dynamic-axes conversion, the dynamo export that takes
    torch's suggested ranges), loaded from its file: importing the `pyedge` package needs the
    compiled core, and scripts/arm64-check.sh exports these models on the host before any
    build."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pyedge", "export",
                        "torch_export.py")
    spec = importlib.util.spec_from_file_location("_pyedge_torch_export", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_torch_export = _load_torch_export()
_dynamic_shapes = _torch_export._dynamic_shapes


DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}


def export(model, example_inputs, path, exporter="dynamo", opset=None, input_names=None,
           output_names=None, dynamic_axes=None, inline=True, verbose=False):
    """Export ``model`` to ``path`` (one self-contained .onnx file); return ``path``.

    exporter="dynamo": ``torch.onnx.export(dynamo=True, optimize=False, external_data=False)``
    (default opset 18). exporter="torchscript": ``dynamo=False, do_constant_folding=False,
    keep_initializers_as_inputs=False`` (default opset 17). Both keep parameter names as
    initializer names where the exporter can. With ``inline`` any local functions are
    inlined (``onnx.inliner.inline_local_functions``) and the file rewritten.
    """
    import onnx

    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', not {exporter!r}")
    opset = opset or DEFAULT_OPSET[exporter]
    if isinstance(example_inputs, dict):
        input_names = input_names or list(example_inputs)
        args = tuple(example_inputs[n] for n in input_names)
    else:
        args = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            dyn = _dynamic_shapes(input_names, dynamic_axes, args) if dynamic_axes else None
            _torch_export.export_dynamo(model, args, path, dynamic_shapes=dyn,
                                        input_names=input_names, output_names=output_names,
                                        opset_version=opset, optimize=False,
                                        external_data=False, verbose=verbose)
        else:
            torch.onnx.export(model, args, path, input_names=input_names,
                              output_names=output_names, opset_version=opset,
                              dynamo=False, do_constant_folding=False,
                              keep_initializers_as_inputs=False,
                              dynamic_axes=dynamic_axes, verbose=verbose)
    if inline:
        m = onnx.load(path)
        if len(m.functions):
            from onnx import inliner
            m = inliner.inline_local_functions(m)
            onnx.save(m, path)
    return path


def export_reference(name, path, exporter="dynamo", opset=None, seed=0, **kw):
    """Build reference model ``name`` (mlp|cnn|gpt2|minilm), export it; return (path, model, inputs)."""
    from models.reference import FACTORIES

    model, inputs, in_names, out_names, dyn = FACTORIES[name](seed=seed, **kw)
    export(model, inputs, path, exporter=exporter, opset=opset, input_names=in_names,
           output_names=out_names, dynamic_axes=dyn)
    return path, model, inputs


def check_ort(path, model, inputs):
    """Run ``path`` in onnxruntime and torch; return (max_abs_err, max_rel_err)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in sess.get_inputs()]
    feed = {n: inputs[n].numpy() for n in feed_names}
    got = sess.run(None, feed)[0]
    with torch.no_grad():
        ref = model(*[inputs[n] for n in inputs]).numpy()
    err = float(np.abs(got - ref).max())
    return err, err / max(float(np.abs(ref).max()), 1e-12)


def _shape(vi):
    t = vi.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    import onnx
    return f"{onnx.TensorProto.DataType.Name(t.elem_type)}{dims}"


QUIRK_OPS = {"If", "Loop", "Scan", "SequenceAt", "SplitToSequence", "SequenceConstruct",
             "ConcatFromSequence", "Trilu", "IsNaN", "IsInf", "CumSum", "GatherND", "ScatterND",
             "NonZero", "Identity", "Constant", "ConstantOfShape", "CastLike"}


def weight_usage(model):
    """For each initializer with >= 2 dims: how the graph consumes it.

    Returns {initializer_name: [pattern, ...]} with patterns like ``Gemm[1]{transB=1}``,
    ``MatMul[1]`` (used as-is, i.e. [in, out] layout), ``Transpose[0]{perm=[1, 0]}->MatMul[1]``
    (stored as torch [out, in], transposed in the graph), ``Conv[1]``, ``Gather[0]``.
    """
    import onnx

    g = model.graph
    cons = collections.defaultdict(list)
    for n in g.node:
        for k, x in enumerate(n.input):
            cons[x].append((n, k))

    def desc(n, k):
        d = f"{n.op_type}[{k}]"
        if n.op_type == "Gemm":
            at = {a.name: a.i for a in n.attribute if a.name in ("transA", "transB")}
            d += "{transB=%d}" % at.get("transB", 0)
        if n.op_type == "Transpose":
            perm = [list(a.ints) for a in n.attribute if a.name == "perm"]
            d += "{perm=%s}" % (perm[0] if perm else "rev")
            d += "->" + "|".join(f"{c.op_type}[{kk}]" for c, kk in cons[n.output[0]])
        return d

    out = {}
    for i in g.initializer:
        if len(i.dims) >= 2:
            out[i.name] = sorted({desc(n, k) for n, k in cons[i.name]})
    return out


def _short_props(n):
    return {p.key: p.value for p in n.metadata_props}


def summarize(path):
    """Text summary of an ONNX file: opsets, ops, initializers, I/O, weight layout,
    name_scopes metadata, functions and quirks."""
    import onnx

    m = onnx.load(path)
    g = m.graph
    lines = [f"== {path}  ({os.path.getsize(path) / 1e6:.2f} MB, ir_version {m.ir_version}, "
             f"producer {m.producer_name} {m.producer_version})"]
    lines.append("opsets: " + ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}"
                                       for o in m.opset_import))
    nodes = list(g.node)
    sub = sum(1 for n in nodes for a in n.attribute if a.type in (5, 10))  # GRAPH(S)
    hist = collections.Counter((n.domain + "::" if n.domain else "") + n.op_type for n in nodes)
    lines.append(f"nodes: {len(nodes)}  functions: {len(m.functions)}  "
                 f"nodes with subgraphs: {sub}  non-default-domain nodes: "
                 f"{sum(1 for n in nodes if n.domain not in ('', 'ai.onnx'))}")
    lines.append("ops: " + ", ".join(f"{k}x{v}" for k, v in sorted(hist.items())))
    inits = list(g.initializer)
    lines.append(f"initializers: {len(inits)}  e.g. " + ", ".join(
        f"{i.name}{list(i.dims)}" for i in inits[:3]))
    lines.append("inputs: " + ", ".join(f"{i.name}:{_shape(i)}" for i in g.input))
    lines.append("outputs: " + ", ".join(f"{o.name}:{_shape(o)}" for o in g.output))
    pats = collections.defaultdict(list)
    for name, ps in weight_usage(m).items():
        pats[" + ".join(ps) or "(unused)"].append(name)
    lines.append("weight usage (initializers with >= 2 dims):")
    for p, names in sorted(pats.items()):
        lines.append(f"  {p}: {len(names)} e.g. {names[0]}")
    q = {k: v for k, v in hist.items() if k in QUIRK_OPS}
    bool_casts = sum(1 for n in nodes if n.op_type == "Cast"
                     and any(a.name == "to" and a.i == onnx.TensorProto.BOOL for a in n.attribute))
    lines.append(f"quirk ops: {q}  Cast->bool: {bool_casts}")
    md = [n for n in nodes if any(p.key == "pkg.torch.onnx.name_scopes" for p in n.metadata_props)]
    lines.append(f"nodes with pkg.torch.onnx.name_scopes: {len(md)}/{len(nodes)}")
    for n in md:
        if n.op_type in ("MatMul", "Gemm", "Conv"):
            props = _short_props(n)
            lines.append(f"  e.g. {n.op_type} {n.name} inputs={list(n.input)}: name_scopes="
                         f"{props['pkg.torch.onnx.name_scopes']}")
            break
    if m.metadata_props:
        lines.append("model metadata: " + ", ".join(p.key for p in m.metadata_props))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--models", default="mlp,cnn,gpt2,minilm")
    ap.add_argument("--exporters", default="dynamo,torchscript")
    ap.add_argument("--opset", type=int, default=None,
                    help="opset (default: 18 for dynamo, 17 for torchscript)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ok = True
    for name in a.models.split(","):
        for ex in a.exporters.split(","):
            path = os.path.join(a.out, f"{name}_{ex}.onnx")
            t0 = time.time()
            try:
                _, model, inputs = export_reference(name, path, exporter=ex, opset=a.opset)
            except Exception as e:  # report and go on
                ok = False
                print(f"== {path}: EXPORT FAILED: {type(e).__name__}: {str(e)[:500]}")
                continue
            dt = time.time() - t0
            print(summarize(path))
            err, rel = check_ort(path, model, inputs)
            print(f"export {dt:.1f}s; onnxruntime vs torch: max abs err {err:.3g}, rel {rel:.3g}\n")
            ok &= rel < 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
