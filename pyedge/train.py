"""The training loop around TrainingSession: data, schedules, accumulation, evaluation,
metrics, checkpoints and resume. `train(TrainConfig(...))` is what `pyedge train` runs.

Conventions:

* A *step* is one optimizer update; it consumes `grad_accum` micro-batches from an endless,
  seeded stream of batches (epochs follow each other; the last partial batch of an epoch is
  kept unless `drop_last`). Without `max_steps`, a run is
  ``ceil(epochs * batches_per_epoch / grad_accum)`` steps.
* Gradient accumulation: the core sums the gradients of the k micro-batches and scales the sum
  by 1/k before clipping and the update: the update of the *mean* gradient, as PyTorch does
  when the loss is divided by k.
* A non-finite loss or gradient skips the whole step (parameters untouched). Without
  `skip_nonfinite` training stops with TrainingError; the last checkpoint stays as it was.
* Determinism: same config + seed + thread count => bit-identical adapters, also across a
  kill and `--resume` (the data order is a pure function of (seed, epoch); the checkpoint
  holds tensors, optimizer state, update count and data position). `deterministic=True`
  uses one thread unless `threads` is given.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pyedge import checkpoint as ckpt
from pyedge.data import BatchLoader
from pyedge.evaluation import (evaluate, fixed_batch_size, infer_num_classes,  # noqa: F401
                               load_data, loss_sums)
from pyedge.metrics_log import MetricsLog, plot_metrics, write_metrics_csv
from pyedge.progress import Progress
from pyedge.schedules import SCHEDULES, make_schedule

LOSSES = ("cross_entropy", "mse", "causal_lm")
OPTIMIZERS = ("adamw", "sgd", "mezo")
ADAPTERS_FORMAT = "pyedge-adapters"


class ConfigError(ValueError):
    """A training option is invalid or inconsistent (usage error)."""


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss, ...); the message says what to do."""


@dataclasses.dataclass
class TrainConfig:
    model: str = ""
    data: str = ""
    eval_data: str | None = None
    out: str = "pyedge-run"
    # adapters
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    rslora: bool = False
    method: str = "lora"                # adapter method (pyedge/adapters/): lora | dora | ia3 | ln_tuning | hra | miss | vera
    feedforward_modules: list = dataclasses.field(default_factory=list)  # ia3: input-scaled targets
    init_lora_weights: str | None = None   # "pissa" | "olora" | "gaussian" (None: PEFT's default)
    loraplus_lr_ratio: float | None = None  # LoRA+: B (and DoRA's magnitude) at lr x ratio
    target: list = dataclasses.field(default_factory=list)   # LoRA target modules
    train: list = dataclasses.field(default_factory=list)    # whole tensors to train
    quantize: str | None = None         # "4" | "8" | "nf4" | "fp4": quantize frozen weights on load
    # objective
    loss: str = "cross_entropy"
    output: str | None = None
    label_smoothing: float = 0.0
    ignore_index: int = -100
    # optimisation
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float | None = None   # None: the optimizer's default (AdamW 0.01, SGD 0)
    momentum: float = 0.0
    mezo_eps: float = 1e-3              # MeZO (pyedge/mezo.py): perturbation scale
    mezo_sparsity: float = 1.0          # Sparse MeZO: fraction of each tensor perturbed
    mezo_mask: str = "random"           # Sparse MeZO: "random" | "magnitude"
    warmup_steps: int = 0
    schedule: str = "linear"
    grad_accum: int = 1
    max_grad_norm: float = 1.0          # 0: no clipping
    seed: int = 0
    threads: int | None = None
    deterministic: bool = False
    # memory: a budget for the whole process ("2.5G", bytes), met by recomputing activations
    max_memory: str | int | None = None
    recompute: str = "auto"             # auto (as the budget needs), none, cheap, full
    # data
    pad_id: int = 0
    seq_len: int | None = None
    tokenizer: str | None = None        # text data: tokenizer.json (default: next to the model)
    pack: bool | None = None            # text data: pack into seq_len rows (default: .txt only)
    drop_last: bool = False
    shuffle: bool = True
    skip_nonfinite_data: bool = False
    eval_batch_size: int | None = None
    # bookkeeping
    eval_every: int = 0                 # 0: evaluate at the end only
    early_stop: int = 0                 # stop after N evaluations without a lower eval loss
    eval_at_start: bool = False
    save_every: int = 100               # 0: checkpoint at the end only
    keep_checkpoints: int = 3           # 0: keep all
    log_every: int = 10
    resume: bool = False
    skip_nonfinite: bool = False
    plot: bool = True
    progress: bool = True

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)
        need(self.model, "no model given")
        need(self.data, "no training data given (--data)")
        need(self.loss in LOSSES, f"unknown loss '{self.loss}'; choose one of {', '.join(LOSSES)}")
        need(self.optimizer in OPTIMIZERS,
             f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "mezo":
            need(self.grad_accum == 1, "--optimizer mezo takes one batch a step: use "
                 "--batch-size instead of --grad-accum")
            need(math.isfinite(self.mezo_eps) and self.mezo_eps > 0,
                 f"--mezo-eps must be > 0, got {self.mezo_eps}")
            need(0 < self.mezo_sparsity <= 1,
                 f"--mezo-sparsity must be in (0, 1], got {self.mezo_sparsity}")
            need(self.mezo_mask in ("random", "magnitude"),
                 f"--mezo-mask must be random or magnitude, got {self.mezo_mask!r}")
        need(self.schedule in SCHEDULES,
             f"unknown schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        need(self.target or self.train,
             "nothing to train: give LoRA targets (--target MODULES; `pyedge inspect model.onnx` "
             "lists them, or 'all-linear') and/or whole tensors (--train PATTERNS)")
        if self.target:
            need(self.lora_r > 0, f"--lora-r must be positive, got {self.lora_r}")
        need(self.lora_alpha > 0, f"--lora-alpha must be positive, got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        need(self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}")
        need(self.epochs > 0 or self.max_steps > 0, "--epochs must be positive (or give --max-steps)")
        need(self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}")
        need(math.isfinite(self.lr) and self.lr >= 0, f"--lr must be >= 0, got {self.lr}")
        need(self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        need(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        need(self.weight_decay is None or self.weight_decay >= 0,
             f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.label_smoothing <= 1,
             f"--label-smoothing must be in [0, 1], got {self.label_smoothing}")
        need(self.threads is None or self.threads > 0, f"--threads must be positive, got {self.threads}")
        need(self.recompute in ("auto", "none", "cheap", "full"),
             f"--recompute must be auto, none, cheap or full, got {self.recompute!r}")
        if self.max_memory is not None:
            from pyedge.memory_budget import parse_memory_size
            try:
                parse_memory_size(self.max_memory)
            except ValueError as e:
                raise ConfigError(f"--max-memory: {e}") from None
        for k in ("eval_every", "save_every", "keep_checkpoints"):
            need(getattr(self, k) >= 0, f"--{k.replace('_', '-')} must be >= 0")
        need(self.log_every > 0, f"--log-every must be positive, got {self.log_every}")
        need(self.early_stop >= 0, f"--early-stop must be >= 0, got {self.early_stop}")
        need(not self.early_stop or (self.eval_data and self.eval_every),
             "--early-stop N needs --eval-data and --eval-every (it counts evaluations)")
        need(self.seq_len is None or self.seq_len > 0, f"--seq-len must be positive, got {self.seq_len}")
        need(self.eval_batch_size is None or self.eval_batch_size > 0, "--eval-batch-size must be positive")
        need(self.loss != "mse" or self.label_smoothing == 0, "--label-smoothing needs a cross-entropy loss")


@dataclasses.dataclass
class TrainResult:
    steps: int
    optimizer_steps: int
    epoch: float
    train_loss: float          # moving average (0.9) of the step losses at the end
    eval: dict | None
    initial_eval: dict | None
    out: Path
    adapters: Path
    checkpoint: Path | None
    skipped_nonfinite: int
    seconds: float
    resumed_from: int | None = None
    peft: bool = False


# --------------------------------------------------------------------------- helpers
def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _weight_of(graph, producers, name):
    if name in graph.initializers:
        return name
    p = producers.get(name)
    if p is not None and p.op_type == "Transpose" and p.inputs and p.inputs[0] in graph.initializers:
        return p.inputs[0]
    return None


def weight_modules(graph) -> list[dict]:
    """Modules with a weight initializer consumed by MatMul/Gemm/Conv or a quantized
    MatMulNBits/MatMulBnb4, in graph order: [{"module", "op", "weight", "shape", "lora": bool
    (LoRA can wrap it today), "feeds_output"}], quantized ones with "bits" and
    "resident_bytes" (packed weight + scales + zero points + bias)."""
    from pyedge.import_quantized import is_quant_node, quant_resident_bytes
    from pyedge.param_names import module_of
    producers = graph.producer_map()
    outputs = {o.name for o in graph.outputs}
    seen, out = set(), []
    for n in graph.nodes:
        if is_quant_node(n) and len(n.inputs) > 1 and n.inputs[1] in graph.initializers:
            mod = module_of(graph, n.inputs[1])
            if mod not in seen:
                seen.add(mod)
                out.append({"module": mod, "op": n.op_type, "weight": n.inputs[1],
                            "shape": [int(n.attrs["N"]), int(n.attrs["K"])], "lora": True,
                            "feeds_output": bool(set(n.outputs) & outputs),
                            "bits": int(n.attrs.get("bits", 4)),
                            "block_size": int(n.attrs["block_size"]),
                            "resident_bytes": quant_resident_bytes(graph, n)})
            continue
        if n.op_type not in ("MatMul", "Gemm", "Conv") or len(n.inputs) < 2:
            continue
        w = _weight_of(graph, producers, n.inputs[1])
        if w is None or graph.initializers[w].dtype.kind != "f":
            continue
        mod = module_of(graph, w)
        if mod in seen:
            continue
        seen.add(mod)
        out.append({"module": mod, "op": n.op_type, "weight": w,
                    "shape": list(graph.initializers[w].shape),
                    "lora": n.op_type in ("MatMul", "Gemm") and graph.initializers[w].ndim == 2,
                    "feeds_output": bool(set(n.outputs) & outputs)})
    return out


def expand_targets(graph, targets: Sequence[str]) -> list[str]:
    """'all-linear' -> every LoRA-able linear module except the one producing a graph output
    (like PEFT's all-linear, which leaves the output head alone)."""
    out = []
    for t in targets:
        if t == "all-linear":
            out += [m["module"] for m in weight_modules(graph) if m["lora"] and not m["feeds_output"]]
        else:
            out.append(t)
    return list(dict.fromkeys(out))


def split_list(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    out = []
    for item in v:
        out += [p.strip() for p in str(item).split(",") if p.strip()]
    return out


def build_session(cfg: TrainConfig, graph=None, loss: str | None = "__cfg__"):
    """The TrainingSession for `cfg`."""
    import pyedge
    if graph is None and cfg.quantize:
        from pyedge.quantize import load_quantized
        graph, _ = load_quantized(cfg.model, cfg.quantize)
    graph = graph if graph is not None else pyedge.load_onnx(cfg.model)
    targets = expand_targets(graph, split_list(cfg.target))
    # methods beside the LoRA family (pyedge/adapters/<method>.py): config from the flags
    others = {
        "ia3": lambda: pyedge.IA3Config(target_modules=targets, seed=cfg.seed,
                                        feedforward_modules=split_list(cfg.feedforward_modules)),
        "ln_tuning": lambda: pyedge.LNTuningConfig(target_modules=targets),
        "hra": lambda: pyedge.HRAConfig(r=cfg.lora_r, target_modules=targets, seed=cfg.seed),
        "miss": lambda: pyedge.MissConfig(r=cfg.lora_r, target_modules=targets, seed=cfg.seed),
        "vera": lambda: pyedge.VeraConfig(r=cfg.lora_r, target_modules=targets,
                                          projection_prng_key=cfg.seed),
    }
    if cfg.method not in ("lora", "dora", *others):
        raise ValueError(f"--method {cfg.method!r}: pyedge has lora, dora, "
                         f"{', '.join(others)}")
    if cfg.method in others:
        lora = others[cfg.method]() if targets else None
    else:
        lora = (pyedge.LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=targets,
                              dropout=cfg.lora_dropout, use_rslora=cfg.rslora, seed=cfg.seed,
                              use_dora=cfg.method == "dora",
                              init_lora_weights=cfg.init_lora_weights or True,
                              loraplus_lr_ratio=cfg.loraplus_lr_ratio)
                if targets else None)
    if cfg.optimizer == "adamw":
        wd = 0.01 if cfg.weight_decay is None else cfg.weight_decay
        opt = pyedge.AdamW(lr=cfg.lr, weight_decay=wd)
    elif cfg.optimizer == "mezo":  # forward only (pyedge/mezo.py)
        wd = 0.0 if cfg.weight_decay is None else cfg.weight_decay
        opt = pyedge.MeZO(lr=cfg.lr, eps=cfg.mezo_eps, weight_decay=wd,
                          sparsity=cfg.mezo_sparsity, mask=cfg.mezo_mask)
    else:
        wd = 0.0 if cfg.weight_decay is None else cfg.weight_decay
        opt = pyedge.SGD(lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)
    threads = cfg.threads or (1 if cfg.deterministic else None)
    sess = pyedge.TrainingSession(
        graph, lora=lora, train=split_list(cfg.train), loss=cfg.loss if loss == "__cfg__" else loss,
        optimizer=opt, output=cfg.output, seed=cfg.seed, threads=threads,
        max_grad_norm=cfg.max_grad_norm, label_smoothing=cfg.label_smoothing,
        ignore_index=cfg.ignore_index, max_memory=cfg.max_memory, recompute=cfg.recompute)
    sess.resolved_targets = targets
    return sess


def pyedge_lora_config():
    from pyedge.adapters.lora import LoraConfig
    return LoraConfig


def _write_final_adapters(adapters_dir: Path, session, meta: dict, say) -> bool:
    """out/adapters: pyedge's raw adapters and the PEFT files, built in a temp folder that
    replaces the old one in one rename (checkpoint.replace_dir): a run killed meanwhile (e.g.
    a --resume of a finished run) never leaves one run's raw files beside another's PEFT
    files. Returns whether the PEFT files were written."""
    import shutil
    parent = adapters_dir.parent
    ckpt.recover_replaced(parent, adapters_dir.name)  # a kill between replace_dir's renames
    for stale in [*parent.glob(f".tmp-{adapters_dir.name}-*"),
                  *parent.glob(f".trash-{adapters_dir.name}-*")]:   # left by a kill
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".tmp-{adapters_dir.name}-{os.getpid()}"
    try:
        ckpt.write_adapters_dir(tmp, session.trainable_parameters(), meta)
        peft = False
        if hasattr(session, "save_adapters"):
            try:
                session.save_adapters(str(tmp))
                peft = True
            except Exception as e:  # noqa: BLE001 - the raw adapters are saved anyway
                say(f"warning: PEFT adapters not written ({type(e).__name__}: {e}); the "
                    "pyedge adapters are in " + str(adapters_dir))
        ckpt.fsync_dir(tmp)
        ckpt.replace_dir(tmp, adapters_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return peft


def adapter_meta(cfg: TrainConfig, session, model_sha: str, step: int | None = None) -> dict:
    lc = session.lora_config
    return {
        "format": ADAPTERS_FORMAT, "version": 1,
        "model": os.path.basename(str(cfg.model)), "model_sha256": model_sha,
        # a method other than the LoRA family: its config's fields, rebuilt by method name
        **({"adapter": {"method": session.adapter_method.name,
                        "config": dataclasses.asdict(lc)}}
           if lc is not None and not isinstance(lc, pyedge_lora_config()) else {}),
        "lora": None if lc is None or not isinstance(lc, pyedge_lora_config()) else {
            "r": lc.r, "alpha": lc.alpha, "target_modules": list(lc.target_modules),
            "dropout": lc.dropout, "use_rslora": lc.use_rslora,
            "use_dora": bool(getattr(lc, "use_dora", False)),
            "init_lora_weights": getattr(lc, "init_lora_weights", True)},
        "train": split_list(cfg.train), "loss": cfg.loss, "output": session.output_name,
        "label_smoothing": cfg.label_smoothing, "ignore_index": cfg.ignore_index,
        "tensors": sorted(session.trainable_parameters()), "step": step,
        **({"quantize": str(cfg.quantize)} if cfg.quantize else {}),
    }


def session_from_adapters(model, adapters, loss: str | None = None, threads: int | None = None,
                          output: str | None = None):
    """An inference session (no loss unless given) with saved adapters loaded.

    `adapters` is a pyedge adapters or checkpoint directory (pyedge_adapters.*), or a PEFT
    directory when pyedge.export can read it. Returns (session, meta)."""
    import pyedge
    path = Path(adapters)
    if not path.exists():
        raise FileNotFoundError(f"{adapters}: no such adapters directory")
    raw = ckpt.read_adapters_dir(path)
    if raw is None:
        return _session_from_peft(model, path, loss, threads, output)
    tensors, meta = raw
    if meta.get("format") != ADAPTERS_FORMAT:
        raise ckpt.CheckpointError(f"{path}/{ckpt.ADAPTERS_META}: not pyedge adapters")
    lm = meta.get("lora")
    lora = (pyedge.LoraConfig(r=int(lm["r"]), alpha=float(lm["alpha"]),
                              target_modules=list(lm["target_modules"]),
                              dropout=float(lm.get("dropout", 0.0)),
                              use_rslora=bool(lm.get("use_rslora", False)),
                              use_dora=bool(lm.get("use_dora", False)),
                              init_lora_weights=lm.get("init_lora_weights", True))
            if lm else None)
    if meta.get("adapter"):  # IA3, LN tuning, ...: the config class of the named method
        from pyedge.adapters.base import method_by_name
        am = meta["adapter"]
        lora = method_by_name(str(am["method"])).config_class(**dict(am["config"]))
    if meta.get("quantize"):  # trained with --quantize: the same quantized base
        from pyedge.quantize import load_quantized
        model, _ = load_quantized(model, meta["quantize"])
    sess = pyedge.TrainingSession(model, lora=lora, train=meta.get("train", []), loss=loss,
                                  output=output or meta.get("output"), threads=threads,
                                  label_smoothing=float(meta.get("label_smoothing", 0.0)),
                                  ignore_index=int(meta.get("ignore_index", -100)))
    _assign_tensors(sess, tensors, str(path))
    return sess, meta


def _session_from_peft(model, path: Path, loss, threads, output):
    import pyedge
    cfg_file = path / "adapter_config.json"
    if not os.path.lexists(cfg_file):
        raise ckpt.CheckpointError(f"{path}: no adapters found (neither {ckpt.ADAPTERS} nor "
                                   "adapter_config.json)")
    try:
        from pyedge.export.adapter_files import read_adapter_folder
        from pyedge.export.peft import load_adapter_files
    except ImportError:
        raise ckpt.CheckpointError(f"{path}: PEFT adapters need pyedge.export (not installed in "
                                   "this build); use a pyedge adapters directory") from None
    ad = read_adapter_folder(path)  # the whole folder validated before a session exists
    pc = ad.config
    targets = pc.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    from pyedge.adapters.base import method_for_peft
    lora = method_for_peft(pc, str(cfg_file)).config_from_peft(pc, targets)
    train = [f"{m}.*" for m in (pc.get("modules_to_save") or [])]
    sess = pyedge.TrainingSession(model, lora=lora, train=train, loss=loss, output=output,
                                  threads=threads)
    load_adapter_files(sess, ad)
    meta = {"lora": {"r": lora.r, "alpha": lora.alpha, "target_modules": targets},
            "train": train, "loss": loss, "output": sess.output_name,
            "label_smoothing": 0.0, "ignore_index": -100}
    return sess, meta


def _assign_tensors(session, tensors: dict, where: str) -> None:
    params = session.trainable_parameters()
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise ckpt.CheckpointError(
            f"{where}: the saved tensors do not match this model/adapter config "
            f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(extra[:5]) or 'none'})")
    for name, arr in tensors.items():  # all checked before the first write
        if params[name].shape != arr.shape:
            raise ckpt.CheckpointError(f"{where}: tensor '{name}' has shape {arr.shape}, the "
                                       f"session's is {params[name].shape}")
        if arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
            raise ckpt.CheckpointError(f"{where}: tensor {name!r} is not all finite floating "
                                       f"point values ({arr.dtype})")
    for name, arr in tensors.items():
        params[name][...] = arr


def _set_step_count(session, n: int) -> None:
    session.step_count = int(n)


def _rng_state(session, seed: int) -> dict:
    st = {"seed": int(seed), "data": "numpy default_rng([seed, epoch]).permutation"}
    st["micro_steps"] = int(session.micro_steps)
    return st


# --------------------------------------------------------------------------- the loop
def _hashes(cfg: TrainConfig, session, model_sha: str, total_steps: int):
    structure = {
        "model_sha256": model_sha,
        "lora": None if session.lora_config is None else {
            "r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": list(session.lora_config.target_modules),
            "dropout": cfg.lora_dropout, "rslora": cfg.rslora},
        "train": split_list(cfg.train), "loss": cfg.loss, "output": session.output_name,
        "optimizer": cfg.optimizer, "tensors": sorted(session.trainable_parameters()),
    }
    if cfg.quantize:  # only when set: older runs' hashes stay valid
        structure["quantize"] = str(cfg.quantize)
    trajectory = {
        "lr": cfg.lr, "schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps,
        "total_steps": total_steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "seed": cfg.seed, "max_grad_norm": cfg.max_grad_norm, "weight_decay": cfg.weight_decay,
        "momentum": cfg.momentum, "label_smoothing": cfg.label_smoothing,
        "ignore_index": cfg.ignore_index, "drop_last": cfg.drop_last, "shuffle": cfg.shuffle,
    }
    if cfg.optimizer == "mezo":  # only then: other runs' hashes stay valid
        trajectory.update(mezo_eps=cfg.mezo_eps, mezo_sparsity=cfg.mezo_sparsity,
                          mezo_mask=cfg.mezo_mask)

    def h(d):
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    return structure, trajectory, h(structure), h(trajectory)


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None,
          progress_stream=None) -> TrainResult:
    """Runs training as configured; returns a TrainResult. Raises ConfigError (bad options),
    DataError, ModelLoadError / PyedgeError (model), CheckpointError, TrainingError.

    The run holds a lock on out/checkpoints (a second run on the same --out is refused) and
    first removes what a killed run left half-written or half-deleted there (temp and trash
    dirs, also from a kill during the very first checkpoint)."""
    cfg.validate()
    if not Path(cfg.model).is_file():
        raise FileNotFoundError(f"{cfg.model}: no such model file")
    ck_root = Path(cfg.out) / "checkpoints"
    with ckpt.RunLock(ck_root):
        ckpt.cleanup_temp(ck_root)
        for folder in (ck_root.parent, ck_root.parent / "adapters"):  # config.json, adapters
            ckpt.cleanup_temp_files(folder)
        return _train(cfg, log, progress_stream)


def _train(cfg: TrainConfig, log, progress_stream) -> TrainResult:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    ck_root = out / "checkpoints"
    stream = progress_stream if progress_stream is not None else sys.stderr
    bar = Progress(0, stream=stream, every=cfg.log_every, enabled=cfg.progress)
    say = log or bar.write

    if cfg.resume:
        if not ckpt.has_checkpoints(ck_root):
            say(f"no checkpoint in {ck_root}: starting from scratch")
    elif ckpt.has_checkpoints(ck_root):
        raise ConfigError(f"{out} already holds checkpoints of a run: pass --resume to continue "
                          "it, or choose another --out")

    session = build_session(cfg)
    model_sha = file_sha256(cfg.model)
    train_ds = load_data(session, cfg.data, cfg)
    eval_ds = load_data(session, cfg.eval_data, cfg) if cfg.eval_data else None
    for ds in (train_ds, eval_ds):
        if ds is not None and getattr(ds, "summary", None):
            say(ds.summary)  # what the text became
        if ds is not None and ds.skipped:
            say(f"{ds.path}: skipped {ds.skipped} record(s) with NaN/inf values")
    fixed_batch = fixed_batch_size(session)
    if fixed_batch and cfg.batch_size != fixed_batch:
        raise ConfigError(f"the model has a fixed batch size {fixed_batch} (exported without a "
                          f"dynamic batch axis): use --batch-size {fixed_batch}")
    drop_last = cfg.drop_last or bool(fixed_batch)
    loader = BatchLoader(train_ds, cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed,
                         drop_last=drop_last)
    k = cfg.grad_accum
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * loader.batches_per_epoch / k))
    schedule = make_schedule(cfg.schedule, cfg.lr, cfg.warmup_steps, total_steps)
    structure, trajectory, s_hash, t_hash = _hashes(cfg, session, model_sha, total_steps)
    eval_bs = cfg.eval_batch_size or max(cfg.batch_size, 64)

    step, skipped, resumed_from = 0, 0, None
    last_ck: Path | None = None
    if cfg.resume and ckpt.has_checkpoints(ck_root):
        ck = ckpt.load_latest(ck_root, warn=say)
        if ck is not None:
            st = ck.state
            if st.get("config_hash") != s_hash:
                old = st.get("structure", {})
                diff = [key for key in structure if old.get(key) != structure[key]]
                raise ckpt.CheckpointError(
                    f"{ck.path}: made with a different model or adapter setup "
                    f"({', '.join(diff) or 'config'} changed); use another --out")
            if st.get("trajectory_hash") != t_hash:
                old = st.get("trajectory", {})
                diff = [key for key in trajectory if old.get(key) != trajectory[key]]
                say(f"warning: resuming with changed {', '.join(diff)}: the result will differ "
                    "from an uninterrupted run")
            _assign_tensors(session, ck.tensors, str(ck.path))
            optim = session.optimizer_state()
            for name, d in optim.items():
                for key, arr in d.items():
                    saved = ck.optimizer_state.get(name, {}).get(key)
                    if saved is None or saved.shape != arr.shape:
                        raise ckpt.CheckpointError(f"{ck.path}: optimizer state '{key}' of "
                                                   f"'{name}' is missing or has the wrong shape")
                    arr[...] = saved
            _set_step_count(session, st["optimizer_steps"])
            rng = st.get("rng", {})
            if "micro_steps" in rng:
                session.micro_steps = int(rng["micro_steps"])
            try:
                loader.load_state(st["data"])
            except ValueError as e:
                raise ckpt.CheckpointError(f"{ck.path}: {e}") from None
            step = resumed_from = ck.step
            skipped = int(st.get("skipped_nonfinite", 0))
            last_ck = ck.path
            say(f"resumed from {ck.path} (step {step}, epoch {loader.position:.2f})")
    out.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write(out / "config.json", json.dumps(
        {k2: v for k2, v in dataclasses.asdict(cfg).items()}, indent=1, default=str).encode())
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if resumed_from is not None else None)

    def save(step_now: int) -> Path:
        state = {
            "step": step_now, "optimizer_steps": int(session.step_count),
            "epoch": loader.position, "data": loader.state(), "rng": _rng_state(session, cfg.seed),
            "lr": schedule.lr_at(step_now), "total_steps": total_steps,
            "config_hash": s_hash, "trajectory_hash": t_hash, "structure": structure,
            "trajectory": trajectory, "skipped_nonfinite": skipped, "time": time.time(),
        }
        return ckpt.save_checkpoint(ck_root, step_now, session.trainable_parameters(),
                                    session.optimizer_state(), state,
                                    adapter_meta(cfg, session, model_sha, step_now),
                                    keep=cfg.keep_checkpoints)

    def run_eval(step_now: int) -> dict:
        res = evaluate(session, eval_ds, eval_bs, cfg.loss, cfg.ignore_index, cfg.label_smoothing)
        metrics.write({"type": "eval", "step": step_now, "epoch": round(loader.position, 4),
                       **res})
        acc = f", accuracy {res['accuracy']:.4f}" if res["accuracy"] is not None else ""
        if "perplexity" in res:
            acc += f", perplexity {res['perplexity']:.4f}"
        say(f"eval @ step {step_now}: loss {res['loss']:.4f}{acc} ({res['records']} records)")
        return res

    initial_eval = None
    if cfg.eval_at_start and eval_ds is not None and resumed_from is None:
        initial_eval = run_eval(0)

    bar.total, bar.start_step, bar.step = total_steps, step, step
    bar.t0 = time.perf_counter()
    last_eval = None
    best = (math.inf, 0, 0)  # early stopping: (lowest eval loss, its step, evaluations since)
    if cfg.early_stop and resumed_from is not None:
        # the evaluations before the checkpoint count, as in an uninterrupted run
        for r in metrics.records():
            if r.get("type") == "eval" and r.get("loss") is not None and r.get("step", 0) > 0:
                best = ((r["loss"], r["step"], 0) if r["loss"] < best[0] else
                        (best[0], best[1], best[2] + 1))
    window: list[float] = []
    last_loss = float("nan")
    ema = None  # moving average of the loss, for the progress display and the result
    memory_said = False
    try:
        while step < total_steps:
            session.lr = schedule.lr_at(step)
            losses, failure = [], None
            for micro in range(k):
                inputs, labels, _ = loader.next()
                if failure is not None:
                    continue  # keep the data stream aligned with an uninterrupted run
                try:
                    losses.append(session.step(inputs, labels, update=(micro == k - 1),
                                               grad_scale=1.0 / k))
                except FloatingPointError as e:
                    failure = e
                if not memory_said:  # the first plan: what the memory budget made of it
                    line = session.memory_plan_summary(inputs, labels, notable_only=True)
                    if line:
                        say(line)
                    memory_said = True
            step += 1
            if failure is not None:
                if not cfg.skip_nonfinite:
                    where = f"; the last checkpoint ({last_ck}) is intact" if last_ck else \
                        "; no checkpoint was written yet"
                    raise TrainingError(f"non-finite loss or gradient at step {step}{where}: "
                                        "lower --lr, check the data, or pass --skip-nonfinite")
                skipped += 1
                metrics.write({"type": "skip", "step": step, "reason": "non-finite"})
            else:
                last_loss = float(np.mean(losses))
                window.append(last_loss)
                ema = last_loss if ema is None else 0.9 * ema + 0.1 * last_loss
            if step % cfg.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                rec = {"type": "train", "step": step, "epoch": round(loader.position, 4),
                       "loss": float(np.mean(window)) if window else float("nan"),
                       "lr": session.lr,
                       "grad_norm": (float(session.last_grad_norm) / k
                                     if session.last_grad_norm is not None else None),
                       "skipped_nonfinite": skipped,
                       "seconds": round(now - t_start, 3)}
                metrics.write(rec)
                window = []
            bar.update(step, ema, lr=session.lr)
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                last_ck = save(step)
            if eval_ds is not None and cfg.eval_every and step % cfg.eval_every == 0 \
                    and step < total_steps:
                last_eval = run_eval(step)
                if cfg.early_stop:
                    best = ((last_eval["loss"], step, 0) if last_eval["loss"] < best[0] else
                            (best[0], best[1], best[2] + 1))
                    if best[2] >= cfg.early_stop:
                        say(f"early stop at step {step}: eval loss has not improved for "
                            f"{best[2]} evaluations (best {best[0]:.4f} at step {best[1]})")
                        metrics.write({"type": "early_stop", "step": step,
                                       "best_step": best[1], "best_loss": best[0]})
                        break
        bar.close()
        if last_ck is None or last_ck.name != f"step-{step}":
            last_ck = save(step)
        if eval_ds is not None and not (last_eval is not None and best[2] >= cfg.early_stop > 0):
            last_eval = run_eval(step)
    finally:
        bar.close()
        metrics.close()
        try:
            write_metrics_csv(out / "metrics.jsonl", out / "metrics.csv")
        except OSError:
            pass  # the jsonl stays the record
    if skipped:
        say(f"skipped {skipped} step(s) with a non-finite loss or gradient")
    adapters_dir = out / "adapters"
    peft = _write_final_adapters(adapters_dir, session, adapter_meta(cfg, session, model_sha,
                                                                     step), say)
    if cfg.plot:
        try:
            plot_metrics(out / "metrics.jsonl", out / "metrics.png")
        except Exception:  # noqa: BLE001 - a plot must never fail a finished run
            pass
    return TrainResult(step, int(session.step_count), loader.position,
                       ema if ema is not None else float("nan"), last_eval,
                       initial_eval, out, adapters_dir, last_ck, skipped,
                       time.perf_counter() - t_start, resumed_from, peft)
