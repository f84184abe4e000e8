"""`bso-cache train` and `sweep`: one run, or a grid of runs, from a cache."""

from __future__ import annotations

import os

import typer

from bso_cache.config import SweepConfig, TrainConfig, names
from bso_cache.training.sweep import SWEEPABLE

from bso_cache.cli.options import (RECIPE_HELP, as_config_values, config_parameters, forwarded_parameters,
                                   grid_parameters, recipe_parameter, with_options)
from bso_cache.cli.output import log
from bso_cache.cli.recipes import use_recipe


@with_options([recipe_parameter(use_recipe)], config_parameters(TrainConfig))
def train(**options):
    """Train the policy alone on a cache with a BSO loss (defaults: the BSO authors' recipe).

    Defaults: sba (lambda 0.2, s 4), beta 0.1, C 30, clamp 30, SafeDPO pair handling, RMSprop
    lr 1e-6 cosine with 5% warmup, 3 epochs, batch 16, grad clip 10, fp32 policy.
    DPO: --generator logistic --safety-penalty 0 --pairs none. SafeDPO: --generator logistic
    --safety-penalty 10 --pairs safedpo.
    """
    from bso_cache.training.train import train as train_policy

    options.pop("config")
    summary = train_policy(TrainConfig(**as_config_values(options)), log=log)
    if os.environ.get("RANK", "0") != "0":  # under torchrun the summary line is rank 0's alone
        return
    final = summary["final"] or {}
    typer.echo(f"{'finished earlier' if summary.get('nothing_to_do') else 'trained'} {summary['steps']} steps -> "
               f"{summary['out']}; final loss "
               f"{final.get('loss', float('nan')):.6g}, preference accuracy "
               f"{final.get('preference_accuracy', float('nan')):.3f}")


_FORWARDED_EXCLUDE = ("cache", "out", "eval_cache", *SWEEPABLE)


@with_options([recipe_parameter(use_recipe, RECIPE_HELP + " Any train option may be in it too.")],
              config_parameters(SweepConfig), grid_parameters(TrainConfig, SWEEPABLE),
              forwarded_parameters(TrainConfig, exclude=_FORWARDED_EXCLUDE))
def sweep(**options):
    """Many runs from one cache: a grid of comma-separated train options and/or named baselines.

    Every other `bso-cache train` option (--device, --dtype, --policy, --lora-r, --autocast,
    --prefix-sharing, ...) is passed to every run as given. Runs go one after another, or with
    --backend ray several at once (--parallel), on every GPU of a machine or a cluster, with
    --early-stop. Finished and stopped runs are skipped when repeated, interrupted ones resume; a
    failed run is recorded with its reason and the others go on (exit 1 names it). With
    --eval-cache, summary.csv marks the Pareto front and the sweep's README names the run to take
    (by --select). The reference is never loaded (one model per run).
    """
    from bso_cache.training.sweep import parse_grid, run_sweep

    options.pop("config")
    grid = parse_grid({name: options.pop(name) for name in SWEEPABLE})
    sweep_cfg = SweepConfig(**as_config_values({k: options.pop(k) for k in names(SweepConfig)}))
    passed = as_config_values({k: v for k, v in options.items() if v is not None})
    baselines = [b.strip() for b in (sweep_cfg.baselines or "").split(",") if b.strip()]
    run_sweep(sweep_cfg, grid, baselines, {"progress": False, **passed}, log=typer.echo)
