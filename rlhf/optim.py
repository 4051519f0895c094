"""Learning-rate schedules, written once for every command."""

from __future__ import annotations

import functools

import torch


def _warmup_then_decay(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    decay = max(0.0, 1.0 - step / total_steps) if schedule == "linear" else 1.0
    return warm * decay


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                schedule: str = "constant") -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then constant or (`linear`) a decay to 0 at
    `total_steps`; one `step()` per optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        _warmup_then_decay, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule))
