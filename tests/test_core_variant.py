"""The core's per-instruction-set builds: which one loads (pyedge/core_variant.py), and the
kernel tests passing on every variant this machine can run, not only the one chosen."""
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import pyedge
from pyedge.core_variant import (BASELINE, X86_LEVELS, CoreVariantError, _X86_V3, _X86_V4,
                                 choose)
from pyedge.cpu_defaults import cpu_flags

ROOT = Path(__file__).resolve().parent.parent
ALL = lambda stem: True  # noqa: E731  (every variant built)


def test_auto_picks_the_best_level_the_cpu_has():
    env = {}
    assert choose(env, _X86_V4, "x86_64", ALL) == X86_LEVELS[0][:2]
    assert choose(env, _X86_V3 | {"avx512f"}, "x86_64", ALL) == ("x86-64-v3", "_core_x86_64_v3")
    assert choose(env, frozenset({"sse2", "avx2"}), "x86_64", ALL) == BASELINE
    assert choose(env, frozenset(), "x86_64", ALL) == BASELINE  # flags unknown: play safe
    # ARM (and anything else) has one build
    assert choose(env, _X86_V4, "aarch64", ALL) == BASELINE


def test_auto_skips_levels_that_were_not_built():
    only_v3 = lambda stem: stem == "_core_x86_64_v3"  # noqa: E731
    assert choose({}, _X86_V4, "x86_64", only_v3) == ("x86-64-v3", "_core_x86_64_v3")
    assert choose({}, _X86_V4, "x86_64", lambda stem: False) == BASELINE


def test_override_names_a_level():
    assert choose({"PYEDGE_CORE_VARIANT": "baseline"}, _X86_V4, "x86_64", ALL) == BASELINE
    assert choose({"PYEDGE_CORE_VARIANT": " X86-64-V3 "}, _X86_V4, "x86_64",
                  ALL) == ("x86-64-v3", "_core_x86_64_v3")
    assert choose({"PYEDGE_CORE_VARIANT": "auto"}, _X86_V3, "x86_64",
                  ALL) == ("x86-64-v3", "_core_x86_64_v3")


@pytest.mark.parametrize("env, flags, machine, built, message", [
    ("x86-64-v4", _X86_V3, "x86_64", ALL, "lacks avx512bw, avx512cd, avx512dq, avx512f"),
    ("x86-64-v4", _X86_V4, "x86_64", lambda s: False, "built without that variant"),
    ("x86-64-v3", _X86_V4, "aarch64", ALL, "aarch64 CPU, not x86-64"),
    ("avx512", _X86_V4, "x86_64", ALL, "not one of: auto, baseline, x86-64-v4, x86-64-v3"),
])
def test_override_that_cannot_run_is_a_clear_error(env, flags, machine, built, message):
    with pytest.raises(CoreVariantError, match=message):
        choose({"PYEDGE_CORE_VARIANT": env}, flags, machine, built)


def _built(stem):
    return importlib.util.find_spec(f"pyedge.{stem}") is not None


def _runnable_levels():
    """(level, stem) of every variant built here whose instructions this CPU has."""
    flags = cpu_flags()
    out = [BASELINE] if _built(BASELINE[1]) else []
    out += [(lv, stem) for lv, stem, needs in X86_LEVELS if needs <= flags and _built(stem)]
    return out


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=600)


def test_the_loaded_core_is_the_automatic_choice():
    level, stem = choose(os.environ, cpu_flags(), platform.machine(), _built)
    assert Path(pyedge._core.__file__).name.startswith(stem + ".")
    assert pyedge._core.__name__ == "pyedge._core"
    assert sys.modules["pyedge._core"] is pyedge._core
    if stem != BASELINE[1]:  # the one-file builds say baseline, native or their -march
        assert pyedge._core.simd_info()["target"] == level


@pytest.mark.parametrize("level, stem", _runnable_levels())
def test_each_variant_loads_as_pyedge_core(level, stem):
    r = _run("import pyedge; from pyedge import _core; import pyedge._core as c; "
             "assert c is _core is pyedge._core; i = _core.simd_info(); "
             "print(_core.__file__.rsplit('/', 1)[1], i['target'], i['backend'])",
             PYEDGE_CORE_VARIANT=level)
    assert r.returncode == 0, r.stderr
    name, target, backend = r.stdout.split()
    assert name.startswith(stem + ".")
    if level != "baseline":
        assert target == level
        assert backend == {"x86-64-v3": "avx2", "x86-64-v4": "avx512"}[level]


# The suites whose kernels change with the vector width (SIMD, attention, small/skinny GEMMs,
# GELU/LayerNorm/softmax, LoRA), each against its references, on the variants not chosen here.
KERNEL_TESTS = ["tests/test_simd.py", "tests/test_op_attention.py", "tests/test_ops_matmul.py",
                "tests/test_ops_fd.py", "tests/test_ops_norm_reduce.py",
                "tests/test_ops_elementwise.py", "tests/test_fusions.py"]


@pytest.mark.parametrize("level, stem", [v for v in _runnable_levels()
                                         if not Path(pyedge._core.__file__).name
                                         .startswith(v[1] + ".")])
def test_kernel_suites_pass_on_the_other_variants(level, stem):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *KERNEL_TESTS], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYEDGE_CORE_VARIANT": level}, timeout=1800)
    tail = "\n".join(r.stdout.splitlines()[-15:])
    assert r.returncode == 0, f"{level}:\n{tail}\n{r.stderr[-2000:]}"
    assert " passed" in tail and "failed" not in tail
