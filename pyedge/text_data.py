"""Text in: Hugging Face `tokenizers` + jinja2 chat templates -> token datasets (device path:
numpy, tokenizers and jinja2 only; no torch, no transformers).

The tokenizer is ``tokenizer.json`` next to the model (``pyedge export --hf`` puts it there)
or ``--tokenizer`` (a folder or the file); ``tokenizer_config.json`` / ``special_tokens_map.json``
/ ``chat_template.jinja`` beside it give the special tokens and the chat template.

Formats (anything holding ``input_ids`` stays with pyedge/data.py):

* ``.txt``: the file is split into documents at blank lines; each is encoded with the
  tokenizer's special tokens, followed by EOS (when the tokenizer has one and did not add it).
  Packed by default: the token stream is cut into ``seq_len`` rows (the last one padded).
* ``.jsonl`` ``{"text"}``: one sequence per record (``--pack`` packs them like .txt); labels are
  the tokens (the causal_lm loss shifts them), padding ignored.
* ``.jsonl`` ``{"prompt", "completion"}``: ``encode(prompt) + encode(completion, no special
  tokens) + EOS``; loss on the completion (and EOS) only, labels -100 on the prompt.
* ``.jsonl`` ``{"messages": [{"role", "content"}, ...]}``: rendered with the model's chat
  template (jinja2, as transformers does) and tokenized without extra special tokens; loss on
  the assistant turns only. The assistant spans come from the template's ``{% generation %}``
  blocks when it has them (transformers' ``return_assistant_tokens_mask``), otherwise from
  rendering each prefix of the conversation (``messages[:i]`` with the generation prompt, then
  ``messages[:i+1]``): the characters the assistant turn adds, its end-of-turn marker included.
  A token is the assistant's when its characters overlap such a span.
* ``.csv`` / ``.jsonl`` with ``text`` and ``label``: one sequence per record for a classifier
  (labels are class ids, or names mapped by config.json's ``label2id``).

Sequences longer than ``seq_len`` (or the model's positions when none is given) are cut and the
cut is reported; the summary (records, tokens, tokens with loss, truncated, padding share) is
``Dataset.summary``, printed before training.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyedge.data import LABELS, DataError, Dataset, DataSpec, _pad

TOKENIZER_FILE = "tokenizer.json"
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer")
DEFAULT_PACK_LEN = 512
_GEN_START, _GEN_END = "\ue000", "\ue001"  # private-use marks around {% generation %} output


# --------------------------------------------------------------------------- tokenizer
def find_tokenizer(model=None, tokenizer=None) -> Path | None:
    """tokenizer.json given (a file or its folder), else next to the model, else None."""
    if tokenizer:
        p = Path(tokenizer)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise DataError(f"{tokenizer}: no such tokenizer (expected tokenizer.json or a "
                            "folder holding it)")
        return p
    if model:
        p = Path(model).parent / TOKENIZER_FILE
        if p.is_file():
            return p
    return None


def _token_str(v):
    if isinstance(v, dict):  # {"content": "<s>", "lstrip": ..., ...}
        v = v.get("content")
    return v if isinstance(v, str) else None


class TextTokenizer:
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, chat_template.jinja)."""

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError("text data needs the 'tokenizers' package (pip install tokenizers)") \
                from None
        self.path = Path(path)
        try:
            self.tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception
            raise DataError(f"{self.path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") \
                from None
        folder = self.path.parent
        self.config = self._json(folder / "tokenizer_config.json")
        special = self._json(folder / "special_tokens_map.json")
        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token",
                    "mask_token"):
            s = _token_str(self.config.get(key)) or _token_str(special.get(key))
            if s is not None:
                self.special_tokens[key] = s
        self.chat_template = None
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            self.chat_template = jinja.read_text(encoding="utf-8")
        else:
            ct = self.config.get("chat_template")
            if isinstance(ct, list):  # [{"name": "default", "template": ...}, ...]
                ct = next((t.get("template") for t in ct if t.get("name") == "default"), None)
            self.chat_template = ct if isinstance(ct, str) else None
        self.bos_id = self.token_id("bos_token")
        self.eos_id = self.token_id("eos_token")
        pad = self.token_id("pad_token")
        if pad is None and self.tok.padding is not None:
            pad = self.tok.padding.get("pad_id")
        # Like transformers: the file's own padding/truncation settings are not applied to
        # single encodings (MiniLM's tokenizer.json pads everything to 128); pyedge pads per
        # batch and truncates with a report.
        self.tok.no_padding()
        self.tok.no_truncation()
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    @staticmethod
    def _json(p: Path) -> dict:
        if not p.is_file():
            return {}
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: unreadable ({e})") from None
        return d if isinstance(d, dict) else {}

    def token_id(self, key: str) -> int | None:
        s = self.special_tokens.get(key)
        return None if s is None else self.tok.token_to_id(s)

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True):
        return self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)


# --------------------------------------------------------------------------- chat templates
def _template_env():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: marks the assistant's text."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return _GEN_START + caller() + _GEN_END

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class ChatRenderer:
    """A tokenizer's chat template, rendered like transformers' apply_chat_template."""

    def __init__(self, tokenizer: TextTokenizer):
        import jinja2
        if not tokenizer.chat_template:
            raise DataError(f"{tokenizer.path.parent}: the tokenizer has no chat template "
                            "(tokenizer_config.json 'chat_template' or chat_template.jinja); "
                            "chat records need one")
        try:
            self.template = _template_env().from_string(tokenizer.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"{tokenizer.path.parent}: the chat template does not parse (line "
                            f"{e.lineno}: {e.message})") from None
        self.context = dict(tokenizer.special_tokens)
        self.has_generation = "generation" in tokenizer.chat_template and \
            "endgeneration" in tokenizer.chat_template

    def render(self, messages, add_generation_prompt=False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    tools=None, documents=None, **self.context)

    def render_with_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
        """(text, [(start, end) character spans of the assistant turns])."""
        text = self.render(messages)
        if self.has_generation:
            spans, out, pos, start = [], [], 0, None
            for ch in text:
                if ch == _GEN_START:
                    start = pos
                elif ch == _GEN_END:
                    spans.append((start, pos))
                else:
                    out.append(ch)
                    pos += 1
            return "".join(out), spans
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render(messages[:i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise ValueError("the chat template does not render the conversation's prefixes "
                                 "as prefixes of the whole, so the assistant turns cannot be "
                                 "located; add {% generation %} tags around them")
            spans.append((len(before), len(upto)))
        return text, spans


# --------------------------------------------------------------------------- records
@dataclass
class _Seq:
    ids: list
    labels: list | int | None  # per-token (causal) or a class id
    type_ids: list | None = None
    truncated: int = 0         # tokens cut


@dataclass
class TextReport:
    kind: str
    records: int = 0
    sequences: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    cut_tokens: int = 0
    dropped: list = field(default_factory=list)  # (reason, count)
    padding: float = 0.0
    limit: int | None = None
    batch_size: int = 1

    def line(self, shown: str) -> str:
        parts = [f"{shown}: {self.records} {self.kind} records -> {self.sequences} sequences, "
                 f"{self.tokens:,} tokens ({self.loss_tokens:,} with loss)"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to {self.limit} tokens "
                         f"({self.cut_tokens:,} tokens cut)")
        else:
            parts.append("none truncated")
        for reason, n in self.dropped:
            parts.append(f"{n} skipped ({reason})")
        parts.append(f"padding {100 * self.padding:.1f}% at batch {self.batch_size}")
        return "; ".join(parts)


def detect_kind(path) -> str | None:
    """'txt', 'text', 'prompt', 'chat', 'classify' for text data; None for token ids."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext == ".txt":
        return "txt"
    if ext == ".csv" and p.is_file():
        with open(p, newline="", encoding="utf-8") as fh:
            try:
                header = [h.strip() for h in next(csv.reader(fh))]
            except (StopIteration, csv.Error, UnicodeDecodeError):
                return None
        return "classify" if "text" in header else None
    if ext in (".jsonl", ".ndjson") and p.is_file():
        with open(p, "rb") as fh:
            for raw in fh:
                if raw.strip():
                    try:
                        rec = json.loads(raw)
                    except (ValueError, UnicodeDecodeError):
                        return None  # data.py reports the bad line
                    return _record_kind(rec)
    return None


def _record_kind(rec) -> str | None:
    if not isinstance(rec, dict) or "input_ids" in rec:
        return None
    if "messages" in rec:
        return "chat"
    if "prompt" in rec and "completion" in rec:
        return "prompt"
    if "text" in rec:
        return "classify" if ("label" in rec or "labels" in rec) else "text"
    return None


def _records(p: Path, shown: str, kind: str):
    """(line number, record dict) of a jsonl/csv file."""
    if p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            try:
                for rec in reader:
                    if rec and any((v or "").strip() for v in rec.values()):
                        yield reader.line_num, rec
            except csv.Error as e:
                raise DataError(f"{shown}:{reader.line_num}: {e}") from None
        return
    with open(p, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{shown}:{lineno}: not a valid JSON record "
                                f"({getattr(e, 'msg', e)}); truncated or corrupt line?") from None
            if not isinstance(rec, dict):
                raise DataError(f"{shown}:{lineno}: a record must be a JSON object, got "
                                f"{type(rec).__name__}")
            yield lineno, rec


def _need_str(shown, lineno, rec, key):
    v = rec.get(key)
    if not isinstance(v, str):
        got = "missing" if v is None else type(v).__name__
        raise DataError(f"{shown}:{lineno}: '{key}' must be a string ({got}; record keys: "
                        f"{', '.join(rec)})")
    return v


def _check_messages(shown, lineno, msgs):
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{shown}:{lineno}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{shown}:{lineno}: message {i} must be an object with a 'role'")
        if m["role"] not in KNOWN_ROLES:
            raise DataError(f"{shown}:{lineno}: message {i} has unknown role '{m['role']}' "
                            f"(known: {', '.join(KNOWN_ROLES)})")
        c = m.get("content")
        if not (isinstance(c, str) or (c is None and m["role"] == "assistant")):
            raise DataError(f"{shown}:{lineno}: message {i} ({m['role']}) needs a string "
                            "'content'")
        if isinstance(c, str) and (_GEN_START in c or _GEN_END in c):
            raise DataError(f"{shown}:{lineno}: message {i} holds a private-use character "
                            "U+E000/U+E001 pyedge uses to mark assistant text")


def _spans_to_labels(ids, offsets, spans, ignore):
    labels = [ignore] * len(ids)
    for t, (a, b) in enumerate(offsets):
        if b <= a:
            continue
        for s, e in spans:
            if a < e and b > s:
                labels[t] = ids[t]
                break
    return labels


def _label_id(shown, lineno, v, label2id):
    if isinstance(v, str):
        s = v.strip()
        if label2id and s in label2id:
            return int(label2id[s])
        try:
            f = float(s)
        except ValueError:
            known = f" (config.json label2id: {', '.join(label2id)})" if label2id else ""
            raise DataError(f"{shown}:{lineno}: label {v!r} is not a class id{known}") from None
        v = f
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
        raise DataError(f"{shown}:{lineno}: label {v!r} is not an integer class id")
    return int(v)


# --------------------------------------------------------------------------- model facts
def model_facts(session, model_path=None) -> tuple[int | None, int | None, dict]:
    """(vocabulary size, max positions, config.json) of the model: the export's metadata,
    config.json next to the model, the causal-LM output width or the embedding on input_ids."""
    g = session.graph
    meta = getattr(g, "metadata", {}) or {}
    config = {}
    if model_path:
        cp = Path(model_path).parent / "config.json"
        if cp.is_file():
            try:
                config = json.loads(cp.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                config = {}
    vocab = int(meta["pyedge.vocab_size"]) if meta.get("pyedge.vocab_size") else None
    pos = int(meta["pyedge.max_positions"]) if meta.get("pyedge.max_positions") else None
    if vocab is None and isinstance(config.get("vocab_size"), int):
        vocab = config["vocab_size"]
    if pos is None:
        for k in ("max_position_embeddings", "n_positions", "max_seq_len"):
            if isinstance(config.get(k), int):
                pos = config[k]
                break
    if vocab is None:
        for n in g.nodes:
            if n.op_type in ("Gather", "GatherBlockQuantized") and len(n.inputs) > 1 \
                    and n.inputs[1] == "input_ids" \
                    and n.inputs[0] in g.initializers:
                vocab = int(g.initializers[n.inputs[0]].shape[0])
                break
    return vocab, pos, config


# --------------------------------------------------------------------------- loading
def load_text_dataset(path, spec: DataSpec, tokenizer: TextTokenizer, *, kind: str,
                      seq_len: int | None = None, pack: bool | None = None,
                      max_positions: int | None = None, vocab_size: int | None = None,
                      label2id: dict | None = None, require_labels: bool = True,
                      batch_size: int = 1) -> Dataset:
    """Tokenizes a text data file for `spec` (see the module docstring); DataError on a problem."""
    p = Path(path)
    shown = str(path)
    if not p.exists():
        raise DataError(f"{shown}: no such data file")
    if p.stat().st_size == 0:
        raise DataError(f"{shown}: the file is empty")
    if vocab_size and tokenizer.vocab_size > vocab_size:
        raise DataError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} tokens, the "
                        f"model's vocabulary {vocab_size}: not this model's tokenizer (pass the "
                        "right one with --tokenizer)")
    if seq_len and max_positions and seq_len > max_positions:
        raise DataError(f"--seq-len {seq_len} is longer than the model's {max_positions} "
                        "positions")
    per_token = spec.labels is not None and len(spec.labels.shape) >= 2
    if kind == "classify":
        if spec.labels is not None and per_token:
            raise DataError(f"{shown}: text with a class label needs a classifier (labels "
                            f"[batch]); the model's {spec.loss} loss takes per-token labels")
    elif spec.labels is not None and not per_token:
        raise DataError(f"{shown}: {kind} records train a causal LM (per-token labels); the "
                        f"model's output '{spec.output}' gives one label per record: use "
                        "text,label records for a classifier")
    elif spec.loss not in (None, "causal_lm"):
        raise DataError(f"{shown}: {kind} records need --loss causal_lm (labels are the "
                        f"next tokens), not {spec.loss}")
    if pack is None:
        pack = kind == "txt"
    if pack and kind not in ("txt", "text"):
        raise DataError(f"{shown}: --pack applies to plain text (.txt or {{\"text\"}} records), "
                        f"not {kind} records (their loss masks would mix)")
    limit = seq_len or max_positions
    if pack and limit is None:
        raise DataError(f"{shown}: packing text needs --seq-len (the model's positions are "
                        "unknown)")
    if pack and not seq_len:
        limit = min(limit, DEFAULT_PACK_LEN)
    ignore = spec.ignore_index
    rep = TextReport(kind=kind, limit=limit, batch_size=batch_size)
    try:
        seqs = _build(p, shown, kind, tokenizer, ignore, label2id, require_labels, spec, rep,
                      limit if kind == "classify" else None)
    except UnicodeDecodeError as e:
        raise DataError(f"{shown}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not seqs:
        raise DataError(f"{shown}: no records" + "".join(f"; {n} skipped ({r})"
                                                        for r, n in rep.dropped))
    if pack:
        seqs = _pack(seqs, limit, ignore)
    elif limit:
        seqs = [_truncate(s, limit, ignore) for s in seqs]
        cut = [s for s in seqs if s.truncated]
        rep.truncated, rep.cut_tokens = len(cut), sum(s.truncated for s in cut)
        if kind in ("prompt", "chat"):
            empty = [s for s in seqs if all(v == ignore for v in s.labels[1:])]
            if empty:
                seqs = [s for s in seqs if any(v != ignore for v in s.labels[1:])]
                rep.dropped.append((f"nothing to learn left after truncation to {limit} tokens",
                                    len(empty)))
                if not seqs:
                    raise DataError(f"{shown}: every record lost its trained tokens to "
                                    f"truncation at {limit} tokens; raise --seq-len")
    return _dataset(shown, seqs, spec, tokenizer, seq_len if not pack else limit, per_token,
                    rep, kind)


def _build(p, shown, kind, tok: TextTokenizer, ignore, label2id, require_labels, spec, rep,
           cls_limit=None):
    import jinja2
    seqs: list[_Seq] = []
    if kind == "txt":
        text = p.read_text(encoding="utf-8", errors="strict") if p.stat().st_size else ""
        docs = [d.strip("\n") for d in text.replace("\r\n", "\n").split("\n\n")]
        docs = [d for d in docs if d.strip()]
        rep.records = len(docs)
        for enc in tok.encode_batch(docs):
            ids = _with_eos(list(enc.ids), tok)
            seqs.append(_Seq(ids, list(ids)))
        return seqs
    renderer = ChatRenderer(tok) if kind == "chat" else None
    rows = list(_records(p, shown, kind))
    rep.records = len(rows)
    if kind in ("text", "classify"):
        texts = []
        for lineno, rec in rows:
            if kind == "text" and _record_kind(rec) not in ("text", "classify"):
                raise DataError(f"{shown}:{lineno}: record has no 'text' (keys: {', '.join(rec)})")
            texts.append(_need_str(shown, lineno, rec, "text"))
        encs = tok.encode_batch(texts)
        cuts = [0] * len(encs)
        long = [i for i, e in enumerate(encs) if cls_limit and len(e.ids) > cls_limit]
        if kind == "classify" and long:
            # the tokenizer's own truncation keeps [CLS] ... [SEP] whole
            tok.tok.enable_truncation(max_length=cls_limit)
            try:
                short = tok.encode_batch([texts[i] for i in long])
            finally:
                tok.tok.no_truncation()
            for i, e in zip(long, short):
                cuts[i] = len(encs[i].ids) - len(e.ids)
                encs[i] = e
        for (lineno, rec), enc, cut in zip(rows, encs, cuts):
            if kind == "text":
                ids = _with_eos(list(enc.ids), tok)
                types = list(enc.type_ids) + [0] * (len(ids) - len(enc.ids))  # + the EOS
                seqs.append(_Seq(ids, list(ids), types))
                continue
            lk = "label" if "label" in rec else ("labels" if "labels" in rec else None)
            if lk is None or rec.get(lk) in (None, ""):
                if require_labels and spec.labels is not None:
                    raise DataError(f"{shown}:{lineno}: record has no 'label' (keys: "
                                    f"{', '.join(rec)})")
                lab = 0
            else:
                lab = _label_id(shown, lineno, rec[lk], label2id)
            seqs.append(_Seq(list(enc.ids), lab, list(enc.type_ids), cut))
        return seqs
    for lineno, rec in rows:
        if kind == "prompt":
            prompt = _need_str(shown, lineno, rec, "prompt")
            completion = _need_str(shown, lineno, rec, "completion")
            a = tok.encode(prompt, add_special_tokens=True)
            b = _with_eos(tok.encode(completion, add_special_tokens=False), tok)
            seqs.append(_Seq(a + b, [ignore] * len(a) + b))
            continue
        msgs = rec.get("messages")
        _check_messages(shown, lineno, msgs)
        if not any(m["role"] == "assistant" for m in msgs):
            rep.dropped.append(("no assistant turn", 1))
            continue
        try:
            text, spans = renderer.render_with_spans(msgs)
        except jinja2.TemplateError as e:
            raise DataError(f"{shown}:{lineno}: the chat template failed: "
                            f"{type(e).__name__}: {e}") from None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise DataError(f"{shown}:{lineno}: the chat template failed: {e}") from None
        enc = tok.tok.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        seqs.append(_Seq(ids, _spans_to_labels(ids, enc.offsets, spans, ignore)))
    # merge the per-record "no assistant turn" notes into one count
    notes: dict[str, int] = {}
    for r, n in rep.dropped:
        notes[r] = notes.get(r, 0) + n
    rep.dropped = list(notes.items())
    return seqs


def _with_eos(ids: list, tok: TextTokenizer) -> list:
    if tok.eos_id is not None and (not ids or ids[-1] != tok.eos_id):
        ids = ids + [tok.eos_id]
    return ids


def _truncate(s: _Seq, limit: int, ignore) -> _Seq:
    if len(s.ids) <= limit:
        return s
    lab = s.labels[:limit] if isinstance(s.labels, list) else s.labels
    return _Seq(s.ids[:limit], lab, s.type_ids[:limit] if s.type_ids else None,
                len(s.ids) - limit)


def _pack(seqs: list[_Seq], n: int, ignore) -> list[_Seq]:
    ids = [t for s in seqs for t in s.ids]
    return [_Seq(ids[i:i + n], ids[i:i + n]) for i in range(0, len(ids), n)]


def _dataset(shown, seqs, spec: DataSpec, tok: TextTokenizer, fixed_len, per_token, rep, kind):
    names = spec.input_names
    known = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    other = [n for n in names if n not in known]
    if other:
        raise DataError(f"{shown}: text data feeds {', '.join(known)}; the model also takes "
                        f"{', '.join(other)}")
    if "input_ids" not in names:
        raise DataError(f"{shown}: the model has no 'input_ids' input to feed text to (inputs: "
                        f"{', '.join(names)})")
    fields: dict[str, list] = {n: [] for n in names}
    labels = []
    for s in seqs:
        n = len(s.ids)
        row = {"input_ids": np.asarray(s.ids, np.int64), "attention_mask": np.ones(n, np.int64),
               "token_type_ids": np.asarray(s.type_ids if s.type_ids else [0] * n, np.int64),
               "position_ids": np.arange(n, dtype=np.int64)}
        for k in names:
            fields[k].append(row[k])
        if spec.labels is not None:
            labels.append(np.asarray(s.labels, np.int64))
    if labels:
        fields[LABELS] = labels
    pad_values = {n: (tok.pad_id if n == "input_ids" else 0) for n in names}
    pad_values[LABELS] = spec.ignore_index if per_token else 0
    # report: tokens, tokens with loss (the causal shift never scores position 0), padding
    lens = np.asarray([len(s.ids) for s in seqs])
    rep.sequences = len(seqs)
    rep.tokens = int(lens.sum())
    if per_token:
        rep.loss_tokens = int(sum(np.count_nonzero(np.asarray(s.labels[1:]) != spec.ignore_index)
                                  for s in seqs))
    else:
        rep.loss_tokens = len(seqs)
    if fixed_len:
        slots = len(seqs) * fixed_len
    else:
        b = max(1, rep.batch_size)
        slots = sum(int(lens[i:i + b].max()) * len(lens[i:i + b]) for i in range(0, len(lens), b))
    rep.padding = 1.0 - rep.tokens / slots if slots else 0.0
    out: dict = {}
    for k, rows in fields.items():
        if k == LABELS and not per_token:
            out[k] = np.asarray(rows, np.int64)
        elif fixed_len:
            out[k] = _pad(rows, pad_values[k], fixed_len, np.int64 if k == LABELS else
                          _input_dtype(spec, k))
        else:
            out[k] = [r.astype(_input_dtype(spec, k), copy=False) if k != LABELS else r
                      for r in rows]
    ds = Dataset(shown, out, spec, pad_values=pad_values, seq_len=fixed_len)
    ds.summary = rep.line(shown)
    ds.report = rep
    return ds


def _input_dtype(spec: DataSpec, name: str):
    for s in spec.inputs:
        if s.name == name:
            return s.dtype
    return "int64"


def load_text(session, path, *, model=None, tokenizer=None, seq_len=None, pack=None,
              require_labels=True, batch_size=1, spec: DataSpec | None = None) -> Dataset | None:
    """The text Dataset of `path` for `session`, or None when `path` holds token ids (then
    pyedge/data.py reads it). The tokenizer comes from `tokenizer` or the model's folder."""
    kind = detect_kind(path)
    if kind is None:
        return None
    spec = spec or DataSpec.from_session(session)
    tpath = find_tokenizer(model, tokenizer)
    if tpath is None:
        where = f" next to {model}" if model else ""
        raise DataError(f"{path} holds text, but there is no tokenizer.json{where}: pass "
                        "--tokenizer PATH (pyedge export --hf writes it beside the model)")
    tok = TextTokenizer(tpath)
    vocab, pos, config = model_facts(session, model)
    label2id = config.get("label2id") if isinstance(config.get("label2id"), dict) else None
    return load_text_dataset(path, spec, tok, kind=kind, seq_len=seq_len, pack=pack,
                             max_positions=pos, vocab_size=vocab, label2id=label2id,
                             require_labels=require_labels, batch_size=batch_size)


__all__ = ["TextTokenizer", "ChatRenderer", "find_tokenizer", "detect_kind", "load_text",
           "load_text_dataset", "model_facts", "KNOWN_ROLES"]
