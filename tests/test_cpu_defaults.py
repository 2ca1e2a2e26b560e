"""The environment pyedge sets for its native libraries while the core loads
(pyedge/cpu_defaults.py): OpenBLAS's kernel family and libgomp's spin."""
import os
import platform
import subprocess
import sys

import pytest

from pyedge import cpu_defaults
from pyedge.cpu_defaults import blas_coretype, core_load_env, cpu_flags

AVX512 = frozenset({"fpu", "avx2", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
AVX2 = frozenset({"fpu", "avx2", "fma"})


def test_blas_coretype_rules():
    assert blas_coretype({}, AVX512, "x86_64") == "SkylakeX"
    # a machine-wide pin to older kernels does not reach pyedge's own OpenBLAS
    assert blas_coretype({"OPENBLAS_CORETYPE": "Haswell"}, AVX512, "x86_64") == "SkylakeX"
    assert blas_coretype({}, AVX2, "x86_64") is None                   # OpenBLAS decides
    assert blas_coretype({}, AVX512 - {"avx512bw"}, "x86_64") is None  # Knights Landing-like
    assert blas_coretype({}, frozenset({"fp", "asimd"}), "aarch64") is None
    # pyedge's own variable wins: a family, or "auto" for OpenBLAS's choice
    assert blas_coretype({"PYEDGE_BLAS_CORETYPE": "Haswell"}, AVX512, "x86_64") == "Haswell"
    assert blas_coretype({"PYEDGE_BLAS_CORETYPE": "auto"}, AVX512, "x86_64") is None


def test_core_load_env_puts_the_users_value_back():
    env = {"OPENBLAS_CORETYPE": "Haswell"}
    with core_load_env(env, flags=AVX512, machine="x86_64") as core:
        assert core == "SkylakeX" and env["OPENBLAS_CORETYPE"] == "SkylakeX"
    assert env["OPENBLAS_CORETYPE"] == "Haswell"
    assert env["GOMP_SPINCOUNT"] == "10000"
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    with core_load_env(env, flags=AVX2, machine="x86_64") as core:
        assert core is None and "OPENBLAS_CORETYPE" not in env
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}  # the user's wait policy, no spin added
    env = {}
    with core_load_env(env, flags=AVX512, machine="x86_64"):
        pass
    assert "OPENBLAS_CORETYPE" not in env


def test_cpu_flags_reads_cpuinfo(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f\n\n"
                 "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(p)) == {"fpu", "avx2", "avx512f"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def _core_type(env):
    code = ("import os, pyedge; print(pyedge._core.blas_core(), "
            "os.environ.get('OPENBLAS_CORETYPE', '-'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], out[1]


# the machine too, as blas_coretype checks it: under qemu-user /proc/cpuinfo is the x86 host's
@pytest.mark.skipif(not (cpu_defaults._AVX512 <= cpu_flags()) or
                    platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="needs an x86-64 AVX-512 CPU")
def test_the_core_gets_the_avx512_kernels_and_the_process_keeps_its_setting():
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell")
    env.pop("PYEDGE_BLAS_CORETYPE", None)
    assert _core_type(env) == ("SkylakeX", "Haswell")
    assert _core_type(dict(env, PYEDGE_BLAS_CORETYPE="auto")) == ("Haswell", "Haswell")
