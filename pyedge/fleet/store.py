"""The server's results on disk, and where a restarted federation picks up.

    <out-dir>/rounds/round-0003/adapter_config.json        PEFT files (PeftModel.from_pretrained)
                               /adapter_model.safetensors
                               /global.npz                  the same tensors by ONNX name, exact
                               /round.json                  round number, aggregation, settings
    <out-dir>/metrics.jsonl                                 one line per finished round

A round folder is written under a temporary name (files fsynced) and renamed when complete
(rename is atomic on one file system), so a server killed mid-write leaves either the whole
round or none of it; a round written again first moves the old folder to a trash name, so no
kill leaves a half-deleted round behind. `latest()` returns the newest complete round and the
next run starts from it.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from pyedge.checkpoint import fsync_dir, replace_dir, write_file_synced

ROUND_FMT = "round-{:04d}"


class RoundStore:
    def __init__(self, out_dir):
        self.out = Path(out_dir).expanduser().resolve()
        self.rounds = self.out / "rounds"
        self.rounds.mkdir(parents=True, exist_ok=True)
        # temporaries and trash of a server that died mid-write
        from pyedge.checkpoint import recover_replaced
        recover_replaced(self.rounds)
        for stale in [*self.rounds.glob(".tmp-*"), *self.rounds.glob(".trash-*")]:
            shutil.rmtree(stale, ignore_errors=True)

    def round_dir(self, rnd: int) -> Path:
        return self.rounds / ROUND_FMT.format(rnd)

    def latest(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """(round, global tensors) of the newest complete round, or None."""
        done = sorted(p for p in self.rounds.glob("round-*") if (p / "round.json").is_file())
        if not done:
            return None
        last = done[-1]
        info = json.loads((last / "round.json").read_text())
        with np.load(last / "global.npz", allow_pickle=False) as z:
            return int(info["round"]), {k: z[k] for k in z.files}

    def write_round(self, rnd: int, arrays: Mapping[str, np.ndarray], session, info: dict) -> Path:
        """Writes round `rnd`: PEFT files from `session` (its trainable tensors are set to
        `arrays` first), the raw tensors and `info`."""
        params = session.trainable_parameters()
        for k, v in arrays.items():
            params[k][...] = v
        tmp = self.rounds / f".tmp-{ROUND_FMT.format(rnd)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        session.save_adapters(tmp)   # (atomic_write: fsynced)
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
        write_file_synced(tmp / "global.npz", buf.getvalue())
        write_file_synced(tmp / "round.json", json.dumps(dict(info, round=rnd), indent=1).encode())
        fsync_dir(tmp)
        final = self.round_dir(rnd)
        replace_dir(tmp, final)   # a round redone after a restart replaces the old folder
        return final

    def log_metrics(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(record, time=time.time())) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict]:
        p = self.out / "metrics.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
