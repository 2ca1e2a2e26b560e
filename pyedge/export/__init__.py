"""Getting models and adapters out of pyedge.

* `save_adapters` / `load_adapters` (pyedge.export.peft): PEFT-format adapters
  (adapter_config.json + adapter_model.safetensors); numpy + safetensors only.
* `merge_adapters` (pyedge.export.merge): fold adapters into an ONNX file for onnxruntime.
* `export_module` (pyedge.export.torch_export, needs torch): nn.Module -> ONNX with the
  parameter map in its metadata. Imported lazily so the device path never imports torch.
"""
from pyedge.export.merge import merge_adapters
from pyedge.export.peft import load_adapters, read_adapters, save_adapters

__all__ = ["save_adapters", "load_adapters", "read_adapters", "merge_adapters",
           "export_module", "load_factory"]


def __getattr__(name):
    if name in ("export_module", "load_factory", "load_factory_spec", "build_param_map"):
        from pyedge.export import torch_export
        return getattr(torch_export, name)
    raise AttributeError(f"module 'pyedge.export' has no attribute '{name}'")
