"""The optimizer and the learning-rate schedule of a training run (TrainConfig's choices)."""

from __future__ import annotations

import math

from .config import TrainConfig

# torch's fused AdamW / SGD run one kernel over all parameters on the CPU and on CUDA: on the CPU
# an AdamW step of the 46M benchmark model takes 0.025 s instead of 0.18 s (the per-parameter
# loop), the same update to float rounding (docs/PERFORMANCE.md).
FUSED = ("adamw", "sgd")
FUSED_DEVICES = ("cpu", "cuda")


def fusable(params) -> bool:
    """Plain floating-point tensors on the CPU or CUDA (not FSDP's DTensor shards)."""
    import torch

    return bool(params) and all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point()
                                and p.device.type in FUSED_DEVICES for p in params)


def make_optimizer(cfg: TrainConfig, params):
    import torch

    params = list(params)
    kinds = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop, "sgd": torch.optim.SGD}
    extra = {"fused": True} if cfg.optimizer in FUSED and fusable(params) else {}
    return kinds[cfg.optimizer](params, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


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
