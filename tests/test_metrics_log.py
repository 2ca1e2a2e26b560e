"""metrics.jsonl on --resume (pyedge/metrics_log.py): cut back to the resumed step, and never
truncated in place (a run killed while rewriting it keeps its history)."""
import json

import pytest

import pyedge.metrics_log as ml


def _write(path, steps):
    path.write_text("".join(json.dumps({"type": "train", "step": s, "loss": 1.0 / s}) + "\n"
                            for s in steps) + '{"type": "train", "st', encoding="utf-8")


def test_resume_keeps_the_records_up_to_the_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    _write(p, [1, 2, 3, 4])
    log = ml.MetricsLog(p, resume_step=2)
    log.write({"type": "train", "step": 3, "loss": float("nan")})
    log.close()
    recs = log.records()
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[-1]["loss"] is None
    assert [q.name for q in tmp_path.iterdir()] == ["metrics.jsonl"]   # no temp file left


def test_a_kill_while_cutting_back_keeps_the_old_history(tmp_path, monkeypatch):
    p = tmp_path / "metrics.jsonl"
    _write(p, [1, 2, 3])
    before = p.read_text(encoding="utf-8")

    class Killed(BaseException):
        pass

    real_open = open

    def open_then_die(file, mode="r", *a, **kw):
        fh = real_open(file, mode, *a, **kw)   # "w" truncates whatever it opens
        if "w" in mode:
            fh.close()
            raise Killed()
        return fh

    monkeypatch.setattr(ml, "open", open_then_die, raising=False)
    with pytest.raises(Killed):
        ml.MetricsLog(p, resume_step=2)
    assert p.read_text(encoding="utf-8") == before
