"""Broken folders of the methods built from standard ops (FourierFT, VeRA, HRA, MiSS; the
LoRA-family cases are tests/test_adapter_abuse.py): every reader refuses them with an
AdapterError naming the file, the key or the module, instead of a bare ValueError/KeyError or
a merge that silently drops tensors. On the bundled demo MLP (layers.0/2/4), no torch."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import pyedge
from pyedge.demo import model_path
from pyedge.export.adapter_files import AdapterError, read_adapter_folder
from pyedge.export.merge import merge_adapters

TARGETS = ["layers.0", "layers.2"]
CONFIGS = {
    "fourierft": lambda: pyedge.FourierFTConfig(n_frequency=20, scaling=10.0,
                                                target_modules=TARGETS),
    "vera": lambda: pyedge.VeraConfig(r=4, target_modules=TARGETS),
    "hra": lambda: pyedge.HRAConfig(r=2, target_modules=TARGETS),
    "miss": lambda: pyedge.MissConfig(r=4, target_modules=TARGETS),
}
WTS, CFG = "adapter_model.safetensors", "adapter_config.json"
P = "base_model.model."


def folder(tmp_path, method):
    sess = pyedge.TrainingSession(str(model_path()), adapter=CONFIGS[method](),
                                  loss="cross_entropy")
    for k, v in sess.trainable_parameters().items():   # nonzero deltas
        v[...] = np.random.default_rng(len(k)).standard_normal(v.shape) * 0.1
    return sess.save_adapters(tmp_path / method)


def edit(path, tensors=None, config=None):
    if tensors is not None:
        t = load_file(os.path.join(path, WTS))
        tensors(t)
        save_file(t, os.path.join(path, WTS))
    if config is not None:
        with open(os.path.join(path, CFG)) as f:
            c = json.load(f)
        config(c)
        with open(os.path.join(path, CFG), "w") as f:
            json.dump(c, f)
    return path


@pytest.mark.parametrize("method", ["fourierft", "vera", "hra", "miss"])
def test_a_module_missing_from_the_model_is_refused_by_merge(tmp_path, method):
    """A tensor for a module the model lacks (target_modules selects it by suffix) must not be
    dropped silently by `pyedge merge`."""
    path = folder(tmp_path, method)

    def add_ghost(t):
        for k in [k for k in t if k.startswith(P + "layers.0.")]:
            t[k.replace("layers.0.", "extra.layers.0.")] = t[k].copy()

    edit(path, tensors=add_ghost)
    with pytest.raises(AdapterError, match="extra.layers.0"):
        merge_adapters(str(model_path()), path, str(tmp_path / "merged.onnx"))
    assert not (tmp_path / "merged.onnx").exists()


def test_vera_module_without_lambda_d_is_refused(tmp_path):
    path = edit(folder(tmp_path, "vera"),
                tensors=lambda t: t.pop(P + "layers.2.vera_lambda_d"))
    with pytest.raises(AdapterError, match=r"layers\.2.*vera_lambda_d"):
        read_adapter_folder(path)


@pytest.mark.parametrize("method", ["fourierft", "hra", "miss"])
def test_tensors_of_a_module_target_modules_does_not_select(tmp_path, method):
    path = edit(folder(tmp_path, method), config=lambda c: c.update(target_modules=["layers.0"]))
    with pytest.raises(AdapterError, match="'layers.2'.*target_modules does not select"):
        read_adapter_folder(path)


@pytest.mark.parametrize("method,key,value", [
    ("fourierft", "n_frequency", "many"), ("fourierft", "scaling", None),
    ("fourierft", "random_loc_seed", -1), ("fourierft", "n_frequency", True),
    ("vera", "projection_prng_key", "x"), ("vera", "d_initial", float("inf")),
    ("vera", "save_projection", "yes")])
def test_bad_numbers_in_the_config_name_the_key(tmp_path, method, key, value):
    path = edit(folder(tmp_path, method), config=lambda c: c.update({key: value}))
    with pytest.raises(AdapterError, match=f"{CFG}.*{key}"):
        read_adapter_folder(path)
    sess = pyedge.TrainingSession(str(model_path()), adapter=CONFIGS[method](),
                                  loss="cross_entropy")
    with pytest.raises(AdapterError, match=key):
        sess.load_adapters(path)


@pytest.mark.parametrize("method", ["fourierft", "vera", "hra", "miss"])
def test_the_good_folder_loads_and_merges(tmp_path, method):
    """The folders the cases above break are fine as saved (so each case tests its break)."""
    path = folder(tmp_path, method)
    sess = pyedge.TrainingSession(str(model_path()), adapter=CONFIGS[method](),
                                  loss="cross_entropy")
    assert sorted(sess.load_adapters(path)["loaded"]) == sorted(sess.trainable_parameters())
    info = merge_adapters(str(model_path()), path, str(tmp_path / "merged.onnx"))
    assert len(info["lora"]) == 2   # layers.0 and layers.2's weights
