"""The onnxruntime-training peer lives in its own virtual environment.

onnxruntime-training 1.19.2 (the last release) needs onnx==1.16.2 and imports torch, so it
cannot share the main environment (onnx 1.23). This module creates ``bench/.venv-ort`` with

    onnxruntime-training==1.19.2 onnx==1.16.2 torch==2.13.0 "numpy<2"

(torch pinned: an unpinned torch pulls the CUDA build, gigabytes). Run it directly:

    python -m bench.ort_env            # create if missing, then check the import
    python -m bench.ort_env --print    # only print the commands
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".venv-ort")
PACKAGES = ["onnxruntime-training==1.19.2", "onnx==1.16.2", "torch==2.13.0", "numpy<2"]
CHECK = "import onnxruntime.training.api, onnxruntime.training.artifacts, onnx; print(onnx.__version__)"


def python_path(venv: str = VENV) -> str:
    return os.path.join(venv, "bin", "python")


def commands(venv: str = VENV) -> list[list[str]]:
    py = python_path(venv)
    return [[sys.executable, "-m", "venv", venv],
            [py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
            [py, "-m", "pip", "install", *PACKAGES]]


def how_to(venv: str = VENV) -> str:
    return "\n".join("    " + " ".join(f'"{c}"' if "<" in c else c for c in cmd)
                     for cmd in commands(venv))


def is_ready(venv: str = VENV) -> bool:
    py = python_path(venv)
    if not os.path.exists(py):
        return False
    r = subprocess.run([py, "-c", CHECK], capture_output=True, text=True)
    return r.returncode == 0


def ensure(venv: str = VENV, create: bool = True, quiet: bool = False) -> str | None:
    """Path of the venv's python, creating the venv if missing (when `create`); None if unusable."""
    if is_ready(venv):
        return python_path(venv)
    if not create:
        if not quiet:
            print(f"onnxruntime-training environment missing at {venv}; create it with:\n"
                  + how_to(venv), file=sys.stderr)
        return None
    print(f"creating {venv} (onnxruntime-training 1.19.2, ~300 MB wheel + torch CPU) ...",
          file=sys.stderr)
    for cmd in commands(venv):
        r = subprocess.run(cmd)
        if r.returncode != 0:
            print("failed: " + " ".join(cmd) + "\nto do it by hand:\n" + how_to(venv),
                  file=sys.stderr)
            return None
    return python_path(venv) if is_ready(venv) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="create/check the onnxruntime-training venv")
    ap.add_argument("--venv", default=VENV)
    ap.add_argument("--print", action="store_true", help="only print the commands")
    a = ap.parse_args(argv)
    if a.print:
        print(how_to(a.venv))
        return 0
    py = ensure(a.venv)
    if py is None:
        return 1
    print(py)
    return 0


if __name__ == "__main__":
    sys.exit(main())
