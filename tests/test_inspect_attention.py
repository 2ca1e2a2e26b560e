"""`pyedge inspect` says how many attention layers fused and, when some did not, that they run
op by op (pyedge/fusion_report.py): a decoder whose attention fuses (Llama, TorchScript, eager) and
one whose attention cannot (TorchScript's SDPA with its -inf mask and NaN guard, see
tests/test_decoder_attention_families.py), with and without adapters."""
from __future__ import annotations

import pytest

from decoder_families import N_LAYERS, export_family


def inspect(capsys, path) -> str:
    """What `pyedge inspect PATH` prints (the CLI's main, in this process)."""
    from pyedge.cli import main
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    return capsys.readouterr().out


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


def test_inspect_prints_the_op_by_op_attention(files, capsys):
    out = inspect(capsys, files["plain"])
    assert f"attention: 0 of {N_LAYERS} layers fused; {N_LAYERS} run op by op" in out, out
    out = inspect(capsys, files["fused"])
    assert f"attention: {N_LAYERS} of {N_LAYERS} layers fused" in out, out
    assert "op by op" not in out


def test_models_without_attention_print_no_attention_line(capsys):
    from pyedge.demo import model_path
    from pyedge.fusion_report import attention_line
    assert "attention:" not in inspect(capsys, model_path())
    assert attention_line({"layers": 0, "fused": 0}) is None
