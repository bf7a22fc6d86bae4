"""Learning-rate schedules: linear warmup, then cosine (with a floor), linear decay or constant.

warmup   lr_t = lr_max * t / W                                  for t < W
cosine   lr_t = lr_min + ½(lr_max − lr_min)(1 + cos(π p)),  p = (t − W) / (T − W),  lr_min = ratio·lr_max
linear   lr_t = lr_max * (1 − p)
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int) -> int:
    """Warmup length in optimizer steps (HF rounds the ratio up)."""
    return warmup_steps if warmup_steps else math.ceil(total_steps * warmup_ratio)


def lr_multiplier(step: int, total_steps: int, warmup: int, kind: str, min_lr_ratio: float = 0.0) -> float:
    """Fraction of the peak LR used for the optimizer step `step` (0-based)."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / (warmup + 1)  # never 0, so no optimizer step is wasted
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return min_lr_ratio + 0.5 * (1.0 - min_lr_ratio) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: int, kind: str, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type = {kind!r}: use one of {SCHEDULES}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, kind, min_lr_ratio)
    )
