"""Evaluation with a session: loss, accuracy and perplexity over a dataset (torch's
definitions, in float64), and loading a data file for a session (text is tokenized, token ids
and arrays are read and checked against the model)."""
from __future__ import annotations

import math

import numpy as np

from pyedge.data import DataError, DataSpec, Dataset, check_label_range, iterate, load_dataset


def loss_sums(outputs: np.ndarray, labels: np.ndarray, loss: str, ignore_index: int = -100,
              label_smoothing: float = 0.0):
    """(sum of per-item losses, item count, correct count or None) for one batch, in float64,
    with torch's definitions (cross_entropy mean over non-ignored items, mse over elements)."""
    if loss == "mse":
        d = outputs.astype(np.float64) - labels.reshape(outputs.shape).astype(np.float64)
        return float(np.sum(d * d)), int(d.size), None
    logits, lab = outputs, labels
    if loss == "causal_lm":
        logits, lab = logits[..., :-1, :], lab[..., 1:]
    c = logits.shape[-1]
    lg = logits.reshape(-1, c).astype(np.float64)
    lb = lab.reshape(-1).astype(np.int64)
    keep = lb != ignore_index
    lg, lb = lg[keep], lb[keep]
    if not lb.size:
        return 0.0, 0, 0
    m = lg.max(axis=1, keepdims=True)
    logp = lg - (np.log(np.exp(lg - m).sum(axis=1, keepdims=True)) + m)
    nll = -logp[np.arange(lb.size), lb]
    per = (1.0 - label_smoothing) * nll + label_smoothing * (-logp.mean(axis=1))
    correct = int(np.sum(np.argmax(lg, axis=1) == lb))
    return float(per.sum()), int(lb.size), correct


def fixed_batch_size(session) -> int | None:
    """The batch size the graph fixes (dim 0 of an input), if any."""
    dims = {v.shape[0] for v in session.graph.inputs
            if v.name != "labels" and v.shape and v.shape[0] > 0}
    return min(dims) if dims else None


# Logits per evaluation batch above which a causal LM with the fused head is evaluated
# through its loss even without a memory budget (W7's 4 x 256 x 151,936 are 622 MB).
FUSED_EVAL_BYTES = 256 << 20


def evaluate(session, dataset: Dataset, batch_size: int = 64, loss: str | None = None,
             ignore_index: int = -100, label_smoothing: float = 0.0,
             output: str | None = None) -> dict:
    """{"loss", "accuracy" (None for mse), "records"} over the whole dataset (a model with a
    fixed batch size gets its last batch padded with repeated records, ignored in the sums)."""
    loss = loss or session.loss_kind or "cross_entropy"
    output = output or session.output_name
    fixed = fixed_batch_size(session)
    if fixed:
        batch_size = fixed
    total, count, correct, nll_total = 0.0, 0, 0, 0.0
    # A causal LM whose session fuses the LM head into its loss is evaluated through that loss
    # (a forward-only plan with the loss as its target) when it has a memory budget or its
    # logits would be large: the B·T·V logits never exist, so evaluation stays under the
    # budget. That gives the loss and perplexity, not the top-1 token accuracy (which needs
    # the logits, and is reported otherwise).
    fused = (loss == "causal_lm" and getattr(session, "fused_loss", False)
             and session.loss_kind == "causal_lm" and output == session.output_name
             and session.ignore_index == ignore_index and label_smoothing == 0.0
             and session.label_smoothing == 0.0)
    decided = False
    for inputs, labels in iterate(dataset, batch_size):
        if fused and not decided:  # on the first batch: budget, or logits over FUSED_EVAL_BYTES
            decided = True
            vocab = next(o for o in session.graph.outputs if o.name == output).shape[-1]
            logits = np.asarray(labels).size * max(int(vocab), 1) * 4
            fused = getattr(session, "max_memory", None) is not None or \
                (int(vocab) > 0 and logits > FUSED_EVAL_BYTES)
            if fused:
                correct = None
        if labels is None:
            raise DataError(f"{dataset.path}: no labels to evaluate against")
        n = len(labels)
        if fused:
            labels = np.asarray(labels, dtype=np.int64)
            if fixed and n < fixed:  # padding records count for nothing: all labels ignored
                pad = np.arange(fixed) % n
                inputs = {k: v[pad] for k, v in inputs.items()}
                labels = np.concatenate([labels, np.full((fixed - n,) + labels.shape[1:],
                                                         ignore_index, np.int64)])
            c_n = int(np.count_nonzero(labels[..., 1:] != ignore_index))
            if c_n:  # the loss is the mean over those labels
                total += session.evaluate_loss(inputs, labels) * c_n
                count += c_n
            continue
        if fixed and n < fixed:
            pad = np.arange(fixed) % n
            inputs = {k: v[pad] for k, v in inputs.items()}
        out = np.array(session.run(inputs, [output])[output])[:n]
        s, c_n, c = loss_sums(out, labels, loss, ignore_index, label_smoothing)
        total, count = total + s, count + c_n
        if loss == "causal_lm" and label_smoothing:
            nll_total += loss_sums(out, labels, loss, ignore_index)[0]
        correct = None if c is None or correct is None else correct + c
    res = {"loss": total / count if count else float("nan"),
           "accuracy": (correct / count if count else float("nan")) if correct is not None else None,
           "records": len(dataset)}
    if loss == "causal_lm":
        # perplexity: exp of the token-weighted mean NLL over non-ignored labels (no smoothing)
        nll = nll_total if label_smoothing else total
        res["tokens"] = count
        mean = nll / count if count else float("nan")
        res["perplexity"] = math.exp(mean) if mean < 700 else float("inf")
    return res


def infer_num_classes(session, dataset: Dataset, spec: DataSpec) -> int | None:
    """The class dim of the loss output, running the model on one record if it is symbolic."""
    if spec.num_classes is not None or spec.loss not in ("cross_entropy", "causal_lm"):
        return spec.num_classes
    n = fixed_batch_size(session) or 1
    inputs, _ = dataset.batch(np.arange(n) % len(dataset))
    out = session.run(inputs, [session.output_name])[session.output_name]
    return int(out.shape[-1])


def load_data(session, path, cfg=None, require_labels: bool = True, loss: str | None = "",
              ignore_index: int | None = None) -> Dataset:
    """Loads and validates `path` for `session` (options from `cfg`: pad_id, seq_len,
    skip_nonfinite_data). `loss` gives the labels' spec for a session without a loss."""
    from pyedge.text_data import load_text
    spec = DataSpec.from_session(session, loss=loss, ignore_index=ignore_index)
    # text (.txt, jsonl text/prompt/messages, csv text,label) is tokenized; token ids are read
    ds = load_text(session, path, model=getattr(cfg, "model", None),
                   tokenizer=getattr(cfg, "tokenizer", None), seq_len=getattr(cfg, "seq_len", None),
                   pack=getattr(cfg, "pack", None), require_labels=require_labels,
                   batch_size=getattr(cfg, "batch_size", 1), spec=spec)
    if ds is None:
        ds = load_dataset(path, spec, require_labels=require_labels,
                          pad_id=getattr(cfg, "pad_id", 0), seq_len=getattr(cfg, "seq_len", None),
                          skip_nonfinite=getattr(cfg, "skip_nonfinite_data", False))
    if spec.num_classes is None and ds.has_labels and spec.loss in ("cross_entropy", "causal_lm"):
        spec.num_classes = infer_num_classes(session, ds, spec)
        labels = ds.fields["labels"]
        for lab in (labels if isinstance(labels, list) else [labels]):
            check_label_range(ds.path, lab, spec, "labels")
    return ds
