"""Hostile or broken adapter folders: every reader refuses them with one line naming the file
and the tensor/key, and a refused load changes nothing (parameters, optimizer state, step
counters compared with np.array_equal before/after). F16/BF16/F64 files are accepted and
converted to float32. The strict safetensors reader agrees with the safetensors package on
valid files.

Readers covered: TrainingSession.load_adapters (every case), `pyedge eval --adapters` and
`pyedge merge` (CLI, in-process), pyedge.torch.load_adapters (when torch is installed)."""
import json
import math
import os
import re
import shutil

import numpy as np
import pytest

import pyedge
from pyedge.demo import make_sensor_data, model_path
from pyedge.export.adapter_files import AdapterError, read_adapter_folder, read_safetensors

P = "base_model.model."
A0, B0 = P + "layers.0.lora_A.weight", P + "layers.0.lora_B.weight"
A2, B2 = P + "layers.2.lora_A.weight", P + "layers.2.lora_B.weight"
HW, HB = P + "layers.4.weight", P + "layers.4.bias"
CFG, WTS = "adapter_config.json", "adapter_model.safetensors"


# ----------------------------------------------------------------------------------- helpers
def make_session(seed=0):
    return pyedge.TrainingSession(
        str(model_path()), lora=pyedge.LoraConfig(r=4, alpha=8, target_modules=[
            "layers.0", "layers.2"], seed=seed), train=["layers.4.*"],
        optimizer=pyedge.AdamW(lr=1e-2), seed=seed)


def trained(seed, steps):
    s = make_session(seed)
    x, y = make_sensor_data(32 * steps, seed=seed + 10, target=True)
    for i in range(steps):
        s.step([x[32 * i:32 * (i + 1)]], y[32 * i:32 * (i + 1)])
    return s


def snapshot(s):
    return ({k: v.copy() for k, v in s.trainable_parameters().items()},
            {k: {kk: vv.copy() for kk, vv in d.items()} for k, d in s.optimizer_state().items()},
            s.step_count, s.micro_steps)


def assert_unchanged(s, snap):
    params, optim, steps, micro = snap
    now = s.trainable_parameters()
    assert sorted(now) == sorted(params)
    for k in params:
        assert np.array_equal(now[k], params[k]), k
    st = s.optimizer_state()
    for k, d in optim.items():
        for kk, v in d.items():
            assert np.array_equal(st[k][kk], v), (k, kk)
    assert (s.step_count, s.micro_steps) == (steps, micro)


_DT = {"F32": ("<f4", 4), "F16": ("<f2", 2), "F64": ("<f8", 8), "I64": ("<i8", 8),
       "I32": ("<i4", 4), "BF16": (None, 2)}


def st_bytes(tensors, dtypes=None, header_edit=None):
    """safetensors bytes written by hand (any dtype, BF16 too); `dtypes` {key: "F16"...}."""
    dtypes = dtypes or {}
    header, blobs, pos = {}, [], 0
    for k in sorted(tensors):
        a = np.asarray(tensors[k])
        dt = dtypes.get(k, "F32")
        if dt == "BF16":  # round to nearest even on the upper 16 bits
            u = a.astype("<f4").view("<u4").astype(np.uint64)
            raw = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")).tobytes()
        else:
            raw = a.astype(_DT[dt][0]).tobytes()
        header[k] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    if header_edit:
        header_edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + b"".join(blobs)


def bf16_of(a):
    u = np.asarray(a, "<f4").view("<u4").astype(np.uint64)
    return ((((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype("<u4")).view("<f4")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid folder from a session trained 3 steps (seed 1): (folder, config, tensors)."""
    folder = tmp_path_factory.mktemp("good") / "ad"
    trained(1, 3).save_adapters(str(folder))
    cfg = json.loads((folder / CFG).read_text())
    from safetensors.numpy import load_file
    return folder, cfg, load_file(str(folder / WTS))


def variant(good, tmp_path, config=None, tensors=None, dtypes=None, raw=None, header_edit=None):
    """A copy of the good folder with the config and/or tensors changed."""
    src, cfg, ts = good
    dst = tmp_path / "ad"
    shutil.copytree(src, dst)
    if config is not None:
        c = config(json.loads(json.dumps(cfg)))
        (dst / CFG).write_text(c if isinstance(c, str) else json.dumps(c))
    if tensors is not None or dtypes is not None or header_edit is not None:
        t = tensors({k: v.copy() for k, v in ts.items()}) if tensors else dict(ts)
        (dst / WTS).write_bytes(st_bytes(t, dtypes, header_edit))
    if raw is not None:
        raw(dst)
    return dst


def put(key, value):
    def f(t):
        t[key] = value
        return t
    return f


def drop(*keys):
    return lambda t: {k: v for k, v in t.items() if k not in keys}


def cfg_set(**kw):
    return lambda c: {**c, **kw}


def poison(key, value, index=0):
    def f(t):
        t[key].reshape(-1)[index] = value
        return t
    return f


def _symlink_out(name):
    def f(dst):
        outside = dst.parent / ("outside_" + name)
        shutil.copy(dst / name, outside)
        os.remove(dst / name)
        os.symlink(outside, dst / name)
    return f


def _truncate(dst):
    data = (dst / WTS).read_bytes()
    (dst / WTS).write_bytes(data[:-100])


def _fifo(dst):
    os.remove(dst / WTS)
    os.mkfifo(dst / WTS)


def _nan_json(dst):  # json.dumps writes NaN; the file then has a bare NaN literal
    c = json.loads((dst / CFG).read_text())
    c["lora_alpha"] = float("nan")
    (dst / CFG).write_text(json.dumps(c))


def _raw_st(header: str, data: bytes) -> bytes:
    h = header.encode()
    return len(h).to_bytes(8, "little") + h + data


def _overlap(h):
    h[B0]["data_offsets"] = [0, h[B0]["data_offsets"][1] - h[B0]["data_offsets"][0]]


# (id, variant kwargs, file the message names, regex the message matches)
CASES = [
    ("nan_lora", dict(tensors=poison(A0, np.nan)), WTS, r"layers\.0\.lora_A\.weight'.*non-finite"),
    ("inf_whole", dict(tensors=poison(HW, -np.inf, 5)), WTS, r"layers\.4\.weight'.*non-finite"),
    ("f64_overflow", dict(tensors=lambda t: {**t, B2: np.full(t[B2].shape, 1e300)},
                          dtypes={B2: "F64"}), WTS,
     r"layers\.2\.lora_B\.weight'.*non-finite"),
    ("bf16_nan", dict(tensors=poison(A2, np.nan), dtypes={A2: "BF16"}), WTS,
     r"layers\.2\.lora_A\.weight'.*non-finite"),
    ("int_lora", dict(tensors=lambda t: {**t, A0: np.ones((4, 8), np.int64)}, dtypes={A0: "I64"}),
     WTS, r"layers\.0\.lora_A\.weight' is int64.*floating point"),
    ("int_whole", dict(tensors=put(HB, np.arange(4)), dtypes={HB: "I32"}), WTS,
     r"layers\.4\.bias' is int32, the model's tensor"),
    ("r_zero", dict(config=cfg_set(r=0)), CFG, r"r must be an integer >= 1, got 0"),
    ("r_string", dict(config=cfg_set(r="4")), CFG, r"r must be an integer >= 1, got '4'"),
    ("alpha_negative", dict(config=cfg_set(lora_alpha=-8)), CFG, r"lora_alpha must be a finite "
     r"positive number, got -8"),
    ("alpha_zero", dict(config=cfg_set(lora_alpha=0)), CFG, r"lora_alpha .* got 0"),
    ("alpha_nan", dict(raw=_nan_json), CFG, r"lora_alpha .* got nan"),
    ("rank_pattern_zero", dict(config=cfg_set(rank_pattern={"layers.2": 0})), CFG,
     r"rank_pattern\['layers.2'\] must be an integer >= 1"),
    ("rank_pattern_backtracking", dict(config=cfg_set(rank_pattern={"(l+)+$": 4})), CFG,
     r"rank_pattern pattern '\(l\+\)\+\$' is refused .*catastrophic backtracking"),
    ("target_regex_invalid", dict(config=cfg_set(target_modules="layers.(0")), CFG,
     r"target_modules pattern 'layers.\(0' is not a valid regex"),
    ("wrong_shape_lora", dict(tensors=lambda t: {**t, A0: np.zeros((4, 7), np.float32)}), WTS,
     r"layers\.0\.lora_A\.weight' has shape \[4, 7\], expected \[4, 8\]"),
    ("wrong_shape_whole", dict(tensors=put(HW, np.zeros((4, 63), np.float32))), WTS,
     r"layers\.4\.weight' has shape \[4, 63\]"),
    ("not_a_pair", dict(tensors=put(B0, np.zeros((64, 3), np.float32))), WTS,
     r"layers\.0\.lora_A\.weight' \[4, 8\] and .*lora_B\.weight' \[64, 3\] are not a LoRA pair"),
    ("missing_lora_B", dict(tensors=drop(B2)), WTS, r"layers\.2\.lora_B\.weight' is missing"),
    ("missing_module", dict(tensors=drop(A2, B2), config=cfg_set(target_modules=["layers.0"])),
     WTS, r"no LoRA tensors for module 'layers\.2'"),
    ("missing_whole", dict(tensors=drop(HB)), WTS, r"trained tensors missing.*layers\.4\.bias"),
    ("extra_whole_strict", dict(tensors=put(P + "layers.4.extra", np.ones(3, np.float32))), WTS,
     r"layers\.4\.extra' matches no tensor of the model"),
    ("extra_lora_module", dict(tensors=lambda t: {**t, P + "layers.9.lora_A.weight": t[A0],
                                                  P + "layers.9.lora_B.weight": t[B0]}), WTS,
     r"layers\.9\.lora_A\.weight' adapts module 'layers\.9', which target_modules"),
    ("whole_outside_modules_to_save", dict(config=cfg_set(modules_to_save=None)), WTS,
     r"layers\.4\..*' is neither LoRA nor in a module that modules_to_save"),
    ("rank_vs_config", dict(config=cfg_set(r=8)), WTS,
     r"layers\.0\.lora_A\.weight' has rank 4 .*adapter_config\.json says r=8"),
    ("targets_vs_keys", dict(config=cfg_set(target_modules=["layers.0"])), WTS,
     r"layers\.2\.lora_A\.weight' adapts module 'layers\.2', which target_modules"),
    ("targets_but_no_lora", dict(tensors=drop(A0, B0, A2, B2)), WTS,
     r"no LoRA tensors, but adapter_config\.json targets"),
    ("method_boft", dict(config=cfg_set(peft_type="BOFT")), CFG, r"peft_type is 'BOFT'"),
    ("method_oft", dict(config=cfg_set(peft_type="OFT")), CFG, r"peft_type is 'OFT'"),
    ("dora", dict(config=cfg_set(use_dora=True)), CFG, r"DoRA"),
    ("dora_tensor", dict(tensors=put(P + "layers.0.lora_magnitude_vector", np.ones(64))), WTS,
     r"layers\.0\.lora_magnitude_vector'.*unsupported LoRA tensor"),
    ("config_not_json", dict(config=lambda c: "{'r': 4,"), CFG, r"not valid JSON"),
    ("config_not_object", dict(config=lambda c: [c]), CFG, r"expected a JSON object, got list"),
    ("target_modules_type", dict(config=cfg_set(target_modules=[1, 2])), CFG,
     r"target_modules must be"),
    ("symlink_weights_out", dict(raw=_symlink_out(WTS)), WTS, r"outside the adapter folder"),
    ("symlink_config_out", dict(raw=_symlink_out(CFG)), CFG, r"outside the adapter folder"),
    ("truncated", dict(raw=_truncate), WTS, r"layers\.4\.weight'.*truncated file"),
    ("fifo", dict(raw=_fifo), WTS, r"not a regular file"),
    ("header_garbage", dict(raw=lambda d: (d / WTS).write_bytes(b"\xff" * 64)), WTS,
     r"truncated or not a safetensors file"),
    ("duplicate_key", dict(raw=lambda d: (d / WTS).write_bytes(_raw_st(
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        '"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4))), WTS,
     r"duplicate key 'a'"),
    ("overlapping_offsets", dict(header_edit=_overlap), WTS, r"overlaps the tensor before it"),
    ("unknown_dtype", dict(header_edit=lambda h: h[A0].update(dtype="F8_E4M3")), WTS,
     r"layers\.0\.lora_A\.weight': dtype 'F8_E4M3' is not supported"),
    ("trailing_bytes", dict(raw=lambda d: open(d / WTS, "ab").write(b"\0" * 8)), WTS,
     r"8 bytes after the last tensor"),
]


@pytest.mark.parametrize("kw,fname,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_session_refuses_and_stays_unchanged(good, tmp_path, kw, fname, pattern):
    folder = variant(good, tmp_path, **kw)
    victim = trained(2, 2)            # its own adapters and AdamW moments, step 2
    snap = snapshot(victim)
    with pytest.raises(AdapterError) as e:
        victim.load_adapters(str(folder))
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert fname in msg, msg
    assert re.search(pattern, msg), msg
    assert_unchanged(victim, snap)


def test_cases_are_many_kinds():
    assert len(CASES) >= 15


@pytest.mark.parametrize("dt", ["F16", "BF16", "F64"])
def test_narrow_and_wide_floats_accepted_as_float32(good, tmp_path, dt):
    _, _, ts = good
    folder = variant(good, tmp_path, dtypes={k: dt for k in ts})
    s = make_session(5)
    s.load_adapters(str(folder))
    conv = {"F16": lambda a: a.astype(np.float16).astype(np.float32), "BF16": bf16_of,
            "F64": lambda a: a}[dt]
    p = s.trainable_parameters()
    for k, a in ts.items():
        name = k[len(P):]
        assert p[name].dtype == np.float32 and np.array_equal(p[name], conv(a)), k


def test_good_folder_loads_exactly(good):
    folder, _, ts = good
    s = make_session(7)
    s.load_adapters(str(folder))
    p = s.trainable_parameters()
    assert all(np.array_equal(p[k[len(P):]], v) for k, v in ts.items())


def test_symlink_inside_the_folder_is_fine(good, tmp_path):
    def inside(dst):
        os.rename(dst / WTS, dst / "real.safetensors")
        os.symlink("real.safetensors", dst / WTS)
    make_session().load_adapters(str(variant(good, tmp_path, raw=inside)))


def test_strict_reader_agrees_with_safetensors(tmp_path):
    from safetensors.numpy import load_file, save_file
    rng = np.random.default_rng(0)
    ts = {"f32": rng.standard_normal((3, 5)).astype(np.float32),
          "f16": rng.standard_normal(7).astype(np.float16),
          "f64": rng.standard_normal((2, 2)),
          "i64": rng.integers(-9, 9, (4,)), "u8": rng.integers(0, 255, (2, 3)).astype(np.uint8),
          "b": np.array([True, False]), "empty": np.zeros((0, 3), np.float32),
          "scalar": np.array(2.5, np.float32)}
    save_file(ts, str(tmp_path / "x.safetensors"))
    ref = load_file(str(tmp_path / "x.safetensors"))
    got = read_safetensors(str(tmp_path / "x.safetensors"))
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        want = v.astype(np.float32) if v.dtype.kind == "f" else v
        assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
        assert np.array_equal(got[k], want), k


def test_bf16_read_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    t = torch.randn(4, 6) * 100
    save_file({"w": t.to(torch.bfloat16)}, str(tmp_path / "b.safetensors"))
    got = read_safetensors(str(tmp_path / "b.safetensors"))["w"]
    assert np.array_equal(got, t.to(torch.bfloat16).to(torch.float32).numpy())


# ----------------------------------------------------------------------------- other readers
SOME = ["nan_lora", "int_whole", "r_zero", "alpha_nan", "wrong_shape_whole", "rank_vs_config",
        "method_oft", "symlink_weights_out", "truncated", "extra_lora_module"]


def _case(name):
    return next(c for c in CASES if c[0] == name)


@pytest.mark.parametrize("name", SOME)
def test_cli_eval_and_merge_refuse(good, tmp_path, capsys, name):
    from pyedge.cli import main
    _, kw, fname, _ = _case(name)
    folder = variant(good, tmp_path, **kw)
    x, y = make_sensor_data(16, seed=3, target=True)
    np.savez(tmp_path / "d.npz", x=x, labels=y)
    out = tmp_path / "merged.onnx"
    for argv in (["eval", str(model_path()), "--adapters", str(folder), "--data",
                  str(tmp_path / "d.npz")],
                 ["merge", str(model_path()), "--adapters", str(folder), "-o", str(out)]):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("pyedge: error:") and "\n" not in err and fname in err, err
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if "merge" in f]


def test_merge_overflow_refused(good, tmp_path):
    from pyedge.export import merge_adapters

    def huge(t):
        t[A0] = np.full_like(t[A0], 1e30)
        t[B0] = np.full_like(t[B0], 1e30)
        return t
    folder = variant(good, tmp_path, tensors=huge)
    with pytest.raises(AdapterError, match=r"merging into .* gives non-finite weights"):
        merge_adapters(str(model_path()), str(folder), str(tmp_path / "m.onnx"))
    assert not (tmp_path / "m.onnx").exists()


def test_eval_path_refuses_before_building_a_session(good, tmp_path):
    from pyedge.train import session_from_adapters
    folder = variant(good, tmp_path, config=cfg_set(r=0))
    with pytest.raises(AdapterError, match="r must be an integer"):
        session_from_adapters(str(model_path()), str(folder))


@pytest.mark.parametrize("name", SOME + ["not_a_pair", "whole_outside_modules_to_save"])
@pytest.mark.parametrize("use_peft", [False, True])
def test_torch_load_adapters_refuses_and_leaves_model(good, tmp_path, name, use_peft):
    torch = pytest.importorskip("torch")
    if use_peft:
        pytest.importorskip("peft")
    import pyedge.torch as pt
    from pyedge.demo import torch_model
    _, kw, fname, _ = _case(name)
    folder = variant(good, tmp_path, **kw)
    torch.manual_seed(0)
    model = torch_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError) as e:
        pt.load_adapters(model, str(folder), use_peft=use_peft, merge=not use_peft)
    assert "\n" not in str(e.value) and fname in str(e.value)
    after = model.state_dict()
    assert sorted(after) == sorted(before)  # no LoRA layers injected
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_torch_shape_mismatch_refused_before_peft(good, tmp_path):
    """A folder that is consistent in itself but made for a wider model."""
    torch = pytest.importorskip("torch")
    import pyedge.torch as pt
    from pyedge.demo import torch_model

    def wider(t):
        t[A0] = np.zeros((4, 9), np.float32)
        return t
    folder = variant(good, tmp_path, tensors=wider)
    model = torch_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"delta of shape \[64, 9\], the weight of "
                                           r"'layers\.0' is \[64, 8\]"):
        pt.load_adapters(model, str(folder), use_peft=False, merge=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_read_adapter_folder_reports_one_error_per_call(good, tmp_path):
    """Sanity for the shared reader: the good folder reads back, a bad one names the tensor."""
    ad = read_adapter_folder(good[0])
    assert sorted(ad.lora) == ["layers.0", "layers.2"] and sorted(ad.whole) == [
        "layers.4.bias", "layers.4.weight"]
    assert math.isclose(ad.config["lora_alpha"], 8)
