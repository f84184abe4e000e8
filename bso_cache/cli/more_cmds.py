"""`bso-cache eval`, `report`, `plan` and `demo`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional

import typer

from bso_cache.config import EvalConfig, PlanConfig, TrainConfig, names

from bso_cache.cli.options import as_config_values, config_parameters, with_options
from bso_cache.cli.output import echo_json

@with_options(config_parameters(EvalConfig),
              [inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                 default=typer.Option(False, "--json", help="Print JSON instead of a table."))])
def eval_cmd(**options):
    """Preference and safety accuracy from cached reference log-probs (no reference loaded);
    with --generate, harmless rate and mean reward of sampled responses."""
    from bso_cache.reporting.evaluate import run_eval

    as_json = options.pop("as_json")
    res = run_eval(EvalConfig(**as_config_values(options)))
    if as_json:
        echo_json(res)
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


def report(
    run_dir: Path = typer.Argument(..., help="A training run folder (with metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the PNGs [default: RUN_DIR/plots]."),
):
    """PNG plots of a run's metrics: loss, rewards, margins, accuracies, u and clamped fraction."""
    from bso_cache.reporting.report import plot_run

    for path in plot_run(run_dir, out):
        typer.echo(str(path))


@with_options(config_parameters(PlanConfig), config_parameters(TrainConfig, only=names(TrainConfig, plan=True),
                                                            aliases={"load_in_4bit": ("--qlora",)}),
              [inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                 default=typer.Option(False, "--json", help="Print JSON (the predicted peak under "
                                                                            "peak_bytes)."))])
def plan(**o):
    """Predict the peak memory of `train` by component from the model's config alone (no weights
    loaded); with --gpu-memory, which memory levers fit and the largest batch for each."""
    from bso_cache.training.plan import PlanOptions, lengths_from_cache, parse_bytes, plan as run_plan

    as_json = o.pop("as_json")
    pc = PlanConfig(**as_config_values({k: o.pop(k) for k in names(PlanConfig)}))
    # the run that train would make of these levers: the checks are train's own (in the backward pass
    # nothing is clipped; QLoRA's adapters default to rank 16)
    o.update(grad_clip=0.0 if o["optimizer_in_backward"] else TrainConfig.SECTIONS["optim"].grad_clip,
             lora_r=o["lora_r"] or (16 if o["load_in_4bit"] else 0))
    train_cfg = TrainConfig(cache="", out="", **o)
    if pc.cache is not None:
        seq, resp = lengths_from_cache(pc.cache)
    else:
        seq, resp = pc.max_length, pc.response_length or max(1, pc.max_length // 2)
    options = PlanOptions.from_train(train_cfg, seq_length=seq, response_tokens=resp, device=pc.device)
    budget = parse_bytes(pc.gpu_memory) if pc.gpu_memory else None
    res = run_plan(pc.model, options, gpu_memory=budget, gguf_file=pc.gguf_file,
                   trust_remote_code=pc.trust_remote_code)
    if as_json:
        echo_json(res)
        return
    _print_plan(res, pc.model, options, seq, resp, pc.gpu_memory if budget else None)


def _print_plan(res: dict, model: str, options, seq: int, resp: int, gpu_memory: str | None) -> None:
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
    if gpu_memory:
        typer.echo(f"on {gpu_memory}: {'combination':<38}{'peak':>9}  fits  largest micro-batch")
        for name, c in res["combinations"].items():
            typer.echo(f"   {name:<46}{c['peak_bytes'] / gib:>7.1f}G  {'yes' if c['fits'] else 'no ':<4}  "
                       f"{c['largest_batch']}")


def demo(
    out: Path = typer.Option(Path("quickstart-out"), "--out", "-o", help="Folder for the demo's data, model, caches and runs."),
    steps: int = typer.Option(60, help="Training steps per run."),
):
    """The embedded default, end to end: synthetic safety data + tiny model -> one cache -> DPO-helpful,
    SafeDPO and BSO trained from it -> a held-out comparison table."""
    from bso_cache.reporting.demo import run_demo

    run_demo(out, steps=steps, log=typer.echo)
