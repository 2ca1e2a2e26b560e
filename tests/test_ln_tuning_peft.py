"""LN tuning (pyedge/adapters/ln_tuning.py) against PyTorch + PEFT's LNTuningConfig on a
Llama-shape decoder (RMSNorm) and on MiniLM (LayerNorm): tests/peft_parity.py's checks, plus
the sites and bad input."""

import numpy as np
import pytest

import pyedge
from peft_parity import run_method_case

CASES = {  # PEFT's defaults for these architectures
    "decoder": dict(target_modules=["input_layernorm", "post_attention_layernorm", "norm"]),
    "minilm": dict(target_modules=["LayerNorm"]),
}


def perturb(name, p, g):
    import torch
    p.add_(0.1 * torch.randn(p.shape, generator=g))


def torch_name(onnx_name):  # model.norm.weight -> ...model.norm.ln_tuning_layers.default.weight
    module, _, param = onnx_name.rpartition(".")
    return f"base_model.model.{module}.ln_tuning_layers.default.{param}"


def run_case(exported, tmp_path, name):
    peft = pytest.importorskip("peft")
    sess, _ = run_method_case(exported, tmp_path, name, peft.LNTuningConfig(**CASES[name]),
                              pyedge.LNTuningConfig(**CASES[name]), perturb, "LN_TUNING",
                              torch_name)
    return sess


def test_decoder_matches_peft(exported, tmp_path):
    sess = run_case(exported, tmp_path, "decoder")
    assert len(sess.adapter_sites) == 5   # 2 layers x 2 norms + the final norm


@pytest.mark.slow
def test_minilm_matches_peft(exported, tmp_path):
    sess = run_case(exported, tmp_path, "minilm")
    assert all(set(s.params) == {"weight", "bias"} for s in sess.adapter_sites)


def test_no_match_and_fields(exported):
    path, _, _ = exported("decoder", "torchscript")
    with pytest.raises(ValueError, match="no module matches LN tuning targets"):
        pyedge.TrainingSession(path, adapter=pyedge.LNTuningConfig(target_modules=["nope"]),
                               loss="causal_lm")
    with pytest.raises(TypeError, match="unknown or unsupported field 'r'"):
        pyedge.LNTuningConfig(target_modules=["norm"], r=2)
    sess = pyedge.TrainingSession(path, adapter=pyedge.LNTuningConfig(
        target_modules=["norm"], task_type="CAUSAL_LM"), loss="causal_lm")
    assert [s.module for s in sess.adapter_sites] == ["model.norm"]
    np.testing.assert_array_equal(sess.trainable_parameters()["model.norm.weight"],
                                  sess.base_graph.initializers["model.norm.weight"])
