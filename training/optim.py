"""AdamW over the trainable parameters only, with weight-decay groups decided in one place, and the LR schedule.

The schedule is a multiplier of ``optim.lr`` as a function of the OPTIMISER step (not the micro-batch), so changing
``grad_accum_steps`` does not stretch the warmup.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flamingo_train.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Two AdamW groups over ``model.trainable_modules()``: with and without weight decay (see OptimConfig).

    Asserts that everything outside the trainable modules is frozen, and that every trainable parameter lies inside
    them, so the optimiser state covers exactly what trains.
    """
    trainable = {
        f"{prefix}.{name}": p
        for prefix, module in model.trainable_modules().items()
        for name, p in module.named_parameters()
    }
    stray = [n for n, p in model.named_parameters() if p.requires_grad and n not in trainable]
    assert not stray, f"parameters outside trainable_modules() require grad: {stray[:5]}"
    frozen_inside = [n for n, p in trainable.items() if not p.requires_grad]
    assert not frozen_inside, f"parameters of trainable modules are frozen: {frozen_inside[:5]}"

    decay, no_decay = [], []
    for name, p in trainable.items():
        skip = p.ndim < 2 or any(fragment in name for fragment in config.no_decay)
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, config), lr=config.lr, betas=tuple(config.betas), eps=config.eps
    )


def lr_multiplier(step: int, *, config: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the base LR for the update that follows ``step`` completed optimiser steps (0-based).

    Linear warmup from 1/warmup to 1 over ``warmup_steps`` updates, then cosine or linear decay to ``min_lr_ratio``
    at ``max_steps`` (or constant).
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.kind == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if config.kind == "cosine" else 1.0 - progress
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, *, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, config=config, max_steps=max_steps)
    )
