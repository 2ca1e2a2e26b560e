"""Aggregating LoRA adapters from many devices (numpy only; the ServerApp's one job).

Each node k returns its trainable tensors: LoRA factors A_k [r, in], B_k [out, r] per adapted
layer, and whole trained tensors (a classifier head). The model a node trained is
W + s·B_k·A_k, so the update to average is the product B_k·A_k, not the factors:

    avg(B)·avg(A) = (Σ w_k B_k)(Σ w_k A_k) ≠ Σ w_k B_k·A_k

(cross terms B_j·A_k, j ≠ k; FLoRA, LoRA-FAIR). Two rules:

- "fedavg": weighted mean of every tensor, factors included (FlowerTune's rule). Cheap, and the
  factors stay the nodes' own basis, so the next round continues from familiar A and B. Biased.
- "exact": per layer, the weighted mean of the products M = Σ w_k B_k·A_k [out, in], then
  re-factored to rank r by a truncated SVD, M ≈ U_r S_r V_rᵀ, B = U_r·√S_r, A = √S_r·V_rᵀ.
  M has rank ≤ K·r; the SVD keeps its best rank-r part (Eckart–Young), so the error left is
  the tail of M's spectrum and is zero whenever the nodes' updates share a rank-r subspace.
  We chose this over FLoRA's stacking (concatenate all A_k and w_k·B_k: exact, rank K·r)
  because stacking grows r every round, so the result no longer fits the nodes' sessions or
  one fixed PEFT config; FLoRA then merges the stack into the base weight and restarts the
  adapters, which makes the global model a new base instead of a LoRA adapter of the user's
  base (no `PeftModel.from_pretrained` of it). The SVD keeps r and the PEFT format; the price
  is an O(out·in·min(out, in)) SVD per layer on the server and the truncation error, which
  `factor_errors` measures.

Whole tensors are averaged in both rules (their average is the average of the updates).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

RULES = ("fedavg", "exact")

Arrays = Mapping[str, np.ndarray]


def _weights(num_examples: Sequence[float]) -> np.ndarray:
    w = np.asarray(num_examples, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise ValueError("aggregation needs at least one node's reply")
    if np.any(w < 0) or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError(f"the nodes' example counts must be positive, got {list(w)}")
    return w / w.sum()


def _check_same_keys(updates: Sequence[Arrays]) -> list[str]:
    keys = list(updates[0])
    for i, u in enumerate(updates[1:], 1):
        if set(u) != set(keys):
            raise ValueError(f"node reply {i} carries tensors {sorted(set(u) ^ set(keys))} that "
                             "the others do not: the nodes run different adapter settings")
        for k in keys:
            if u[k].shape != updates[0][k].shape:
                raise ValueError(f"'{k}': shape {u[k].shape} in reply {i}, "
                                 f"{updates[0][k].shape} in reply 0")
    return keys


def weighted_mean(updates: Sequence[Arrays], num_examples: Sequence[float]) -> dict[str, np.ndarray]:
    """FedAvg of every tensor; computed in float64, returned in each tensor's dtype."""
    w = _weights(num_examples)
    keys = _check_same_keys(updates)
    return {k: sum(wk * np.asarray(u[k], np.float64) for wk, u in zip(w, updates))
            .astype(updates[0][k].dtype) for k in keys}


def product_mean(updates: Sequence[Arrays], num_examples: Sequence[float], a: str, b: str
                 ) -> np.ndarray:
    """Σ w_k B_k·A_k [out, in] in float64: the exact average of one layer's LoRA updates."""
    w = _weights(num_examples)
    return sum(wk * (np.asarray(u[b], np.float64) @ np.asarray(u[a], np.float64))
               for wk, u in zip(w, updates))


def refactor(m: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) with B·A the best rank-r approximation of m [out, in]."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    root = np.sqrt(s[:r])
    b = u[:, :r] * root
    a = root[:, None] * vt[:r]
    if a.shape[0] < r:  # min(out, in) < r: pad with zero rank-one terms to keep the shapes
        a = np.vstack([a, np.zeros((r - a.shape[0], m.shape[1]))])
        b = np.hstack([b, np.zeros((m.shape[0], r - b.shape[1]))])
    return a, b


def aggregate(updates: Sequence[Arrays], num_examples: Sequence[float],
              lora_pairs: Sequence[tuple[str, str]], rule: str = "fedavg"
              ) -> dict[str, np.ndarray]:
    """The global tensors from the nodes' replies. lora_pairs: (A name, B name) per layer."""
    if rule not in RULES:
        raise ValueError(f"unknown aggregation '{rule}'; choose one of {', '.join(RULES)}")
    out = weighted_mean(updates, num_examples)
    if rule == "exact":
        for a, b in lora_pairs:
            r = updates[0][a].shape[0]
            new_a, new_b = refactor(product_mean(updates, num_examples, a, b), r)
            out[a] = new_a.astype(updates[0][a].dtype)
            out[b] = new_b.astype(updates[0][b].dtype)
    return out


def factor_errors(updates: Sequence[Arrays], num_examples: Sequence[float],
                  lora_pairs: Sequence[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """Per layer, the relative Frobenius error ‖B'A' − Σ w_k B_k A_k‖ / ‖Σ w_k B_k A_k‖ of the
    global factors under each rule: what averaging the factors costs, and what is left after
    the rank-r SVD."""
    res: dict[str, dict[str, float]] = {}
    glob = {rule: aggregate(updates, num_examples, lora_pairs, rule) for rule in RULES}
    for a, b in lora_pairs:
        exact = product_mean(updates, num_examples, a, b)
        norm = float(np.linalg.norm(exact)) or 1.0
        res[a.rsplit(".lora_A", 1)[0]] = {
            rule: float(np.linalg.norm(glob[rule][b].astype(np.float64)
                                       @ glob[rule][a].astype(np.float64) - exact)) / norm
            for rule in RULES}
    return res
