"""The suite on a device: torch, transformers, peft, onnxruntime and onnxscript unimportable
(tests/torch_free/sitecustomize.py blocks them, as on a board where they are not installed).
Everything must collect; what needs a missing reference skips with the reason, the rest runs
and passes."""
import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _run_blocked(*args, timeout):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(HERE, "torch_free")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--deselect", "tests/test_torch_free.py", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_blocker_blocks():
    env = dict(os.environ, PYTHONPATH=os.path.join(HERE, "torch_free"))
    r = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "blocked: torch" in r.stderr


def test_collects_without_reference_packages():
    r = _run_blocked("--collect-only", "tests", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "error" not in r.stdout.lower().splitlines()[-1], r.stdout[-2000:]
    assert re.search(r"\d+ tests? collected", r.stdout), r.stdout[-500:]


# Modules that never mention torch (nor transformers/peft, which need it) run whole below; of
# the others only the `arm64`-marked device tests run. Indirect imports (models.reference, a
# helper) are skipped by conftest's hook, which the collection test above covers for all.
_TORCH = re.compile(r"torch|transformers|peft")


def _modules():
    """(modules without any mention of torch, other modules with `arm64`-marked tests)."""
    free, marked = [], []
    for name in sorted(os.listdir(HERE)):
        if not (name.startswith("test_") and name.endswith(".py")) or name == "test_torch_free.py":
            continue
        src = open(os.path.join(HERE, name)).read()
        if not _TORCH.search(src):
            free.append("tests/" + name)
        elif "mark.arm64" in src:
            marked.append("tests/" + name)
    return free, marked


def _counts(r):
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    n = {k.rstrip("s") if k != "passed" else k: int(v)
         for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    return tail, n


def test_module_split_sees_torch_imports():
    free, marked = _modules()
    assert {"tests/test_simd.py", "tests/test_data.py"} <= set(free)
    assert {"tests/test_ops_elementwise.py", "tests/test_op_rotary.py"} <= set(marked)
    assert not {"tests/test_parity_torch.py", "tests/test_ops_conv.py"} & set(free + marked)


def test_device_tests_pass_without_reference_packages():
    """Without the reference packages: the device subset (`-m arm64`) of the modules that
    mention torch, and every module that does not, whole (not `slow`). The whole suite run
    blocked took 378 s of CI for what these show; collection of all of tests/ is the test
    above. Comparisons against onnxruntime skip, with the reason."""
    free, marked = _modules()
    r = _run_blocked("-rs", "-m", "arm64", *marked, timeout=900)
    tail, n = _counts(r)
    print("torch-free, arm64-marked:", tail)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert n.get("passed", 0) > 50 and not n.get("failed") and not n.get("error"), tail
    assert "needs onnxruntime (not installed)" in r.stdout  # the parity checks skip, saying why
    r = _run_blocked("-m", "not slow", *free, timeout=900)
    tail, n = _counts(r)
    print(f"torch-free modules ({len(free)}):", tail)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert n.get("passed", 0) > 100 and not n.get("failed") and not n.get("error"), tail
