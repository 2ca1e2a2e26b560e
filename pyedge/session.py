"""TrainingSession: an ONNX model + adapters + loss + optimizer, run by the C++ core."""
from __future__ import annotations

import contextlib
import os
from typing import Mapping, Sequence

import numpy as np

from pyedge import _core
from pyedge.adapters import LoraConfig, select_trainable_tensors
from pyedge.adapters.base import method_for_config
from pyedge.fused_loss import fuse_linear_cross_entropy
from pyedge.fusions import fuse as fuse_graph
from pyedge.mezo import MeZO, mezo_step
from pyedge.graph import Graph, Node, ValueInfo, to_core
from pyedge.onnx_import import load_onnx
from pyedge.optim import SGD, AdamW

LOSSES = ("cross_entropy", "mse", "causal_lm")
LABELS = "labels"
LOSS = "pyedge_loss"


class TrainingSession:
    """Fine-tunes an ONNX model on the CPU.

    model: path to an .onnx file, its bytes, an onnx.ModelProto, or a pyedge Graph.
    adapter: an adapter method's config (pyedge/adapters/: LoraConfig, with use_dora,
          init_lora_weights, loraplus_lr_ratio, ...) on the modules named by its
          target_modules (PyTorch module names). lora: the same (its older name).
    train: patterns of whole tensors to train (e.g. ["classifier.*"]).
    loss: "cross_entropy" (labels int64 [...]), "mse" (labels like the output) or
          "causal_lm" (cross-entropy of logits[:, :-1] against labels[:, 1:]).
    output: which graph output the loss reads (default: the first).
    fuse: replace exported elementwise chains (GELU, attention's scaled masked softmax) by
          single ops (pyedge/fusions.py);
          False runs the graph op by op, as exported.
    chunked_loss: a cross-entropy loss whose logits come from a linear head (the LM head)
          reads the head's input instead and computes logits and loss over row chunks
          (pyedge.LinearCrossEntropy, pyedge/fused_loss.py): the B·T·V logits and their
          gradient never exist in training. None: as `fuse`. loss_chunk_rows: rows per
          chunk (0: the op's default, ~32 MiB of logits).
    max_memory: budget for the whole process, bytes or a size ("2.5GB", "800M"): the planner
          recomputes activations in the backward (bitwise the same results) as little as
          keeps weights + parameters, gradients, optimizer state + activations under it, and
          raises at plan time, naming the minimum, when it cannot. None: fit into what the
          system has (MemAvailable, a cgroup limit), with a margin.
    recompute: "auto" (as the budget requires), "none", "cheap" (norms, activations,
          elementwise ops) or "full" (also whole blocks between checkpoints).
    """

    def __init__(self, model, lora: LoraConfig | None = None, train: Sequence[str] = (),
                 loss: str | None = "cross_entropy", optimizer: AdamW | SGD | MeZO | None = None,
                 output: str | None = None, seed: int = 0, threads: int | None = None,
                 max_grad_norm: float = 0.0, label_smoothing: float = 0.0,
                 ignore_index: int = -100, fuse: bool = True,
                 chunked_loss: bool | None = None, loss_chunk_rows: int = 0,
                 max_memory: int | str | None = None, recompute: str = "auto",
                 adapter=None):
        self.graph = model.copy() if isinstance(model, Graph) else load_onnx(model)
        self.base_graph = self.graph.copy()
        if adapter is not None and lora is not None and adapter is not lora:
            raise ValueError("give the adapter config as adapter= (lora= is its older name), "
                             "not both")
        cfg = adapter if adapter is not None else lora
        # the method (pyedge/adapters/<method>.py) rewrites the graph and owns its tensors
        self.adapter_config = cfg
        self.adapter_method = method_for_config(cfg) if cfg is not None else None
        self.adapter_sites = self.adapter_method.inject(self.graph, cfg) if cfg is not None \
            else []
        self.lora_config, self.lora_sites = cfg, self.adapter_sites  # older names
        self.train_patterns = list(train)
        self.whole_tensors = select_trainable_tensors(self.graph, train) if train else []
        adapter_tensors = self.adapter_method.trainable(self.adapter_sites) if cfg is not None \
            else []
        trainable = adapter_tensors + self.whole_tensors
        if loss is not None and not trainable:
            raise ValueError("nothing to train: give an adapter config and/or train patterns")
        self.output_name = output or self.graph.outputs[0].name
        if self.output_name not in {o.name for o in self.graph.outputs}:
            raise ValueError(f"'{self.output_name}' is not a graph output; outputs: "
                             f"{[o.name for o in self.graph.outputs]}")
        self.loss_kind = loss
        self.ignore_index, self.label_smoothing = int(ignore_index), float(label_smoothing)
        if loss is not None:
            self._append_loss(loss, label_smoothing, ignore_index)
        self.max_grad_norm = max_grad_norm
        self.optimizer = optimizer or AdamW()
        self.seed = int(seed)  # MeZO's perturbations derive from (seed, step_count)
        if isinstance(self.optimizer, MeZO) and cfg is not None and \
                float(getattr(cfg, "dropout", 0.0) or 0.0) > 0:
            raise ValueError("MeZO compares two losses of the same network: it runs without "
                             "dropout; set the adapter's dropout to 0")
        if threads or os.environ.get("PYEDGE_NUM_THREADS"):
            _core.set_num_threads(int(threads or os.environ["PYEDGE_NUM_THREADS"]))
        # Exported elementwise chains (GELU, scaled masked softmax) become single ops; base_graph
        # keeps the original.
        self.fusions = fuse_graph(self.graph, set(trainable)) if fuse else {}
        # after fuse(): it may have rewritten the head (trans_b, bias) that this pass reads
        if loss in ("cross_entropy", "causal_lm") and (fuse if chunked_loss is None else chunked_loss):
            if fuse_linear_cross_entropy(self.graph, LOSS, loss_chunk_rows):
                self.fusions["linear_cross_entropy"] = 1
        self._model = to_core(self.graph)
        # What the process holds before the session's own buffers: the weights, or more (the
        # interpreter, numpy, onnx). Measured once, so a budget means the same on each replan.
        from pyedge.memory_budget import mapped_bytes, resident_bytes
        weights = list(self.graph.initializers.values())
        self._resident_bytes = resident_bytes(sum(a.nbytes for a in weights),
                                              mapped_bytes(weights))
        opt = self.optimizer.to_core()
        scales = self.adapter_method.lr_scales(self.adapter_sites, cfg) if cfg is not None else {}
        if scales:  # per-tensor learning-rate factors (LoRA+)
            opt["lr_scales"] = scales
        self._sess = _core.Session(self._model, trainable, LOSS if loss else "", opt, seed)
        from pyedge.plan_time_inputs import plan_time_inputs
        keyed = plan_time_inputs(self.graph)
        if keyed:  # parameters fed as graph inputs: plans keyed on their values too
            self._sess.set_value_keyed_inputs(keyed)
        self._input_names = [v.name for v in self.graph.inputs]
        self._input_dtypes = {v.name: v.dtype for v in self.graph.inputs}
        self._recompute = recompute
        self.max_memory = max_memory

    # --- graph -----------------------------------------------------------------------------
    def _append_loss(self, kind, label_smoothing, ignore_index):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss '{kind}'; choose one of {', '.join(LOSSES)}")
        out = next(o for o in self.graph.outputs if o.name == self.output_name)
        if kind == "mse":
            self.graph.inputs.append(ValueInfo(LABELS, "float32", list(out.shape)))
            self.graph.nodes.append(Node("MSELoss", [self.output_name, LABELS], [LOSS],
                                         name="pyedge_mse_loss", domain="pyedge"))
        else:
            shape = list(out.shape[:-1]) if out.shape else []
            self.graph.inputs.append(ValueInfo(LABELS, "int64", shape))
            attrs = {"ignore_index": int(ignore_index), "label_smoothing": float(label_smoothing),
                     "shift": int(kind == "causal_lm")}
            self.graph.nodes.append(Node("CrossEntropyLoss", [self.output_name, LABELS], [LOSS],
                                         name="pyedge_cross_entropy", domain="pyedge",
                                         attrs=attrs))
        self.graph.opsets.setdefault("pyedge", 1)

    # --- inputs ----------------------------------------------------------------------------
    def _input_list(self, inputs, labels=None):
        if isinstance(inputs, Mapping):
            feed = dict(inputs)
        else:
            if isinstance(inputs, np.ndarray):
                inputs = [inputs]
            model_inputs = [n for n in self._input_names if n != LABELS]
            if len(inputs) != len(model_inputs):
                raise ValueError(f"expected {len(model_inputs)} inputs ({model_inputs}), got "
                                 f"{len(inputs)}")
            feed = dict(zip(model_inputs, inputs))
        if labels is not None:
            feed[LABELS] = labels
        if "position_ids" in self._input_names and "position_ids" not in feed \
                and np.ndim(feed.get("input_ids")) == 2:  # transformers' default: 0..T-1
            n, t = np.shape(feed["input_ids"])
            feed["position_ids"] = np.broadcast_to(np.arange(t, dtype=np.int64), (n, t))
        if "attention_mask" in self._input_names and "attention_mask" not in feed \
                and np.ndim(feed.get("input_ids")) == 2:  # transformers' default: all ones
            feed["attention_mask"] = np.ones(np.shape(feed["input_ids"]), np.int64)
        unknown = set(feed) - set(self._input_names)
        if unknown:
            raise ValueError(f"unknown input(s) {sorted(unknown)}; the model takes "
                             f"{[n for n in self._input_names if n != LABELS]}")
        out = []
        for name in self._input_names:
            x = feed.get(name)
            if x is not None:
                x = np.asarray(x)
                want = self._input_dtypes[name]
                if x.dtype != want:
                    if np.dtype(want).kind == "f" or x.dtype.kind in "iub":
                        x = x.astype(want)
                    else:
                        raise ValueError(f"input '{name}' must be {want}, got {x.dtype}")
                x = np.require(x, requirements="C")
            out.append(x)
        return out

    # --- training --------------------------------------------------------------------------
    def step(self, inputs, labels, update: bool = True, grad_scale: float = 1.0) -> float:
        """One forward + backward (+ optimizer update when `update`); returns the loss.

        With update=False the gradients accumulate until a call with update=True; pass
        grad_scale=1/k on that call to update with the mean of k micro-batches.
        Raises FloatingPointError on a NaN/inf loss or gradient; parameters stay untouched.
        """
        arrays = self._input_list(inputs, labels)
        if isinstance(self.optimizer, MeZO):  # forward only: two losses a step (pyedge/mezo.py)
            if not update or grad_scale != 1.0:
                raise ValueError("MeZO steps cannot accumulate micro-batches (update=False, "
                                 "grad_scale): give the whole batch to one step")
            self.last_grad_norm = None
            return mezo_step(self, arrays, self.optimizer)
        with self._planning(arrays, True):
            loss, norm, applied = self._sess.train_step(arrays, update, float(self.max_grad_norm),
                                                        float(grad_scale))
        self.last_grad_norm = norm
        if not np.isfinite(loss) or (update and not applied):
            raise FloatingPointError(
                f"non-finite {'loss' if not np.isfinite(loss) else 'gradient'} at step "
                f"{self._sess.step_count + 1} (loss={loss}); the update was skipped and the "
                "parameters are unchanged: lower the learning rate or check the data")
        return float(loss)

    def _forward_loss(self, arrays) -> float:
        """The loss of one batch (input arrays incl. labels) from the forward-only plan."""
        with self._planning(arrays, True):
            return float(self._sess.run(arrays, [LOSS])[0])

    def apply_update(self, grad_scale: float = 1.0) -> float:
        """Applies the gradients accumulated by step(update=False) calls (times grad_scale);
        returns their norm."""
        norm, applied = self._sess.apply_update(float(self.max_grad_norm), float(grad_scale))
        self.last_grad_norm = norm
        if not applied:
            raise FloatingPointError(f"non-finite gradient norm ({norm}); the update was skipped")
        return float(norm)

    def run(self, inputs, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Inference with the current adapters; returns {output name: array}."""
        names = list(outputs or [o.name for o in self.graph.outputs])
        feed = self._input_list(inputs)
        with self._planning(feed, False):
            arrays = self._sess.run(feed, names)
        # int8/int16 outputs are computed in int64 (import_rewrites.widen_narrow_ints)
        declared = {o.name: o.dtype for o in self.graph.outputs}
        arrays = [a.astype(declared[n]) if declared.get(n) in ("int8", "int16", "uint8")
                  and a.dtype == np.int64 else a for n, a in zip(names, arrays)]
        return dict(zip(names, arrays))

    @property
    def fused_loss(self) -> bool:
        """True when the loss reads the LM head's input (pyedge.LinearCrossEntropy): the loss
        of a batch is then computed without the B·T·V logits (evaluate_loss)."""
        return bool(self.fusions.get("linear_cross_entropy"))

    def evaluate_loss(self, inputs, labels) -> float:
        """The session's loss on a batch without training: a forward-only plan whose only
        target is the loss, so with the fused LM head (fused_loss) no logits exist. Same value
        as step() would return (mean over the labels the loss counts)."""
        if self.loss_kind is None:
            raise ValueError("evaluate_loss needs a session with a loss")
        arrays = self._input_list(inputs, labels)
        with self._planning(arrays, False):
            (loss,) = self._sess.run(arrays, [LOSS])
        return float(np.asarray(loss).reshape(()))

    def _planning(self, arrays, training: bool):
        """A progress line (progress.Phase) around the first call with new input shapes: the
        core plans then, which takes seconds for a large model; later calls get nothing."""
        key = (training, tuple(None if a is None else a.shape for a in arrays))
        seen = self.__dict__.setdefault("_planned_shapes", set())
        if key in seen:
            return contextlib.nullcontext()
        seen.add(key)
        from pyedge.progress import Phase
        shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in zip(self._input_names, arrays)
                           if a is not None and n != LABELS)
        what = "training step" if training else "forward pass"
        return Phase(f"planning and running the first {what} for {shapes}")

    @property
    def max_memory(self) -> int | None:
        """The memory budget in bytes (None: what the system has). Setting it replans."""
        return self._max_memory

    @max_memory.setter
    def max_memory(self, value):
        self.set_memory_budget(value, self._recompute)

    def set_memory_budget(self, max_memory=None, recompute: str = "auto"):
        """Budget (see the class doc) and recomputation policy for the plans built from now
        on; cached plans are dropped."""
        from pyedge.memory_budget import parse_memory_size
        if recompute not in ("auto", "none", "cheap", "full"):
            raise ValueError(f"recompute must be 'auto', 'none', 'cheap' or 'full', got "
                             f"{recompute!r}")
        budget = None if max_memory is None else parse_memory_size(max_memory)
        self._sess.set_memory_budget(-1 if budget is None else budget, self._resident_bytes,
                                     recompute)
        self._max_memory, self._recompute = budget, recompute

    @property
    def lr(self) -> float:
        return self._sess.lr

    @lr.setter
    def lr(self, value: float):
        self._sess.lr = float(value)

    @property
    def step_count(self) -> int:
        """Optimizer updates applied (AdamW's bias correction uses it; restored on resume)."""
        return self._sess.step_count

    @step_count.setter
    def step_count(self, n: int):
        self._sess.step_count = int(n)

    @property
    def micro_steps(self) -> int:
        """Forward/backward passes run; dropout masks derive from it (restored on resume)."""
        return self._sess.micro_steps

    @micro_steps.setter
    def micro_steps(self, n: int):
        self._sess.micro_steps = int(n)

    # --- tensors ---------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, np.ndarray]:
        """Trainable tensors as writable numpy views onto the core's memory."""
        return self._sess.parameters()

    def parameters(self) -> dict[str, np.ndarray]:
        """All tensors: frozen weights (read-only views) and trainable ones (writable views)."""
        params = {k: v for k, v in self.graph.initializers.items() if v.dtype.kind == "f"}
        params.update(self._sess.parameters())
        return params

    def gradients(self) -> dict[str, np.ndarray]:
        return self._sess.gradients()

    def optimizer_state(self) -> dict[str, dict[str, np.ndarray]]:
        return self._sess.optimizer_state()

    def plan_stats(self, inputs=None, shapes=None, training: bool = True) -> dict:
        """Plan statistics for an input signature (arrays or shapes by input name)."""
        if shapes is None:
            arrays = self._input_list(inputs, None)
            shapes = {n: list(a.shape) for n, a in zip(self._input_names, arrays)
                      if a is not None}
        if training and LABELS in self._input_names and LABELS not in shapes:
            out = next(o for o in self.graph.outputs if o.name == self.output_name)
            # A graph with static shapes, fed those shapes, has the output shape it declares.
            static = bool(out.shape) and all(isinstance(d, int) and d > 0 for d in out.shape) \
                and all(list(v.shape) == list(shapes.get(v.name, v.shape))
                        and all(isinstance(d, int) and d > 0 for d in v.shape)
                        for v in self.graph.inputs if v.name != LABELS)
            if static:  # no forward run (it would plan and hold the whole logits)
                shapes[LABELS] = list(out.shape if self.loss_kind == "mse" else out.shape[:-1])
        if training and LABELS in self._input_names and LABELS not in shapes:
            if inputs is None:
                raise ValueError(f"plan_stats(shapes=...) of a training plan needs the labels' "
                                 f"shape too: add shapes['{LABELS}']")
            out_shape = self._sess.run(self._input_list(inputs), [self.output_name])[0].shape
            shapes[LABELS] = list(out_shape if self.loss_kind == "mse" else out_shape[:-1])
        stats = self._sess.plan_stats([list(shapes.get(n, [])) for n in self._input_names],
                                      training)
        params = self._sess.parameters()
        stats["trainable_parameters"] = int(sum(p.size for p in params.values()))
        stats["trainable_tensors"] = len(params)
        stats["frozen_parameters"] = int(sum(
            a.size for n, a in self.graph.initializers.items()
            if a.dtype.kind == "f" and n not in params))
        stats["parameter_gradient_bytes"] = int(sum(p.nbytes for p in params.values())) \
            if not self._sess.forward_only else 0  # MeZO: no gradient buffers
        n_state = len(next(iter(self._sess.optimizer_state().values()), {}))
        stats["optimizer_state_bytes"] = stats["parameter_gradient_bytes"] * n_state
        # resident weights: quantized ones at their packed size (+ scales, zero points)
        stats["weight_bytes"] = int(sum(a.nbytes for a in self.graph.initializers.values()))
        from pyedge.import_quantized import quantized_bytes
        stats["quantized_weight_bytes"] = quantized_bytes(self.graph)
        # chains rewritten per kind (attention, rmsnorm, gated_mlp, gelu, ...): a kind a model
        # has but that is missing here ran op by op
        stats["fusions"] = {k: v for k, v in self.fusions.items() if v}
        return stats

    def memory_plan_summary(self, inputs, labels=None, notable_only: bool = False) -> str | None:
        """One line on the training plan for this batch's shapes: its planned peak, the budget
        it was made under and what is recomputed. notable_only: None unless a budget was given
        or something is recomputed."""
        from pyedge.memory_budget import format_bytes
        arrays = self._input_list(inputs, labels)
        st = self._sess.plan_stats([list(a.shape) if a is not None else []
                                    for a in arrays], True)
        if notable_only and self._max_memory is None and not st["recompute_ops"]:
            return None
        line = (f"memory plan: peak {format_bytes(st['planned_peak_bytes'])} (arena "
                f"{format_bytes(st['arena_bytes'])}); recompute: {st['recompute_choice']}")
        if st["recompute_ops"]:
            types = ", ".join(f"{k} x{v}" for k, v in sorted(st["recompute_op_types"].items()))
            line += (f"; {st['recompute_ops']} ops ({types}), "
                     f"+{100.0 * st['recompute_flops'] / max(st['forward_flops'], 1.0):.0f}% "
                     f"of the forward's FLOPs")
        return line

    @property
    def last_step_allocations(self) -> int:
        return self._sess.last_step_allocations

    # --- adapters (PEFT format) ----------------------------------------------------------
    def save_adapters(self, dir) -> str:
        """Writes adapter_config.json + adapter_model.safetensors that
        peft.PeftModel.from_pretrained loads; returns the folder."""
        from pyedge.export.peft import save_adapters
        return save_adapters(self, dir)

    def load_adapters(self, dir, strict: bool = True) -> dict:
        """Loads a PEFT-format adapter folder into the trainable tensors."""
        from pyedge.export.peft import load_adapters
        return load_adapters(self, dir, strict=strict)
