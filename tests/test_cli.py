"""The `pyedge` command as a user runs it (subprocess `python -m pyedge ...`), including wrong
inputs: each must end with one line `pyedge: error: ...`, a non-zero exit and no traceback.
The --help texts and the long train/eval/merge run call pyedge.cli.main in this process
(tests/cli_inproc.py: the same exit codes, stdout and stderr, without ~2 s of interpreter
start-up per call); every other case keeps its own process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cli_inproc import run_cli

ROOT = Path(__file__).resolve().parents[1]


def has_loss():
    from pyedge import _core
    return "pyedge.CrossEntropyLoss" in _core.registered_ops()


requires_loss = pytest.mark.skipif(not has_loss(), reason="pyedge.CrossEntropyLoss not in this build")


def run(*args, cwd=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYEDGE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "pyedge", *map(str, args)], cwd=cwd or ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def fails(r, code, *needles):
    """One error line naming the cause, the right exit code, no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyedge: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def model():
    from pyedge.demo import model_path
    return str(model_path())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data files for the demo model (x float32 [N, 8] -> 4 classes) and broken models."""
    d = tmp_path_factory.mktemp("cli")
    from pyedge.demo import make_sensor_data
    x, y = make_sensor_data(200, seed=1, target=True)
    np.savez(d / "train.npz", x=x, labels=y)
    np.savez(d / "wrong_name.npz", inputs=x, labels=y)
    np.savez(d / "wrong_shape.npz", x=x[:, :7], labels=y)
    np.savez(d / "wrong_dtype.npz", x=np.array([["a"] * 8] * 4), labels=y[:4])
    np.savez(d / "bad_labels.npz", x=x, labels=np.where(np.arange(200) == 17, 9, y))
    (d / "truncated.jsonl").write_text(
        json.dumps({"x": x[0].tolist(), "labels": 1}) + "\n" + '{"x": [0.1, 0.2')
    (d / "corrupt.onnx").write_bytes(np.random.default_rng(0).bytes(3000))
    # a model with an op pyedge has no kernel for: y = det(x @ proj.weight)
    w = numpy_helper.from_array(np.eye(2, dtype=np.float32), "proj.weight")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "proj.weight"], ["h"], name="proj_matmul"),
         helper.make_node("Det", ["h"], ["y"], name="det_node")], "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, d / "det.onnx")
    np.savez(d / "det.npz", x=np.ones((4, 2, 2), np.float32), labels=np.zeros(4, np.float32))
    return d


# --------------------------------------------------------------------------- help & usage
@pytest.mark.parametrize("cmd", ["export", "inspect", "train", "eval", "merge", "demo"])
def test_help(cmd):
    r = run_cli(cmd, "--help")
    assert r.returncode == 0 and "usage: pyedge " + cmd in r.stdout


def test_usage_errors(model, files):
    fails(run(), 2, "required: COMMAND")
    fails(run("train", model, "--data", files / "train.npz", "--bogus"), 2, "--bogus")
    fails(run("train", model, "--data", files / "train.npz", "--lora-r", "x"), 2, "--lora-r")
    fails(run("train", model, "--data", files / "train.npz"), 2, "nothing to train")
    fails(run("train", "--data", files / "train.npz"), 2, "no model given")
    fails(run("train", model, "--target", "nosuchmodule", "--data", files / "train.npz"), 2,
          "no module matches LoRA targets", "layers.0")


# --------------------------------------------------------------------------- inspect
def test_inspect(model):
    r = run("inspect", model)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "x: float32 [?, 8]" in out and "logits: float32 [?, 4]" in out
    assert "Gemm x3" in out and "unsupported ops: none" in out
    assert "layers.0  Gemm [64, 8]" in out
    r = run("inspect", model, "--target", "all-linear", "--train", "layers.4.*", "--lora-r", "2", "--json")
    rep = json.loads(r.stdout)
    assert rep["trainable"]["lora_modules"] == ["layers.0", "layers.2"]
    assert rep["trainable"]["parameters"] == 2 * (8 + 64) + 2 * (64 + 64) + 64 * 4 + 4
    if has_loss():
        assert rep["plan"]["total_bytes"] > rep["plan"]["weight_bytes"] > 0
    # Gemm layers: no exported chain to fuse; the head's Gemm reads into the loss
    assert rep["trainable"]["fusions"] == {"linear_cross_entropy": 1}
    r = run("inspect", model, "--target", "all-linear", "--lora-r", "2")
    assert "fused chains: linear_cross_entropy x1; GEMM kernels: OpenBLAS " in r.stdout, r.stdout
    import pyedge
    info = pyedge._core.simd_info()
    assert f"; core build: {info['target']} ({info['backend']}, " in r.stdout, r.stdout


def test_inspect_lists_unsupported_ops(files):
    r = run("inspect", files / "det.onnx")
    assert r.returncode == 0, r.stderr
    assert "Det x1: det_node" in r.stdout


# --------------------------------------------------------------------------- broken inputs
def test_missing_and_corrupt_model(files, tmp_path):
    for cmd in (["train", files / "nope.onnx", "--data", files / "train.npz", "--target", "q"],
                ["inspect", files / "nope.onnx"], ["eval", files / "nope.onnx", "--data", files / "train.npz"]):
        fails(run(*cmd), 1, "nope.onnx", "no such model file")
    fails(run("inspect", files / "corrupt.onnx"), 1, "corrupt.onnx", "not a valid ONNX file")
    fails(run("train", files / "corrupt.onnx", "--data", files / "train.npz", "--target", "q",
              "--out", tmp_path / "o"), 1, "not a valid ONNX file")


def test_missing_data(model, tmp_path):
    fails(run("train", model, "--data", tmp_path / "none.npz", "--target", "layers.0", "--out",
              tmp_path / "o"), 1, "none.npz: no such data file")


def test_unsupported_op(files, tmp_path):
    line = fails(run("train", files / "det.onnx", "--data", files / "det.npz", "--target", "proj",
                     "--loss", "mse", "--out", tmp_path / "o", "--no-progress"), 1, "unsupported op")
    if "pyedge.MSELoss" in __import__("pyedge")._core.registered_ops():
        assert "Det" in line and "det_node" in line


@pytest.mark.parametrize("data,needles", [
    ("wrong_name.npz", ["wrong_name.npz", "no array 'x' for model input 'x'", "inputs, labels"]),
    ("wrong_shape.npz", ["wrong_shape.npz", "array 'x' has shape (200, 7)", "dim 1 must be 8"]),
    ("wrong_dtype.npz", ["wrong_dtype.npz", "array 'x' has dtype <U1", "needs float32"]),
    ("bad_labels.npz", ["bad_labels.npz", "label 9 (record 17) is out of range", "4 classes (0..3)"]),
    ("truncated.jsonl", ["truncated.jsonl:2", "not a valid JSON record"]),
])
def test_data_errors(model, files, tmp_path, data, needles):
    fails(run("train", model, "--data", files / data, "--target", "layers.0", "--out",
              tmp_path / "o"), 1, *needles)
    fails(run("eval", model, "--data", files / data), 1, *needles)


def test_config_file_errors(model, files, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('lora_rank = 4\n')
    fails(run("train", model, "--config", bad, "--data", files / "train.npz"), 2, "unknown option 'lora_rank'")
    bad.write_text('lr = "fast"\n')
    fails(run("train", model, "--config", bad, "--data", files / "train.npz"), 2, "'lr' must be float")
    bad.write_text('lr = [\n')
    fails(run("train", model, "--config", bad, "--data", files / "train.npz"), 2, "invalid TOML")


def test_export_and_merge_errors(model, files, tmp_path):
    r = run("merge", model, "--adapters", tmp_path / "nothing", "-o", tmp_path / "m.onnx")
    fails(r, 1, "nothing: no such adapters directory")
    r = run("export", "no_such_pkg.mod:factory", "-o", tmp_path / "m.onnx")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(files):
    r = run("--debug", "inspect", files / "corrupt.onnx")
    assert r.returncode != 0 and "Traceback" in r.stderr


# --------------------------------------------------------------------------- a real run
@requires_loss
def test_train_eval_merge(model, files, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[train]\ndata = "{files / "train.npz"}"\ntarget = ["layers.0", "layers.2"]\n'
                   'train = "layers.4.*"\nlora-r = 4\nmax_steps = 50\nbatch_size = 16\nlr = 0.01\n'
                   'schedule = "cosine"\nwarmup_steps = 5\nsave_every = 20\n')
    out = tmp_path / "run"
    r = run_cli("train", model, "--config", cfg, "--max-steps", "30", "--eval-data",
            files / "train.npz", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "trained 30 steps" in r.stdout            # the flag overrides the config file
    assert "step 30/30" in r.stderr                  # plain progress lines when not a TTY
    assert (out / "checkpoints" / "step-30").is_dir() and (out / "checkpoints" / "step-20").is_dir()
    cfg_used = json.loads((out / "config.json").read_text())
    assert cfg_used["lora_r"] == 4 and cfg_used["max_steps"] == 30
    r = run_cli("eval", model, "--adapters", out / "adapters", "--data", files / "train.npz", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    base = json.loads(run_cli("eval", model, "--data", files / "train.npz", "--json").stdout)
    assert res["accuracy"] > base["accuracy"] + 0.2
    r = run_cli("eval", model, "--adapters", out / "checkpoints" / "step-20", "--data", files / "train.npz")
    assert r.returncode == 0 and "accuracy" in r.stdout
    fails(run_cli("train", model, "--config", cfg, "--out", out), 2, "--resume")
    r = run_cli("merge", model, "--adapters", out / "adapters", "-o", tmp_path / "merged.onnx")
    try:
        import pyedge.export.merge  # noqa: F401
    except ImportError:
        fails(r, 1, "pyedge.export")
    else:
        assert r.returncode == 0, r.stderr


@requires_loss
def test_nonfinite_loss_exit_code(model, files, tmp_path):
    out = tmp_path / "nan"
    r = run("train", model, "--data", files / "train.npz", "--target", "layers.0", "--lr", "1e30",
            "--optimizer", "sgd", "--max-grad-norm", "0", "--max-steps", "20", "--out", out,
            "--no-progress")
    fails(r, 1, "non-finite loss", "--skip-nonfinite")
    r = run("train", model, "--data", files / "train.npz", "--target", "layers.0", "--lr", "1e30",
            "--optimizer", "sgd", "--max-grad-norm", "0", "--max-steps", "20", "--out",
            tmp_path / "skip", "--skip-nonfinite", "--no-progress")
    assert r.returncode == 0 and "non-finite steps skipped" in r.stdout


def tiny_lm(path, vocab=20, dim=8):
    """input_ids [B, S] -> Gather(emb) -> MatMul(lm_head.weight) -> logits [B, S, vocab]."""
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.normal(size=(vocab, dim)).astype(np.float32), "emb.weight")
    head = numpy_helper.from_array(rng.normal(size=(dim, vocab)).astype(np.float32) * 0.1,
                                   "lm_head.weight")
    g = helper.make_graph(
        [helper.make_node("Gather", ["emb.weight", "input_ids"], ["h"], name="embed"),
         helper.make_node("MatMul", ["h", "lm_head.weight"], ["logits"], name="lm_head")], "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        [emb, head])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@requires_loss
def test_causal_lm_from_jsonl(tmp_path):
    from pyedge import _core
    if "Gather" not in _core.registered_ops():
        pytest.skip("Gather not in this build")
    model = tiny_lm(tmp_path / "lm.onnx")
    rng = np.random.default_rng(1)
    # a learnable pattern: each token is followed by (token + 1) % 20; varying lengths
    lines = []
    for i in range(64):
        start, n = int(rng.integers(0, 20)), int(rng.integers(3, 12))
        lines.append(json.dumps({"input_ids": [(start + k) % 20 for k in range(n)]}))
    (tmp_path / "lm.jsonl").write_text("\n".join(lines) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input_ids": [1, 2, 25]}) + "\n")
    fails(run("train", model, "--data", bad, "--target", "lm_head", "--loss", "causal_lm",
              "--out", tmp_path / "b"), 1, "bad.jsonl:1: label 25 is out of range", "20 classes")
    r = run("train", model, "--data", tmp_path / "lm.jsonl", "--eval-data", tmp_path / "lm.jsonl",
            "--target", "lm_head", "--lora-r", "4", "--loss", "causal_lm", "--pad-id", "0",
            "--batch-size", "8", "--max-steps", "60", "--lr", "0.05", "--out", tmp_path / "run",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    ev = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
          if json.loads(l)["type"] == "eval"][-1]
    assert ev["accuracy"] > 0.5


@requires_loss
def test_device_path_needs_no_torch(model, files, tmp_path):
    """train / eval / inspect / demo (without the check) run with torch unimportable."""
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from pyedge.cli import main
args = ["train", {str(model)!r}, "--data", {str(files / "train.npz")!r}, "--target", "layers.0",
        "--max-steps", "5", "--out", {str(tmp_path / "run")!r}, "-q"]
assert main(args) == 0
assert main(["eval", {str(model)!r}, "--adapters", {str(tmp_path / "run" / "adapters")!r},
             "--data", {str(files / "train.npz")!r}]) == 0
assert main(["inspect", {str(model)!r}, "--target", "all-linear"]) == 0
assert main(["demo", "--out", {str(tmp_path / "demo")!r}, "--steps", "20", "--no-torch-check"]) == 0
print("OK", [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft")])
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "OK []" in r.stdout
