"""Typed, frozen configurations holding every default in one place.

The CLI maps its options onto these; the resolved configuration is saved next to every output.
`validate()` fails on bad values before any model loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError

PAIR_MODES = ("none", "safedpo", "drop-both-unsafe")
ORIENTATIONS = ("better", "safer")
OPTIMIZERS = ("adamw", "rmsprop", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
AUTOCAST = ("none", "bf16", "fp16")
PREFIX_SHARING = ("auto", "on", "off")
DEFAULT_CLAMP = 30.0    # kappa: u in [-30, 30], the upper bound raised for C > 30 (losses.default_upper_clamp)   # see bso_cache.scoring.PairScorer


def _check_prefix_sharing(value: str) -> None:
    if value not in PREFIX_SHARING:
        raise ConfigError(f"unknown --prefix-sharing '{value}'; valid: {', '.join(PREFIX_SHARING)}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


DEFAULT_MAX_LENGTH = 2048        # --max-length when not given: min(this, the model's positions)
DEFAULT_ROWS_PER_SHARD = 2000    # --rows-per-shard when not given (fewer so that every torchrun rank has one)


@dataclass(frozen=True)
class BuildConfig:
    model: str
    data: str
    out: str
    split: str = "train"
    hf_config: str | None = None
    format: str = "auto"
    gguf_file: str | None = None
    template: str = "auto"              # auto | chat | plain
    chat_template: str | None = None    # path to a Jinja template file overriding the tokenizer's
    system_prompt: str | None = None
    max_length: int | None = None       # None: min(DEFAULT_MAX_LENGTH, the model's max positions)
    overlong: str = "drop"              # drop | truncate
    batch_size: int = 8                 # pairs per forward (2x sequences)
    rows_per_shard: int | None = None   # input rows per shard; None: DEFAULT_ROWS_PER_SHARD
    dtype: str = "float32"
    device: str = "auto"
    prefix_sharing: str = "auto"        # score each prompt once (auto: where it measured faster)
    skip_bad_rows: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True

    def validate(self) -> None:
        from .formats import FORMATS
        from .models import DTYPES
        from .tokenize import TEMPLATE_MODES

        if self.format not in FORMATS:
            raise ConfigError(f"unknown --format '{self.format}'; valid: {', '.join(FORMATS)}")
        if self.template not in TEMPLATE_MODES:
            raise ConfigError(f"unknown --template '{self.template}'; valid: {', '.join(TEMPLATE_MODES)}")
        if self.overlong not in ("drop", "truncate"):
            raise ConfigError(f"unknown --overlong '{self.overlong}'; valid: drop, truncate")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown --dtype '{self.dtype}'; valid: {', '.join(DTYPES)}")
        for name in ("batch_size", "rows_per_shard"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("--max-length must be >= 2")
        _check_prefix_sharing(self.prefix_sharing)


@dataclass(frozen=True)
class TrainConfig:
    cache: str
    out: str
    policy: str | None = None           # default: the reference recorded in the manifest
    gguf_file: str | None = None
    # loss (shared BSO.md; defaults are the method authors')
    generator: str = "sba"
    beta: float = 0.1
    safety_penalty: float = 30.0
    lam: float = 0.2
    scale: float = 4.0
    mu: float | None = None
    clamp: float | None = None          # None: [-30, 30], upper raised for C > 30
    clamp_lower: float | None = None
    clamp_upper: float | None = None
    label_smoothing: float = 0.0
    # pairs
    pairs: str = "safedpo"
    orientation: str = "better"
    # optimisation
    optimizer: str = "rmsprop"
    lr: float = 1e-6
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    batch_size: int = 16                # pairs per optimizer step, over all processes
    grad_accum: int = 1                 # micro-batches per step and process
    epochs: int = 3
    max_steps: int | None = None
    seed: int = 0
    shuffle_buffer: int = 4096
    bucket_batches: int = 16            # batches sorted by length together
    # numerics / memory
    dtype: str = "float32"
    autocast: str = "none"
    gradient_checkpointing: bool = False
    device: str = "auto"
    prefix_sharing: str = "auto"        # score each prompt once (auto: where it measured faster)
    fsdp: bool = False                  # shard parameters, gradients and optimizer state (torchrun)
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"
    # outputs
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    log_every: int = 1
    eval_cache: str | None = None
    eval_every: int = 0
    tensorboard: bool = False
    step0_tolerance: float | None = None  # None: by dtype (see metrics.step0_tolerance)
    trust_remote_code: bool = False
    progress: bool = True
    overwrite: bool = False

    def validate(self) -> None:
        from .models import DTYPES

        if self.pairs not in PAIR_MODES:
            raise ConfigError(f"unknown --pairs '{self.pairs}'; valid: {', '.join(PAIR_MODES)}")
        if self.orientation not in ORIENTATIONS:
            raise ConfigError(f"unknown --orientation '{self.orientation}'; valid: {', '.join(ORIENTATIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown --optimizer '{self.optimizer}'; valid: {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"unknown --lr-schedule '{self.lr_schedule}'; valid: {', '.join(SCHEDULES)}")
        if self.autocast not in AUTOCAST:
            raise ConfigError(f"unknown --autocast '{self.autocast}'; valid: {', '.join(AUTOCAST)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown --dtype '{self.dtype}'; valid: {', '.join(DTYPES)}")
        if self.lr < 0:
            raise ConfigError("--lr must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("--warmup-ratio must be in [0, 1)")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ConfigError(f"--batch-size ({self.batch_size}) must be a positive multiple of "
                              f"--grad-accum ({self.grad_accum})")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ConfigError("--epochs and --max-steps must be >= 1")
        if self.log_every < 1 or self.save_every < 0 or self.eval_every < 0:
            raise ConfigError("--log-every must be >= 1; --save-every and --eval-every >= 0")
        if self.eval_every and not self.eval_cache:
            raise ConfigError("--eval-every needs --eval-cache")
        if self.lora_r < 0:
            raise ConfigError("--lora-r must be >= 0")
        _check_prefix_sharing(self.prefix_sharing)
        if self.fsdp and self.lora_r:
            raise ConfigError("--fsdp with --lora-r is not supported; LoRA adapters are small: use DDP")
        self.loss_spec()

    def loss_spec(self):
        from .losses import make_loss_spec

        return make_loss_spec(self.generator, beta=self.beta, safety_penalty=self.safety_penalty,
                              clamp=self.clamp, clamp_lower=self.clamp_lower,
                              clamp_upper=self.clamp_upper, lam=self.lam, scale=self.scale,
                              mu=self.mu, label_smoothing=self.label_smoothing)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


# The baselines people compare against (shared BSO.md), one table for `sweep --baselines`, the
# demo and the reproduction script: TrainConfig overrides, the rest at their defaults.
BASELINES = {
    "dpo-helpful": dict(generator="logistic", safety_penalty=0.0, pairs="none", orientation="better"),
    "dpo-harmless": dict(generator="logistic", safety_penalty=0.0, pairs="none", orientation="safer"),
    "safedpo": dict(generator="logistic", safety_penalty=10.0, pairs="safedpo", orientation="better"),
    # the authors' recipe: TrainConfig's loss defaults, held fixed when a sweep varies them
    "bso": {**{k: getattr(TrainConfig, k) for k in ("generator", "lam", "scale", "beta", "safety_penalty", "clamp")},
            "pairs": "safedpo", "orientation": "better"},
}
