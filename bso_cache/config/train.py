"""`bso-cache train`'s configuration: six small frozen sections, each option declared once with its
default, its help and what it is to the sweep, a resume, the model card and `plan` (fields.py).

A TrainConfig is made and read flat (`TrainConfig(cache=..., out=..., lr=...)`, `cfg.lr`,
run_config.json), and grouped in code by section (`cfg.optim`, `cfg.loss`, ...). It is validated
when it is made: no configuration exists with a bad value, and a bad value fails before any model
loads. What the machine must have for it (packages, a device) is preflight.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bso_cache.errors import ConfigError
from bso_cache.losses import LOSS_DEFAULTS as _L
from bso_cache.config.build import GGUF_4BIT
from bso_cache.config.choices import (ATTN_HELP, DIGEST_HELP, DEFAULT_PREFIX_SHARING, DEVICE_HELP, PREFIX_SHARING_HELP,
                                      PROGRESS_HELP, REMOTE_CODE_HELP, Attention, Autocast, DType, GeneratorName,
                                      OptimizerName, Orientation, PairMode, PrefixSharing, Schedule)
from bso_cache.config.fields import check_choices, check_digest_text, option, options

REPORTERS = ("tensorboard", "wandb", "mlflow", "trackio")  # --report-to's trackers (each an extra: trackers.py)


@dataclass(frozen=True)
class SourceOptions:
    """What is read and where the run goes."""

    cache: str = option(help="Cache folder from `bso-cache build`.", short="-c", path=True, resume=True)
    out: str = option(help="Run folder: final model (from_pretrained format), metrics.jsonl, run_config.json, "
                           "checkpoints/.", short="-o", path=True, resume=True)
    policy: str | None = option(None, "Policy to train [default: the reference recorded in the manifest]. Must "
                                      "share the cache's tokenizer.")
    gguf_file: str | None = option(None, "GGUF file inside --policy.")
    expect_digest: str | None = option(None, DIGEST_HELP, resume=True)


@dataclass(frozen=True)
class LossOptions:
    """The BSO loss (docs/LOSSES.md); the defaults are the method authors' (losses.LOSS_DEFAULTS)."""

    generator: GeneratorName = option(_L.generator, "Generator h: logistic (DPO/SafeDPO) | kliep | lsif | ba | sba | "
                                      "phi (= sba with lambda=1-mu, s=1). sba is computed with expm1: its loss "
                                      "carries the constant 1/(lambda s) (1.25 nats by default), which changes no "
                                      "gradient.", sweep=True)
    beta: float = option(_L.beta, "Temperature beta > 0 (as in DPO).", sweep=True)
    safety_penalty: float = option(_L.safety_penalty, "C >= 0, the safety penalty (C=0: plain preference "
                                                      "optimisation).", sweep=True)
    lam: float = option(_L.lam, "lambda of ba/sba (> -1; 0 is the kliep limit).", sweep=True)
    scale: float = option(_L.scale, "s of sba (4 makes its gradient at u=0 equal logistic's).", sweep=True)
    mu: float | None = option(_L.mu, "mu of the phi generator.", sweep=True)
    clamp: float | None = option(None, "Symmetric bound kappa on u: [-kappa, kappa]; no gradient past a bound (a "
                                       "pair within 1e-3 of one, the cache's float noise, counts as on it and keeps "
                                       "its gradient) [default: [-30, 30], and for C > 30 the upper bound becomes "
                                       "min(C+10, floor(85/(1+lambda))) so safe-winner pairs (u = C at start) still "
                                       "learn; logistic, which cannot overflow, is not clamped unless a bound is "
                                       "given].", sweep=True)
    clamp_lower: float | None = option(None, "Lower bound on u (overrides --clamp's).", sweep=True)
    clamp_upper: float | None = option(None, "Upper bound on u (overrides --clamp's and the automatic raise).",
                                       sweep=True)
    label_smoothing: float = option(_L.label_smoothing, "Conservative epsilon in [0, 0.5): (1-e) l(clamp(u_raw)) + "
                                    "e l(clamp(-u_raw)), the swapped pair's own clamped log-ratio.", sweep=True)


@dataclass(frozen=True)
class DataOptions:
    """Which pairs are trained on, how they are oriented, in what order."""

    pairs: PairMode = option("safedpo", "Pair handling: none | safedpo (swap unsafe-chosen/safe-rejected, drop "
                                        "both-unsafe) | drop-both-unsafe.", sweep=True, card=True)
    orientation: Orientation = option("better", "better (chosen = more helpful) | safer (chosen = safer response, "
                                                "PKU-style data).", sweep=True, card=True)
    shuffle: bool = option(True, "--no-shuffle: pairs in cache order (shards in order, rows in order, no length "
                                 "bucketing), to match another tool step by step; the seed then changes nothing "
                                 "about the order.")
    shuffle_buffer: int = option(4096, "Pairs held for shuffling (bounds memory).")
    bucket_batches: int = option(16, "Batches sorted by length together.", cli=False)


@dataclass(frozen=True)
class OptimOptions:
    """The optimizer, its schedule and the batch: what a baseline of a sweep shares with the grid."""

    optimizer: OptimizerName = option("rmsprop", "adamw | rmsprop | sgd | adamw8bit | rmsprop8bit (bitsandbytes, "
                                      "8-bit states) | adamw4bit (torchao, 4-bit states); the low-bit ones need pip "
                                      "install 'bso-cache[lowbit]'.", sweep=True, card=True, plan=True)
    lr: float = option(1e-6, "Peak learning rate.", sweep=True, card=True)
    lr_schedule: Schedule = option("cosine", "cosine | linear | constant (after warmup).", sweep=True, card=True)
    warmup_ratio: float = option(0.05, "Share of steps of linear warmup.", sweep=True, card=True)
    weight_decay: float = option(0.0, "Decoupled weight decay (AdamW) or L2 (RMSprop, SGD).", sweep=True, card=True)
    grad_clip: float = option(10.0, "Max gradient norm (0: no clipping).", sweep=True, card=True)
    batch_size: int = option(16, "Pairs per optimizer step, in total over --grad-accum micro-batches and torchrun "
                                 "processes (the same run whatever their number).", sweep=True, card=True, plan=True)
    grad_accum: int = option(1, "Micro-batches per step and process (less memory, same result).", sweep=True,
                             card=True, plan=True)
    epochs: int = option(3, "Passes over the cache.", sweep=True, card=True)
    max_steps: int | None = option(None, "Stop after this many optimizer steps.", sweep=True, card=True)
    seed: int = option(0, "Seed of shard order, shuffle buffer and init.", sweep=True, card=True)


@dataclass(frozen=True)
class ComputeOptions:
    """Numerics, memory levers and devices: how the same run is computed."""

    dtype: DType = option("float32", "Policy weights dtype: float32 | bfloat16 | float16. With bfloat16/float16 "
                                     "each update is computed in float32 and stochastically rounded to the weights "
                                     "(unbiased), so DPO-size learning rates still learn.", card=True, plan=True)
    autocast: Autocast = option("none", "Mixed precision: none | bf16 | fp16 (weights stay in --dtype).", card=True,
                                plan=True)
    gradient_checkpointing: bool = option(False, "Recompute activations in backward (less memory). On the CPU it also "
                                          "fixes glibc's mmap threshold at 128 KiB (freed blocks go back to the OS; "
                                          "a MALLOC_* setting of yours rules).", card=True, plan=True)
    optimizer_in_backward: bool = option(False, "Apply each parameter's update as soon as its gradient is ready and "
                                         "free the gradient: the model's gradients are never held at once. Needs "
                                         "--grad-clip 0 and --grad-accum 1; one process. On the CPU it also fixes "
                                         "glibc's mmap threshold at 128 KiB.", card=True, plan=True)
    optimizer_offload: bool = option(False, "Keep the optimizer state in CPU memory and update there (CUDA only); "
                                            "gradients are clipped on the GPU first.", card=True, plan=True)
    device: str = option("auto", DEVICE_HELP, resume=True)
    prefix_sharing: PrefixSharing = option(DEFAULT_PREFIX_SHARING, PREFIX_SHARING_HELP, resume=True)
    attn_implementation: Attention = option("auto", ATTN_HELP, resume=True)
    fsdp: bool = option(False, "Under torchrun: shard parameters, gradients and optimizer state over the processes "
                               "(FSDP2) instead of DDP.")
    lora_r: int = option(0, "LoRA rank (0: full fine-tuning). Needs peft.", card=True, plan=True)
    lora_alpha: float = option(16.0, "LoRA scaling alpha (the update is scaled by alpha / r).", card=True)
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.")
    lora_target: str = option("all-linear", "Comma-separated module names, or all-linear.", card=True)
    load_in_4bit: bool = option(False, "QLoRA: the policy's linear layers in 4-bit NF4 (bitsandbytes, computing in "
                                "--dtype) with --lora-r adapters trained on them. Its reference is the 4-bit base, so "
                                "the cache must be built with --load-in-4bit too. The final model is saved merged and "
                                "de-quantized (an ordinary model in --dtype), the adapters in adapter/. Needs pip "
                                "install 'bso-cache[qlora]'.", card=True, plan=True)


@dataclass(frozen=True)
class OutputOptions:
    """Checkpoints, cadences, evaluation and trackers: where and how the run reports."""

    save_every: int = option(0, "Checkpoint every N steps (0: only the final model).", resume=True)
    keep_checkpoints: int = option(2, "Checkpoints kept.", resume=True)
    resume: bool = option(False, "Continue from the newest checkpoint in --out.", resume=True)
    overwrite: bool = option(False, "Replace a non-empty --out.", resume=True)
    log_every: int = option(1, "Write metrics every N steps.", resume=True)
    eval_cache: str | None = option(None, "A held-out cache to evaluate on.", path=True, resume=True)
    eval_every: int = option(0, "Evaluate on --eval-cache every N steps.", resume=True)
    allow_other_reference: bool = option(False, "Accept an --eval-cache built with another reference than --cache "
                                                "(its rewards are then relative to that reference).", resume=True)
    tensorboard: bool = option(False, "Also log to OUT/tensorboard (the same as --report-to tensorboard).",
                               resume=True)
    report_to: str = option("none", "Experiment trackers, comma-separated: none | tensorboard | wandb | mlflow | "
                            "trackio (each an extra: pip install 'bso-cache[wandb]'; configured by its usual "
                            "environment variables). The configuration, every metrics.jsonl scalar, the evaluation "
                            "and the final model; a sweep groups its runs.", resume=True)
    step0_tolerance: float | None = option(None, "Max |log pi - log pi_ref| per response token at step 0 when the "
                                                 "policy is the reference [default: 0.001 nats with float32 on both "
                                                 "sides, 0.05 otherwise].", resume=True)
    trust_remote_code: bool = option(False, REMOTE_CODE_HELP, resume=True)
    progress: bool = option(True, PROGRESS_HELP, resume=True)


def parse_report_to(value: str | None, tensorboard: bool = False) -> tuple[str, ...]:
    """'wandb,mlflow' -> ('wandb', 'mlflow'); 'none' or '' -> (); `--tensorboard` adds tensorboard."""
    names = [n.strip().lower() for n in (value or "").split(",") if n.strip()]
    if "none" in names and len(names) > 1:
        raise ConfigError(f"--report-to {value}: 'none' cannot be combined with a tracker")
    names = [n for n in names if n != "none"]
    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise ConfigError(f"--report-to: unknown tracker '{bad[0]}'; valid: none, {', '.join(REPORTERS)} "
                          f"(several comma-separated)")
    if tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, init=False)
class TrainConfig:
    """Every option of `bso-cache train`, by section. Made flat: TrainConfig(cache=..., out=..., lr=...)."""

    SECTIONS = {"source": SourceOptions, "loss": LossOptions, "data": DataOptions, "optim": OptimOptions,
                "compute": ComputeOptions, "outputs": OutputOptions}

    source: SourceOptions
    loss: LossOptions
    data: DataOptions
    optim: OptimOptions
    compute: ComputeOptions
    outputs: OutputOptions

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(_SECTION_OF))
        if unknown:
            raise TypeError(f"TrainConfig got unknown option(s): {', '.join(unknown)}")
        for section, cls in self.SECTIONS.items():
            object.__setattr__(self, section, cls(**{k: v for k, v in values.items() if _SECTION_OF[k] == section}))
        self.validate()

    def __getattr__(self, name: str) -> Any:  # cfg.lr: the option of that name, from its section
        section = _SECTION_OF.get(name)
        if section is None:
            raise AttributeError(f"'TrainConfig' has no option {name!r}")
        return getattr(object.__getattribute__(self, section), name)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some options changed (validated like any new configuration)."""
        from bso_cache.config.fields import to_dict

        return TrainConfig(**{**to_dict(self), **changes})

    def validate(self) -> None:
        """Values only; what the machine must have for them is preflight.check_train's."""
        check_choices(self)
        check_digest_text(self.source.expect_digest)
        o = self.optim
        if o.lr < 0:
            raise ConfigError("--lr must be >= 0")
        if not 0 <= o.warmup_ratio < 1:
            raise ConfigError("--warmup-ratio must be in [0, 1)")
        if o.batch_size < 1 or o.grad_accum < 1 or o.batch_size % o.grad_accum:
            raise ConfigError(f"--batch-size ({o.batch_size}) must be a positive multiple of "
                              f"--grad-accum ({o.grad_accum})")
        if o.epochs < 1 or (o.max_steps is not None and o.max_steps < 1):
            raise ConfigError("--epochs and --max-steps must be >= 1")
        out = self.outputs
        if out.log_every < 1 or out.save_every < 0 or out.eval_every < 0:
            raise ConfigError("--log-every must be >= 1; --save-every and --eval-every >= 0")
        if out.eval_every and not out.eval_cache:
            raise ConfigError("--eval-every needs --eval-cache")
        self._check_compute()
        self.loss_spec()
        parse_report_to(out.report_to, out.tensorboard)

    def _check_compute(self) -> None:
        c, o = self.compute, self.optim
        if c.lora_r < 0:
            raise ConfigError("--lora-r must be >= 0")
        if c.fsdp and c.lora_r:
            raise ConfigError("--fsdp with --lora-r is not supported; LoRA adapters are small: use DDP")
        if c.load_in_4bit and not c.lora_r:
            raise ConfigError("--load-in-4bit: 4-bit weights are not trained directly; QLoRA trains LoRA adapters "
                              "on them: add --lora-r (e.g. 16)")
        if c.load_in_4bit and self.source.gguf_file:
            raise ConfigError(GGUF_4BIT)
        if c.optimizer_in_backward and o.grad_clip > 0:
            raise ConfigError(f"--optimizer-in-backward applies each update before the global gradient norm is "
                              f"known, so it cannot clip it: pass --grad-clip 0 (now {o.grad_clip:g}) or drop "
                              f"--optimizer-in-backward")
        if c.optimizer_in_backward and o.grad_accum > 1:
            raise ConfigError("--optimizer-in-backward updates at every backward pass; it cannot accumulate "
                              f"--grad-accum {o.grad_accum} micro-batches: use --grad-accum 1 (a smaller "
                              "--batch-size) or drop --optimizer-in-backward")
        if c.fsdp and (o.optimizer not in ("adamw", "rmsprop", "sgd") or c.dtype != "float32"
                       or c.optimizer_in_backward or c.optimizer_offload):
            raise ConfigError("--fsdp runs the plain optimizers (adamw, rmsprop, sgd) on float32 weights; "
                              "the low-bit optimizers, bf16/fp16 weights, "
                              "--optimizer-in-backward and --optimizer-offload are for one process or DDP")

    def loss_spec(self):
        from bso_cache.losses import make_loss_spec

        return make_loss_spec(**dataclasses.asdict(self.loss))

    @property
    def micro_batch(self) -> int:
        return self.optim.batch_size // self.optim.grad_accum


_SECTION_OF = {o.name: o.section for o in options(TrainConfig)}


def defaults(section: str) -> dict:
    """A section's options at their defaults."""
    return {o.name: o.default for o in options(TrainConfig) if o.section == section}


# The baselines people compare against (docs/LOSSES.md), one table for `sweep --baselines`, the
# demo and the reproduction script: overrides of the loss and data sections, the rest at their defaults.
BASELINES = {
    "dpo-helpful": dict(generator="logistic", safety_penalty=0.0, pairs="none", orientation="better"),
    "dpo-harmless": dict(generator="logistic", safety_penalty=0.0, pairs="none", orientation="safer"),
    "safedpo": dict(generator="logistic", safety_penalty=10.0, pairs="safedpo", orientation="better"),
    # the authors' recipe: the loss section's defaults, held fixed when a sweep varies them
    "bso": {**{k: v for k, v in defaults("loss").items() if k not in ("clamp_lower", "clamp_upper", "label_smoothing",
                                                                        "mu")},
            "pairs": "safedpo", "orientation": "better"},
}
