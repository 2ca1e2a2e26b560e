"""The decoder bench workloads (W6, W7, W8, llama-w4) at a test size, through the bench's own
code path: bench.workloads (config, batches, export) and bench.worker's engine functions, one
pyedge step and one PyTorch+PEFT step with equal first losses."""
import argparse
import dataclasses

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from bench import worker  # noqa: E402
from bench.workloads import LLM_PROJECTIONS, WORKLOADS, ensure_export, expand, tiny  # noqa: E402

IDS = ["6", "7", "8", "llama-w4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench_cache"))


def _args(path):
    return argparse.Namespace(onnx=path, steps=1, warmup=0, threads=1, seed=0)


def test_workload_definitions():
    assert expand("6,llama-w4") == ["6", "llama-w4"]
    w6, w7, w8, w4 = (WORKLOADS[i] for i in IDS)
    assert w6.kwargs == dict(arch="llama", layers=30, hidden=576, heads=9, kv_heads=3,
                             intermediate=1536, vocab=49152, tie=True, seq=256, batch=4)
    assert w7.kwargs["arch"] == "qwen2" and w7.kwargs["vocab"] == 151936
    assert w8.kwargs["hidden"] == 1536 and w8.quantize == {"bits": 4, "group_size": 32}
    assert w8.engines == ("pyedge",)
    for w in (w6, w7, w8):
        assert w.lora_targets == LLM_PROJECTIONS and w.lora_r == 8 and w.lora_alpha == 16
        assert w.loss == "causal_lm" and "ort" not in w.engines
    assert w4.lora_targets == ["q_proj", "v_proj"] and w4.kwargs["kv_heads"] == 8


@pytest.mark.parametrize("wid", IDS)
def test_tiny_workload_first_loss_equal(wid, cache):
    w = tiny(WORKLOADS[wid])
    assert w.kwargs["arch"] == WORKLOADS[wid].kwargs["arch"]
    float_w = dataclasses.replace(w, quantize=None)  # W8's 4-bit base: checked below
    path = ensure_export(float_w, "dynamo", None, log=lambda *_: None, cache=cache)
    _, pe_losses, _, _, extra, _ = worker.run_pyedge(float_w, _args(path))
    _, th_losses, _, _, textra, _ = worker.run_torch(float_w, _args(path))
    assert extra["trainable_parameters"] == textra["trainable_parameters"] > 0
    assert pe_losses[0] == pytest.approx(th_losses[0], rel=2e-5)
    if w.quantize:  # W8: the same model on a 4-bit base (quantized once, in its own process)
        _, q_losses, _, _, qextra, _ = worker.run_pyedge(w, _args(path))
        assert qextra["quantize"] == w.quantize
        assert q_losses[0] == pytest.approx(pe_losses[0], rel=5e-2) and q_losses[0] != pe_losses[0]


def test_qwen2_export_has_qkv_biases(cache):
    from pyedge.onnx_import import load_onnx
    w = tiny(WORKLOADS["7"])
    g = load_onnx(ensure_export(w, "dynamo", None, log=lambda *_: None, cache=cache))
    names = set(g.initializers)
    for p in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{p}.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    # tied: one [vocab, hidden] tensor serves the embedding and the LM head
    vocab = [k for k, a in g.initializers.items() if a.shape == (512, 64)]
    assert len(vocab) == 1 and g.param_map[vocab[0]]["module"] == "model.embed_tokens"


def test_variants_pass_their_options_or_are_skipped(monkeypatch):
    import inspect

    import pyedge
    assert WORKLOADS["6m"].max_memory and WORKLOADS["6m"].kwargs == WORKLOADS["6"].kwargs
    assert WORKLOADS["7q4"].quantize and WORKLOADS["7q4"].engines == ("pyedge",)
    w = dataclasses.replace(tiny(WORKLOADS["6"]), max_memory=1 << 30)
    takes = "max_memory" in inspect.signature(pyedge.TrainingSession.__init__).parameters
    if takes:
        assert worker.pyedge_model_and_options(w, "m.onnx") == ("m.onnx", {"max_memory": 1 << 30})
    else:
        with pytest.raises(worker.Skipped, match="max_memory"):
            worker.pyedge_model_and_options(w, "m.onnx")

    class Session:  # a session that takes the budget, as on branch recompute
        def __init__(self, model, max_memory=None):
            pass
    monkeypatch.setattr(pyedge, "TrainingSession", Session)
    assert worker.pyedge_model_and_options(w, "m.onnx") == ("m.onnx", {"max_memory": 1 << 30})
    w = dataclasses.replace(w, max_memory=None)
    calls = []
    import bench.workloads as bw
    monkeypatch.setattr(bw, "ensure_quantized",
                        lambda path, q, log=None: calls.append((path, q)) or "m.q.onnx")
    q = dataclasses.replace(w, quantize={"bits": 4})
    assert worker.pyedge_model_and_options(q, "m.onnx")[0] == "m.q.onnx"
    assert calls == [("m.onnx", {"bits": 4})]


def test_external_data_export_path_as_w7(tmp_path, monkeypatch):
    """W7/W8 are over the 1.8 GB threshold: the bench caches model.onnx + model.onnx.data.
    The same path with the threshold lowered, on the tiny W7: first losses still equal."""
    import os

    from pyedge.export import torch_export
    monkeypatch.setattr(torch_export, "EXTERNAL_DATA_THRESHOLD", 10_000)
    w = tiny(WORKLOADS["7"])
    path = ensure_export(w, "dynamo", None, log=lambda *_: None, cache=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path),
                                                   os.path.basename(path) + ".data"])
    _, pe, _, _, _, _ = worker.run_pyedge(w, _args(path))
    _, th, _, _, _, _ = worker.run_torch(w, _args(path))
    assert pe[0] == pytest.approx(th[0], rel=2e-5)
