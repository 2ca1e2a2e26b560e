"""FourierFT (pyedge/adapters/fourierft.py) against PyTorch + PEFT's FourierFTConfig on a
Llama-shape decoder and on MiniLM (tests/peft_parity.py's checks), and the positions
regenerated from random_loc_seed without torch."""
import numpy as np
import pytest

import pyedge
from peft_parity import run_method_case

CASES = {"decoder": dict(n_frequency=200, scaling=50.0, random_loc_seed=11,
                         target_modules=["q_proj", "v_proj", "up_proj"]),
         "minilm": dict(n_frequency=300, scaling=100.0, target_modules=["query", "value"])}


def perturb(name, p, g):
    import torch
    p.add_(0.05 * torch.randn(p.shape, generator=g) - p)   # PEFT's randn init is too large


def run_case(exported, tmp_path, name):
    peft = pytest.importorskip("peft")
    run_method_case(exported, tmp_path, name, peft.FourierFTConfig(**CASES[name]),
                    pyedge.FourierFTConfig(**CASES[name]), perturb, "FOURIERFT")


def test_decoder_matches_peft(exported, tmp_path):
    run_case(exported, tmp_path, "decoder")


@pytest.mark.slow
def test_minilm_matches_peft(exported, tmp_path):
    run_case(exported, tmp_path, "minilm")


@pytest.mark.parametrize("n,seed,count", [(10, 0, 10), (4096, 777, 1000), (147456, 3, 50)])
def test_positions_equal_torch_randperm(n, seed, count):
    torch = pytest.importorskip("torch")
    from pyedge.adapters.fourierft import positions
    ref = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].numpy()
    np.testing.assert_array_equal(positions(n, seed, count), ref)


def test_delta_equals_ifft2():
    from pyedge.adapters.fourierft import bases, positions
    k, n, nf = 12, 10, 30
    c = np.random.default_rng(0).standard_normal(nf)
    p = positions(k * n, 5, nf)
    dense = np.zeros((n, k))
    dense[p // k, p % k] = c
    Ci, Si, Co, So = bases(k, n, nf, 5, np.float64)
    ours = ((Co * c) @ Ci.T - (So * c) @ Si.T) / (k * n)
    np.testing.assert_allclose(ours, np.fft.ifft2(dense).real, atol=1e-12)
