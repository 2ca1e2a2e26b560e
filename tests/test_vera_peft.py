"""VeRA (pyedge/adapters/vera.py) against PyTorch + PEFT's VeraConfig on a Llama-shape decoder
and on MiniLM (tests/peft_parity.py's checks), the projections regenerated bit for bit from
projection_prng_key without torch, and a save_projection=false folder."""

import numpy as np
import pytest

import pyedge
from peft_parity import run_method_case

CASES = {"decoder": dict(r=8, target_modules=["q_proj", "v_proj", "up_proj"],
                         projection_prng_key=3),
         "minilm": dict(r=8, target_modules=["query", "value"])}


def perturb(name, p, g):
    import torch
    p.add_(0.1 * torch.randn(p.shape, generator=g))


def run_case(exported, tmp_path, name, **extra):
    peft = pytest.importorskip("peft")
    kw = {**CASES[name], **extra}
    run_method_case(exported, tmp_path, name, peft.VeraConfig(**kw), pyedge.VeraConfig(**kw),
                    perturb, "VERA")


def test_decoder_matches_peft(exported, tmp_path):
    run_case(exported, tmp_path, "decoder")


def test_decoder_without_saved_projection(exported, tmp_path):
    run_case(exported, tmp_path, "decoder", save_projection=False)


@pytest.mark.slow
def test_minilm_matches_peft(exported, tmp_path):
    run_case(exported, tmp_path, "minilm")


@pytest.mark.parametrize("key", [0, 7, 2**31 + 5])
def test_projections_equal_torch(key):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.tuners.vera.model import _kaiming_init

    from pyedge.adapters.vera import projections
    g = torch.Generator(device="cpu").manual_seed(key)
    A = _kaiming_init((16, 100), generator=g)
    B = _kaiming_init((75, 16), generator=g)
    ours = projections(key, 16, 100, 75)
    np.testing.assert_array_equal(ours[0], A.numpy())
    np.testing.assert_array_equal(ours[1], B.numpy())
