"""`pyedge inspect` says how many attention layers fused and, when some did not, that they run
op by op (pyedge/fusion_report.py): a decoder whose attention fuses (Llama, TorchScript, eager) and
one whose attention cannot (TorchScript's SDPA with its -inf mask and NaN guard, see
tests/test_decoder_attention_families.py), with and without adapters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from decoder_families import N_LAYERS, export_family

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    """`python -m pyedge ...` as a user runs it (this checkout's pyedge)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pyedge", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect_attn")
    fused, _, _ = export_family(root, "llama", "torchscript", attn="eager")
    plain, _, _ = export_family(root, "llama", "torchscript", attn="sdpa")
    return {"fused": fused, "plain": plain}


@pytest.mark.parametrize("lora", [False, True], ids=["model", "with_lora"])
def test_inspect_reports_attention_fused_or_op_by_op(files, lora):
    from pyedge.cli_inspect import inspect_report
    kw = dict(target="q_proj,v_proj", loss="causal_lm") if lora else {}
    assert inspect_report(files["fused"], **kw)["attention"] == {"layers": N_LAYERS,
                                                                 "fused": N_LAYERS}
    assert inspect_report(files["plain"], **kw)["attention"] == {"layers": N_LAYERS, "fused": 0}


def test_inspect_prints_the_op_by_op_attention(files):
    r = run("inspect", files["plain"])
    assert r.returncode == 0, r.stderr
    assert f"attention: 0 of {N_LAYERS} layers fused; {N_LAYERS} run op by op" in r.stdout, \
        r.stdout
    r = run("inspect", files["fused"], "--json")
    assert json.loads(r.stdout)["attention"] == {"layers": N_LAYERS, "fused": N_LAYERS}
    r = run("inspect", files["fused"])
    assert f"attention: {N_LAYERS} of {N_LAYERS} layers fused" in r.stdout, r.stdout
    assert "op by op" not in r.stdout


def test_models_without_attention_print_no_attention_line():
    from pyedge.demo import model_path
    r = run("inspect", model_path())
    assert r.returncode == 0, r.stderr
    assert "attention:" not in r.stdout
