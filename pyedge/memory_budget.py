"""Memory budgets: `max_memory=` sizes and what the process already holds.

The planner (csrc/graph/plan_recompute.cpp) recomputes activations in the backward until
    resident + parameters + gradients + optimizer state + arena + folded constants <= budget.
"resident" is what this process holds once training runs: its resident set when the session
is made (the interpreter, numpy, onnx, weights it copied) plus the memory-mapped weights, which
page in during the first step and then count in the resident set too (at least the weights'
size), plus RUNTIME_RESERVE.

Every plan of a session is made under the budget: training plans recompute to fit;
forward-only plans (run(), evaluation, plan_stats(training=False)) have nothing to recompute
and must fit as they are, counting the outputs copied out to the caller (run()'s logits exist
twice at its end), else the plan-time error names their minimum. A causal LM's evaluation
under a budget (or with large logits) goes through the fused loss
(TrainingSession.evaluate_loss), which never makes the logits.
Before the shared arena grows, the core checks what the system still has (MemAvailable, a
cgroup's headroom) and raises pyedge.OutOfMemoryError (a MemoryError) naming the bytes needed
and available instead of being killed (PYEDGE_TEST_MEM_AVAILABLE fakes the reading in tests).
"""
from __future__ import annotations

import re

# What a step allocates outside the plan: BLAS and thread buffers, the batch's arrays, Python
# objects (measured: VmHWM ran ~1.3 MiB over the planned peak on a small GPT-2).
RUNTIME_RESERVE = 16 << 20


def mapped_bytes(arrays) -> int:
    """Bytes of the arrays that are views on a memory-mapped file (not yet counted in the
    resident set: their pages come in when a step first reads them)."""
    import mmap

    import numpy as np
    total = 0
    for a in arrays:
        base = a
        while isinstance(base, (np.ndarray, memoryview)) and not isinstance(base, np.memmap):
            base = base.obj if isinstance(base, memoryview) else base.base
        if isinstance(base, (np.memmap, mmap.mmap)):
            total += int(a.nbytes)
    return total

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory_size(value) -> int:
    """Bytes from an int, or a string with an optional binary unit: "2.5GB", "2.5G",
    "800MiB", "1500000000". K/M/G/T are powers of 1024 (as PYEDGE_MAX_MEMORY)."""
    if isinstance(value, bool):
        raise ValueError(f"max_memory must be a byte count or a size like '2.5GB', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(value), re.IGNORECASE)
        if not m:
            raise ValueError(f"max_memory must be a byte count or a size like '2.5GB', "
                             f"'800M', got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return n


def resident_set_bytes() -> int:
    """VmRSS of this process (0 where /proc is not available)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resident_bytes(weight_bytes: int, mapped_weight_bytes: int = 0) -> int:
    """What a session counts as held: max(weights, VmRSS + mapped weights) + RUNTIME_RESERVE.
    (Counting max(weights, VmRSS) alone left out the interpreter when the weights are mapped:
    a 1 GiB budget on W6 peaked ~90 MB over it.)"""
    return max(int(weight_bytes), resident_set_bytes() + int(mapped_weight_bytes)) + \
        RUNTIME_RESERVE


def format_bytes(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
