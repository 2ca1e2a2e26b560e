"""MiSS (pyedge/adapters/miss.py) against PyTorch + PEFT's MissConfig on a Llama-shape decoder
and on MiniLM (tests/peft_parity.py's checks), plus the block-sum matrix and bad input."""
import numpy as np
import pytest

import pyedge
from peft_parity import run_method_case

# r = 6 divides neither the decoder's 64 nor its 128 input features: PEFT's zero padding is
# exercised there; MiniLM's 384 is a multiple of 8
CASES = {"decoder": dict(r=6, target_modules=["q_proj", "v_proj", "down_proj"]),
         "minilm": dict(r=8, target_modules=["query", "value"])}


def perturb(name, p, g):
    import torch
    p.add_(0.05 * torch.randn(p.shape, generator=g))


def run_case(exported, tmp_path, name):
    peft = pytest.importorskip("peft")
    run_method_case(exported, tmp_path, name, peft.MissConfig(**CASES[name]),
                    pyedge.MissConfig(**CASES[name]), perturb, "MISS")


def test_decoder_matches_peft(exported, tmp_path):
    run_case(exported, tmp_path, "decoder")


@pytest.mark.slow
def test_minilm_matches_peft(exported, tmp_path):
    run_case(exported, tmp_path, "minilm")


def test_block_sum_equals_peft_reshape():
    from pyedge.adapters.miss import block_sum
    x = np.random.default_rng(0).standard_normal((3, 10))
    padded = np.pad(x, ((0, 0), (0, 2)))        # PEFT pads 10 -> 12 for r = 4
    ref = padded.reshape(3, 3, 4).sum(axis=1)
    np.testing.assert_allclose(x @ block_sum(10, 4), ref, rtol=1e-12)


def test_bad_config():
    with pytest.raises(ValueError, match="init_weights='bat' is not supported"):
        pyedge.MissConfig(r=4, target_modules=["q_proj"], init_weights="bat")
    with pytest.raises(ValueError, match="miss_dropout=0.1 is not supported"):
        pyedge.MissConfig(r=4, target_modules=["q_proj"], miss_dropout=0.1)
