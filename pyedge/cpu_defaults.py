"""Environment the core's native libraries read when they load (libgomp, OpenBLAS).
pyedge/__init__.py imports the core inside ``core_load_env()``."""
from __future__ import annotations

import os
import platform
from contextlib import contextmanager

# What OpenBLAS's AVX-512 kernels (its "SkylakeX" family) need.
_AVX512 = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """Feature flags of the first CPU listed (empty when unknown, e.g. not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def blas_coretype(environ, flags: frozenset[str], machine: str) -> str | None:
    """The OpenBLAS kernel family pyedge's GEMMs should use, or None for OpenBLAS's choice.

    PYEDGE_BLAS_CORETYPE decides when set ("auto": OpenBLAS's own detection and
    OPENBLAS_CORETYPE). Otherwise an x86-64 CPU with AVX-512 gets the AVX-512 kernels even
    when OPENBLAS_CORETYPE asks for older ones: machines pin it process-wide (this project's
    Zen 5 machine sets OPENBLAS_CORETYPE=Haswell), and pyedge's OpenBLAS is its own copy,
    where that pin halved the GEMM rate (about 250 against 480 GFLOP/s at 1024³)."""
    own = environ.get("PYEDGE_BLAS_CORETYPE", "").strip()
    if own:
        return None if own.lower() == "auto" else own
    if machine.lower() in ("x86_64", "amd64") and _AVX512 <= flags:
        return "SkylakeX"
    return None


@contextmanager
def core_load_env(environ=os.environ, flags: frozenset[str] | None = None,
                  machine: str | None = None):
    """Sets the variables for the duration of the core's import (OpenBLAS reads its core
    type once, when it loads); OPENBLAS_CORETYPE is put back afterwards, so libraries
    loaded later and child processes see the user's value."""
    # OpenMP workers spin briefly after a parallel loop, then sleep. Waking a sleeping worker
    # costs tens of microseconds per loop, which doubled the MLP step (0.12 -> 0.22 ms,
    # bench W2); spinning without bound wastes a core that another process needs. libgomp's
    # count is in pause-loop iterations (10000: well under a millisecond). A user's own
    # setting wins.
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = "10000"
    core = blas_coretype(environ, cpu_flags() if flags is None else flags,
                         platform.machine() if machine is None else machine)
    before = environ.get("OPENBLAS_CORETYPE")
    if core:
        environ["OPENBLAS_CORETYPE"] = core
    try:
        yield core
    finally:
        if core:
            if before is None:
                environ.pop("OPENBLAS_CORETYPE", None)
            else:
                environ["OPENBLAS_CORETYPE"] = before
