"""`pyedge train` and `pyedge eval`: their options (flags, a TOML file, a resumed run's saved
options) and what they print."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from pyedge.cli_common import EXIT_OK, UsageError, one_line, out


def add_commands(sub, common) -> None:
    """The train and eval subcommands."""
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
    g.add_argument("--method", choices=("lora", "dora", "ia3", "ln_tuning", "hra", "miss", "vera"),
                   help="adapter method (pyedge/adapters/): lora (default), dora (LoRA with a "
                        "trained magnitude, PEFT's use_dora), ia3 (IA3Config: a learned scale per "
                        "feature of --target), ln_tuning (LNTuningConfig: --target's norm "
                        "tensors train), hra (HRAConfig: --lora-r Householder reflections), "
                        "miss (MissConfig: a [--lora-r, out] block), vera (VeraConfig: rank --lora-r, "
                        "projections seeded by --seed)")
    g.add_argument("--feedforward-modules",
                   help="ia3: the targets whose input is scaled, comma-separated (PEFT's "
                        "feedforward_modules, e.g. down_proj)")
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
        raise UsageError(f"{path}: invalid TOML ({one_line(e)})") from None
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
        raise UsageError(f"{p}: unreadable ({one_line(e)}); give the options again") from None
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
    for k in ("target", "train", "feedforward_modules"):
        if k in values:
            values[k] = split_list(values[k])
    if "loss" not in values and values.get("model") and _is_causal_lm_folder(values["model"]):
        values["loss"] = "causal_lm"  # cross-entropy on unshifted LM logits is never meant
    if not values.get("model"):
        raise UsageError("no model given: pyedge train model.onnx --data train.npz ...")
    if not values.get("data"):
        raise UsageError("no training data given (--data train.npz)")
    return TrainConfig(**values)


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
        out("; ".join(parts))
        out(f"adapters: {res.adapters}" + (" (pyedge + PEFT format)" if res.peft else ""))
        out(f"checkpoint: {res.checkpoint}")
        out(f"metrics: {res.out / 'metrics.jsonl'}")
    return EXIT_OK


def cmd_eval(args) -> int:
    import pyedge
    from pyedge.evaluation import evaluate, load_data
    from pyedge.train import session_from_adapters
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
        out(json.dumps(res))
    else:
        acc = f"  accuracy {res['accuracy']:.4f}" if res["accuracy"] is not None else ""
        ppl = (f"  perplexity {res['perplexity']:.4f} ({res['tokens']} tokens)"
               if "perplexity" in res else "")
        out(f"{args.data}: {res['records']} records  loss {res['loss']:.4f}{acc}{ppl}")
    return EXIT_OK
