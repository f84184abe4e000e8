"""The configurations of `eval`, `verify` and `plan`: every option of each, declared once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bso_cache.errors import ConfigError
from bso_cache.config.build import BuildConfig, GGUF_4BIT
from bso_cache.config.choices import (ATTN_HELP, CACHE_HELP, DIGEST_HELP, DEFAULT_MAX_LENGTH, DEFAULT_PREFIX_SHARING, DEVICE_HELP,
                                      GGUF_HELP, PREFIX_SHARING_HELP, REMOTE_CODE_HELP, Attention, DType,
                                      PrefixSharing)
from bso_cache.config.fields import check_choices, check_digest_text, option


@dataclass(frozen=True)
class EvalConfig:
    """`bso-cache eval`: implicit-reward figures on a cache, and with --generate, sampled responses scored."""

    model: str = option(help="Model to evaluate (a run folder or any from_pretrained path).", short="-m")
    cache: str = option(help="Cache whose pairs (and reference log-probs) to evaluate on.", short="-c", path=True)
    expect_digest: str | None = option(None, DIGEST_HELP)
    results: str | None = option(None, "Also write the results as JSON to this file.", path=True)
    batch_size: int = option(16, "Pairs per forward.")
    max_pairs: int | None = option(None, "Evaluate at most this many pairs (in cache order).")
    device: str = option("auto", DEVICE_HELP)
    dtype: DType = option("float32", "Model dtype.")
    load_in_4bit: bool = option(False, "Load the model's linear layers in 4-bit NF4 (bitsandbytes), as a QLoRA "
                                       "cache's reference was (build --load-in-4bit). A QLoRA run's saved model is "
                                       "an ordinary one: evaluate it without this.")
    generate: bool = option(False, "Also sample responses to the cache's prompts and score them.")
    cost_model: str | None = option(None, "Sequence-classification cost model (harmless: cost <= 0).")
    reward_model: str | None = option(None, "Sequence-classification reward model.")
    max_prompts: int = option(64, "Distinct prompts to generate for.")
    max_new_tokens: int = option(512, "Tokens to sample per response.")
    temperature: float = option(0.7, "Sampling temperature (0: greedy).")
    top_p: float = option(0.9, "Nucleus sampling: the smallest token set of this probability.")
    generations: str | None = option(None, "Save generations here as JSONL [default: beside --results, or "
                                           "./generations.jsonl].", path=True)
    seed: int = option(0, "Seed of the sampling.")
    prefix_sharing: PrefixSharing = option(DEFAULT_PREFIX_SHARING, PREFIX_SHARING_HELP)
    attn_implementation: Attention = option("auto", ATTN_HELP)
    allow_other_reference: bool = option(False, "Evaluate a run that started from other weights than the cache's "
                                                "reference (its rewards are then relative to that reference).")
    gguf_file: str | None = option(None, GGUF_HELP)
    trust_remote_code: bool = option(False, REMOTE_CODE_HELP)
    progress: bool = option(True, "Show a progress bar (pairs evaluated).")

    def __post_init__(self) -> None:
        check_choices(self)
        check_digest_text(self.expect_digest)
        if self.batch_size < 1 or self.max_prompts < 1 or self.max_new_tokens < 1:
            raise ConfigError("--batch-size, --max-prompts and --max-new-tokens must be >= 1")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError("--max-pairs must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")
        if self.generate and not (self.cost_model or self.reward_model):
            raise ConfigError("--generate needs --cost-model and/or --reward-model to score the responses")
        if self.load_in_4bit and self.gguf_file:
            raise ConfigError(GGUF_4BIT)


EVAL_DEFAULTS = EvalConfig(model="", cache="")  # generation.generate's defaults are eval's


@dataclass(frozen=True)
class VerifyConfig:
    """`bso-cache verify`: every shard's integrity, and optionally a sample re-scored with the reference."""

    cache: str = option(help=CACHE_HELP, short="-c", path=True)
    expect_digest: str | None = option(None, DIGEST_HELP)
    model: str | None = option(None, "Reference to re-score with [default: the manifest's].")
    sample: int = option(0, "Pairs to re-score with the reference (0: integrity only).")
    seed: int = option(0, "Seed of the sample.")
    batch_size: int = option(8, "Pairs per forward.")
    device: str = option("auto", DEVICE_HELP)
    tolerance: float | None = option(None, "Fail if a re-scored log-prob differs by more than this per response "
                                           "token (nats) [default: by the cache's dtype, the step-0 check's rule: "
                                           "0.001 for float32, 0.05 for bfloat16/float16].")
    prefix_sharing: PrefixSharing = option(BuildConfig.prefix_sharing, PREFIX_SHARING_HELP)
    attn_implementation: Attention = option(BuildConfig.attn_implementation, ATTN_HELP)
    gguf_file: str | None = option(None, "Load --model from this GGUF file inside it [default: the manifest's, with "
                                         "the manifest's reference].")
    trust_remote_code: bool = option(False, REMOTE_CODE_HELP)

    def __post_init__(self) -> None:
        check_choices(self)
        check_digest_text(self.expect_digest)
        if self.sample < 0 or self.batch_size < 1:
            raise ConfigError("--sample must be >= 0 and --batch-size >= 1")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ConfigError("--tolerance must be > 0")


@dataclass(frozen=True)
class PlanConfig:
    """`bso-cache plan`'s own options; the levers and the batch are train's (TrainConfig's plan=True options)."""

    model: str = option(help="Model folder or hub id in the local HF cache: only its config.json is read, no "
                             "weights.", short="-m")
    gguf_file: str | None = option(None, "Read the shape from this GGUF file's header inside --model.")
    cache: str | None = option(None, "Take the sequence and response lengths from this cache (its longest pair) "
                                     "instead of --max-length.", short="-c", path=True)
    max_length: int = option(DEFAULT_MAX_LENGTH, "Tokens of prompt + the longer response, without --cache.")
    response_length: int | None = option(None, "Tokens of the longer response, without --cache [default: half of "
                                               "--max-length].")
    device: str = option("cuda", "cuda (adds the CUDA runtime's own memory) | cpu (training memory only).")
    gpu_memory: str | None = option(None, "e.g. 24GiB: also say which lever combinations fit and the largest "
                                          "micro-batch of each.")
    trust_remote_code: bool = option(False, "Allow a config class from the hub.")

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"--device {self.device}: plan predicts for cuda or cpu")
        if self.max_length < 2:
            raise ConfigError(f"--max-length {self.max_length}: a pair has at least 2 tokens")
        if self.response_length is not None and not 1 <= self.response_length < self.max_length:
            raise ConfigError(f"--response-length {self.response_length}: between 1 and --max-length - 1 "
                              f"({self.max_length - 1}): the prompt has a token too")


SelectMetric = Literal["eval_balanced", "eval_preference_accuracy", "eval_safety_accuracy", "eval_mean_margin"]
Backend = Literal["sequential", "ray"]
# ASHA's settings for --early-stop (training/sweep_ray.py): a run is first judged after GRACE_EVALS
# held-out evaluations (the first, a few steps in, mostly measures the reference: the policy has
# barely moved), and at each rung the best 1/REDUCTION continue, judged once REDUCTION runs have
# reached the rung. 3 rather than Ray's default 4: a BSO sweep is a small grid (4-16 runs), where 3
# gives more rungs, so fewer good runs are judged on one early evaluation.
ASHA_GRACE_EVALS = 2
ASHA_REDUCTION = 3


@dataclass(frozen=True)
class SweepConfig:
    """`bso-cache sweep`'s own options; the grid and every other train option come from TrainConfig."""

    cache: str = option(help="Cache folder from `bso-cache build` (one for every run).", short="-c", path=True)
    out: str = option(help="Sweep folder: one subfolder per run, summary.csv/.json, PNG plots.", short="-o",
                      path=True)
    baselines: str | None = option(None, "Comma-separated: dpo-helpful, dpo-harmless, safedpo, bso "
                                         "(docs/LOSSES.md).")
    eval_cache: str | None = option(None, "Held-out cache: each run is evaluated on it at the end (and every "
                                          "--eval-every steps).", path=True)
    backend: Backend = option("sequential", "sequential: one run after another in this process | ray: the runs "
                              "as Ray Tune trials, --parallel at once on this machine or a cluster (pip install "
                              "'bso-cache[ray]').")
    parallel: int | None = option(None, "With --backend ray: at most this many runs at once [default: as many as "
                                        "the resources allow].")
    gpus_per_run: str = option("0", "With --backend ray: GPUs per run; a fraction packs several runs on one GPU "
                                    "(0.25: four), auto: as many as plan predicts fit the GPU's memory with a "
                                    "20% margin.")
    cpus_per_run: int = option(1, "With --backend ray: CPU cores per run; each run uses that many torch threads, "
                                  "so runs never oversubscribe the cores.")
    ray_address: str | None = option(None, "With --backend ray: join this Ray cluster (auto: the one `ray start` "
                                           "made) [default: a local cluster started and shut down by the sweep].")
    early_stop: bool = option(False, f"With --backend ray, --eval-cache and --eval-every: stop runs that are "
                                     f"losing on --select, by Ray Tune's ASHA: judged first after "
                                     f"{ASHA_GRACE_EVALS} evaluations (the first mostly measures the reference), "
                                     f"then the best 1/{ASHA_REDUCTION} go on at each rung, once {ASHA_REDUCTION} "
                                     f"runs have reached it (so two good runs never judge each other alone). A "
                                     f"stopped run keeps its last checkpoint and evaluation.")
    select: SelectMetric = option("eval_balanced", "The held-out figure that ranks runs (early stopping and the "
                                  "recommended run): eval_balanced (the mean of preference and safety accuracy; "
                                  "the preference accuracy alone where no pair differs in safety) | "
                                  "eval_preference_accuracy | eval_safety_accuracy | eval_mean_margin. Never the "
                                  "training loss: the generators' losses are on different scales.")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.parallel is not None and self.parallel < 1 or self.cpus_per_run < 1:
            raise ConfigError("--parallel and --cpus-per-run must be >= 1")
        if self.gpus_per_run != "auto":
            try:
                ok = float(self.gpus_per_run) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"--gpus-per-run {self.gpus_per_run}: a number >= 0 (0.25 packs four runs on "
                                  f"a GPU) or auto")
        ray_only = [flag for flag, on in (("--parallel", self.parallel is not None), ("--ray-address", self.ray_address),
                                         ("--early-stop", self.early_stop)) if on]
        if ray_only and self.backend != "ray":
            raise ConfigError(f"{', '.join(ray_only)} need --backend ray (pip install 'bso-cache[ray]')")
        if self.early_stop and not self.eval_cache:
            raise ConfigError("--early-stop ranks runs on held-out figures: give --eval-cache and --eval-every")
