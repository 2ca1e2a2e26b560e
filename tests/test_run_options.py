"""Run experience (pyedge/train.py, pyedge/cli.py): `--resume` takes the run's saved options,
`--early-stop N` on the eval loss, metrics also as CSV. A hand-built ONNX LM on text data
(tests/test_text_data.py), so each run takes well under a second."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

import text_fixtures as tf
from test_text_data import tiny_lm


@pytest.fixture()
def run(tmp_path):
    tf.save_tokenizer_folder(str(tmp_path))
    model = tiny_lm(tmp_path / "model.onnx", positions=64)
    tf.write_jsonl(tmp_path / "pc.jsonl", tf.PROMPTS * 3)
    return tmp_path, model


def _main(capsys, *args):
    from pyedge.cli import main
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return (rc,) + tuple(capsys.readouterr())


def _adapters(d):
    from safetensors.numpy import load_file
    return load_file(str(d / "adapters" / "pyedge_adapters.safetensors"))


def test_resume_reads_saved_options(run, capsys):
    d, model = run
    opts = ["--data", d / "pc.jsonl", "--loss", "causal_lm", "--target", "proj",
            "--lora-r", "4", "--lr", "3e-2", "--batch-size", "2", "--max-steps", "6",
            "--save-every", "3", "--seed", "7", "--deterministic", "-q"]
    assert _main(capsys, "train", model, *opts, "--out", d / "full")[0] == 0
    want = _adapters(d / "full")
    shutil.rmtree(d / "full" / "checkpoints" / "step-6")
    shutil.rmtree(d / "full" / "adapters")
    rc, out, err = _main(capsys, "train", "--out", d / "full", "--resume")
    assert rc == 0, err
    assert "resumed at 3" in out and "warning" not in out + err
    got = _adapters(d / "full")
    assert sorted(got) == sorted(want) and len(got) == 2  # proj's LoRA A and B
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    # a flag given now overrides the saved one
    rc, out, err = _main(capsys, "train", "--out", d / "full", "--resume", "--max-steps", "8")
    assert rc == 0 and "trained steps 7-8" in out, out + err


def test_early_stop_on_eval_loss_and_metrics_csv(run, capsys):
    d, model = run
    rc, out, err = _main(capsys, "train", model, "--data", d / "pc.jsonl", "--eval-data",
                         d / "pc.jsonl", "--loss", "causal_lm", "--target", "proj", "--lr", "0",
                         "--batch-size", "2", "--max-steps", "20", "--eval-every", "1",
                         "--early-stop", "2", "--log-every", "1", "--out", d / "es",
                         "--no-progress")
    assert rc == 0, err
    assert "early stop at step 3" in out + err and "trained 3 steps" in out
    recs = [json.loads(x) for x in (d / "es" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["type"] == "eval"] == [1, 2, 3]
    assert any(r["type"] == "early_stop" and r["best_step"] == 1 for r in recs)
    rows = list(csv.DictReader(open(d / "es" / "metrics.csv", newline="")))
    assert len(rows) == len(recs)
    assert [r["type"] for r in rows] == [r["type"] for r in recs]
    ev = [r for r in rows if r["type"] == "eval"]
    assert float(ev[0]["loss"]) == pytest.approx(next(r for r in recs if r["type"] == "eval")["loss"])
    assert float(ev[0]["perplexity"]) == pytest.approx(np.exp(float(ev[0]["loss"])))


def test_early_stop_needs_periodic_eval(run, capsys):
    d, model = run
    rc, out, err = _main(capsys, "train", model, "--data", d / "pc.jsonl", "--target", "proj",
                         "--loss", "causal_lm", "--early-stop", "2", "--out", d / "x")
    assert rc == 2 and "--early-stop N needs --eval-data and --eval-every" in err


def test_early_stop_counts_evaluations_before_a_resume(run, capsys):
    d, model = run
    args = ["train", model, "--data", d / "pc.jsonl", "--eval-data", d / "pc.jsonl", "--loss",
            "causal_lm", "--target", "proj", "--lr", "0", "--batch-size", "2", "--max-steps",
            "20", "--eval-every", "1", "--early-stop", "3", "--save-every", "1",
            "--out", d / "es", "-q"]
    assert _main(capsys, *args)[0] == 0
    ck = d / "es" / "checkpoints"
    assert (ck / "step-4").is_dir() and not (ck / "step-5").exists()  # evals 1..4: stop at 4
    shutil.rmtree(ck / "step-4")
    shutil.rmtree(ck / "step-3")
    rc, out, err = _main(capsys, "train", "--out", d / "es", "--resume")
    assert rc == 0 and "trained steps 3-4 (resumed at 2)" in out, out + err
