"""pyedge: fine-tune ONNX models on edge devices with sparse backprop and LoRA."""
from pyedge import _core
from pyedge._core import PyedgeError, UnsupportedOpError

__version__ = "0.1.0"
