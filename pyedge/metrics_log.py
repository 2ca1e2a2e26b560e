"""A run's metrics: metrics.jsonl (appended per logged step and evaluation, cut back to the
resumed step on --resume), its CSV copy and the optional PNG plot."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLog:
    """out/metrics.jsonl: one JSON object per logged step or evaluation."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(rec, dict) and int(rec.get("step", 0)) <= resume_step:
                    kept.append(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the cut-back copy replaces the file in one rename: a run killed while writing it
        # leaves the old history, never a truncated one
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in kept))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in rec.items()}
        self._fh.write(json.dumps(rec) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def records(self) -> list[dict]:
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def write_metrics_csv(metrics_path: Path, csv_path: Path) -> None:
    """metrics.jsonl -> metrics.csv (one row per record, the union of their keys as columns,
    `type` and `step` first), for spreadsheets."""
    import csv
    recs = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            recs.append(rec)
    cols = ["type", "step"]
    for r in recs:
        cols += [k for k in r if k not in cols]
    tmp = Path(csv_path).with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, restval="")
        w.writeheader()
        for r in recs:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, csv_path)


def plot_metrics(metrics_path: Path, png_path: Path) -> bool:
    """Loss/accuracy curves as a PNG when matplotlib is installed; False otherwise."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - optional dependency, any import failure means skip
        return False
    recs = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass
    tr = [r for r in recs if r.get("type") == "train"]
    ev = [r for r in recs if r.get("type") == "eval"]
    fig, ax = plt.subplots(1, 2 if any(r.get("accuracy") is not None for r in ev) else 1,
                           figsize=(10, 4), squeeze=False)
    def ys(rs, key):
        return [float("nan") if r.get(key) is None else r[key] for r in rs]
    a = ax[0][0]
    a.plot([r["step"] for r in tr], ys(tr, "loss"), label="train loss")
    if ev:
        a.plot([r["step"] for r in ev], ys(ev, "loss"), "o-", label="eval loss")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.legend()
    if ax.shape[1] > 1:
        b = ax[0][1]
        b.plot([r["step"] for r in ev], ys(ev, "accuracy"), "o-", label="eval accuracy")
        b.set_xlabel("step")
        b.set_ylabel("accuracy")
        b.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return True
