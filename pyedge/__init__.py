"""pyedge: fine-tune ONNX models on edge devices with sparse backprop and LoRA."""
import os as _os
import platform as _platform

from pyedge.core_variant import load_core as _load_core
from pyedge.cpu_defaults import core_load_env, cpu_flags

with core_load_env():  # variables libgomp and OpenBLAS read when they load
    # pyedge._core: the build of the core for this CPU's instruction set (core_variant.py)
    _core = _load_core(_os.environ, cpu_flags(), _platform.machine())
from pyedge._core import OutOfMemoryError, PyedgeError, UnsupportedOpError  # noqa: E402
from pyedge.adapters import (FourierFTConfig, HRAConfig, IA3Config, LNTuningConfig, LoraConfig,
                             MissConfig, VeraConfig)
from pyedge.generate import Generator, generate  # the function; the module stays importable
from pyedge.mezo import MeZO
from pyedge.onnx_import import ModelLoadError, load_onnx
from pyedge.optim import SGD, AdamW
from pyedge.quantize import quantize  # the function; the module stays importable by `from`
from pyedge.session import TrainingSession

__version__ = "0.1.0"
__all__ = ["TrainingSession", "LoraConfig", "IA3Config", "HRAConfig", "MissConfig", "VeraConfig",
           "FourierFTConfig", "LNTuningConfig", "AdamW", "SGD", "MeZO", "load_onnx", "PyedgeError",
           "UnsupportedOpError", "ModelLoadError", "OutOfMemoryError", "quantize", "Generator",
           "generate"]


def __getattr__(name):
    # `pyedge.torch` (workstation helpers) imports torch, so it loads only when asked for.
    if name == "torch":
        import importlib
        return importlib.import_module("pyedge.torch")
    raise AttributeError(f"module 'pyedge' has no attribute {name!r}")
