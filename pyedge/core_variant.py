"""Which build of the compiled core this CPU runs, and loading it as ``pyedge._core``.

A portable x86-64 build carries the core several times, one file per instruction-set level:
``_core`` (the x86-64 baseline, SSE2), ``_core_x86_64_v3`` (AVX2, FMA) and
``_core_x86_64_v4`` (AVX-512). Each file is the same Python module ``_core``; this picks the
best level the CPU supports and loads that file under the name ``pyedge._core``, so the rest
of pyedge never knows. ARM builds and ``PYEDGE_NATIVE=ON`` builds have one file, ``_core``.

``PYEDGE_CORE_VARIANT`` overrides the choice: ``auto`` (default), ``baseline``,
``x86-64-v3`` or ``x86-64-v4``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

# /proc/cpuinfo flags each level needs, on top of the levels below it (the psABI's x86-64-v2,
# v3, v4; GCC's -march=x86-64-vN may use any of them). "abm" is how Linux names LZCNT.
_X86_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"})
_X86_V3 = _X86_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

# Best first: (level name, file stem, flags it needs).
X86_LEVELS = (("x86-64-v4", "_core_x86_64_v4", _X86_V4),
              ("x86-64-v3", "_core_x86_64_v3", _X86_V3))
BASELINE = ("baseline", "_core")


class CoreVariantError(ImportError):
    """The core build asked for cannot run here (not built, or the CPU lacks its instructions)."""


def choose(environ, flags: frozenset[str], machine: str, built) -> tuple[str, str]:
    """(level, file stem) of the core to load.

    built(stem) tells whether that file exists. Automatic choice: the best x86-64 level that
    is built and whose instructions the CPU has, else the baseline. A level named in
    PYEDGE_CORE_VARIANT must be built and supported, or this raises CoreVariantError."""
    want = environ.get("PYEDGE_CORE_VARIANT", "").strip().lower() or "auto"
    x86 = machine.lower() in ("x86_64", "amd64")
    if want == "auto":
        if x86:
            for level, stem, needs in X86_LEVELS:
                if needs <= flags and built(stem):
                    return level, stem
        return BASELINE
    if want == BASELINE[0]:
        return BASELINE
    for level, stem, needs in X86_LEVELS:
        if want == level:
            if not x86:
                raise CoreVariantError(f"PYEDGE_CORE_VARIANT={level}: this is a {machine} CPU, "
                                       "not x86-64")
            missing = sorted(needs - flags)
            if missing:
                raise CoreVariantError(f"PYEDGE_CORE_VARIANT={level}: this CPU lacks "
                                       f"{', '.join(missing)}; use auto or baseline")
            if not built(stem):
                raise CoreVariantError(f"PYEDGE_CORE_VARIANT={level}: this pyedge was built "
                                       f"without that variant (see PYEDGE_X86_LEVELS in "
                                       "CMakeLists.txt); use auto or baseline")
            return level, stem
    names = ", ".join(["auto", BASELINE[0]] + [lv for lv, _, _ in X86_LEVELS])
    raise CoreVariantError(f"PYEDGE_CORE_VARIANT={want!r} is not one of: {names}")


def _spec(stem: str):
    # find_spec, not a path next to this file: an editable install keeps the compiled files
    # apart from the sources, and only the import system knows where.
    try:
        return importlib.util.find_spec(f"pyedge.{stem}")
    except (ImportError, ValueError):
        return None


def load_core(environ, flags: frozenset[str], machine: str):
    """Imports the chosen core as ``pyedge._core`` and returns it."""
    level, stem = choose(environ, flags, machine, lambda s: _spec(s) is not None)
    if stem == BASELINE[1]:
        return importlib.import_module("pyedge._core")
    origin = _spec(stem).origin
    # The file's init function is PyInit__core: it must be loaded under a name ending in _core.
    spec = importlib.util.spec_from_file_location("pyedge._core", origin)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyedge._core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["pyedge._core"]
        raise
    return module
