"""Put on PYTHONPATH to run Python as a device does: the reference packages (torch,
transformers, peft, onnxruntime, ...) are not importable (tests/test_torch_free.py)."""
import sys

_BLOCKED = ("torch", "torchvision", "transformers", "peft", "onnxruntime", "onnxscript",
            "accelerate", "sentence_transformers")


class _BlockReferencePackages:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named '{name}' (blocked: {name})", name=name)
        return None


sys.meta_path.insert(0, _BlockReferencePackages())
