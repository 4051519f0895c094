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


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Put `scheduler` (built for this run by `lr_schedule`) at the position of a saved one
    (`state_dict()`, also after a JSON round trip) and set the optimiser's learning rate for
    that position under this run's schedule. A resumed run may be longer than the one
    checkpointed (train.steps=N): the restored optimiser holds the old schedule's rate
    (0 at the end of a linear decay), and the saved position is all that carries over."""
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    # step() moves one position on and sets every group's rate for it: one back first.
    scheduler.last_epoch -= 1
    scheduler.step()
