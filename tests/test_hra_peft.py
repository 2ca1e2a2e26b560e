"""HRA (pyedge/adapters/hra.py) against PyTorch + PEFT's HRAConfig on a Llama-shape decoder and
on MiniLM (tests/peft_parity.py's checks), plus the initial identity and bad input."""
import numpy as np
import pytest

import pyedge
from peft_parity import run_method_case

CASES = {"decoder": dict(r=4, target_modules=["q_proj", "v_proj", "up_proj"]),
         "minilm": dict(r=4, target_modules=["query", "value"])}


def perturb(name, p, g):
    import torch
    p.add_(0.3 * torch.randn(p.shape, generator=g))   # break the pairs: R != I


def run_case(exported, tmp_path, name):
    peft = pytest.importorskip("peft")
    run_method_case(exported, tmp_path, name, peft.HRAConfig(**CASES[name]),
                    pyedge.HRAConfig(**CASES[name]), perturb, "HRA")


def test_decoder_matches_peft(exported, tmp_path):
    run_case(exported, tmp_path, "decoder")


@pytest.mark.slow
def test_minilm_matches_peft(exported, tmp_path):
    run_case(exported, tmp_path, "minilm")


def test_starts_as_identity(exported):
    """PEFT's symmetric initialisation: the adapted model's outputs equal the base model's."""
    path, _, _ = exported("decoder", "torchscript")
    ids = np.random.default_rng(0).integers(0, 100, (2, 8)).astype(np.int64)
    plain = pyedge.TrainingSession(path, loss=None).run(
        {"input_ids": ids})
    sess = pyedge.TrainingSession(path, adapter=pyedge.HRAConfig(**CASES["decoder"]), loss=None)
    out = sess.run({"input_ids": ids})
    k = sess.output_name
    assert np.abs(out[k] - plain[k]).max() <= 1e-4 * np.abs(plain[k]).max()
    u = next(iter(sess.trainable_parameters().values()))
    np.testing.assert_array_equal(u[:, 0::2], u[:, 1::2])


def test_bad_config():
    with pytest.raises(ValueError, match="even"):
        pyedge.HRAConfig(r=3, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="apply_GS=True is not supported"):
        pyedge.HRAConfig(r=4, target_modules=["q_proj"], apply_GS=True)
