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


# A test that needs a reference package the machine lacks (torch, onnxruntime, ... on a device)
# is skipped with the reason instead of failing: the suite runs anywhere.
def _skip_if_missing_reference(outcome):
    from optional_deps import missing_reference
    exc = outcome.excinfo[1] if outcome.excinfo else None
    pkg = missing_reference(exc) if exc is not None else None
    if pkg is not None:
        outcome.force_exception(pytest.skip.Exception(f"needs {pkg} (not installed)",
                                                      _use_item_location=True))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    outcome = yield
    _skip_if_missing_reference(outcome)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    _skip_if_missing_reference(outcome)
