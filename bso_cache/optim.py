"""The optimizer and the learning-rate schedule of a training run (TrainConfig's choices)."""

from __future__ import annotations

import math

from .config import TrainConfig


def make_optimizer(cfg: TrainConfig, params):
    import torch

    kinds = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop, "sgd": torch.optim.SGD}
    return kinds[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg: TrainConfig, optimizer, total_steps: int):
    import torch

    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:  # step = number of updates done so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
