"""Reference packages the tests compare against (torch, onnxruntime, ...) are optional: a device
(a Pi, the emulated aarch64 root) runs the suite without them. `optional("torch")` is the module
when it imports, else a stand-in whose use inside a test skips that test with the reason, so a
test module that mentions torch at import time (`F = torch.nn.functional`) still collects and its
torch-free tests still run. Imports inside tests need nothing: conftest.py turns a missing
reference package into a skip."""
from __future__ import annotations

import importlib

import pytest

# Packages the device path never needs; a test that needs one is skipped without it.
REFERENCE_PACKAGES = ("torch", "torchvision", "transformers", "peft", "onnxruntime", "onnxscript",
                      "accelerate", "sentence_transformers")


class _Missing:
    """Any attribute is another stand-in; calling one skips the running test."""

    def __init__(self, path: str):
        self._path = path

    def __getattr__(self, name: str) -> "_Missing":
        if name.startswith("__"):
            raise AttributeError(name)
        return _Missing(f"{self._path}.{name}")

    def __call__(self, *args, **kwargs):
        pytest.skip(f"needs {self._path.split('.')[0]} (not installed): {self._path}")

    def __bool__(self) -> bool:
        return False


def optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return _Missing(name)


def missing_reference(exc: BaseException) -> str | None:
    """The reference package an ImportError is about, or None for any other error."""
    if isinstance(exc, ImportError):
        top = (getattr(exc, "name", None) or "").split(".")[0]
        if top in REFERENCE_PACKAGES:
            return top
        msg = str(exc)
        for p in REFERENCE_PACKAGES:
            if f"'{p}'" in msg or f"blocked: {p}" in msg:
                return p
    return None
