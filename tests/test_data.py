"""Data loading and validation (pyedge/data.py): formats, one-line errors, batching, resume."""
import json

import numpy as np
import pytest

from pyedge.data import (BatchLoader, DataError, DataSpec, InputSpec, example_batch, iterate,
                         load_dataset)


def cls_spec(features=8, classes=4):
    return DataSpec([InputSpec("x", "float32", [-1, features])],
                    InputSpec("labels", "int64", [-1]), "cross_entropy", classes, "logits")


def tok_spec(vocab=50, per_token=False, loss="cross_entropy", seq=-1):
    lab = InputSpec("labels", "int64", [-1, seq] if per_token else [-1])
    return DataSpec([InputSpec("input_ids", "int64", [-1, seq]),
                     InputSpec("attention_mask", "int64", [-1, seq])], lab, loss,
                    vocab if loss == "causal_lm" else 3, "logits")


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def err(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- npz
def test_npz_roundtrip(tmp_path):
    x = np.arange(40, dtype=np.float64).reshape(5, 8)
    p = write_npz(tmp_path / "d.npz", x=x, labels=np.array([0, 1, 2, 3, 0]))
    ds = load_dataset(p, cls_spec())
    assert len(ds) == 5
    inputs, labels = ds.batch([4, 0])
    assert inputs["x"].dtype == np.float32 and inputs["x"].shape == (2, 8)
    assert labels.tolist() == [0, 0] and labels.dtype == np.int64


def test_npz_label_alias_and_column_labels(tmp_path):
    p = write_npz(tmp_path / "d.npz", x=np.zeros((3, 8)), label=np.array([[1], [2], [3]]))
    ds = load_dataset(p, cls_spec())
    assert ds.batch([0, 1, 2])[1].tolist() == [1, 2, 3]


@pytest.mark.parametrize("arrays,needle", [
    (dict(inp=np.zeros((3, 8)), labels=np.zeros(3, int)), "no array 'x' for model input 'x'"),
    (dict(x=np.zeros((3, 7)), labels=np.zeros(3, int)), "dim 1 must be 8"),
    (dict(x=np.zeros((3, 2, 8)), labels=np.zeros(3, int)), "rank 3"),
    (dict(x=np.array([["a"] * 8] * 3), labels=np.zeros(3, int)), "dtype <U1"),
    (dict(x=np.zeros((3, 8))), "no 'labels' array"),
    (dict(x=np.zeros((3, 8)), labels=np.array([0, 4, 1])), "label 4 (record 1) is out of range"),
    (dict(x=np.zeros((3, 8)), labels=np.array([0, -1, 1])), "label -1"),
    (dict(x=np.zeros((3, 8)), labels=np.array([0.5, 1, 1])), "non-integer"),
    (dict(x=np.zeros((3, 8)), labels=np.zeros(4, int)), "disagree on the number of records"),
    (dict(x=np.zeros((0, 8)), labels=np.zeros(0, int)), "no records"),
])
def test_npz_errors(tmp_path, arrays, needle):
    p = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as e:
        load_dataset(p, cls_spec())
    assert needle in err(e) and "bad.npz" in err(e)


def test_ignore_index_allowed(tmp_path):
    p = write_npz(tmp_path / "d.npz", x=np.zeros((2, 8)), labels=np.array([-100, 3]))
    assert len(load_dataset(p, cls_spec())) == 2


def test_npz_nonfinite(tmp_path):
    x = np.zeros((4, 8), np.float32)
    x[2, 3] = np.nan
    x[3, 0] = np.inf
    p = write_npz(tmp_path / "d.npz", x=x, labels=np.zeros(4, int))
    with pytest.raises(DataError) as e:
        load_dataset(p, cls_spec())
    assert "NaN/inf in 2 record(s) (first: record 2)" in err(e)
    ds = load_dataset(p, cls_spec(), skip_nonfinite=True)
    assert len(ds) == 2 and ds.skipped == 2


def test_npz_never_unpickles(tmp_path):
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = {"a": 1}, [2]
    p = tmp_path / "evil.npz"
    np.savez(p, x=obj, labels=np.zeros(2, int))
    with pytest.raises(DataError) as e:
        load_dataset(str(p), cls_spec())
    assert "pickled" in err(e)


def test_bad_files(tmp_path):
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "junk.npz").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "d.parquet").write_bytes(b"x")
    for name, needle in [("empty.npz", "empty"), ("junk.npz", "not a valid .npz"),
                         ("d.parquet", "unknown data format"), ("missing.npz", "no such data file")]:
        with pytest.raises(DataError) as e:
            load_dataset(str(tmp_path / name), cls_spec())
        assert needle in err(e)


def test_npy_directory_is_memory_mapped(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    np.save(d / "x.npy", np.ones((6, 8), np.float32))
    np.save(d / "labels.npy", np.arange(6) % 4)
    ds = load_dataset(str(d), cls_spec())
    assert isinstance(ds.fields["x"], np.memmap)
    inputs, labels = ds.batch([5, 1])
    assert labels.tolist() == [1, 1] and inputs["x"].shape == (2, 8)


# --------------------------------------------------------------------------- csv
def test_csv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b,label,c,d,e,f,g,h\n" + "\n".join(
        ",".join(str(v) for v in [i, 1.5, i % 4, 0, 0, 0, 0, 0, -1]) for i in range(5)) + "\n")
    ds = load_dataset(str(p), cls_spec())
    inputs, labels = ds.batch(np.arange(5))
    assert inputs["x"].shape == (5, 8) and inputs["x"][3, 0] == 3 and inputs["x"][0, 7] == -1
    assert labels.tolist() == [0, 1, 2, 3, 0]


@pytest.mark.parametrize("body,needle", [
    ("a,b,c,d,e,f,g,h,label\n1,2,3,4,5,6,7,8,0\n1,2,3\n", "d.csv:3: 3 fields, the header has 9"),
    ("a,b,c,d,e,f,g,h,label\n1,2,x,4,5,6,7,8,0\n", "d.csv:2: column 'c': 'x' is not a number"),
    ("a,b,c,d,e,f,g,h,label\n1,2,3,4,5,6,7,8,1.5\n", "not an integer class label"),
    ("a,b,c,d,e,f,g,label\n1,2,3,4,5,6,7,0\n", "dim 1 must be 8"),
    ("", "empty"),
    ("a,b,c,d,e,f,g,h,label\n", "no records"),
    ("a,b,c,d,e,f,g,h,label\n1,2,3,4,5,6,7,8,9\n", "label 9 (record 0) is out of range"),
])
def test_csv_errors(tmp_path, body, needle):
    p = tmp_path / "d.csv"
    p.write_text(body)
    with pytest.raises(DataError) as e:
        load_dataset(str(p), cls_spec())
    assert needle in err(e)


# --------------------------------------------------------------------------- jsonl
def write_jsonl(path, records, raw_tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + raw_tail)
    return str(path)


def test_jsonl_pads_to_longest_in_batch(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [
        {"input_ids": [5, 6, 7], "label": 1},
        {"input_ids": [8], "attention_mask": [1], "labels": 2},
        {"input_ids": [1, 2, 3, 4, 9], "labels": 0}])
    ds = load_dataset(p, tok_spec(), pad_id=99)
    inputs, labels = ds.batch([0, 1])
    assert inputs["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [1, 2]
    assert ds.batch([2])[0]["input_ids"].shape == (1, 5)


def test_jsonl_fixed_length_and_causal_labels(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    ds = load_dataset(p, tok_spec(per_token=True, loss="causal_lm"), seq_len=4, pad_id=0)
    inputs, labels = ds.batch([0, 1])
    assert inputs["input_ids"].shape == (2, 4)
    assert labels.tolist() == [[5, 6, 7, -100], [8, -100, -100, -100]]
    with pytest.raises(DataError) as e:
        load_dataset(p, tok_spec(per_token=True, loss="causal_lm"), seq_len=2)
    assert "d.jsonl:1: 3 tokens, longer than the fixed length 2" in err(e)


def test_jsonl_graph_fixed_length(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [1, 2], "labels": 0}])
    ds = load_dataset(p, tok_spec(seq=6))
    assert ds.batch([0])[0]["input_ids"].shape == (1, 6)


@pytest.mark.parametrize("records,tail,needle", [
    ([{"input_ids": [1, 2], "labels": 0}], '{"input_ids": [1, 2], "lab', "d.jsonl:2: not a valid JSON"),
    ([{"input_ids": [1, 2], "labels": 0}, [1, 2]], "", "d.jsonl:2: a record must be a JSON object"),
    ([{"tokens": [1, 2], "labels": 0}], "", "d.jsonl:1: record has no 'input_ids'"),
    ([{"input_ids": [1, 2], "labels": 7}], "", "d.jsonl:1: label 7 is out of range"),
    ([{"input_ids": [1, 2], "attention_mask": [1], "labels": 0}], "", "sequence lengths differ"),
    ([{"input_ids": [1.5, 2], "labels": 0}], "", "non-integer"),
    ([{"input_ids": ["a"], "labels": 0}], "", "must hold numbers"),
    ([{"input_ids": [1, 2]}], "", "d.jsonl:1: record has no 'labels'"),
])
def test_jsonl_errors(tmp_path, records, tail, needle):
    p = write_jsonl(tmp_path / "d.jsonl", records, tail)
    with pytest.raises(DataError) as e:
        load_dataset(p, tok_spec())
    assert needle in err(e)


def test_jsonl_empty(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_dataset(str(tmp_path / "d.jsonl"), tok_spec())
    (tmp_path / "d.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_dataset(str(tmp_path / "d.jsonl"), tok_spec())


# --------------------------------------------------------------------------- batching
def make_ds(tmp_path, n=10):
    p = write_npz(tmp_path / "d.npz", x=np.arange(n * 8, dtype=np.float32).reshape(n, 8),
                  labels=np.arange(n) % 4)
    return load_dataset(p, cls_spec())


def ids(batch):
    return (batch[0]["x"][:, 0] / 8).astype(int).tolist()


def test_loader_seeded_shuffle_and_partial_batch(tmp_path):
    ds = make_ds(tmp_path)
    a = BatchLoader(ds, 4, seed=3)
    b = BatchLoader(ds, 4, seed=3)
    assert a.batches_per_epoch == 3
    ea = [ids(a.next()) for _ in range(3)]
    assert [len(x) for x in ea] == [4, 4, 2]                      # last partial batch kept
    assert sorted(sum(ea, [])) == list(range(10))                 # a permutation
    assert ea == [ids(b.next()) for _ in range(3)]                # same seed, same order
    assert a.epoch == 1 and a.index == 0
    e2 = [ids(a.next()) for _ in range(3)]
    assert e2 != ea                                               # a new order each epoch
    c = BatchLoader(ds, 4, seed=4)
    assert [ids(c.next()) for _ in range(3)] != ea


def test_loader_drop_last_and_no_shuffle(tmp_path):
    ds = make_ds(tmp_path)
    a = BatchLoader(ds, 4, shuffle=False, drop_last=True)
    assert a.batches_per_epoch == 2
    assert [ids(a.next()) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchLoader(ds, 11, drop_last=True)


def test_loader_state_resumes_exactly(tmp_path):
    ds = make_ds(tmp_path)
    a = BatchLoader(ds, 3, seed=11)
    for _ in range(5):
        a.next()
    st = json.loads(json.dumps(a.state()))
    rest = [ids(a.next()) for _ in range(6)]
    b = BatchLoader(ds, 3, seed=11)
    b.load_state(st)
    assert [ids(b.next()) for _ in range(6)] == rest
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, 2, seed=11).load_state(st)


def test_iterate_and_example_batch(tmp_path):
    ds = make_ds(tmp_path, 5)
    assert [len(b[1]) for b in iterate(ds, 2)] == [2, 2, 1]
    ex = example_batch(tok_spec(), batch=1, seq_len=7)
    assert ex["input_ids"].shape == (1, 7) and ex["attention_mask"].sum() == 7


def test_spec_from_session():
    import pyedge
    from pyedge.demo import model_path
    s = pyedge.TrainingSession(str(model_path()), loss=None)
    spec = DataSpec.from_session(s, loss="cross_entropy")
    assert spec.input_names == ["x"] and spec.num_classes == 4
    assert spec.labels.dtype == "int64" and spec.labels.shape == [-1]
    mse = DataSpec.from_session(s, loss="mse")
    assert mse.labels.dtype == "float32" and mse.labels.shape == [-1, 4]
