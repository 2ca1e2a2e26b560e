"""Training data: files -> validated arrays -> seeded, resumable batches.

Formats (chosen by extension):

* ``.npz``: arrays named after the graph inputs, plus ``labels`` (or ``label``). Read with
  ``allow_pickle=False``: object arrays are refused, nothing is ever unpickled.
* a directory of ``.npy`` files (``<input>.npy``, ``labels.npy``): memory-mapped, for data
  larger than RAM.
* ``.jsonl``: one pre-tokenised record per line, ``{"input_ids": [...], "attention_mask":
  [...], "labels": ...}``. Sequences are padded to the longest in the batch, or to a fixed
  length (``seq_len``, or the graph's own fixed dimension). ``input_ids`` (and any other
  token input) are padded with ``pad_id``, masks and token types with 0, per-token labels with
  ``ignore_index``. A missing ``attention_mask`` is all ones, missing ``token_type_ids`` zeros,
  missing ``position_ids`` 0..T-1 (also in .npz files beside ``input_ids``);
  for ``causal_lm`` missing labels are the input ids (padding ignored).
* ``.csv``: a header row; a ``label``/``labels`` column, every other column numeric and fed
  as one float32 input ``[N, columns]`` (the model must take exactly one such input).

Everything is checked against the session's graph inputs before training starts; each
problem is one :class:`DataError` line naming the file, the array (or line) and what the model
expects.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

LABELS = "labels"
FORMATS = (".npz", ".jsonl", ".csv", "directory of .npy files")
_MASK_NAMES = ("attention_mask", "token_type_ids", "position_ids")


class DataError(ValueError):
    """A data file does not fit the model (one line, names the file and the cause)."""


# --------------------------------------------------------------------------- specs
@dataclasses.dataclass
class InputSpec:
    name: str
    dtype: str
    shape: list[int]  # -1 for a symbolic dimension; dim 0 is the batch

    def describe(self) -> str:
        return "[" + ", ".join("?" if d < 0 else str(d) for d in self.shape) + "]"


@dataclasses.dataclass
class DataSpec:
    """What a data file must provide for a session."""
    inputs: list[InputSpec]
    labels: InputSpec | None = None      # None: inference only
    loss: str | None = None
    num_classes: int | None = None       # class dim of the loss output (cross_entropy/causal_lm)
    output: str = ""
    ignore_index: int = -100

    @classmethod
    def from_session(cls, session, num_classes: int | None = None, loss: str | None = "",
                     ignore_index: int | None = None) -> "DataSpec":
        """The spec of `session`'s graph inputs and labels. For a session without a loss
        (inference, evaluation) pass `loss` to get the labels that loss would take."""
        g = session.graph
        inputs = [InputSpec(v.name, v.dtype, list(v.shape)) for v in g.inputs if v.name != LABELS]
        labels = next((InputSpec(v.name, v.dtype, list(v.shape)) for v in g.inputs
                       if v.name == LABELS), None)
        loss = session.loss_kind if loss == "" else loss
        out = next((o for o in g.outputs if o.name == session.output_name), None)
        if labels is None and loss and out is not None:
            labels = (InputSpec(LABELS, "float32", list(out.shape)) if loss == "mse" else
                      InputSpec(LABELS, "int64", list(out.shape[:-1]) if out.shape else []))
        if num_classes is None and out is not None and out.shape and out.shape[-1] > 0 \
                and loss in ("cross_entropy", "causal_lm"):
            num_classes = int(out.shape[-1])
        ignore = -100 if ignore_index is None else int(ignore_index)
        for n in g.nodes:
            if n.op_type in ("CrossEntropyLoss", "LinearCrossEntropy") and n.domain == "pyedge":
                ignore = int(n.attrs.get("ignore_index", -100))
        return cls(inputs, labels, loss, num_classes, session.output_name, ignore)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]


# --------------------------------------------------------------------------- dataset
class Dataset:
    """Validated records. Fixed-shape fields are arrays [N, ...]; ragged jsonl fields are
    lists of per-record arrays, padded per batch."""

    def __init__(self, path: str, fields: dict[str, np.ndarray | list], spec: DataSpec,
                 pad_values: dict[str, int | float] | None = None, seq_len: int | None = None,
                 skipped: int = 0):
        self.path = path
        self.fields = fields
        self.spec = spec
        self.pad_values = pad_values or {}
        self.seq_len = seq_len
        self.skipped = skipped  # records dropped (non-finite values, with skip_nonfinite)
        self.num_records = len(next(iter(fields.values()))) if fields else 0

    def __len__(self) -> int:
        return self.num_records

    @property
    def has_labels(self) -> bool:
        return LABELS in self.fields

    def batch(self, indices) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """(inputs by name, labels or None) for the records at `indices`."""
        indices = np.asarray(indices, dtype=np.int64)
        out: dict[str, np.ndarray] = {}
        for name, f in self.fields.items():
            if isinstance(f, list):
                out[name] = _pad([f[i] for i in indices], self.pad_values.get(name, 0),
                                 self.seq_len, _dtype_for(self.spec, name))
            else:
                a = f[indices]  # fancy indexing copies (also from a memmap)
                out[name] = np.ascontiguousarray(a, dtype=_dtype_for(self.spec, name))
        labels = out.pop(LABELS, None)
        return out, labels


def _dtype_for(spec: DataSpec, name: str) -> str:
    if name == LABELS:
        return spec.labels.dtype if spec.labels is not None else "int64"
    for s in spec.inputs:
        if s.name == name:
            return s.dtype
    return "float32"


def _pad(rows: list[np.ndarray], value, length: int | None, dtype) -> np.ndarray:
    if not rows:
        return np.zeros((0,), dtype)
    if rows[0].ndim == 0:
        return np.asarray(rows, dtype=dtype)
    n = length or max(r.shape[0] for r in rows)
    out = np.full((len(rows), n) + rows[0].shape[1:], value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out


# --------------------------------------------------------------------------- loading
def load_dataset(path, spec: DataSpec, *, require_labels: bool = True, pad_id: int = 0,
                 seq_len: int | None = None, skip_nonfinite: bool = False) -> Dataset:
    """Reads and validates a data file for `spec`; raises DataError (one line) on a problem."""
    p = Path(path)
    shown = str(path)
    if not p.exists():
        raise DataError(f"{shown}: no such data file")
    if p.is_dir():
        fields = _read_npy_dir(p, shown)
        return _finish_arrays(shown, fields, spec, require_labels, skip_nonfinite)
    ext = p.suffix.lower()
    if ext == ".npz":
        fields = _read_npz(p, shown)
        return _finish_arrays(shown, fields, spec, require_labels, skip_nonfinite)
    if ext == ".csv":
        fields = _read_csv(p, shown, spec)
        return _finish_arrays(shown, fields, spec, require_labels, skip_nonfinite)
    if ext in (".jsonl", ".ndjson"):
        return _read_jsonl(p, shown, spec, require_labels, pad_id, seq_len, skip_nonfinite)
    if ext == ".npy":
        raise DataError(f"{shown}: a single .npy file cannot name its arrays; use an .npz "
                        "(arrays named after the model inputs plus 'labels') or a directory of "
                        "<input>.npy files")
    raise DataError(f"{shown}: unknown data format '{ext or p.name}'; use one of "
                    f"{', '.join(FORMATS)}")


def _read_npz(p: Path, shown: str) -> dict[str, np.ndarray]:
    if p.stat().st_size == 0:
        raise DataError(f"{shown}: the file is empty")
    try:
        with np.load(p, allow_pickle=False) as z:
            fields = {}
            for k in z.files:
                try:
                    fields[k] = z[k]
                except ValueError as e:
                    if "allow_pickle" in str(e) or "Object arrays" in str(e):
                        raise DataError(f"{shown}: array '{k}' holds Python objects (pickled); "
                                        "store plain numeric arrays") from None
                    raise DataError(f"{shown}: array '{k}' cannot be read ({e})") from None
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{shown}: not a valid .npz file ({type(e).__name__}: {e})") from None
    if not fields:
        raise DataError(f"{shown}: the file holds no arrays")
    return fields


def _read_npy_dir(p: Path, shown: str) -> dict[str, np.ndarray]:
    fields = {}
    for f in sorted(p.glob("*.npy")):
        try:
            fields[f.stem] = np.load(f, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{shown}/{f.name}: cannot be read without unpickling or is "
                            f"corrupt ({e})") from None
        except OSError as e:
            raise DataError(f"{shown}/{f.name}: not a valid .npy file ({e})") from None
    if not fields:
        raise DataError(f"{shown}: the directory holds no .npy files")
    return fields


def _label_key(keys, shown) -> str | None:
    present = [k for k in ("labels", "label") if k in keys]
    if len(present) == 2:
        raise DataError(f"{shown}: has both 'label' and 'labels'; keep one")
    return present[0] if present else None


def _read_csv(p: Path, shown: str, spec: DataSpec) -> dict[str, np.ndarray]:
    float_inputs = [s for s in spec.inputs if len(s.shape) == 2]
    if len(spec.inputs) != 1 or not float_inputs:
        raise DataError(f"{shown}: CSV data feeds one input [batch, features], the model takes "
                        f"{', '.join(s.name + s.describe() for s in spec.inputs)}; use an .npz")
    name = spec.inputs[0].name
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{shown}: the file is empty") from None
        except csv.Error as e:
            raise DataError(f"{shown}:1: {e}") from None
        header = [h.strip() for h in header]
        lk = _label_key(header, shown)
        li = header.index(lk) if lk else -1
        feat_cols = [i for i in range(len(header)) if i != li]
        rows, labels = [], []
        label_float = spec.loss == "mse"
        try:
            for lineno, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise DataError(f"{shown}:{lineno}: {len(row)} fields, the header has "
                                    f"{len(header)} (truncated record?)")
                vals = []
                for i in feat_cols:
                    vals.append(_csv_number(row[i], shown, lineno, header[i], float))
                rows.append(vals)
                if li >= 0:
                    labels.append(_csv_number(row[li], shown, lineno, header[li],
                                              float if label_float else _int_like))
        except csv.Error as e:
            raise DataError(f"{shown}:{reader.line_num}: {e}") from None
    if not rows:
        raise DataError(f"{shown}: no records after the header")
    fields = {name: np.asarray(rows, dtype=np.float32)}
    if li >= 0:
        fields[LABELS] = np.asarray(labels, dtype=np.float32 if label_float else np.int64)
    return fields


def _int_like(s: str) -> int:
    v = float(s)
    if not v.is_integer():
        raise ValueError(s)
    return int(v)


def _csv_number(cell: str, shown, lineno, col, conv):
    cell = cell.strip()
    try:
        return conv(cell)
    except (ValueError, OverflowError):
        what = "an integer class label" if conv is _int_like else "a number"
        raise DataError(f"{shown}:{lineno}: column '{col}': {cell!r} is not {what}") from None


# --------------------------------------------------------------------------- checks
def _finish_arrays(shown, fields, spec: DataSpec, require_labels, skip_nonfinite) -> Dataset:
    lk = _label_key(fields.keys(), shown)
    if lk == "label":
        fields[LABELS] = fields.pop("label")
    have = sorted(fields)
    out: dict[str, np.ndarray] = {}
    ids = fields.get("input_ids")
    if ids is not None and np.ndim(ids) == 2:  # as for jsonl records: masks default to
        fields = dict(fields)                  # ones, positions to 0..T-1, types to 0
        for s in spec.inputs:
            if s.name in _MASK_NAMES and s.name not in fields:
                n, t = np.shape(ids)
                fields[s.name] = (np.ones((n, t), np.int64) if s.name == "attention_mask" else
                                  np.broadcast_to(np.arange(t, dtype=np.int64), (n, t)).copy()
                                  if s.name == "position_ids" else np.zeros((n, t), np.int64))
    for s in spec.inputs:
        if s.name not in fields:
            raise DataError(f"{shown}: no array '{s.name}' for model input '{s.name}' "
                            f"{s.dtype}{s.describe()} (the file has: {', '.join(have)})")
        out[s.name] = _check_array(shown, s.name, fields[s.name], s)
    if spec.labels is not None and LABELS in fields:
        out[LABELS] = _check_labels(shown, fields[LABELS], spec)
    elif require_labels and spec.labels is not None:
        raise DataError(f"{shown}: no 'labels' array (the file has: {', '.join(have)})")
    counts = {k: a.shape[0] for k, a in out.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{shown}: arrays disagree on the number of records: " +
                        ", ".join(f"{k}={v}" for k, v in counts.items()))
    n = next(iter(counts.values()))
    if n == 0:
        raise DataError(f"{shown}: no records (arrays have length 0)")
    keep, skipped = _nonfinite_rows(shown, out, spec, skip_nonfinite)
    if keep is not None:
        out = {k: np.asarray(a)[keep] for k, a in out.items()}
        if not len(next(iter(out.values()))):
            raise DataError(f"{shown}: every record has NaN/inf values")
    return Dataset(shown, out, spec, skipped=skipped)


def _check_array(shown, name, a, s: InputSpec, what="array") -> np.ndarray:
    if a.dtype.kind in "OUSVMm":
        raise DataError(f"{shown}: {what} '{name}' has dtype {a.dtype}; model input '{name}' "
                        f"needs {s.dtype}")
    if a.ndim != len(s.shape):
        raise DataError(f"{shown}: {what} '{name}' has shape {tuple(a.shape)} (rank {a.ndim}); "
                        f"model input '{name}' expects rank {len(s.shape)} {s.describe()} "
                        "(dim 0 is the batch)")
    for i, d in enumerate(s.shape):
        if i > 0 and d > 0 and a.shape[i] != d:
            raise DataError(f"{shown}: {what} '{name}' has shape {tuple(a.shape)}; model input "
                            f"'{name}' expects {s.describe()} (dim {i} must be {d})")
    _check_castable(shown, name, a, s.dtype, what)
    return a


def _check_castable(shown, name, a, dtype, what="array"):
    want = np.dtype(dtype)
    if want.kind in "iub" and a.dtype.kind == "f":
        flat = np.asarray(a).ravel()
        if flat.size and not np.all(np.isfinite(flat) & (flat == np.round(flat))):
            raise DataError(f"{shown}: {what} '{name}' is {a.dtype} with non-integer values; "
                            f"model input '{name}' is {dtype}")
    if want.kind == "i" and a.dtype.kind in "iu" and a.size:
        info = np.iinfo(want)
        lo, hi = np.min(a), np.max(a)
        if lo < info.min or hi > info.max:
            raise DataError(f"{shown}: {what} '{name}' has values in [{lo}, {hi}], outside "
                            f"{dtype}")


def _check_labels(shown, a, spec: DataSpec, where: str = "") -> np.ndarray:
    s = spec.labels
    a = np.asarray(a) if not isinstance(a, np.memmap) else a
    loc = where or f"array '{LABELS}'"
    if a.dtype.kind in "OUSVMm":
        raise DataError(f"{shown}: {loc} has dtype {a.dtype}; the {spec.loss} loss needs "
                        f"{s.dtype} labels")
    # Accept labels with an extra trailing 1 ([N, 1] for [N]) or flat per-record values.
    if a.ndim == len(s.shape) + 1 and a.shape[-1] == 1:
        a = a.reshape(a.shape[:-1])
    elif a.ndim == 1 and len(s.shape) == 2 and s.shape[1] > 0 and spec.loss == "mse":
        if s.shape[1] == 1:
            a = a.reshape(-1, 1)
    if a.ndim != len(s.shape):
        raise DataError(f"{shown}: {loc} has shape {tuple(a.shape)}; the {spec.loss} loss on "
                        f"output '{spec.output}' expects labels {s.describe()} (dim 0 is the batch)")
    for i, d in enumerate(s.shape):
        if i > 0 and d > 0 and a.shape[i] != d:
            raise DataError(f"{shown}: {loc} has shape {tuple(a.shape)}; the {spec.loss} loss "
                            f"expects labels {s.describe()} (dim {i} must be {d})")
    if spec.loss in ("cross_entropy", "causal_lm"):
        if a.dtype.kind == "f":
            flat = np.asarray(a).ravel()
            if flat.size and not np.all(np.isfinite(flat) & (flat == np.round(flat))):
                raise DataError(f"{shown}: {loc} holds non-integer values; the {spec.loss} loss "
                                "needs integer class labels")
        if a.dtype.kind == "b":
            a = a.astype(np.int64)
        check_label_range(shown, a, spec, loc)
    return a


def check_label_range(shown, a, spec: DataSpec, loc=None, record: bool = True):
    """Class labels must lie in [0, num_classes) or equal ignore_index."""
    c = spec.num_classes
    a = np.asarray(a)
    flat = a.ravel().astype(np.int64)
    valid = flat != spec.ignore_index
    bad = valid & ((flat < 0) | (flat >= c)) if c else valid & (flat < 0)
    if np.any(bad):
        i = int(np.argmax(bad))
        per = max(1, flat.size // max(1, a.shape[0])) if a.ndim else 1
        rng = f"{c} classes (0..{c - 1})" if c else "non-negative class ids"
        where = f"{shown}: {loc or 'labels'}:" if loc else f"{shown}:"
        rec = f" (record {i // per})" if record else ""
        raise DataError(f"{where} label {flat[i]}{rec} is out of range: output "
                        f"'{spec.output}' has {rng}, or ignore_index {spec.ignore_index}")


def _nonfinite_rows(shown, fields, spec, skip):
    bad = None
    first = None
    for k, a in fields.items():
        if np.dtype(a.dtype).kind != "f":
            continue
        n = a.shape[0]
        finite = np.isfinite(np.asarray(a).reshape(n, -1)).all(axis=1) if n else np.ones(0, bool)
        if not finite.all():
            b = ~finite
            if first is None:
                first = (k, int(np.argmax(b)), int(b.sum()))
            bad = b if bad is None else bad | b
    if bad is None:
        return None, 0
    if not skip:
        k, i, cnt = first
        raise DataError(f"{shown}: array '{k}' has NaN/inf in {cnt} record(s) (first: record "
                        f"{i}); clean the data or pass --skip-nonfinite-data to drop them")
    return ~bad, int(bad.sum())


# --------------------------------------------------------------------------- jsonl
def _read_jsonl(p: Path, shown, spec: DataSpec, require_labels, pad_id, seq_len,
                skip_nonfinite) -> Dataset:
    if p.stat().st_size == 0:
        raise DataError(f"{shown}: the file is empty")
    names = spec.input_names
    # The padded axis is dim 1 of each [batch, seq, ...] input; a fixed graph dim fixes the length.
    fixed = {s.shape[1] for s in spec.inputs if len(s.shape) >= 2 and s.shape[1] > 0}
    if seq_len is None and len(fixed) == 1:
        seq_len = next(iter(fixed))
    per_token_labels = spec.labels is not None and len(spec.labels.shape) >= 2
    fields: dict[str, list] = {n: [] for n in names}
    labels: list = []
    skipped = 0
    lines_of: list[int] = []
    with open(p, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                msg = getattr(e, "msg", str(e))
                raise DataError(f"{shown}:{lineno}: not a valid JSON record ({msg}); truncated "
                                "or corrupt line?") from None
            if not isinstance(rec, dict):
                raise DataError(f"{shown}:{lineno}: a record must be a JSON object, got "
                                f"{type(rec).__name__}")
            row = {}
            for s in spec.inputs:
                v = rec.get(s.name)
                if v is None:
                    if s.name == "attention_mask" and "input_ids" in rec:
                        v = [1] * len(rec["input_ids"]) if isinstance(rec["input_ids"], list) else 1
                    elif s.name in ("token_type_ids", "position_ids") and "input_ids" in rec:
                        n = len(rec["input_ids"]) if isinstance(rec["input_ids"], list) else 0
                        v = [0] * n if s.name == "token_type_ids" else list(range(n))
                    else:
                        raise DataError(f"{shown}:{lineno}: record has no '{s.name}' (model "
                                        f"inputs: {', '.join(names)}; record keys: "
                                        f"{', '.join(rec) or 'none'})")
                row[s.name] = _record_array(shown, lineno, s.name, v, s.dtype, len(s.shape) - 1)
            lk = "labels" if "labels" in rec else ("label" if "label" in rec else None)
            lab = None
            if spec.labels is not None:
                if lk is not None:
                    lab = _record_array(shown, lineno, lk, rec[lk], spec.labels.dtype,
                                        len(spec.labels.shape) - 1, labels=True)
                elif spec.loss == "causal_lm" and "input_ids" in row:
                    lab = row["input_ids"].astype(np.int64).copy()
                    if "attention_mask" in row:
                        lab[row["attention_mask"] == 0] = spec.ignore_index
                elif require_labels:
                    raise DataError(f"{shown}:{lineno}: record has no 'labels' (keys: "
                                    f"{', '.join(rec) or 'none'})")
            # Sequence lengths must agree inside a record, and fit a fixed length.
            lens = {k: v.shape[0] for k, v in row.items() if v.ndim >= 1}
            if per_token_labels and lab is not None and lab.ndim >= 1:
                lens[LABELS] = lab.shape[0]
            if len(set(lens.values())) > 1:
                raise DataError(f"{shown}:{lineno}: sequence lengths differ inside the record: " +
                                ", ".join(f"{k}={v}" for k, v in lens.items()))
            if seq_len and lens and max(lens.values()) > seq_len:
                raise DataError(f"{shown}:{lineno}: {max(lens.values())} tokens, longer than "
                                f"the fixed length {seq_len} (--seq-len or the model's input "
                                "shape); truncate the data first")
            bad = [k for k, v in row.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v))]
            if lab is not None and lab.dtype.kind == "f" and not np.all(np.isfinite(lab)):
                bad.append(LABELS)
            if bad:
                if not skip_nonfinite:
                    raise DataError(f"{shown}:{lineno}: '{bad[0]}' has NaN/inf; clean the data "
                                    "or pass --skip-nonfinite-data to drop such records")
                skipped += 1
                continue
            for k, v in row.items():
                fields[k].append(v)
            if lab is not None:
                labels.append(lab)
            lines_of.append(lineno)
    if not lines_of:
        raise DataError(f"{shown}: no records" + (" (all had NaN/inf values)" if skipped else ""))
    if labels:
        fields[LABELS] = labels
    # Per-record checks (shapes of inner dims, dtype castability, label range) with line numbers.
    for s in spec.inputs:
        for i, v in enumerate(fields[s.name]):
            for d_i, d in enumerate(s.shape[2:], start=1):
                if d > 0 and v.shape[d_i] != d:
                    raise DataError(f"{shown}:{lines_of[i]}: '{s.name}' has shape {v.shape}; model "
                                    f"input '{s.name}' expects {s.describe()} per batch")
        _check_castable(shown, s.name, _concat(fields[s.name]), s.dtype, "field")
    if labels and spec.loss in ("cross_entropy", "causal_lm"):
        for i, v in enumerate(labels):
            check_label_range(f"{shown}:{lines_of[i]}", v, spec, loc="", record=False)
    pad_values = {}
    for n in names:
        pad_values[n] = 0 if n in _MASK_NAMES else pad_id
    pad_values[LABELS] = spec.ignore_index if per_token_labels else 0
    out: dict[str, np.ndarray | list] = {}
    for k, rows in fields.items():
        shapes = {r.shape for r in rows}
        if rows[0].ndim == 0 or (len(shapes) == 1 and not seq_len):
            out[k] = np.stack(rows).astype(_dtype_for(spec, k), copy=False)
        elif seq_len and rows[0].ndim >= 1:
            out[k] = _pad(rows, pad_values.get(k, 0), seq_len, _dtype_for(spec, k))
        else:
            out[k] = rows
    return Dataset(shown, out, spec, pad_values=pad_values, seq_len=seq_len, skipped=skipped)


def _concat(rows):
    return np.concatenate([np.asarray(r).ravel() for r in rows]) if rows else np.zeros(0)


def _record_array(shown, lineno, key, v, dtype, rank, labels=False) -> np.ndarray:
    try:
        a = np.asarray(v)
    except (ValueError, TypeError):
        raise DataError(f"{shown}:{lineno}: '{key}' is a ragged list") from None
    if a.dtype.kind not in "biuf":
        raise DataError(f"{shown}:{lineno}: '{key}' must hold numbers, got {a.dtype.name} "
                        f"values ({str(v)[:40]})")
    if a.ndim != rank:
        want = "a scalar" if rank == 0 else f"a {rank}-d list" if rank > 1 else "a list"
        raise DataError(f"{shown}:{lineno}: '{key}' has shape {a.shape}; the model expects "
                        f"{want} per record")
    if np.dtype(dtype).kind in "iub" and a.dtype.kind == "f":
        if not np.all(np.isfinite(a) & (a == np.round(a))):
            raise DataError(f"{shown}:{lineno}: '{key}' has non-integer values; "
                            f"{'labels' if labels else 'the model input'} must be {dtype}")
        a = a.astype(np.int64)
    return a


# --------------------------------------------------------------------------- batching
class BatchLoader:
    """Seeded shuffling over a Dataset; an endless stream of batches across epochs.

    The permutation of epoch e is a pure function of (seed, e), so the position
    (epoch, index) is all a checkpoint needs to resume the stream exactly.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        n = len(dataset)
        self.batches_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{dataset.path}: {n} record(s), fewer than one batch of "
                            f"{batch_size} with drop_last; lower --batch-size")
        self.epoch = 0
        self.index = 0  # next batch within the epoch
        self._perm_epoch = -1
        self._perm = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.dataset)
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n)
                          if self.shuffle else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    def next(self):
        """(inputs, labels, epoch) of the next batch; advances the position."""
        perm = self.permutation(self.epoch)
        lo = self.index * self.batch_size
        idx = perm[lo: lo + self.batch_size]
        epoch = self.epoch
        self.index += 1
        if self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
        inputs, labels = self.dataset.batch(idx)
        return inputs, labels, epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "shuffle": self.shuffle, "batch_size": self.batch_size,
                "drop_last": self.drop_last, "num_records": len(self.dataset)}

    def load_state(self, st: dict) -> None:
        for k in ("seed", "shuffle", "batch_size", "drop_last", "num_records"):
            if k in st and st[k] != getattr(self, k if k != "num_records" else "_n"):
                raise ValueError(f"the checkpoint's data position was saved with {k}={st[k]}, "
                                 f"this run has {getattr(self, k if k != 'num_records' else '_n')}")
        self.epoch = int(st["epoch"])
        self.index = int(st["index"])

    @property
    def _n(self) -> int:
        return len(self.dataset)

    @property
    def position(self) -> float:
        """Fractional epoch (epochs done + share of the current one)."""
        return self.epoch + self.index / self.batches_per_epoch


def iterate(dataset: Dataset, batch_size: int) -> Iterator[tuple[dict, np.ndarray | None]]:
    """In-order batches over the whole dataset (evaluation), last partial batch kept."""
    for lo in range(0, len(dataset), batch_size):
        yield dataset.batch(np.arange(lo, min(lo + batch_size, len(dataset))))


def example_batch(spec: DataSpec, batch: int = 1, seq_len: int = 16) -> dict[str, np.ndarray]:
    """Zero inputs from shape hints: fixed dims as-is, symbolic batch -> `batch`, others ->
    `seq_len` (for plan statistics)."""
    out = {}
    for s in spec.inputs:
        shape = [d if d > 0 else (batch if i == 0 else seq_len) for i, d in enumerate(s.shape)]
        dt = np.dtype(s.dtype)
        if s.name == "attention_mask":
            out[s.name] = np.ones(shape, dt)
        else:
            out[s.name] = np.zeros(shape, dt)
    return out


__all__ = ["DataError", "DataSpec", "InputSpec", "Dataset", "load_dataset", "BatchLoader",
           "iterate", "example_batch", "check_label_range"]
