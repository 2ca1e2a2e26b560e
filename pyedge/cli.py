"""The `pyedge` command line: export, inspect, train, eval, merge, demo.

Every expected failure prints one line ``pyedge: error: <message>`` to stderr and exits with
2 (usage: bad flags or options) or 1 (runtime: missing file, corrupt model, unsupported op,
data that does not fit the model, non-finite loss, ...). ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """A bad command line or config file (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `pyedge: error: <msg> (see 'pyedge train --help')`."""

    def error(self, message):  # noqa: D401
        sys.stderr.write(f"pyedge: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


def _one_line(msg: str) -> str:
    return "; ".join(part.strip() for part in str(msg).strip().splitlines() if part.strip())


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show Python tracebacks on errors")

    p = _Parser(prog="pyedge", parents=[common],
                description="Fine-tune ONNX models on edge CPUs: LoRA adapters in, PEFT out.")
    from pyedge import __version__
    p.add_argument("--version", action="version", version=f"pyedge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

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

    # train ----------------------------------------------------------------------------------
    t = sub.add_parser("train", parents=[common], help="fine-tune with LoRA / whole tensors",
                       argument_default=argparse.SUPPRESS,
                       description="Fine-tune an ONNX model. Options may also come from "
                                   "--config file.toml (keys = option names; flags win).")
    t.add_argument("model", nargs="?", help="the .onnx model")
    t.add_argument("--config", help="TOML file with options (keys like lora_r or lora-r, "
                                    "optionally under [train]); paths are relative to it")
    t.add_argument("--data", help="training data: .npz, .jsonl, .csv or a directory of .npy")
    t.add_argument("--eval-data", help="evaluation data (same formats)")
    t.add_argument("--out", "-o", help="run directory (default: pyedge-run)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out, with the options saved "
                        "there (flags given now override them)")
    g = t.add_argument_group("adapters")
    g.add_argument("--lora-r", type=int, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 16)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input (default 0)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rsLoRA)")
    g.add_argument("--method", choices=("lora", "dora"),
                   help="adapter method (pyedge/adapters/): lora (default) or dora (LoRA with a "
                        "trained magnitude, PEFT's use_dora)")
    g.add_argument("--init-lora-weights", choices=("gaussian", "pissa", "olora"),
                   help="LoRA initialisation as PEFT's init_lora_weights (pissa/olora: A, B from "
                        "the SVD/QR of the weight, which becomes the residual)")
    g.add_argument("--loraplus-lr-ratio", type=float,
                   help="LoRA+: lora_B trains with lr x this ratio")
    g.add_argument("--target", help="LoRA target modules, comma-separated ('query,value', "
                                    "'encoder.layer.*.value', 're:...', 'all-linear')")
    g.add_argument("--train", help="whole tensors to train, comma-separated patterns ('classifier.*')")
    g.add_argument("--quantize", choices=("4", "8", "nf4", "fp4"),
                   help="quantize the frozen linear weights on load (QLoRA; see pyedge quantize)")
    g = t.add_argument_group("objective")
    g.add_argument("--loss", choices=("cross_entropy", "mse", "causal_lm"),
                   help="default cross_entropy; causal_lm when config.json beside the model "
                        "names a *ForCausalLM")
    g.add_argument("--output", help="graph output the loss reads (default: the first)")
    g.add_argument("--label-smoothing", type=float)
    g.add_argument("--ignore-index", type=int, help="label ignored by cross-entropy (default -100)")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    g.add_argument("--batch-size", type=int, help="default 16")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    g.add_argument("--optimizer", choices=("adamw", "sgd", "mezo"),
                   help="mezo: forward-only zeroth-order SGD, an inference's memory")
    g.add_argument("--weight-decay", type=float, help="default: AdamW 0.01, SGD and MeZO 0")
    g.add_argument("--mezo-eps", type=float, help="MeZO perturbation scale (default 1e-3)")
    g.add_argument("--mezo-sparsity", type=float,
                   help="Sparse MeZO: fraction of each tensor perturbed (default 1: all)")
    g.add_argument("--mezo-mask", choices=("random", "magnitude"),
                   help="Sparse MeZO entries: seeded random (default) or smallest |w|")
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0)")
    g.add_argument("--schedule", choices=("constant", "linear", "cosine"), help="default linear")
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--max-grad-norm", type=float, help="clip the gradient norm (default 1.0, 0: off)")
    g.add_argument("--seed", type=int)
    g.add_argument("--threads", type=int)
    g.add_argument("--deterministic", action="store_true",
                   help="bit-reproducible runs, also across --resume (one thread unless --threads)")
    g.add_argument("--max-memory", help="memory budget of the whole run ('2.5G', '800M', bytes): "
                                        "activations are recomputed in the backward to meet it "
                                        "(default: what the system has)")
    g.add_argument("--recompute", choices=("auto", "none", "cheap", "full"),
                   help="recomputation: as the budget needs (auto, default), or forced")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip steps with a NaN/inf loss instead of stopping")
    g = t.add_argument_group("data")
    g.add_argument("--pad-id", type=int, help="padding token id for .jsonl inputs (default 0)")
    g.add_argument("--seq-len", type=int, help="pad .jsonl sequences to this fixed length")
    g.add_argument("--tokenizer", help="text data: tokenizer.json or its folder (default: next "
                                       "to the model)")
    g.add_argument("--pack", action="store_true", default=argparse.SUPPRESS,
                   help="text data: pack {\"text\"} records into --seq-len rows (.txt always is)")
    g.add_argument("--drop-last", action="store_true", help="drop the last partial batch of an epoch")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    g.add_argument("--skip-nonfinite-data", action="store_true",
                   help="drop records with NaN/inf inputs instead of failing")
    g.add_argument("--eval-batch-size", type=int)
    g = t.add_argument_group("logging and checkpoints")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (default: at the end)")
    g.add_argument("--early-stop", type=int, metavar="N",
                   help="stop after N evaluations (--eval-every) without a lower eval loss")
    g.add_argument("--eval-at-start", action="store_true", help="also evaluate before training")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (default 100, 0: end only)")
    g.add_argument("--keep-checkpoints", type=int, help="keep the last K checkpoints (default 3, 0: all)")
    g.add_argument("--log-every", type=int, help="log line / metrics record every N steps (default 10)")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="no metrics.png")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress output")
    g.add_argument("--quiet", "-q", action="store_true", help="only errors")
    t.set_defaults(func=cmd_train)

    # eval -----------------------------------------------------------------------------------
    v = sub.add_parser("eval", parents=[common], help="loss/accuracy with adapters loaded",
                       description="Evaluate a model, with adapters (a run's adapters/ or a "
                                   "checkpoint directory) if given.")
    v.add_argument("model")
    v.add_argument("--adapters", help="adapters directory (pyedge or PEFT format)")
    v.add_argument("--data", required=True)
    v.add_argument("--loss", choices=("cross_entropy", "mse", "causal_lm"),
                   help="default: the adapters' loss, else cross_entropy")
    v.add_argument("--output", help="graph output to score")
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument("--pad-id", type=int, default=0)
    v.add_argument("--seq-len", type=int)
    v.add_argument("--tokenizer", help="text data: tokenizer.json or its folder")
    v.add_argument("--pack", action="store_true", default=None,
                   help="text data: pack {\"text\"} records into --seq-len rows")
    v.add_argument("--threads", type=int)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_eval)

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

    # demo -----------------------------------------------------------------------------------
    d = sub.add_parser("demo", parents=[common], help="end-to-end fine-tuning on a bundled model",
                       description="Fine-tune a bundled sensor classifier on a shifted task: "
                                   "accuracy before/after, PEFT adapters, PyTorch check.")
    d.add_argument("--out", default="pyedge-demo", help="output directory (default ./pyedge-demo)")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--no-torch-check", dest="torch_check", action="store_false",
                   help="skip loading the adapters back into PyTorch")
    d.set_defaults(func=cmd_demo)
    return p


# --------------------------------------------------------------------------- config
def _train_fields():
    from pyedge.train import TrainConfig
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_toml_config(path) -> dict:
    """Options from a TOML file, keys normalised to TrainConfig names, paths made absolute."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib  # type: ignore
        except ImportError:
            raise UsageError("--config needs Python 3.11+ (tomllib) or the tomli package") from None
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{path}: invalid TOML ({_one_line(e)})") from None
    if isinstance(doc.get("train"), dict):
        section = dict(doc["train"])
        for key, val in doc.items():
            if key != "train" and not isinstance(val, dict):
                section.setdefault(key, val)
        doc = section
    fields = _train_fields()
    aliases = {"no_shuffle": ("shuffle", lambda v: not v), "no_plot": ("plot", lambda v: not v),
               "no_progress": ("progress", lambda v: not v), "output_dir": ("out", None)}
    out = {}
    for key, val in doc.items():
        name = key.replace("-", "_")
        if name in aliases:
            name, conv = aliases[name]
            val = conv(val) if conv else val
        if name not in fields:
            raise UsageError(f"{path}: unknown option '{key}'")
        out[name] = _coerce(path, key, val, fields[name])
    for k in ("model", "data", "eval_data", "out", "tokenizer"):
        if isinstance(out.get(k), str) and not os.path.isabs(out[k]):
            out[k] = str(p.parent / out[k])
    return out


def _coerce(path, key, val, field):
    t = str(field.type)
    try:
        if t.startswith("list"):
            if isinstance(val, str):
                return [s.strip() for s in val.split(",") if s.strip()]
            if isinstance(val, list) and all(isinstance(x, str) for x in val):
                return val
            raise TypeError
        if t.startswith("bool"):
            if not isinstance(val, bool):
                raise TypeError
            return val
        if t.startswith("int"):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError
            return val
        if t.startswith("float"):
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise TypeError
            return float(val)
        if t.startswith("str | int") and isinstance(val, int) and not isinstance(val, bool):
            return val  # a size: "2.5G" or bytes
        if val is not None and not isinstance(val, str):
            raise TypeError
        return val
    except TypeError:
        raise UsageError(f"{path}: option '{key}' must be {t.split(' ')[0]}, got "
                         f"{type(val).__name__} {val!r}") from None


def _is_causal_lm_folder(model) -> bool:
    """config.json next to the model (pyedge export --hf copies it) names a *ForCausalLM."""
    p = Path(model).parent / "config.json"
    try:
        arch = json.loads(p.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(isinstance(a, str) and a.endswith("ForCausalLM") for a in arch)


def saved_run_options(out) -> dict:
    """The options a run in `out` was started with (its config.json), as TrainConfig fields;
    {} when there is none. Lets `pyedge train --out DIR --resume` repeat nothing."""
    p = Path(out) / "config.json"
    if not p.is_file():
        return {}
    try:
        saved = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{p}: unreadable ({_one_line(e)}); give the options again") from None
    fields = _train_fields()
    # progress display follows this invocation's -q, not the first one's
    keep = {k: v for k, v in saved.items() if k in fields and k not in ("resume", "progress")}
    return keep


def train_config_from_args(args) -> "object":
    from pyedge.train import TrainConfig, split_list
    values = {}
    if getattr(args, "config", None):
        values.update(read_toml_config(args.config))
    flags = {k: v for k, v in vars(args).items()
             if k not in ("func", "command", "config", "debug", "quiet")}
    values.update(flags)
    if values.get("resume"):
        # the run's saved options first; the config file and the flags given now win
        values = {**saved_run_options(values.get("out") or "pyedge-run"), **values}
    for k in ("target", "train"):
        if k in values:
            values[k] = split_list(values[k])
    if "loss" not in values and values.get("model") and _is_causal_lm_folder(values["model"]):
        values["loss"] = "causal_lm"  # cross-entropy on unshifted LM logits is never meant
    if not values.get("model"):
        raise UsageError("no model given: pyedge train model.onnx --data train.npz ...")
    if not values.get("data"):
        raise UsageError("no training data given (--data train.npz)")
    return TrainConfig(**values)


# --------------------------------------------------------------------------- commands
def _out(msg=""):
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def cmd_train(args) -> int:
    from pyedge.train import train
    cfg = train_config_from_args(args)
    quiet = getattr(args, "quiet", False)
    if quiet:
        cfg.progress = False
    log = (lambda m: None) if quiet else None
    res = train(cfg, log=log)
    if not quiet:
        ev = res.eval
        done = (f"trained {res.steps} steps" if res.resumed_from is None else
                f"trained steps {res.resumed_from + 1}-{res.steps} (resumed at {res.resumed_from})"
                if res.steps > res.resumed_from else f"already at step {res.steps}")
        parts = [f"{done} ({res.epoch:.2f} epochs) in {res.seconds:.1f} s"]
        if math.isfinite(res.train_loss):
            parts.append(f"train loss {res.train_loss:.4f} (moving average)")
        if ev:
            parts.append(f"eval loss {ev['loss']:.4f}" + (
                f", accuracy {ev['accuracy']:.4f}" if ev.get("accuracy") is not None else "") + (
                f", perplexity {ev['perplexity']:.4f}" if "perplexity" in ev else ""))
        if res.skipped_nonfinite:
            parts.append(f"{res.skipped_nonfinite} non-finite steps skipped")
        _out("; ".join(parts))
        _out(f"adapters: {res.adapters}" + (" (pyedge + PEFT format)" if res.peft else ""))
        _out(f"checkpoint: {res.checkpoint}")
        _out(f"metrics: {res.out / 'metrics.jsonl'}")
    return EXIT_OK


def cmd_eval(args) -> int:
    import pyedge
    from pyedge.train import evaluate, load_data, session_from_adapters
    if not Path(args.model).is_file():
        raise FileNotFoundError(f"{args.model}: no such model file")
    if args.adapters:
        sess, meta = session_from_adapters(args.model, args.adapters, threads=args.threads,
                                           output=args.output)
    else:
        sess = pyedge.TrainingSession(args.model, loss=None, output=args.output,
                                      threads=args.threads)
        meta = {}
    causal = "causal_lm" if sess.graph.metadata.get("pyedge.task") == "causal-lm" else None
    loss = args.loss or meta.get("loss") or causal or "cross_entropy"
    ignore = int(meta.get("ignore_index", -100))
    smoothing = float(meta.get("label_smoothing", 0.0)) if not args.loss else 0.0
    opts = argparse.Namespace(pad_id=args.pad_id, seq_len=args.seq_len, skip_nonfinite_data=False,
                              model=args.model, tokenizer=args.tokenizer, pack=args.pack,
                              batch_size=args.batch_size)
    ds = load_data(sess, args.data, opts, loss=loss, ignore_index=ignore)
    if getattr(ds, "summary", None):
        sys.stderr.write(ds.summary + "\n")
    res = evaluate(sess, ds, args.batch_size, loss, ignore, smoothing)
    if args.json:
        _out(json.dumps(res))
    else:
        acc = f"  accuracy {res['accuracy']:.4f}" if res["accuracy"] is not None else ""
        ppl = (f"  perplexity {res['perplexity']:.4f} ({res['tokens']} tokens)"
               if "perplexity" in res else "")
        _out(f"{args.data}: {res['records']} records  loss {res['loss']:.4f}{acc}{ppl}")
    return EXIT_OK


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
    _out(f"wrote {args.output} ({changed} weight tensors changed)")
    meta_file = Path(args.adapters) / "pyedge_adapters.json"
    try:
        trained_q = json.loads(meta_file.read_text()).get("quantize") if meta_file.is_file() else None
    except (OSError, ValueError):
        trained_q = None
    if trained_q and not info.get("dequantized") and not info.get("requantized"):
        _out(f"note: the adapters were trained on the model quantized on load (--quantize "
             f"{trained_q}); they are merged into {args.model}'s float weights")
    if info.get("dequantized"):
        _out(f"quantized base: {len(info['dequantized'])} adapted layers written as float "
             "weights (dequantized + LoRA delta); the others stay quantized")
    if info.get("requantized"):
        st = info.get("settings") or {}
        _out(f"quantized base: {len(info['requantized'])} adapted layers re-quantized "
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
        _out(line)
    _out(f"wrote {args.output}")
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
    _out(f"wrote {res['model']} ({_fmt_bytes(size)}) and {', '.join(res['files']) or 'no other files'}")
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
    _out(f"wrote {path} ({_fmt_bytes(size)})")
    return EXIT_OK


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
        _out(json.dumps(rep, indent=1, default=str))
        return EXIT_OK
    opsets = ", ".join(f"{k or 'ai.onnx'}:{v}" for k, v in rep["opsets"].items())
    _out(f"model: {rep['model']} ({_fmt_bytes(rep['file_bytes'])}, opsets {opsets})")
    _out("inputs:")
    for v in rep["inputs"]:
        _out(f"  {v['name']}: {v['dtype']} {_fmt_shape(v['shape'])}")
    _out("outputs:")
    for v in rep["outputs"]:
        _out(f"  {v['name']}: {v['dtype']} {_fmt_shape(v['shape'])}")
    _out(f"ops ({rep['nodes']} nodes): " + ", ".join(f"{k} x{c}" for k, c in rep["ops"].items()))
    if rep["unsupported"]:
        _out("unsupported ops (pyedge has no kernel yet):")
        for op, names in rep["unsupported"].items():
            more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
            _out(f"  {op} x{len(names)}: {', '.join(names[:5])}{more}")
    else:
        _out("unsupported ops: none")
    _out(f"parameters: {rep['parameters']:,} in {rep['parameter_tensors']} tensors "
         f"({_fmt_bytes(rep['weight_bytes'])} of weights)")
    mods = rep["modules"]
    _out(f"modules with weights ({len(mods)}; LoRA targets are the linear ones):")
    for m in mods:
        tag = "" if m["lora"] else "  (no LoRA yet)"
        if "bits" in m:  # quantized: bits, block and what it occupies
            tag = (f"  {m['bits']}-bit, blocks of {m['block_size']}, "
                   f"{_fmt_bytes(m['resident_bytes'])} resident") + tag
        _out(f"  {m['module']}  {m['op']} {_fmt_shape(m['shape'])}{tag}")
    qi = rep["quantized"]
    if qi["layers"]:
        _out(f"quantized: {qi['layers']} layers, {_fmt_bytes(qi['resident_bytes'])} resident "
             f"(float32: {_fmt_bytes(qi['float32_bytes'])})")
    tr = rep.get("trainable")
    if tr:
        _out(f"trainable: {tr['parameters']:,} parameters in {tr['tensors']} tensors "
             f"({tr['percent']:.3f}% of the model); LoRA on {len(tr['lora_modules'])} modules")
        pl = rep.get("plan")
        if pl:
            shp = ", ".join(f"{k}{_fmt_shape(v)}" for k, v in pl["batch_shapes"].items())
            _out(f"planned memory for one training step ({shp}): {_fmt_bytes(pl['total_bytes'])} "
                 f"= weights {_fmt_bytes(pl['weight_bytes'])} + arena "
                 f"{_fmt_bytes(pl['arena_bytes'])} (reused by liveness for {_fmt_bytes(pl['activation_bytes'])} of activations"
                 f" and {_fmt_bytes(pl['gradient_bytes'])} of gradients) + parameter gradients "
                 f"{_fmt_bytes(pl['parameter_gradient_bytes'])} + optimizer state "
                 f"{_fmt_bytes(pl['optimizer_state_bytes'])}")
            _out(f"plan: {pl['forward_ops']} forward ops, {pl['backward_ops']} backward ops, "
                 f"{pl['pruned_nodes']} nodes pruned")
            budget = pl["memory_budget_bytes"]
            _out(f"planned peak: {_fmt_bytes(pl['planned_peak_bytes'])} (weights and what the "
                 f"process holds + parameters, gradients, optimizer state + arena"
                 + (f"; budget {_fmt_bytes(budget)}" if budget else "") + ")")
            types = ", ".join(f"{k} x{v}" for k, v in sorted(pl["recompute_op_types"].items()))
            extra = 100.0 * pl["recompute_flops"] / max(pl["forward_flops"], 1.0)
            _out(f"recompute: {pl['recompute_choice']}"
                 + (f"; {pl['recompute_ops']} ops ({types}), +{extra:.0f}% of the forward's "
                    f"FLOPs, arena {_fmt_bytes(pl['arena_bytes_no_recompute'])} without"
                    if pl["recompute_ops"] else ""))
        else:
            _out(f"planned memory: unavailable ({rep.get('plan_error', 'no plan')})")
        fused = tr.get("fusions") or {}
        _out("fused chains: " + (", ".join(f"{k} x{v}" for k, v in fused.items()) or "none")
             + f"; GEMM kernels: OpenBLAS {pyedge._core.blas_core()}"
             + f"; core build: {_core_build()}")
    return EXIT_OK


def _core_build() -> str:
    """Which build of the core runs (pyedge/core_variant.py): its -march and SIMD backend."""
    from pyedge import _core
    info = _core.simd_info()
    return f"{info['target']} ({info['backend']}, {info['width']} floats)"


def cmd_demo(args) -> int:
    from pyedge.demo import run_demo
    run_demo(out=args.out, steps=args.steps, seed=args.seed, threads=args.threads,
             torch_check=args.torch_check)
    return EXIT_OK


# --------------------------------------------------------------------------- main
def _classify(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an expected failure; None for a bug."""
    import pyedge
    from pyedge.checkpoint import CheckpointError
    from pyedge.data import DataError
    from pyedge.train import ConfigError, TrainingError

    if isinstance(exc, (UsageError, ConfigError)):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                        PermissionError)) and exc.filename is not None:
        return EXIT_RUNTIME, f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, (DataError, pyedge.ModelLoadError, pyedge.PyedgeError, CheckpointError,
                        TrainingError, FileNotFoundError, OSError)):
        return EXIT_RUNTIME, str(exc)
    mod = type(exc).__module__ or ""
    if mod.startswith("pyedge.export") or type(exc).__name__ == "AdapterError":
        return EXIT_RUNTIME, str(exc)
    if isinstance(exc, ImportError):
        return EXIT_RUNTIME, f"cannot import {exc.name or ''}: {exc}".replace(" : ", ": ")
    if isinstance(exc, RuntimeError) and type(exc) is RuntimeError:
        return EXIT_RUNTIME, str(exc)
    if isinstance(exc, (ValueError, TypeError)) and type(exc) in (ValueError, TypeError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, ValueError):
        return EXIT_RUNTIME, str(exc)
    return None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("PYEDGE_DEBUG") == "1"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("\npyedge: interrupted (a run can continue with --resume)\n")
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI boundary
        if debug:
            raise
        cls = _classify(exc)
        if cls is None:
            code, msg = EXIT_RUNTIME, (f"internal error: {type(exc).__name__}: {exc} "
                                       "(rerun with --debug for the traceback)")
        else:
            code, msg = cls
        sys.stderr.write(f"pyedge: error: {_one_line(msg) or type(exc).__name__}\n")
        sys.stderr.flush()
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
