"""LoRA initialisations other than PEFT's default (A kaiming-uniform, B = 0), as PEFT's
``init_lora_weights`` (peft/tuners/lora/layer.py, 0.21):

* "gaussian": A ~ N(0, 1/r²) (std 1/r), B = 0;
* False: A and B both nn.Linear's default, kaiming-uniform(a=√5): bounds 1/√in and 1/√r;
* "pissa" (PiSSA): W [out, in] (the effective weight, fan_in_fan_out undone) = V·S·Uᵀ in float32;
  with S_r / s (s the LoRA scaling): A = diag(√(S_r/s))·Uᵀ_r [r, in], B = V_r·diag(√(S_r/s))
  [out, r], and the base weight becomes the residual W − s·B·A;
* "olora" (OLoRA): W = Q·R (float32, on the weight as stored, [out, in] for nn.Linear):
  A = R[:r] [r, in], B = Q[:, :r] [out, r], base W − s·B·A.

PEFT stores only A and B (and init_lora_weights in the config); its from_pretrained redoes the
SVD/QR on the base it is given and loads A and B over the result. pyedge does the same: a
session's residual, and `pyedge merge`'s, come from `initial_adapters` on the original base
weight. (SVD and QR are unique up to the sign of each component: numpy's and torch's LAPACK
may flip a pair (row of A, column of B) together; B·A and the residual are the same either way.)
"""
from __future__ import annotations

import math

import numpy as np


def effective_weight(W: np.ndarray, trans_w: bool) -> np.ndarray:
    """The [out, in] matrix y = x·Wᵀ uses, from the ONNX initializer ([out, in] when trans_w,
    else [in, out])."""
    return W if trans_w else W.T


def initial_adapters(W_eff: np.ndarray, r: int, scale: float, how: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) float32 that PiSSA/OLoRA start from for W_eff [out, in]."""
    W = np.asarray(W_eff, np.float32)
    if r > min(W.shape):
        raise ValueError(f"init_lora_weights='{how}' needs r <= min(out, in) = {min(W.shape)}, "
                         f"got r={r}")
    if how == "pissa":
        V, S, Uh = np.linalg.svd(W, full_matrices=False)
        root = np.sqrt(S[:r] / np.float32(scale)).astype(np.float32)
        A = root[:, None] * Uh[:r]
        B = V[:, :r] * root[None, :]
    elif how == "olora":
        Q, R = np.linalg.qr(W)
        A, B = R[:r], Q[:, :r]
    else:
        raise ValueError(f"no base-dependent initialisation '{how}'")
    return np.ascontiguousarray(A, np.float32), np.ascontiguousarray(B, np.float32)


def residual(W: np.ndarray, trans_w: bool, A: np.ndarray, B: np.ndarray, scale: float
             ) -> np.ndarray:
    """W − s·B·A in the initializer's layout (float32 arithmetic, as PEFT's)."""
    d = np.float32(scale) * (B.astype(np.float32) @ A.astype(np.float32))   # [out, in]
    return (W - (d if trans_w else d.T)).astype(W.dtype)


def initialise(graph, site, cfg, rng) -> None:
    """Re-initialises the site's A and B in `graph` for cfg.init_lora_weights (not True) and,
    for PiSSA/OLoRA, replaces the base weight by the residual."""
    how = cfg.init_lora_weights
    a, b = graph.initializers[site.lora_a], graph.initializers[site.lora_b]
    if how == "gaussian":
        graph.initializers[site.lora_a] = rng.normal(0.0, 1.0 / cfg.r, size=a.shape) \
            .astype(np.float32)
    elif how is False:
        bound = 1.0 / math.sqrt(cfg.r)
        graph.initializers[site.lora_b] = rng.uniform(-bound, bound, size=b.shape) \
            .astype(np.float32)
    elif how in ("pissa", "olora"):
        W = graph.initializers[site.weight]
        try:
            A, B = initial_adapters(effective_weight(W, site.trans_w), cfg.r, cfg.scaling, how)
        except ValueError as e:
            raise ValueError(f"'{site.module}': {e}") from None
        graph.initializers[site.lora_a], graph.initializers[site.lora_b] = A, B
        graph.initializers[site.weight] = residual(W, site.trans_w, A, B, cfg.scaling)
    else:
        raise ValueError(f"init_lora_weights={how!r} is not supported")
