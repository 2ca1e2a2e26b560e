"""(IA)³ (pyedge/adapters/ia3.py) against PyTorch + PEFT's IA3Config on a Llama-shape decoder
and on MiniLM (tests/peft_parity.py: load PEFT's folder, step-0 gradients, 20 AdamW losses,
PEFT loads pyedge's folder, merge in onnxruntime); graph rewrite and bad-input checks."""
import os

import numpy as np
import pytest

import pyedge
from peft_parity import run_method_case

CASES = {  # PEFT's defaults for these architectures (keys, values, the MLP's output side)
    "decoder": dict(target_modules=["k_proj", "v_proj", "down_proj"],
                    feedforward_modules=["down_proj"]),
    "minilm": dict(target_modules=["key", "value", "output.dense"],
                   feedforward_modules=["output.dense"]),
}


def perturb(name, p, g):
    import torch
    p.add_(0.2 * torch.randn(p.shape, generator=g))   # away from the identity (ones)


def run_case(exported, tmp_path, name):
    peft = pytest.importorskip("peft")
    sess, cfg = run_method_case(exported, tmp_path, name, peft.IA3Config(**CASES[name]),
                                pyedge.IA3Config(**CASES[name]), perturb, "IA3")
    assert cfg["feedforward_modules"] and set(cfg["feedforward_modules"]) <= \
        set(cfg["target_modules"])
    return sess


def test_decoder_matches_peft(exported, tmp_path):
    sess = run_case(exported, tmp_path, "decoder")
    ff = [s for s in sess.adapter_sites if s.feedforward]
    assert len(ff) == 2 and len(sess.adapter_sites) == 6


@pytest.mark.slow
def test_minilm_matches_peft(exported, tmp_path):
    sess = run_case(exported, tmp_path, "minilm")
    # output.dense matches the attention output and the MLP output: 4 per layer
    assert sum(s.feedforward for s in sess.adapter_sites) == len(sess.adapter_sites) // 2


def test_rewrite_places_mul_after_bias_and_before_ff(exported):
    """Attention side: the Mul reads the bias Add's output (PEFT scales the bias too);
    feed-forward: the Mul feeds the MatMul."""
    path, _, _ = exported("minilm", "torchscript")
    sess = pyedge.TrainingSession(path, adapter=pyedge.IA3Config(**CASES["minilm"]),
                                  loss="cross_entropy")
    g = sess.base_graph.copy()
    from pyedge.adapters.ia3 import inject_ia3
    sites = inject_ia3(g, pyedge.IA3Config(**CASES["minilm"]))
    prod = g.producer_map()
    muls = [n for n in g.nodes if n.op_type == "Mul" and n.inputs[1].endswith(".ia3_l")]
    assert len(muls) == len(sites) and sites
    for m in muls:
        site = next(s for s in sites if s.vector == m.inputs[1])
        src = prod[m.inputs[0]] if m.inputs[0] in prod else None
        if site.feedforward:
            users = [n for n in g.nodes if m.outputs[0] in n.inputs]
            assert [u.op_type for u in users] == ["MatMul"]
        else:
            assert src is not None and src.op_type == "Add" and site.bias in src.inputs


def test_values_and_init(exported):
    path, _, _ = exported("decoder", "torchscript")
    sess = pyedge.TrainingSession(path, adapter=pyedge.IA3Config(**CASES["decoder"]),
                                  loss="causal_lm")
    params = sess.trainable_parameters()
    assert all(np.array_equal(v, np.ones_like(v)) for v in params.values())
    for s in sess.adapter_sites:
        assert params[s.vector].shape == ((s.in_features,) if s.feedforward
                                          else (s.out_features,))


def test_peft_field_names_and_errors():
    with pytest.raises(ValueError, match="target_modules is required"):
        pyedge.IA3Config()
    with pytest.raises(TypeError, match="unknown or unsupported field 'r'"):
        pyedge.IA3Config(target_modules=["k_proj"], r=4)
    cfg = pyedge.IA3Config(target_modules=["k_proj"], task_type="CAUSAL_LM",
                           fan_in_fan_out=False, inference_mode=False)
    assert cfg.is_feedforward("x.k_proj") is False


def test_folder_of_other_method_is_refused(exported, tmp_path):
    """An IA3 folder into a LoRA session, and a wrong-orientation ia3_l, are clear errors."""
    path, _, _ = exported("decoder", "torchscript")
    sess = pyedge.TrainingSession(path, adapter=pyedge.IA3Config(**CASES["decoder"]),
                                  loss="causal_lm")
    folder = sess.save_adapters(tmp_path / "ia3")
    lora = pyedge.TrainingSession(path, adapter=pyedge.LoraConfig(
        r=2, target_modules=["k_proj"]), loss="causal_lm")
    from pyedge.export.adapter_files import AdapterError
    with pytest.raises(AdapterError, match="adapters are ia3, the session trains lora"):
        lora.load_adapters(folder)
    from safetensors.numpy import load_file, save_file
    w = os.path.join(folder, "adapter_model.safetensors")
    t = load_file(w)
    k = next(k for k in t if k.endswith("k_proj.ia3_l"))
    t[k] = t[k].reshape(1, -1)
    save_file(t, w)
    with pytest.raises(ValueError, match="expected"):
        sess.load_adapters(folder)
