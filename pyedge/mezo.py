"""Forward-only training: MeZO, zeroth-order SGD (Malladi et al. 2023), and Sparse MeZO.

A step estimates the gradient's projection on one random direction z from two losses:

    theta += eps*z ; L+ = loss(theta)          (z ~ N(0, 1), one value per trained entry)
    theta -= 2eps*z; L- = loss(theta)
    theta += eps*z                              (back to theta, up to float32 rounding)
    g = (L+ - L-) / (2 eps)                     (a scalar: the projected gradient)
    theta -= lr * (g*z + weight_decay*theta)    (MeZO's SGD update, decay as in its trainer)

z is never stored: it is regenerated from a seed for each of the four passes, per tensor
(numpy default_rng([seed, step, tensor index])), so the extra memory is one tensor's z at a
time and the state is only (session seed, step counter): resume needs nothing else.

The loss comes from the core's forward-only plan (optimizer kind "none": no gradient buffers,
no optimizer state, no backward plan; run() with the loss as its output), so a step needs
an inference's memory plus the loss. Dropout is off in that plan (both losses must see the
same network; MeZO's reference keeps dropout off too).

Sparse MeZO (`sparsity` < 1): only round(sparsity * n) entries of each tensor are perturbed
and updated. mask="random" (default): a fresh seeded random subset per step and tensor
(regenerated, never stored). Random rather than magnitude because LoRA's B starts at zero:
every |entry| ties, so a magnitude mask would be arbitrary there. mask="magnitude": the
entries of smallest |theta| at the start of the step (Liu et al. 2024, "Sparse MeZO", perturb
small weights), ties broken by index; their indices are kept for the step's four passes.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

MASKS = ("random", "magnitude")


@dataclasses.dataclass
class MeZO:
    """Zeroth-order SGD settings. lr: the step size (the schedule scales it); eps: the
    perturbation scale; weight_decay: MeZO's L2 term (theta -= lr*wd*theta); sparsity: the
    fraction of each tensor's entries perturbed (1: all, MeZO; < 1: Sparse MeZO); mask:
    "random" or "magnitude" (see the module doc)."""
    lr: float = 1e-3
    eps: float = 1e-3
    weight_decay: float = 0.0
    sparsity: float = 1.0
    mask: str = "random"

    def __post_init__(self):
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"MeZO lr must be a finite number >= 0, got {self.lr}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"MeZO eps must be a finite number > 0, got {self.eps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"MeZO weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.sparsity <= 1:
            raise ValueError(f"MeZO sparsity (the fraction perturbed) must be in (0, 1], got "
                             f"{self.sparsity}")
        if self.mask not in MASKS:
            raise ValueError(f"MeZO mask must be one of {', '.join(MASKS)}, got {self.mask!r}")

    def to_core(self) -> dict:
        # "none": the core plans forward only and keeps no gradients or optimizer state
        return {"kind": "none", "lr": self.lr}


def perturbed_count(n: int, sparsity: float) -> int:
    """Entries of an n-entry tensor that a step perturbs (at least one)."""
    return n if sparsity >= 1 else max(1, int(round(sparsity * n)))


class _Direction:
    """z for one tensor at one step, regenerated on demand: (indices or None, values)."""

    def __init__(self, opt: MeZO, seed: int, step: int, index: int, param: np.ndarray):
        self.key = [int(seed), int(step), int(index)]
        self.n = param.size
        self.k = perturbed_count(self.n, opt.sparsity)
        self.idx = None
        if self.k < self.n and opt.mask == "magnitude":
            # the smallest |theta| at the step's start; kept for its passes (theta moves)
            self.idx = np.argsort(np.abs(param.reshape(-1)), kind="stable")[:self.k]
        self.random_mask = self.k < self.n and opt.mask == "random"

    def get(self):
        rng = np.random.default_rng(self.key)
        idx = self.idx
        if self.random_mask:
            idx = np.sort(rng.permutation(self.n)[:self.k])
        z = rng.standard_normal(self.k if idx is not None else self.n, dtype=np.float32)
        return idx, z


def _add(param: np.ndarray, idx, z: np.ndarray, scale: np.float32) -> None:
    """param += scale * z on the chosen entries, in place in the core's buffer."""
    flat = param.reshape(-1)
    if idx is None:
        flat += scale * z
    else:
        flat[idx] += scale * z


def mezo_step(session, arrays: list, opt: MeZO) -> float:
    """One MeZO step on `session` (a forward-only TrainingSession) for one batch; returns
    (L+ + L-)/2. Raises FloatingPointError (parameters restored) on a non-finite loss."""
    params = list(session.trainable_parameters().items())  # writable views, core memory
    step = int(session.step_count)
    seed = int(session.seed)
    dirs = [_Direction(opt, seed, step, i, p) for i, (_, p) in enumerate(params)]
    eps = np.float32(opt.eps)

    def shift(scale):
        for d, (_, p) in zip(dirs, params):
            idx, z = d.get()
            _add(p, idx, z, scale)

    def loss():
        return float(session._forward_loss(arrays))

    shift(eps)
    try:
        l_plus = loss()
    except BaseException:  # a bad batch or an interrupt: never leave theta perturbed
        shift(-eps)
        raise
    shift(np.float32(-2.0) * eps)
    try:
        l_minus = loss()
    except BaseException:
        shift(eps)
        raise
    session.micro_steps += 2
    if not (math.isfinite(l_plus) and math.isfinite(l_minus)):
        shift(eps)
        raise FloatingPointError(
            f"non-finite loss at MeZO step {step + 1} (L+={l_plus}, L-={l_minus}); the "
            "parameters are restored: lower eps or the learning rate, or check the data")
    g = np.float32((l_plus - l_minus) / (2.0 * opt.eps))
    lr = np.float32(session.lr)
    wd = np.float32(opt.weight_decay)
    for d, (_, p) in zip(dirs, params):
        idx, z = d.get()
        _add(p, idx, z, eps)  # restore
        flat = p.reshape(-1)
        if idx is None:
            flat -= lr * (g * z + wd * flat) if wd else lr * (g * z)
        else:  # Sparse MeZO updates (and decays) only the perturbed entries
            flat[idx] -= lr * (g * z + wd * flat[idx]) if wd else lr * (g * z)
    session.step_count = step + 1
    session.last_projected_grad = float(g)
    return 0.5 * (l_plus + l_minus)
