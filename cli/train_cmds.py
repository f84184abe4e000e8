"""`bso-cache train` and `sweep`: one run, or a grid of runs, from a cache."""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Optional

import typer

from bso_cache.config import TrainConfig

from .app import app, log, run, use_recipe
from .options import ATTN_HELP, DEVICE_HELP, PREFIX_SHARING_HELP, RECIPE_HELP, Opt, as_config_values, recipe, \
    with_options

TRAIN_OPTIONS = {
    'cache': Opt('Cache folder from `bso-cache build`.', short='-c', type=Path),
    'out': Opt('Run folder: final model (from_pretrained format), metrics.jsonl, run_config.json, checkpoints/.', short='-o', type=Path),
    'policy': Opt("Policy to train [default: the reference recorded in the manifest]. Must share the cache's tokenizer."),
    'gguf_file': Opt('GGUF file inside --policy.'),
    'generator': Opt('Generator h: logistic (DPO/SafeDPO) | kliep | lsif | ba | sba | phi (= sba with lambda=1-mu, s=1). sba is computed with expm1: its loss carries the constant 1/(lambda s) (1.25 nats by default), which changes no gradient.'),
    'beta': Opt('Temperature beta > 0 (as in DPO).'),
    'safety_penalty': Opt('C >= 0, the safety penalty (C=0: plain preference optimisation).'),
    'lam': Opt('lambda of ba/sba (> -1; 0 is the kliep limit).'),
    'scale': Opt("s of sba (4 makes its gradient at u=0 equal logistic's)."),
    'mu': Opt('mu of the phi generator.'),
    'clamp': Opt("Symmetric bound kappa on u: [-kappa, kappa]; no gradient past a bound (a pair within 1e-3 of one, the cache's float noise, counts as on it and keeps its gradient) [default: [-30, 30], and for C > 30 the upper bound becomes min(C+10, floor(85/(1+lambda))) so safe-winner pairs (u = C at start) still learn; logistic, which cannot overflow, is not clamped unless a bound is given]."),
    'clamp_lower': Opt("Lower bound on u (overrides --clamp's)."),
    'clamp_upper': Opt("Upper bound on u (overrides --clamp's and the automatic raise)."),
    'label_smoothing': Opt("Conservative epsilon in [0, 0.5): (1-e) l(clamp(u_raw)) + e l(clamp(-u_raw)), the swapped pair's own clamped log-ratio (BSO.md)."),
    'pairs': Opt('Pair handling: none | safedpo (swap unsafe-chosen/safe-rejected, drop both-unsafe) | drop-both-unsafe.'),
    'orientation': Opt('better (chosen = more helpful) | safer (chosen = safer response, PKU-style data).'),
    'optimizer': Opt("adamw | rmsprop | sgd | adamw8bit | rmsprop8bit (bitsandbytes, 8-bit states) | adamw4bit (torchao, 4-bit states); the low-bit ones need pip install 'bso-cache[lowbit]'."),
    'lr': Opt('Peak learning rate.'),
    'lr_schedule': Opt('cosine | linear | constant (after warmup).'),
    'warmup_ratio': Opt('Share of steps of linear warmup.'),
    'weight_decay': Opt('Decoupled weight decay (AdamW) or L2 (RMSprop, SGD).'),
    'grad_clip': Opt('Max gradient norm (0: no clipping).'),
    'batch_size': Opt('Pairs per optimizer step, in total over --grad-accum micro-batches and torchrun processes (the same run whatever their number).'),
    'grad_accum': Opt('Micro-batches per step and process (less memory, same result).'),
    'epochs': Opt('Passes over the cache.'),
    'max_steps': Opt('Stop after this many optimizer steps.'),
    'seed': Opt('Seed of shard order, shuffle buffer and init.'),
    'shuffle': Opt('--no-shuffle: pairs in cache order (shards in order, rows in order, no length bucketing), to match another tool step by step; the seed then changes nothing about the order.'),
    'shuffle_buffer': Opt('Pairs held for shuffling (bounds memory).'),
    'dtype': Opt('Policy weights dtype: float32 | bfloat16 | float16. With bfloat16/float16 each update is computed in float32 and stochastically rounded to the weights (unbiased), so DPO-size learning rates still learn.'),
    'autocast': Opt('Mixed precision: none | bf16 | fp16 (weights stay in --dtype).'),
    'gradient_checkpointing': Opt('Recompute activations in backward (less memory). On the CPU it also fixes glibc\'s mmap threshold at 128 KiB (freed blocks go back to the OS; a MALLOC_* setting of yours rules).'),
    'optimizer_in_backward': Opt("Apply each parameter's update as soon as its gradient is ready and free the gradient: the model's gradients are never held at once. Needs --grad-clip 0 and --grad-accum 1; one process. On the CPU it also fixes glibc's mmap threshold at 128 KiB."),
    'optimizer_offload': Opt('Keep the optimizer state in CPU memory and update there (CUDA only); gradients are clipped on the GPU first.'),
    'device': Opt(DEVICE_HELP),
    'prefix_sharing': Opt(PREFIX_SHARING_HELP),
    'attn_implementation': Opt(ATTN_HELP),
    'fsdp': Opt('Under torchrun: shard parameters, gradients and optimizer state over the processes (FSDP2) instead of DDP.'),
    'lora_r': Opt('LoRA rank (0: full fine-tuning). Needs peft.'),
    'lora_alpha': Opt('LoRA scaling alpha (the update is scaled by alpha / r).'),
    'lora_dropout': Opt('Dropout on the LoRA input.'),
    'lora_target': Opt('Comma-separated module names, or all-linear.'),
    'load_in_4bit': Opt("QLoRA: the policy's linear layers in 4-bit NF4 (bitsandbytes, computing in --dtype) with --lora-r adapters trained on them. Its reference is the 4-bit base, so the cache must be built with --load-in-4bit too. The final model is saved merged and de-quantized (an ordinary model in --dtype), the adapters in adapter/. Needs pip install 'bso-cache[qlora]'."),
    'save_every': Opt('Checkpoint every N steps (0: only the final model).'),
    'keep_checkpoints': Opt('Checkpoints kept.'),
    'resume': Opt('Continue from the newest checkpoint in --out.'),
    'overwrite': Opt('Replace a non-empty --out.'),
    'log_every': Opt('Write metrics every N steps.'),
    'eval_cache': Opt('A held-out cache to evaluate on.', type=Optional[Path]),
    'eval_every': Opt('Evaluate on --eval-cache every N steps.'),
    'allow_other_reference': Opt('Accept an --eval-cache built with another reference than --cache (its rewards are then relative to that reference).'),
    'tensorboard': Opt('Also log to OUT/tensorboard (the same as --report-to tensorboard).'),
    'report_to': Opt("Experiment trackers, comma-separated: none | tensorboard | wandb | mlflow | trackio (each an extra: pip install 'bso-cache[wandb]'; configured by its usual environment variables). The configuration, every metrics.jsonl scalar, the evaluation and the final model; a sweep groups its runs."),
    'step0_tolerance': Opt('Max |log pi - log pi_ref| per response token at step 0 when the policy is the reference [default: 0.001 nats with float32 on both sides, 0.05 otherwise].'),
    'trust_remote_code': Opt('Allow model code from the hub (off by default).'),
    'progress': Opt('Show a progress bar.'),
}


@app.command()
@with_options((recipe(use_recipe), None), (TRAIN_OPTIONS, TrainConfig))
def train(**options):
    """Train the policy alone on a cache with a BSO loss (defaults: the BSO authors' recipe).

    Defaults: sba (lambda 0.2, s 4), beta 0.1, C 30, clamp 30, SafeDPO pair handling, RMSprop
    lr 1e-6 cosine with 5% warmup, 3 epochs, batch 16, grad clip 10, fp32 policy.
    DPO: --generator logistic --safety-penalty 0 --pairs none. SafeDPO: --generator logistic
    --safety-penalty 10 --pairs safedpo.
    """
    from bso_cache.allocator import memory_first
    from bso_cache.models import resolve_device
    from bso_cache.train import train as run_train

    options.pop("config")
    cfg = run(TrainConfig, **as_config_values(options))
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, the lines below are rank 0's alone
    note = memory_first(cfg, resolve_device(cfg.device))
    if note and main_rank:
        log(note)
    summary = run(run_train, cfg, log=log)
    final = summary["final"] or {}
    if not main_rank:
        return
    typer.echo(f"{'finished earlier' if summary.get('nothing_to_do') else 'trained'} {summary['steps']} steps -> "
               f"{summary['out']}; final loss "
               f"{final.get('loss', float('nan')):.6g}, preference accuracy "
               f"{final.get('preference_accuracy', float('nan')):.3f}")


def _grid_options() -> dict[str, Opt]:
    """One grid option per sweepable train option (sweep.SWEEPABLE): comma-separated values."""
    from bso_cache.sweep import NONE_ALLOWED, SWEEPABLE

    hints = typing.get_type_hints(TrainConfig)
    table = {}
    for name in SWEEPABLE:
        choices = typing.get_args(hints[name]) if typing.get_origin(hints[name]) is typing.Literal else ()
        what = f" ({', '.join(choices)})" if choices else (" (none: the default)" if name in NONE_ALLOWED else "")
        table[name] = Opt(f"Grid of train's --{name.replace('_', '-')}: comma-separated values{what}.",
                          type=Optional[str], default=None)
    return table


SWEEP_OPTIONS = {
    "cache": Opt("Cache folder from `bso-cache build` (one for every run).", short="-c", type=Path, default=...),
    "out": Opt("Sweep folder: one subfolder per run, summary.csv/.json, PNG plots.", short="-o", type=Path,
               default=...),
    "baselines": Opt("Comma-separated: dpo-helpful, dpo-harmless, safedpo, bso (BSO.md settings).",
                     type=Optional[str], default=None),
    "eval_cache": Opt("Held-out cache: each run is evaluated on it at the end.", type=Optional[Path], default=None),
}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@with_options((recipe(use_recipe, RECIPE_HELP + " Any train option may be in it too."), None),
              (SWEEP_OPTIONS, None), (_grid_options(), None), context=True)
def sweep(ctx: typer.Context, **options):
    """Many runs from one cache: a grid of comma-separated train options and/or named baselines.

    Any other `bso-cache train` option (--device, --dtype, --policy, --grad-accum, --lora-r, --autocast,
    --prefix-sharing, ...) is passed to every run. Finished runs are skipped when repeated; the
    reference is never loaded (one model per run).
    """
    from bso_cache.sweep import SWEEPABLE, parse_grid, run_sweep

    passed = {**ctx.meta.get("recipe_train_options", {}), **_train_options(ctx.args)}
    grid = run(parse_grid, {name: options[name] for name in SWEEPABLE})
    names = [b.strip() for b in options["baselines"].split(",") if b.strip()] if options["baselines"] else []
    eval_cache = options["eval_cache"]
    run(run_sweep, str(options["cache"]), str(options["out"]), grid, names, {"progress": False, **passed},
        str(eval_cache) if eval_cache else None, log=typer.echo)


def _train_options(args: list[str]) -> dict:
    """The `train` options among a sweep's other arguments, parsed by `train` itself (its names,
    types and checks), as TrainConfig fields; only those given on the command line."""
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    try:
        parsed = command.make_context("train", ["--cache", "-", "--out", "-", *args])
    except Exception as e:  # noqa: BLE001 - click's usage errors: one line
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        typer.echo(f"error: bso-cache sweep: {message.replace('Value error, ', '')}", err=True)
        raise typer.Exit(2) from None
    given = {k: v for k, v in parsed.params.items() if k not in ("cache", "out")
             and getattr(parsed.get_parameter_source(k), "name", "") == "COMMANDLINE"}
    return as_config_values(given)
