"""Optimizer settings; the update itself runs in C++ over the trainable tensors only."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class AdamW:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01  # torch.optim.AdamW's default

    def to_core(self) -> dict:
        return {"kind": "adamw", "lr": self.lr, "beta1": self.betas[0], "beta2": self.betas[1],
                "eps": self.eps, "weight_decay": self.weight_decay}


@dataclasses.dataclass
class SGD:
    lr: float = 1e-2
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def to_core(self) -> dict:
        return {"kind": "sgd", "lr": self.lr, "momentum": self.momentum,
                "dampening": self.dampening, "weight_decay": self.weight_decay,
                "nesterov": self.nesterov}
