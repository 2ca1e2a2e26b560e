"""pyedge: fine-tune ONNX models on edge devices with sparse backprop and LoRA."""
import os

# OpenMP workers spin briefly after a parallel loop, then sleep. Waking a sleeping worker
# costs tens of microseconds per loop, which doubled the MLP step (0.12 -> 0.22 ms,
# bench W2); spinning without bound wastes a core that another process needs. libgomp's
# count is in pause-loop iterations (10000: well under a millisecond). Read when libgomp
# loads, so it is set before the core is imported; a user's own setting wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

from pyedge import _core  # noqa: E402
from pyedge._core import PyedgeError, UnsupportedOpError  # noqa: E402
from pyedge.adapters import LoraConfig
from pyedge.onnx_import import ModelLoadError, load_onnx
from pyedge.optim import SGD, AdamW
from pyedge.session import TrainingSession

__version__ = "0.1.0"
__all__ = ["TrainingSession", "LoraConfig", "AdamW", "SGD", "load_onnx", "PyedgeError",
           "UnsupportedOpError", "ModelLoadError"]


def __getattr__(name):
    # `pyedge.torch` (workstation helpers) imports torch, so it loads only when asked for.
    if name == "torch":
        import importlib
        return importlib.import_module("pyedge.torch")
    raise AttributeError(f"module 'pyedge' has no attribute {name!r}")
