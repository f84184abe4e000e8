"""The `bso-cache` command line: options -> frozen configs -> library calls. No math, no I/O logic.

The project's own errors (bad input, bad options, damaged caches) print as one line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import typer

from bso_cache.config import DEFAULT_MAX_LENGTH as _DEFAULT_MAX_LENGTH, DEFAULT_ROWS_PER_SHARD as _DEFAULT_ROWS_PER_SHARD
from bso_cache.config import BuildConfig as _B, TrainConfig as _T  # the one source of every default
from bso_cache.config import EVAL_DEFAULTS as _E

app = typer.Typer(
    name="bso-cache",
    help="Train LMs to be helpful and safe with BSO (DPO, SafeDPO, ...) from an offline "
         "reference-log-prob cache: `build` scores the data with the reference once, `train` "
         "trains the policy alone, as often as you like.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _run(fn: Callable, *args, **kwargs):
    from bso_cache.errors import BsoCacheError

    try:
        return fn(*args, **kwargs)
    except BsoCacheError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


PREFIX_SHARING_HELP = ("Score each prompt once for both responses (one sequence prompt+chosen+rejected with a "
                       "block mask): auto (where the estimated cost for this model and data is lower: measured on "
                       "the CPU and an H200) | on | off. The numbers are the same either way; a model whose attention "
                       "cannot take the mask falls back to off with one printed line.")


ATTN_HELP = ("transformers' attention: auto (the measured best per device: docs/PERFORMANCE.md) | sdpa | eager | "
             "flex_attention (prefix sharing with FlexAttention's block mask; training with it needs a GPU). A "
             "model without FlexAttention support uses sdpa, with one printed line.")


RECIPE_HELP = ("A recipe file (YAML, TOML or JSON; a run's run_config.json too): keys are this command's option "
               "names, flags given here override it.")


def _use_recipe(ctx: typer.Context, param, value):
    from .recipes import use_recipe

    return use_recipe(ctx, param, value)


def _log(line: str) -> None:
    """A progress line on stderr, written above any progress bar instead of through it."""
    import sys

    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def _version(value: bool) -> None:
    if value:
        from bso_cache import __version__

        typer.echo(f"bso-cache {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Train LMs to be helpful and safe with BSO (DPO, SafeDPO, ...) from an offline reference-log-prob
    cache: `build` scores the data with the reference once, `train` trains the policy alone, as often
    as you like."""


def _echo_json(obj, indent: int | None = 2) -> None:
    """Strict JSON on stdout: null where a figure does not exist, never NaN."""
    from bso_cache.files import strict_json

    typer.echo(json.dumps(strict_json(obj), indent=indent, default=str, allow_nan=False))


# --------------------------------------------------------------------------------------- build
@app.command()
def build(
    config: Optional[Path] = typer.Option(None, "--config", help=RECIPE_HELP, is_eager=True, callback=_use_recipe),
    model: str = typer.Option(..., "--model", "-m", help="Reference model: local folder or hub id (in the local HF cache)."),
    data: str = typer.Option(..., "--data", "-d", help="Input: JSONL/JSON/Parquet/CSV file or folder, a save_to_disk folder, or a HF dataset name."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder to write (resumed if unfinished)."),
    split: str = typer.Option(_B.split, help="Split of a Hugging Face dataset."),
    hf_config: Optional[str] = typer.Option(_B.hf_config, "--hf-config", help="Configuration name of a HF dataset."),
    format: str = typer.Option(_B.format, "--format", help="Input format: auto | pku | hh | generic | implicit (TRL's implicit prompt: chosen/rejected conversations sharing their first turns; auto: from the first row)."),
    gguf_file: Optional[str] = typer.Option(_B.gguf_file, "--gguf-file", help="Load the model from this GGUF file inside --model."),
    template: str = typer.Option(_B.template, help="Prompt rendering: auto (chat template if the tokenizer has one) | chat | plain ('Human: ...\\n\\nAssistant:')."),
    chat_template: Optional[Path] = typer.Option(_B.chat_template, "--chat-template", help="Jinja chat template file overriding the tokenizer's."),
    system_prompt: Optional[str] = typer.Option(_B.system_prompt, "--system-prompt", help="System message added to every conversation that has none (a row's own system message is kept; the manifest notes count both)."),
    max_length: Optional[int] = typer.Option(_B.max_length, "--max-length", help=f"Max tokens of prompt + the longer response [default: min({_DEFAULT_MAX_LENGTH}, model positions)]."),
    overlong: str = typer.Option(_B.overlong, help="Pairs over --max-length: drop (counted) | truncate (responses cut)."),
    batch_size: int = typer.Option(_B.batch_size, "--batch-size", help="Pairs per reference forward (length-bucketed)."),
    rows_per_shard: Optional[int] = typer.Option(_B.rows_per_shard, "--rows-per-shard", help=f"Input rows per Parquet shard, the unit of resume and of torchrun ranks [default: {_DEFAULT_ROWS_PER_SHARD}, or the input's rows when fewer, whatever the number of ranks; build memory is bounded by it]."),
    dtype: str = typer.Option(_B.dtype, help="Reference dtype: float32 | bfloat16 | float16 (log-softmax is float32 regardless)."),
    device: str = typer.Option(_B.device, help="auto | cpu | cuda[:N]."),
    prefix_sharing: str = typer.Option(_B.prefix_sharing, "--prefix-sharing", help=PREFIX_SHARING_HELP),
    attn_implementation: str = typer.Option(_B.attn_implementation, "--attn-implementation", help=ATTN_HELP),
    skip_bad_rows: bool = typer.Option(_B.skip_bad_rows, "--skip-bad-rows", help="Count malformed rows as dropped (with the reason) instead of stopping."),
    overwrite: bool = typer.Option(_B.overwrite, "--overwrite", help="Discard an existing cache in --out made with other settings."),
    trust_remote_code: bool = typer.Option(_B.trust_remote_code, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    progress: bool = typer.Option(_B.progress, "--progress/--no-progress", help="Show a progress bar."),
):
    """Score preference pairs with the frozen reference model once; write Parquet shards + manifest.

    Re-running the same command on an unfinished cache resumes it; on a finished one it does nothing.
    """
    from bso_cache.build import build_cache
    from bso_cache.config import BuildConfig

    cfg = _run(BuildConfig, model=model, data=data, out=str(out), split=split, hf_config=hf_config,
                      format=format, gguf_file=gguf_file, template=template,
                      chat_template=str(chat_template) if chat_template else None,
                      system_prompt=system_prompt, max_length=max_length, overlong=overlong,
                      batch_size=batch_size, rows_per_shard=rows_per_shard, dtype=dtype,
                      device=device, prefix_sharing=prefix_sharing, attn_implementation=attn_implementation,
                      skip_bad_rows=skip_bad_rows, overwrite=overwrite,
                      trust_remote_code=trust_remote_code, progress=progress)
    _run(build_cache, cfg, log=_log)


# ------------------------------------------------------------------------------------- inspect
@app.command()
def inspect(
    cache: Path = typer.Argument(..., help="Cache folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    verify: bool = typer.Option(False, "--verify", help="Also check every shard's checksum."),
):
    """Rows, drops by reason, length percentiles, label mix by pair type, log-prob statistics."""
    from bso_cache.inspect_cache import inspect_cache

    info = _run(inspect_cache, cache, verify=verify)
    if as_json:
        _echo_json(info)
        return
    r = info["rows"]
    typer.echo(f"cache      {info['cache']}  ({info['shards']} shards, {info['bytes'] / 1e6:.2f} MB)")
    typer.echo(f"reference  {info['reference']['name_or_path']}  {info['reference']['weights_digest'][:23]}")
    from bso_cache.cache import counts_text

    dropped = sum(r["dropped"].values())
    reasons = " (" + counts_text(r["dropped"]) + ")" if dropped else ""
    typer.echo(f"rows       input {r['input']}, written {r['written']}, dropped {dropped}{reasons}")
    if info["notes"]:
        typer.echo(f"notes      {counts_text(info['notes'])}")
    L = info["lengths"]
    typer.echo(f"lengths    p50 {L['total_p50']:.0f}, p90 {L['total_p90']:.0f}, p99 {L['total_p99']:.0f}, "
               f"max {L['total_max']}; mean prompt {L['prompt_mean']:.1f}, chosen {L['chosen_mean']:.1f}, "
               f"rejected {L['rejected_mean']:.1f}; truncated {L['truncated']}")
    typer.echo(f"pair types {counts_text(info['pair_types'])}   (chosen/rejected safety)")
    typer.echo(f"safer      safer_is_chosen: {counts_text(info['safer_is_chosen'])}")
    lp = info["ref_logps"]
    typer.echo(f"ref logp   chosen mean {lp['chosen_mean']:.2f} ({lp['chosen_per_token_mean']:.3f}/token), "
               f"rejected mean {lp['rejected_mean']:.2f} ({lp['rejected_per_token_mean']:.3f}/token); "
               f"reference prefers chosen in {100 * lp['ref_prefers_chosen']:.1f}%")

# --------------------------------------------------------------------------------------- train
_LOSS_HELP = "Loss (shared BSO.md): u = -(beta*m + C*(s_w - s_l)), clamped, loss = l_h(u)."


def _train_config(**kw):
    from bso_cache.config import TrainConfig

    return TrainConfig(**kw)


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", help=RECIPE_HELP, is_eager=True, callback=_use_recipe),
    cache: Path = typer.Option(..., "--cache", "-c", help="Cache folder from `bso-cache build`."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: final model (from_pretrained format), metrics.jsonl, run_config.json, checkpoints/."),
    policy: Optional[str] = typer.Option(_T.policy, "--policy", help="Policy to train [default: the reference recorded in the manifest]. Must share the cache's tokenizer."),
    gguf_file: Optional[str] = typer.Option(_T.gguf_file, "--gguf-file", help="GGUF file inside --policy."),
    generator: str = typer.Option(_T.generator, help="Generator h: logistic (DPO/SafeDPO) | kliep | lsif | ba | sba | phi (= sba with lambda=1-mu, s=1). sba is computed with expm1: its loss carries the constant 1/(lambda s) (1.25 nats by default), which changes no gradient."),
    beta: float = typer.Option(_T.beta, help="Temperature beta > 0 (as in DPO)."),
    safety_penalty: float = typer.Option(_T.safety_penalty, "--safety-penalty", help="C >= 0, the safety penalty (C=0: plain preference optimisation)."),
    lam: float = typer.Option(_T.lam, help="lambda of ba/sba (> -1; 0 is the kliep limit)."),
    scale: float = typer.Option(_T.scale, help="s of sba (4 makes its gradient at u=0 equal logistic's)."),
    mu: Optional[float] = typer.Option(_T.mu, help="mu of the phi generator."),
    clamp: Optional[float] = typer.Option(_T.clamp, help="Symmetric bound kappa on u: [-kappa, kappa]; no gradient past a bound (a pair within 1e-3 of one, the cache's float noise, counts as on it and keeps its gradient) [default: [-30, 30], and for C > 30 the upper bound becomes min(C+10, floor(85/(1+lambda))) so safe-winner pairs (u = C at start) still learn; logistic, which cannot overflow, is not clamped unless a bound is given]."),
    clamp_lower: Optional[float] = typer.Option(_T.clamp_lower, "--clamp-lower", help="Lower bound on u (overrides --clamp's)."),
    clamp_upper: Optional[float] = typer.Option(_T.clamp_upper, "--clamp-upper", help="Upper bound on u (overrides --clamp's and the automatic raise)."),
    label_smoothing: float = typer.Option(_T.label_smoothing, "--label-smoothing", help="Conservative epsilon in [0, 0.5): (1-e) l(clamp(u_raw)) + e l(clamp(-u_raw)), the swapped pair's own clamped log-ratio (BSO.md)."),
    pairs: str = typer.Option(_T.pairs, help="Pair handling: none | safedpo (swap unsafe-chosen/safe-rejected, drop both-unsafe) | drop-both-unsafe."),
    orientation: str = typer.Option(_T.orientation, help="better (chosen = more helpful) | safer (chosen = safer response, PKU-style data)."),
    optimizer: str = typer.Option(_T.optimizer, help="adamw | rmsprop | sgd | adamw8bit | rmsprop8bit (bitsandbytes, 8-bit states) | adamw4bit (torchao, 4-bit states); the low-bit ones need pip install 'bso-cache[lowbit]'."),
    lr: float = typer.Option(_T.lr, help="Peak learning rate."),
    lr_schedule: str = typer.Option(_T.lr_schedule, "--lr-schedule", help="cosine | linear | constant (after warmup)."),
    warmup_ratio: float = typer.Option(_T.warmup_ratio, "--warmup-ratio", help="Share of steps of linear warmup."),
    weight_decay: float = typer.Option(_T.weight_decay, "--weight-decay", help="Decoupled weight decay (AdamW) or L2 (RMSprop, SGD)."),
    grad_clip: float = typer.Option(_T.grad_clip, "--grad-clip", help="Max gradient norm (0: no clipping)."),
    batch_size: int = typer.Option(_T.batch_size, "--batch-size", help="Pairs per optimizer step, in total over --grad-accum micro-batches and torchrun processes (the same run whatever their number)."),
    grad_accum: int = typer.Option(_T.grad_accum, "--grad-accum", help="Micro-batches per step and process (less memory, same result)."),
    epochs: int = typer.Option(_T.epochs, help="Passes over the cache."),
    max_steps: Optional[int] = typer.Option(_T.max_steps, "--max-steps", help="Stop after this many optimizer steps."),
    seed: int = typer.Option(_T.seed, help="Seed of shard order, shuffle buffer and init."),
    shuffle: bool = typer.Option(_T.shuffle, "--shuffle/--no-shuffle", help="--no-shuffle: pairs in cache order (shards in order, rows in order, no length bucketing), to match another tool step by step; the seed then changes nothing about the order."),
    shuffle_buffer: int = typer.Option(_T.shuffle_buffer, "--shuffle-buffer", help="Pairs held for shuffling (bounds memory)."),
    dtype: str = typer.Option(_T.dtype, help="Policy weights dtype: float32 | bfloat16 | float16. With bfloat16/float16 each update is computed in float32 and stochastically rounded to the weights (unbiased), so DPO-size learning rates still learn."),
    autocast: str = typer.Option(_T.autocast, help="Mixed precision: none | bf16 | fp16 (weights stay in --dtype)."),
    gradient_checkpointing: bool = typer.Option(_T.gradient_checkpointing, "--gradient-checkpointing", help="Recompute activations in backward (less memory)."),
    optimizer_in_backward: bool = typer.Option(_T.optimizer_in_backward, "--optimizer-in-backward", help="Apply each parameter's update as soon as its gradient is ready and free the gradient: the model's gradients are never held at once. Needs --grad-clip 0 and --grad-accum 1; one process."),
    optimizer_offload: bool = typer.Option(_T.optimizer_offload, "--optimizer-offload", help="Keep the optimizer state in CPU memory and update there (CUDA only); gradients are clipped on the GPU first."),
    device: str = typer.Option(_T.device, help="auto | cpu | cuda[:N]."),
    prefix_sharing: str = typer.Option(_T.prefix_sharing, "--prefix-sharing", help=PREFIX_SHARING_HELP),
    attn_implementation: str = typer.Option(_T.attn_implementation, "--attn-implementation", help=ATTN_HELP),
    fsdp: bool = typer.Option(_T.fsdp, "--fsdp", help="Under torchrun: shard parameters, gradients and optimizer state over the processes (FSDP2) instead of DDP."),
    lora_r: int = typer.Option(_T.lora_r, "--lora-r", help="LoRA rank (0: full fine-tuning). Needs peft."),
    lora_alpha: float = typer.Option(_T.lora_alpha, "--lora-alpha", help="LoRA scaling alpha (the update is scaled by alpha / r)."),
    lora_dropout: float = typer.Option(_T.lora_dropout, "--lora-dropout", help="Dropout on the LoRA input."),
    lora_target: str = typer.Option(_T.lora_target, "--lora-target", help="Comma-separated module names, or all-linear."),
    save_every: int = typer.Option(_T.save_every, "--save-every", help="Checkpoint every N steps (0: only the final model)."),
    keep_checkpoints: int = typer.Option(_T.keep_checkpoints, "--keep-checkpoints", help="Checkpoints kept."),
    resume: bool = typer.Option(_T.resume, "--resume", help="Continue from the newest checkpoint in --out."),
    overwrite: bool = typer.Option(_T.overwrite, "--overwrite", help="Replace a non-empty --out."),
    log_every: int = typer.Option(_T.log_every, "--log-every", help="Write metrics every N steps."),
    eval_cache: Optional[Path] = typer.Option(_T.eval_cache, "--eval-cache", help="A held-out cache to evaluate on."),
    eval_every: int = typer.Option(_T.eval_every, "--eval-every", help="Evaluate on --eval-cache every N steps."),
    allow_other_reference: bool = typer.Option(_T.allow_other_reference, "--allow-other-reference", help="Accept an --eval-cache built with another reference than --cache (its rewards are then relative to that reference)."),
    tensorboard: bool = typer.Option(_T.tensorboard, "--tensorboard", help="Also log to OUT/tensorboard (the same as --report-to tensorboard)."),
    report_to: str = typer.Option(_T.report_to, "--report-to", help="Experiment trackers, comma-separated: none | tensorboard | wandb | mlflow | trackio (each an extra: pip install 'bso-cache[wandb]'; configured by its usual environment variables). The configuration, every metrics.jsonl scalar, the evaluation and the final model; a sweep groups its runs."),
    step0_tolerance: Optional[float] = typer.Option(_T.step0_tolerance, "--step0-tolerance", help="Max |log pi - log pi_ref| per response token at step 0 when the policy is the reference [default: 0.001 nats with float32 on both sides, 0.05 otherwise]."),
    trust_remote_code: bool = typer.Option(_T.trust_remote_code, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    progress: bool = typer.Option(_T.progress, "--progress/--no-progress", help="Show a progress bar."),
):
    """Train the policy alone on a cache with a BSO loss (defaults: the BSO authors' recipe).

    Defaults: sba (lambda 0.2, s 4), beta 0.1, C 30, clamp 30, SafeDPO pair handling, RMSprop
    lr 1e-6 cosine with 5% warmup, 3 epochs, batch 16, grad clip 10, fp32 policy.
    DPO: --generator logistic --safety-penalty 0 --pairs none. SafeDPO: --generator logistic
    --safety-penalty 10 --pairs safedpo.
    """
    from bso_cache.train import train as run_train

    cfg = _run(
        _train_config, cache=str(cache), out=str(out), policy=policy, gguf_file=gguf_file, generator=generator,
        beta=beta, safety_penalty=safety_penalty, lam=lam, scale=scale, mu=mu, clamp=clamp,
        clamp_lower=clamp_lower, clamp_upper=clamp_upper, label_smoothing=label_smoothing,
        pairs=pairs, orientation=orientation, optimizer=optimizer, lr=lr, lr_schedule=lr_schedule,
        warmup_ratio=warmup_ratio, weight_decay=weight_decay, grad_clip=grad_clip,
        batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, seed=seed,
        shuffle=shuffle, shuffle_buffer=shuffle_buffer, dtype=dtype, autocast=autocast,
        gradient_checkpointing=gradient_checkpointing,
        optimizer_in_backward=optimizer_in_backward, optimizer_offload=optimizer_offload, device=device, prefix_sharing=prefix_sharing,
        attn_implementation=attn_implementation, fsdp=fsdp, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target=lora_target,
        save_every=save_every, keep_checkpoints=keep_checkpoints, resume=resume,
        overwrite=overwrite, log_every=log_every,
        eval_cache=str(eval_cache) if eval_cache else None, eval_every=eval_every,
        allow_other_reference=allow_other_reference,
        tensorboard=tensorboard, report_to=report_to, step0_tolerance=step0_tolerance,
        trust_remote_code=trust_remote_code, progress=progress)
    summary = _run(run_train, cfg, log=_log)
    final = summary["final"] or {}
    if os.environ.get("RANK", "0") != "0":  # under torchrun the summary line is rank 0's alone
        return
    typer.echo(f"{'finished earlier' if summary.get('nothing_to_do') else 'trained'} {summary['steps']} steps -> "
               f"{summary['out']}; final loss "
               f"{final.get('loss', float('nan')):.6g}, preference accuracy "
               f"{final.get('preference_accuracy', float('nan')):.3f}")


# -------------------------------------------------------------------------------------- verify
@app.command()
def verify(
    cache: Path = typer.Argument(..., help="Cache folder."),
    model: Optional[str] = typer.Option(None, "--model", help="Reference to re-score with [default: the manifest's]."),
    sample: int = typer.Option(0, "--sample", help="Pairs to re-score with the reference (0: integrity only)."),
    seed: int = typer.Option(0, help="Seed of the sample."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]."),
    tolerance: Optional[float] = typer.Option(None, help="Fail if a re-scored log-prob differs by more than this per response token (nats) [default: by the cache's dtype, the step-0 check's rule: 0.001 for float32, 0.05 for bfloat16/float16]."),
    prefix_sharing: str = typer.Option(_T.prefix_sharing, "--prefix-sharing", help=PREFIX_SHARING_HELP),
    attn_implementation: str = typer.Option(_T.attn_implementation, "--attn-implementation", help=ATTN_HELP),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="Load --model from this GGUF file inside it [default: the manifest's, with the manifest's reference]."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code from its repository (off unless you trust it)."),
):
    """Check every shard (checksum, size, rows, schema); optionally re-score a sample of pairs."""
    from bso_cache.verify import verify_cache

    res = _run(verify_cache, cache, model=model, sample=sample, seed=seed, device=device,
               prefix_sharing=prefix_sharing, tolerance=tolerance, attn_implementation=attn_implementation,
               gguf_file=gguf_file, trust_remote_code=trust_remote_code, log=_log)
    _echo_json(res, indent=None)
    if res.get("failure"):
        typer.echo(f"error: {res['failure']}", err=True)
        raise typer.Exit(2)


# ---------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., "--model", "-m", help="Model to evaluate (a run folder or any from_pretrained path)."),
    cache: Path = typer.Option(..., "--cache", "-c", help="Cache whose pairs (and reference log-probs) to evaluate on."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results as JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    batch_size: int = typer.Option(_E.batch_size, "--batch-size", help="Pairs per forward."),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", help="Evaluate at most this many pairs (in cache order)."),
    device: str = typer.Option(_T.device, help="auto | cpu | cuda[:N]."),
    dtype: str = typer.Option(_T.dtype, help="Model dtype: float32 | bfloat16 | float16."),
    generate: bool = typer.Option(False, "--generate", help="Also sample responses to the cache's prompts and score them."),
    cost_model: Optional[str] = typer.Option(None, "--cost-model", help="Sequence-classification cost model (harmless: cost <= 0)."),
    reward_model: Optional[str] = typer.Option(None, "--reward-model", help="Sequence-classification reward model."),
    max_prompts: int = typer.Option(_E.max_prompts, "--max-prompts", help="Distinct prompts to generate for."),
    max_new_tokens: int = typer.Option(_E.max_new_tokens, "--max-new-tokens", help="Tokens to sample per response."),
    temperature: float = typer.Option(_E.temperature, help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(_E.top_p, "--top-p", help="Nucleus sampling: the smallest token set of this probability."),
    generations: Optional[Path] = typer.Option(None, "--generations", help="Save generations here as JSONL [default: next to --out]."),
    seed: int = typer.Option(_E.seed, help="Seed of the sampling."),
    prefix_sharing: str = typer.Option(_T.prefix_sharing, "--prefix-sharing", help=PREFIX_SHARING_HELP),
    attn_implementation: str = typer.Option(_T.attn_implementation, "--attn-implementation", help=ATTN_HELP),
    allow_other_reference: bool = typer.Option(False, "--allow-other-reference", help="Evaluate a run that started from other weights than the cache's reference (its rewards are then relative to that reference)."),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="Load the model from this GGUF file inside --model."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code from its repository (off unless you trust it)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (pairs evaluated)."),
):
    """Preference and safety accuracy from cached reference log-probs (no reference loaded);
    with --generate, harmless rate and mean reward of sampled responses."""
    from bso_cache.evaluate import run_eval

    res = _run(run_eval, model=model, cache=cache, out=out, batch_size=batch_size, max_pairs=max_pairs,
               device=device, dtype=dtype, generate=generate, cost_model=cost_model, reward_model=reward_model,
               max_prompts=max_prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
               generations=generations, seed=seed, prefix_sharing=prefix_sharing,
               attn_implementation=attn_implementation, allow_other_reference=allow_other_reference,
               gguf_file=gguf_file, trust_remote_code=trust_remote_code, progress=progress)
    if as_json:
        _echo_json(res)
        return
    typer.echo(f"rewards relative to {res['reference']['name_or_path']} ({res['reference']['relation']})")
    typer.echo(f"pairs {res['pairs']}   preference_accuracy {res['preference_accuracy']:.4f}   "
               f"safety_accuracy {_figure(res['safety_accuracy'])} (over {res['safety_pairs']} pairs)   "
               f"mean margin {res['mean_margin']:.3f}")
    typer.echo(f"{'pair type':<14}{'pairs':>7}{'chosen r':>11}{'rejected r':>12}{'margin':>10}{'pref acc':>10}")
    for name, t in res["by_pair_type"].items():
        typer.echo(f"{name:<14}{t['pairs']:>7}{t['mean_chosen_reward']:>11.3f}{t['mean_rejected_reward']:>12.3f}"
                   f"{t['mean_margin']:>10.3f}{t['preference_accuracy']:>10.3f}")
    if "generation" in res:
        typer.echo("generation: " + json.dumps(res["generation"], allow_nan=False))


def _figure(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------------------- sweep
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", help=RECIPE_HELP + " Any train option may be in it too.", is_eager=True, callback=_use_recipe),
    cache: Path = typer.Option(..., "--cache", "-c", help="Cache folder from `bso-cache build` (one for every run)."),
    out: Path = typer.Option(..., "--out", "-o", help="Sweep folder: one subfolder per run, summary.csv/.json, PNG plots."),
    baselines: Optional[str] = typer.Option(None, help="Comma-separated: dpo-helpful, dpo-harmless, safedpo, bso (BSO.md settings)."),
    eval_cache: Optional[Path] = typer.Option(None, "--eval-cache", help="Held-out cache: each run is evaluated on it at the end."),
    generator: Optional[str] = typer.Option(None, help="Grid of generators, e.g. logistic,kliep,sba."),
    beta: Optional[str] = typer.Option(None, help="Grid of beta values, e.g. 0.05,0.1."),
    safety_penalty: Optional[str] = typer.Option(None, "--safety-penalty", help="Grid of C values, e.g. 0,10,30."),
    lam: Optional[str] = typer.Option(None, help="Grid of lambda values of ba/sba, e.g. 0.2,0.3."),
    scale: Optional[str] = typer.Option(None, help="Grid of s values of sba."),
    mu: Optional[str] = typer.Option(None, help="Grid of mu values of the phi generator."),
    clamp: Optional[str] = typer.Option(None, help="Grid of symmetric clamp bounds (none: the automatic bounds)."),
    label_smoothing: Optional[str] = typer.Option(None, "--label-smoothing", help="Grid of label smoothing epsilons."),
    pairs: Optional[str] = typer.Option(None, help="Grid of pair handlings: none, safedpo, drop-both-unsafe."),
    orientation: Optional[str] = typer.Option(None, help="Grid of orientations: better, safer."),
    optimizer: Optional[str] = typer.Option(None, help="Grid of optimizers: adamw, rmsprop, sgd, adamw8bit, rmsprop8bit, adamw4bit."),
    lr: Optional[str] = typer.Option(None, help="Grid of learning rates, e.g. 1e-6,5e-7."),
    batch_size: Optional[str] = typer.Option(None, "--batch-size", help="Grid of batch sizes (pairs per step)."),
    epochs: Optional[str] = typer.Option(None, help="Grid of epoch counts."),
    max_steps: Optional[str] = typer.Option(None, "--max-steps", help="Grid of step limits."),
    seed: Optional[str] = typer.Option(None, help="Grid of seeds, e.g. 0,1,2."),
    device: str = typer.Option(_T.device, help="auto | cpu | cuda[:N] (every run)."),
    dtype: str = typer.Option(_T.dtype, help="Policy dtype of every run: float32 | bfloat16 | float16."),
    log_every: int = typer.Option(_T.log_every, "--log-every", help="Write metrics every N steps."),
    prefix_sharing: str = typer.Option(_T.prefix_sharing, "--prefix-sharing", help=PREFIX_SHARING_HELP),
):
    """Many runs from one cache: a grid of comma-separated train options and/or named baselines.

    Any other `bso-cache train` option (--policy, --gguf-file, --grad-accum, --lora-r, --clamp-lower,
    --clamp-upper, --autocast, ...) is passed to every run. Finished runs are skipped when
    repeated; the reference is never loaded (one model per run).
    """
    from bso_cache.sweep import parse_grid, run_sweep

    passed = {**ctx.meta.get("recipe_train_options", {}), **_train_options(ctx.args)}
    grid = _run(parse_grid, {"generator": generator, "beta": beta, "safety_penalty": safety_penalty, "lam": lam,
                             "scale": scale, "mu": mu, "clamp": clamp, "label_smoothing": label_smoothing,
                             "pairs": pairs, "orientation": orientation, "optimizer": optimizer, "lr": lr,
                             "batch_size": batch_size, "epochs": epochs, "max_steps": max_steps, "seed": seed})
    names = [b.strip() for b in baselines.split(",") if b.strip()] if baselines else []
    base = {"device": device, "dtype": dtype, "log_every": log_every, "progress": False,
            "prefix_sharing": prefix_sharing, **passed}
    _run(run_sweep, str(cache), str(out), grid, names, base, str(eval_cache) if eval_cache else None,
         log=typer.echo)


def _train_options(args: list[str]) -> dict:
    """The `train` options among a sweep's other arguments, parsed by `train` itself (its names,
    types and checks), as TrainConfig fields; only those given on the command line."""
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    try:
        parsed = command.make_context("train", ["--cache", "-", "--out", "-", *args])
    except Exception as e:  # noqa: BLE001 - click's usage errors: one line
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        typer.echo(f"error: sweep: {message}", err=True)
        raise typer.Exit(2) from None
    given = {k: v for k, v in parsed.params.items() if k not in ("cache", "out")
             and getattr(parsed.get_parameter_source(k), "name", "") == "COMMANDLINE"}
    return {k: str(v) if isinstance(v, Path) else v for k, v in given.items()}


# -------------------------------------------------------------------------------------- report
@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A training run folder (with metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the PNGs [default: RUN_DIR/plots]."),
):
    """PNG plots of a run's metrics: loss, rewards, margins, accuracies, u and clamped fraction."""
    from bso_cache.report import plot_run

    for path in _run(plot_run, run_dir, out):
        typer.echo(str(path))


# ---------------------------------------------------------------------------------------- plan
@app.command()
def plan(
    model: str = typer.Option(..., "--model", "-m", help="Model folder or hub id in the local HF cache: only its config.json is read, no weights."),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="Read the shape from this GGUF file's header inside --model."),
    cache: Optional[Path] = typer.Option(None, "--cache", "-c", help="Take the sequence and response lengths from this cache (its longest pair) instead of --max-length."),
    max_length: int = typer.Option(_DEFAULT_MAX_LENGTH, "--max-length", help="Tokens of prompt + the longer response, without --cache."),
    response_length: Optional[int] = typer.Option(None, "--response-length", help="Tokens of the longer response, without --cache [default: half of --max-length]."),
    batch_size: int = typer.Option(_T.batch_size, "--batch-size", help="Pairs per optimizer step."),
    grad_accum: int = typer.Option(_T.grad_accum, "--grad-accum", help="Micro-batches per step (the forward holds --batch-size / --grad-accum pairs)."),
    dtype: str = typer.Option(_T.dtype, help="Weights dtype: float32 | bfloat16 | float16."),
    optimizer: str = typer.Option(_T.optimizer, help="adamw | rmsprop | sgd | adamw8bit | rmsprop8bit | adamw4bit."),
    lora_r: int = typer.Option(_T.lora_r, "--lora-r", help="LoRA rank on every linear layer (0: full fine-tuning)."),
    qlora: bool = typer.Option(False, "--qlora", help="The base in 4-bit NF4 with LoRA adapters (rank --lora-r, default 16); for comparison: train has no QLoRA option yet."),
    gradient_checkpointing: bool = typer.Option(_T.gradient_checkpointing, "--gradient-checkpointing", help="Activations recomputed in the backward."),
    optimizer_in_backward: bool = typer.Option(_T.optimizer_in_backward, "--optimizer-in-backward", help="Gradients applied and freed one tensor at a time."),
    optimizer_offload: bool = typer.Option(_T.optimizer_offload, "--optimizer-offload", help="Optimizer state in CPU memory."),
    autocast: str = typer.Option(_T.autocast, help="none | bf16 | fp16 (activations in 16 bits)."),
    device: str = typer.Option("cuda", help="cuda (adds the CUDA runtime's own memory) | cpu (training memory only)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="e.g. 24GiB: also say which lever combinations fit and the largest micro-batch of each."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (the predicted peak under peak_bytes)."),
    trust_remote_code: bool = typer.Option(_T.trust_remote_code, "--trust-remote-code", help="Allow a config class from the hub."),
):
    """Predict the peak memory of `train` by component from the model's config alone (no weights
    loaded); with --gpu-memory, which memory levers fit and the largest batch for each."""
    from bso_cache.plan import PlanOptions, lengths_from_cache, parse_bytes, plan as run_plan

    if cache is not None:
        seq, resp = _run(lengths_from_cache, str(cache))
    else:
        seq, resp = max_length, response_length or max(1, max_length // 2)
    if batch_size < 1 or grad_accum < 1 or batch_size % grad_accum:
        typer.echo(f"error: --batch-size ({batch_size}) must be a positive multiple of --grad-accum ({grad_accum})", err=True)
        raise typer.Exit(2)
    options = PlanOptions(dtype=dtype, optimizer=optimizer, lora_r=lora_r, qlora=qlora,
                          gradient_checkpointing=gradient_checkpointing, optimizer_in_backward=optimizer_in_backward,
                          optimizer_offload=optimizer_offload, autocast=autocast, micro_batch=batch_size // grad_accum,
                          seq_length=seq, response_tokens=resp, device=device)
    budget = _run(parse_bytes, gpu_memory) if gpu_memory else None
    res = _run(run_plan, model, options, gpu_memory=budget, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    if as_json:
        _echo_json(res)
        return
    gib = 1 << 30
    typer.echo(f"model {model}: {res['params'] / 1e9:.3f}B parameters, {res['trainable_params'] / 1e9:.3f}B trainable; "
               f"micro-batch {options.micro_batch} pairs of up to {seq} tokens ({resp} response)")
    for k in ("weights", "gradients", "optimizer_state", "update", "activations", "head", "runtime"):
        typer.echo(f"  {k:<16}{res[k] / gib:>9.2f} GiB")
    how = ("all of them at once" if options.optimizer_in_backward
           else "weights + optimizer_state + runtime + max(activations + head, gradients + update)")
    typer.echo(f"  {'peak':<16}{res['peak_bytes'] / gib:>9.2f} GiB (predicted: {how})")
    if res["offloaded_state_bytes"]:
        typer.echo(f"  (+ {res['offloaded_state_bytes'] / gib:.2f} GiB of optimizer state in CPU memory)")
    if budget:
        typer.echo(f"on {gpu_memory}: {'combination':<38}{'peak':>9}  fits  largest micro-batch")
        for name, c in res["combinations"].items():
            typer.echo(f"   {name:<46}{c['peak_bytes'] / gib:>7.1f}G  {'yes' if c['fits'] else 'no ':<4}  "
                       f"{c['largest_batch']}")


# ---------------------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Path = typer.Option(Path("quickstart-out"), "--out", "-o", help="Folder for the demo's data, model, caches and runs."),
    steps: int = typer.Option(60, help="Training steps per run."),
):
    """The embedded default, end to end: synthetic safety data + tiny model -> one cache -> DPO-helpful,
    SafeDPO and BSO trained from it -> a held-out comparison table."""
    from bso_cache.demo import run_demo

    _run(run_demo, out, steps=steps, log=typer.echo)


def main() -> None:
    import logging

    from bso_cache.allocator import return_freed_memory

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return_freed_memory()  # large freed blocks go back to the OS (bso_cache/allocator.py)
    # torchao (the adamw4bit extra; transformers imports it when installed) logs at import that its
    # CUDA-only kernels did not load, and torch that torchao registers an enum: nothing to act on
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    app()


if __name__ == "__main__":
    main()
