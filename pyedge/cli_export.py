"""`pyedge export`, `pyedge merge` and `pyedge quantize`: ONNX files in, ONNX files out."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pyedge.cli_common import EXIT_OK, UsageError, fmt_bytes, out


def add_commands(sub, common) -> None:
    """The export, merge and quantize subcommands."""
    # export ---------------------------------------------------------------------------------
    e = sub.add_parser("export", parents=[common], help="export a PyTorch model to ONNX (needs torch)",
                       description="Export a PyTorch nn.Module to ONNX with pyedge's parameter "
                                   "map (workstation; needs torch).")
    e.add_argument("factory", nargs="?", help="'package.module:factory' or a model.py file "
                                              "(defining build() or model)")
    e.add_argument("-o", "--output", required=True,
                   help="the .onnx file to write (with --hf: the output folder)")
    e.add_argument("--hf", metavar="DIR", help="a Hugging Face model folder (save_pretrained): "
                   "writes OUTPUT/model.onnx + tokenizer and config files")
    e.add_argument("--task", choices=("causal-lm", "seq-cls"), help="with --hf: the model head")
    e.add_argument("--example", action="append", default=[], metavar="[NAME=]DTYPE[SHAPE]",
                   help="an example input, e.g. x=float32[1,784] or input_ids=int64[1,16]; "
                        "repeat per input (not needed if the factory returns examples)")
    e.add_argument("--input-names", help="comma-separated input names")
    e.add_argument("--output-names", help="comma-separated output names")
    e.add_argument("--dynamic", action="append", default=[], metavar="NAME:AXIS=LABEL",
                   help="a dynamic axis, e.g. x:0=batch (repeatable); default: axis 0 of every "
                        "input is 'batch' when --example is used")
    e.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    e.add_argument("--opset", type=int)
    e.add_argument("--task-type", help="PEFT task type recorded for the adapters (SEQ_CLS, CAUSAL_LM, ...)")
    e.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                   help="weights in OUTPUT.data beside the file: auto = above 1.8 GB")
    e.set_defaults(func=cmd_export)

    # merge ----------------------------------------------------------------------------------
    m = sub.add_parser("merge", parents=[common], help="fold adapters into the weights (ONNX out)",
                       description="Write an ONNX file with the adapters merged into the weights "
                                   "(runs in plain onnxruntime).")
    m.add_argument("model")
    m.add_argument("--adapters", required=True)
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--bits", type=int, choices=(4, 8),
                   help="quantized base: re-quantize the merged weights (default: write them "
                        "float, dequantized + delta)")
    m.add_argument("--group-size", type=int, help="with --bits: block size (default: the base's)")
    m.set_defaults(func=cmd_merge)

    # quantize -------------------------------------------------------------------------------
    q = sub.add_parser("quantize", parents=[common], help="4/8-bit frozen weights (ONNX out)",
                       description="Quantize the linear weights of an ONNX model to 4 or 8 bits "
                                   "(MatMulNBits / MatMulBnb4 / int8 DequantizeLinear: runs in "
                                   "onnxruntime, trains LoRA in pyedge).")
    q.add_argument("model")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--bits", type=int, choices=(4, 8), default=4)
    q.add_argument("--group-size", type=int, help="values per block along K (default 64; "
                   "8-bit default: one scale per output channel)")
    q.add_argument("--scheme", choices=("int", "nf4", "fp4"), default="int")
    q.add_argument("--symmetric", action="store_true", default=None,
                   help="no zero points (int scheme)")
    q.add_argument("--include", help="also quantize: embeddings, lm_head (comma-separated)")
    q.add_argument("--exclude", help="module patterns to leave float (comma-separated)")
    q.set_defaults(func=cmd_quantize)


def _export_module(name):
    import importlib
    try:
        return importlib.import_module(f"pyedge.export.{name}")
    except ModuleNotFoundError as e:
        if e.name and (e.name.startswith("pyedge.export") or e.name == "pyedge.export"):
            raise RuntimeError("this pyedge build has no pyedge.export module (PEFT/ONNX export "
                               "and merge); install a pyedge version that includes it") from None
        if e.name in ("torch", "transformers", "peft", "onnxscript"):
            raise RuntimeError(f"'{e.name}' is not installed: pyedge export needs the "
                               "workstation extras (pip install 'pyedge[torch]')") from None
        raise


def cmd_merge(args) -> int:
    for p, what in ((args.model, "model file"), (args.adapters, "adapters directory")):
        if not Path(p).exists():
            raise FileNotFoundError(f"{p}: no such {what}")
    merge = _export_module("merge")
    from pyedge.checkpoint import ADAPTERS
    qargs = {"bits": args.bits, "group_size": args.group_size} if args.bits else {}
    if args.group_size and not args.bits:
        raise UsageError("--group-size goes with --bits (re-quantize the merged layers)")
    src = Path(args.adapters)
    if not (src / "adapter_config.json").is_file() and (src / ADAPTERS).is_file():
        # a checkpoint (pyedge format only): write its PEFT form to a temp dir and merge that
        import tempfile

        from pyedge.train import session_from_adapters
        sess, _ = session_from_adapters(args.model, src)
        with tempfile.TemporaryDirectory(prefix="pyedge-merge-") as tmp:
            sess.save_adapters(tmp)
            info = merge.merge_adapters(args.model, tmp, args.output, **qargs)
    else:
        info = merge.merge_adapters(args.model, args.adapters, args.output, **qargs)
    changed = len(info.get("lora", [])) + len(info.get("whole", [])) if isinstance(info, dict) else "?"
    out(f"wrote {args.output} ({changed} weight tensors changed)")
    meta_file = Path(args.adapters) / "pyedge_adapters.json"
    try:
        trained_q = json.loads(meta_file.read_text()).get("quantize") if meta_file.is_file() else None
    except (OSError, ValueError):
        trained_q = None
    if trained_q and not info.get("dequantized") and not info.get("requantized"):
        out(f"note: the adapters were trained on the model quantized on load (--quantize "
             f"{trained_q}); they are merged into {args.model}'s float weights")
    if info.get("dequantized"):
        out(f"quantized base: {len(info['dequantized'])} adapted layers written as float "
             "weights (dequantized + LoRA delta); the others stay quantized")
    if info.get("requantized"):
        st = info.get("settings") or {}
        out(f"quantized base: {len(info['requantized'])} adapted layers re-quantized "
             f"({st.get('scheme', 'int')} {st.get('bits')}-bit, "
             f"{'blocks of ' + str(st['group_size']) if st.get('group_size') else 'per channel'})"
             " after adding the LoRA delta")
    return EXIT_OK


def cmd_quantize(args) -> int:
    from pyedge.quantize import quantize
    from pyedge.train import split_list
    if not Path(args.model).is_file():
        raise FileNotFoundError(f"{args.model}: no such model file")
    rep = quantize(args.model, args.output, bits=args.bits, group_size=args.group_size,
                   scheme=args.scheme, include=split_list(args.include),
                   symmetric=args.symmetric, exclude=split_list(args.exclude))
    for line in rep.lines():
        out(line)
    out(f"wrote {args.output}")
    return EXIT_OK


def _parse_example(spec: str):
    """'x=float32[1,784]' | 'float32[1,784]' | '[1,784]' | '1,784' -> (name|None, dtype, shape)."""
    import re
    name = None
    if "=" in spec:
        name, spec = spec.split("=", 1)
    m = re.fullmatch(r"\s*([a-z0-9]*)\s*\[?\s*([0-9,\s]*)\]?\s*", spec)
    if not m:
        raise UsageError(f"--example '{spec}': expected [NAME=]DTYPE[SHAPE], e.g. x=float32[1,784]")
    dtype = m.group(1) or "float32"
    shape = [int(s) for s in m.group(2).replace(" ", "").split(",") if s]
    return name, dtype, shape


def cmd_export_hf(args) -> int:
    if args.factory:
        raise UsageError("give either a factory or --hf DIR, not both")
    if not args.task:
        raise UsageError("--hf needs --task causal-lm or --task seq-cls")
    hx = _export_module("hf_export")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"'{e.name}' is not installed: pyedge export --hf runs on a "
                           "workstation with torch and transformers") from None
    res = hx.export_hf(args.hf, args.task, args.output, exporter=args.exporter, opset=args.opset)
    size = os.path.getsize(res["model"])
    out(f"wrote {res['model']} ({fmt_bytes(size)}) and {', '.join(res['files']) or 'no other files'}")
    return EXIT_OK


def cmd_export(args) -> int:
    if args.hf:
        return cmd_export_hf(args)
    if not args.factory:
        raise UsageError("give a factory ('package.module:factory' or model.py) or --hf DIR")
    tx = _export_module("torch_export")
    try:
        import torch
    except ImportError:
        raise RuntimeError("torch is not installed: pyedge export runs on a workstation with "
                           "pyedge[torch]") from None
    spec = tx.load_factory_spec(args.factory)
    examples = spec.example_inputs
    input_names = args.input_names.split(",") if args.input_names else spec.input_names
    output_names = args.output_names.split(",") if args.output_names else spec.output_names
    dynamic = spec.dynamic_axes
    if args.example:
        gen = torch.Generator().manual_seed(0)
        parsed = [_parse_example(s) for s in args.example]
        names = [n or (input_names[i] if input_names and i < len(input_names) else f"input_{i}")
                 for i, (n, _, _) in enumerate(parsed)]
        examples = {}
        for nm, (_, dt, shape) in zip(names, parsed):
            tdt = getattr(torch, dt, None)
            if not isinstance(tdt, torch.dtype):
                raise UsageError(f"--example {nm}: unknown dtype '{dt}'")
            examples[nm] = (torch.randn(shape, generator=gen).to(tdt) if tdt.is_floating_point
                            else torch.zeros(shape, dtype=tdt))
        input_names = names
        if dynamic is None and not args.dynamic:
            dynamic = {n: {0: "batch"} for n in names}
    if examples is None:
        raise UsageError(f"{args.factory}: the factory returns no example inputs; give --example "
                         "NAME=DTYPE[SHAPE] for each input")
    if args.dynamic:
        dynamic = dict(dynamic or {})
        for d in args.dynamic:
            try:
                nm, rest = d.split(":", 1)
                axis, label = rest.split("=", 1)
                dynamic.setdefault(nm, {})[int(axis)] = label
            except ValueError:
                raise UsageError(f"--dynamic '{d}': expected NAME:AXIS=LABEL") from None
    path = tx.export_module(spec.module, examples, args.output, input_names=input_names,
                            output_names=output_names, dynamic_axes=dynamic,
                            exporter=args.exporter, opset=args.opset, task_type=args.task_type,
                            external_data={"auto": None, "yes": True, "no": False}[
                                getattr(args, "external_data", "auto")])
    _export_module("hf_export").unwrap_exported(path, spec.module)  # `self.m = model` wrappers
    size = os.path.getsize(path) if os.path.exists(path) else 0
    if os.path.exists(path + ".data"):
        size += os.path.getsize(path + ".data")
    out(f"wrote {path} ({fmt_bytes(size)})")
    return EXIT_OK
