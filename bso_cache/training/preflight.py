"""What the machine must have for a configuration, checked once before any model loads: the
packages its options need (each named with the extra that installs it), the device and torchrun. A configuration's own
`validate()` checks values only; this is the one place that looks at the installation."""

from __future__ import annotations

import importlib.util
import os

from bso_cache.config import BuildConfig, EvalConfig, SweepConfig, TrainConfig, parse_report_to
from bso_cache.errors import ConfigError
from bso_cache.training.optim import check_optimizer_available
from bso_cache.quantize import check_load_in_4bit
from bso_cache.reporting.trackers import require_installed


def check_build(cfg: BuildConfig) -> None:
    if cfg.load_in_4bit:
        check_load_in_4bit(cfg.gguf_file)


def check_train(cfg: TrainConfig, device: str) -> None:
    """The packages, the device (resolved: models.resolve_device) and torchrun's processes."""
    if cfg.load_in_4bit:
        check_load_in_4bit(cfg.gguf_file, adapters=True)
    require_installed(parse_report_to(cfg.report_to, cfg.tensorboard))
    check_optimizer_available(cfg.optimizer)
    if cfg.optimizer_offload and not device.startswith("cuda"):
        raise ConfigError(f"--optimizer-offload moves the optimizer state from the GPU to CPU memory; on "
                          f"--device {device} it is already there: drop it")
    if cfg.optimizer_in_backward and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # what dist.Dist reads
        raise ConfigError("--optimizer-in-backward would update before DDP has averaged the gradients "
                          "over the processes: run it in one process, or drop it under torchrun")


def check_eval(cfg: EvalConfig) -> None:
    if cfg.load_in_4bit:
        check_load_in_4bit(cfg.gguf_file)


def check_sweep(cfg: SweepConfig) -> None:
    if cfg.backend == "ray" and (importlib.util.find_spec("ray") is None
                                 or importlib.util.find_spec("ray.tune") is None):
        raise ConfigError("--backend ray runs the sweep on Ray Tune, which is not installed: "
                          "pip install 'bso-cache[ray]'")
