"""pyedge: fine-tune ONNX models on edge devices with sparse backprop and LoRA."""
from pyedge import _core
from pyedge._core import PyedgeError, UnsupportedOpError
from pyedge.adapters import LoraConfig
from pyedge.onnx_import import ModelLoadError, load_onnx
from pyedge.optim import SGD, AdamW
from pyedge.session import TrainingSession

__version__ = "0.1.0"
__all__ = ["TrainingSession", "LoraConfig", "AdamW", "SGD", "load_onnx", "PyedgeError",
           "UnsupportedOpError", "ModelLoadError"]
