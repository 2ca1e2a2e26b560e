import os
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the repo root, for `models`
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name, exporter, **kw) -> (onnx path, torch module, example inputs); cached."""
    cache = {}
    root = tmp_path_factory.mktemp("exports")

    def get(name, exporter="torchscript", **kw):
        key = (name, exporter, tuple(sorted(kw.items())))
        if key not in cache:
            from models import reference
            from models.export_reference import export
            model, inputs, in_names, out_names, dyn = reference.FACTORIES[name](**kw)
            path = root / f"{name}_{exporter}_{len(cache)}.onnx"
            export(model, inputs, str(path), exporter=exporter, input_names=in_names,
                   output_names=out_names, dynamic_axes=dyn)
            cache[key] = (str(path), model, inputs)
        return cache[key]
    return get
