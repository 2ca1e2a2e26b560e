"""Learning-rate schedules, with the formulas of transformers' optimization.py.

`lr_at(step)` is the learning rate of the update with 0-based index `step`, exactly what
`torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)` gives after `step` calls of
`scheduler.step()`:

* constant: ``get_constant_schedule_with_warmup``
* linear:   ``get_linear_schedule_with_warmup``
* cosine:   ``get_cosine_schedule_with_warmup`` (num_cycles = 0.5: half a cosine to 0)
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_lambda(kind: str, step: int, warmup_steps: int, total_steps: int,
              num_cycles: float = 0.5) -> float:
    """The multiplier of the base learning rate at `step`."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    if kind == "cosine":
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
    raise ValueError(f"unknown schedule '{kind}'; choose one of {', '.join(SCHEDULES)}")


class Schedule:
    def __init__(self, kind: str, base_lr: float, warmup_steps: int = 0, total_steps: int = 1):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule '{kind}'; choose one of {', '.join(SCHEDULES)}")
        if warmup_steps < 0:
            raise ValueError(f"warmup steps must be >= 0, got {warmup_steps}")
        if base_lr < 0 or not math.isfinite(base_lr):
            raise ValueError(f"learning rate must be a finite number >= 0, got {base_lr}")
        self.kind = kind
        self.base_lr = float(base_lr)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def multiplier(self, step: int) -> float:
        return lr_lambda(self.kind, step, self.warmup_steps, self.total_steps)

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.multiplier(step)

    __call__ = lr_at

    def __repr__(self):
        return (f"Schedule({self.kind!r}, base_lr={self.base_lr}, warmup_steps="
                f"{self.warmup_steps}, total_steps={self.total_steps})")


def make_schedule(kind: str, base_lr: float, warmup_steps: int = 0,
                  total_steps: int = 1) -> Schedule:
    return Schedule(kind, base_lr, warmup_steps, total_steps)
