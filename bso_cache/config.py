"""Typed, frozen configurations holding every default and every allowed value in one place.

The CLI reads its defaults from these and maps its options onto them; the resolved
configuration is saved next to every output. A config is validated when it is made
(`__post_init__`): no config exists with a bad value, and a bad value fails before any model loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from .errors import ConfigError
from .quantize import check_load_in_4bit
from .losses import ALIASES as _ALIASES, GENERATORS as _GENERATORS, LOSS_DEFAULTS as _L

# The allowed values, as types (the fields below use them) and as tuples (for checks and help).
Format = Literal["auto", "pku", "hh", "generic", "implicit"]
TemplateMode = Literal["auto", "chat", "plain"]
Overlong = Literal["drop", "truncate"]
DType = Literal["float32", "bfloat16", "float16"]
PairMode = Literal["none", "safedpo", "drop-both-unsafe"]
Orientation = Literal["better", "safer"]
OptimizerName = Literal["adamw", "rmsprop", "sgd", "adamw8bit", "rmsprop8bit", "adamw4bit"]
Schedule = Literal["cosine", "linear", "constant"]
Autocast = Literal["none", "bf16", "fp16"]
PrefixSharing = Literal["auto", "on", "off"]   # see sharing.py
GeneratorName = Literal[(*_GENERATORS, *_ALIASES)]  # the loss's generator h (losses.GENERATORS)
Attention = Literal["auto", "sdpa", "eager", "flex_attention"]  # transformers' names; see models.resolve_attention

FORMATS, TEMPLATE_MODES, OVERLONG, DTYPES = get_args(Format), get_args(TemplateMode), get_args(Overlong), get_args(DType)
PAIR_MODES, ORIENTATIONS, OPTIMIZERS = get_args(PairMode), get_args(Orientation), get_args(OptimizerName)
SCHEDULES, AUTOCAST, PREFIX_SHARING = get_args(Schedule), get_args(Autocast), get_args(PrefixSharing)
ATTENTION = get_args(Attention)
DEFAULT_PREFIX_SHARING: PrefixSharing = "auto"  # every command's --prefix-sharing default (the rule: sharing.py)


def _check_choices(cfg, choices: dict[str, tuple]) -> None:
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ConfigError(f"unknown --{name.replace('_', '-')} '{value}'; valid: {', '.join(allowed)}")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


DEFAULT_MAX_LENGTH = 2048        # --max-length when not given: min(this, the model's positions)
DEFAULT_ROWS_PER_SHARD = 2000    # --rows-per-shard when not given (or the input's rows, when fewer)


@dataclass(frozen=True)
class BuildConfig:
    model: str
    data: str
    out: str
    split: str = "train"
    hf_config: str | None = None
    format: Format = "auto"
    gguf_file: str | None = None
    template: TemplateMode = "auto"     # chat template if the tokenizer has one
    chat_template: str | None = None    # path to a Jinja template file overriding the tokenizer's
    system_prompt: str | None = None
    max_length: int | None = None       # None: min(DEFAULT_MAX_LENGTH, the model's max positions)
    overlong: Overlong = "drop"
    batch_size: int = 8                 # pairs per forward (2x sequences)
    rows_per_shard: int | None = None   # input rows per shard; None: DEFAULT_ROWS_PER_SHARD
    dtype: DType = "float32"
    load_in_4bit: bool = False          # the reference in 4-bit NF4 (bitsandbytes): the cache a QLoRA run trains on
    device: str = "auto"
    prefix_sharing: PrefixSharing = DEFAULT_PREFIX_SHARING  # score each prompt once (auto: where it measured faster)
    attn_implementation: Attention = "auto"
    skip_bad_rows: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_choices(self, {"format": FORMATS, "template": TEMPLATE_MODES, "overlong": OVERLONG, "dtype": DTYPES,
                              "prefix_sharing": PREFIX_SHARING, "attn_implementation": ATTENTION})
        for name in ("batch_size", "rows_per_shard"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("--max-length must be >= 2")
        if self.load_in_4bit:
            check_load_in_4bit(self.gguf_file)


@dataclass(frozen=True)
class TrainConfig:
    cache: str
    out: str
    policy: str | None = None           # default: the reference recorded in the manifest
    gguf_file: str | None = None
    # loss (shared BSO.md; defaults are the method authors')
    generator: GeneratorName = _L.generator  # losses.LOSS_DEFAULTS owns the loss defaults
    beta: float = _L.beta
    safety_penalty: float = _L.safety_penalty
    lam: float = _L.lam
    scale: float = _L.scale
    mu: float | None = _L.mu
    clamp: float | None = None          # None: [-30, 30], upper raised for C > 30; logistic: no clamp
    clamp_lower: float | None = None
    clamp_upper: float | None = None
    label_smoothing: float = _L.label_smoothing
    # pairs
    pairs: PairMode = "safedpo"
    orientation: Orientation = "better"
    # optimisation
    optimizer: OptimizerName = "rmsprop"
    lr: float = 1e-6
    lr_schedule: Schedule = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    batch_size: int = 16                # pairs per optimizer step, over all processes
    grad_accum: int = 1                 # micro-batches per step and process
    epochs: int = 3
    max_steps: int | None = None
    seed: int = 0
    shuffle: bool = True                # False: cache order (shards, rows), no bucketing; the seed changes nothing
    shuffle_buffer: int = 4096
    bucket_batches: int = 16            # batches sorted by length together
    # numerics / memory
    dtype: DType = "float32"
    autocast: Autocast = "none"
    gradient_checkpointing: bool = False
    optimizer_in_backward: bool = False  # apply each parameter's update in the backward pass, free its gradient
    optimizer_offload: bool = False     # optimizer state in CPU memory, updated there (CUDA)
    device: str = "auto"
    prefix_sharing: PrefixSharing = DEFAULT_PREFIX_SHARING  # score each prompt once (auto: where it measured faster)
    attn_implementation: Attention = "auto"
    fsdp: bool = False                  # shard parameters, gradients and optimizer state (torchrun)
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"
    load_in_4bit: bool = False          # QLoRA: the base in 4-bit NF4, LoRA adapters trained on it (needs lora_r)
    # outputs
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    log_every: int = 1
    eval_cache: str | None = None
    eval_every: int = 0
    allow_other_reference: bool = False  # --eval-cache built with another reference: report against it
    tensorboard: bool = False           # the same as report_to including tensorboard
    report_to: str = "none"             # experiment trackers, comma-separated (trackers.REPORTERS)
    step0_tolerance: float | None = None  # None: by dtype (see metrics.step0_tolerance)
    trust_remote_code: bool = False
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_choices(self, {"pairs": PAIR_MODES, "orientation": ORIENTATIONS, "optimizer": OPTIMIZERS,
                              "lr_schedule": SCHEDULES, "autocast": AUTOCAST, "dtype": DTYPES,
                              "prefix_sharing": PREFIX_SHARING, "attn_implementation": ATTENTION})
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
        if self.fsdp and self.lora_r:
            raise ConfigError("--fsdp with --lora-r is not supported; LoRA adapters are small: use DDP")
        if self.load_in_4bit and not self.lora_r:
            raise ConfigError("--load-in-4bit: 4-bit weights are not trained directly; QLoRA trains LoRA adapters "
                              "on them: add --lora-r (e.g. 16)")
        if self.load_in_4bit:
            check_load_in_4bit(self.gguf_file, adapters=True)
        self._check_memory_levers()
        self.loss_spec()
        from .trackers import parse_report_to, require_installed

        require_installed(parse_report_to(self.report_to, self.tensorboard))

    def _check_memory_levers(self) -> None:
        if self.optimizer_in_backward and self.grad_clip > 0:
            raise ConfigError(f"--optimizer-in-backward applies each update before the global gradient norm is "
                              f"known, so it cannot clip it: pass --grad-clip 0 (now {self.grad_clip:g}) or drop "
                              f"--optimizer-in-backward")
        if self.optimizer_in_backward and self.grad_accum > 1:
            raise ConfigError("--optimizer-in-backward updates at every backward pass; it cannot accumulate "
                              f"--grad-accum {self.grad_accum} micro-batches: use --grad-accum 1 (a smaller "
                              "--batch-size) or drop --optimizer-in-backward")
        if self.fsdp and (self.optimizer not in ("adamw", "rmsprop", "sgd") or self.dtype != "float32"
                          or self.optimizer_in_backward or self.optimizer_offload):
            raise ConfigError("--fsdp runs the plain optimizers (adamw, rmsprop, sgd) on float32 weights; "
                              "the low-bit optimizers, bf16/fp16 weights, "
                              "--optimizer-in-backward and --optimizer-offload are for one process or DDP")

    def loss_spec(self):
        from .losses import make_loss_spec

        return make_loss_spec(self.generator, beta=self.beta, safety_penalty=self.safety_penalty,
                              clamp=self.clamp, clamp_lower=self.clamp_lower,
                              clamp_upper=self.clamp_upper, lam=self.lam, scale=self.scale,
                              mu=self.mu, label_smoothing=self.label_smoothing)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


@dataclass(frozen=True)
class EvalConfig:
    """`bso-cache eval`'s defaults, one place for the CLI and the library (generation.generate)."""

    batch_size: int = 16                # pairs per forward
    max_prompts: int = 64               # distinct prompts to generate for (--generate)
    max_new_tokens: int = 512
    temperature: float = 0.7            # 0: greedy
    top_p: float = 0.9
    seed: int = 0


EVAL_DEFAULTS = EvalConfig()


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
