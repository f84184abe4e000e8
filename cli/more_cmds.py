"""`bso-cache eval`, `report`, `plan` and `demo`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from bso_cache.config import DEFAULT_MAX_LENGTH, EVAL_DEFAULTS as _E, Attention, Autocast, DType, OptimizerName, \
    PrefixSharing, TrainConfig as _T

from .app import app, echo_json, run
from .options import ATTN_HELP, DEVICE_HELP, PREFIX_SHARING_HELP, REMOTE_CODE_HELP, Opt, with_options

EVAL_OPTIONS = {
    "model": Opt("Model to evaluate (a run folder or any from_pretrained path).", short="-m", type=str, default=...),
    "cache": Opt("Cache whose pairs (and reference log-probs) to evaluate on.", short="-c", type=Path, default=...),
    "results": Opt("Also write the results as JSON to this file.", type=Optional[Path], default=None),
    "as_json": Opt("Print JSON instead of a table.", type=bool, default=False, flag="--json"),
    "batch_size": Opt("Pairs per forward.", type=int, default=_E.batch_size),
    "max_pairs": Opt("Evaluate at most this many pairs (in cache order).", type=Optional[int], default=None),
    "device": Opt(DEVICE_HELP, type=str, default=_T.device),
    "dtype": Opt("Model dtype.", type=DType, default=_T.dtype),
    "load_in_4bit": Opt("Load the model's linear layers in 4-bit NF4 (bitsandbytes), as a QLoRA cache's reference "
                        "was (build --load-in-4bit). A QLoRA run's saved model is an ordinary one: evaluate it "
                        "without this.", type=bool, default=False),
    "generate": Opt("Also sample responses to the cache's prompts and score them.", type=bool, default=False),
    "cost_model": Opt("Sequence-classification cost model (harmless: cost <= 0).", type=Optional[str], default=None),
    "reward_model": Opt("Sequence-classification reward model.", type=Optional[str], default=None),
    "max_prompts": Opt("Distinct prompts to generate for.", type=int, default=_E.max_prompts),
    "max_new_tokens": Opt("Tokens to sample per response.", type=int, default=_E.max_new_tokens),
    "temperature": Opt("Sampling temperature (0: greedy).", type=float, default=_E.temperature),
    "top_p": Opt("Nucleus sampling: the smallest token set of this probability.", type=float, default=_E.top_p),
    "generations": Opt("Save generations here as JSONL [default: beside --results, or ./generations.jsonl].",
                       type=Optional[Path], default=None),
    "seed": Opt("Seed of the sampling.", type=int, default=_E.seed),
    "prefix_sharing": Opt(PREFIX_SHARING_HELP, type=PrefixSharing, default=_T.prefix_sharing),
    "attn_implementation": Opt(ATTN_HELP, type=Attention, default=_T.attn_implementation),
    "allow_other_reference": Opt("Evaluate a run that started from other weights than the cache's reference (its "
                                 "rewards are then relative to that reference).", type=bool, default=False),
    "gguf_file": Opt("Load the model from this GGUF file inside --model.", type=Optional[str], default=None),
    "trust_remote_code": Opt(REMOTE_CODE_HELP, type=bool, default=False),
    "progress": Opt("Show a progress bar (pairs evaluated).", type=bool, default=True),
}


@app.command("eval")
@with_options((EVAL_OPTIONS, None))
def eval_cmd(**options):
    """Preference and safety accuracy from cached reference log-probs (no reference loaded);
    with --generate, harmless rate and mean reward of sampled responses."""
    from bso_cache.evaluate import run_eval

    as_json = options.pop("as_json")
    res = run(run_eval, **options)
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


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A training run folder (with metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the PNGs [default: RUN_DIR/plots]."),
):
    """PNG plots of a run's metrics: loss, rewards, margins, accuracies, u and clamped fraction."""
    from bso_cache.report import plot_run

    for path in run(plot_run, run_dir, out):
        typer.echo(str(path))


PLAN_OPTIONS = {
    "model": Opt("Model folder or hub id in the local HF cache: only its config.json is read, no weights.", short="-m",
                 type=str, default=...),
    "gguf_file": Opt("Read the shape from this GGUF file's header inside --model.", type=Optional[str], default=None),
    "cache": Opt("Take the sequence and response lengths from this cache (its longest pair) instead of "
                 "--max-length.", short="-c", type=Optional[Path], default=None),
    "max_length": Opt("Tokens of prompt + the longer response, without --cache.", type=int, default=DEFAULT_MAX_LENGTH),
    "response_length": Opt("Tokens of the longer response, without --cache [default: half of --max-length].",
                           type=Optional[int], default=None),
    "batch_size": Opt("Pairs per optimizer step.", type=int, default=_T.batch_size),
    "grad_accum": Opt("Micro-batches per step (the forward holds --batch-size / --grad-accum pairs).", type=int,
                      default=_T.grad_accum),
    "dtype": Opt("Weights dtype.", type=DType, default=_T.dtype),
    "optimizer": Opt("The optimizer (its state's bytes per parameter).", type=OptimizerName, default=_T.optimizer),
    "lora_r": Opt("LoRA rank on every linear layer (0: full fine-tuning).", type=int, default=_T.lora_r),
    "qlora": Opt("QLoRA: the base in 4-bit NF4 with LoRA adapters (rank --lora-r, default 16), as train "
                 "--load-in-4bit runs it.", type=bool, default=False, flag="--load-in-4bit", short="--qlora"),
    "gradient_checkpointing": Opt("Activations recomputed in the backward.", type=bool,
                                  default=_T.gradient_checkpointing),
    "optimizer_in_backward": Opt("Gradients applied and freed one tensor at a time.", type=bool,
                                 default=_T.optimizer_in_backward),
    "optimizer_offload": Opt("Optimizer state in CPU memory.", type=bool, default=_T.optimizer_offload),
    "autocast": Opt("Activations in 16 bits (bf16, fp16) or not (none).", type=Autocast, default=_T.autocast),
    "device": Opt("cuda (adds the CUDA runtime's own memory) | cpu (training memory only).", type=str, default="cuda"),
    "gpu_memory": Opt("e.g. 24GiB: also say which lever combinations fit and the largest micro-batch of each.",
                      type=Optional[str], default=None),
    "as_json": Opt("Print JSON (the predicted peak under peak_bytes).", type=bool, default=False, flag="--json"),
    "trust_remote_code": Opt("Allow a config class from the hub.", type=bool, default=_T.trust_remote_code),
}


@app.command()
@with_options((PLAN_OPTIONS, None))
def plan(**o):
    """Predict the peak memory of `train` by component from the model's config alone (no weights
    loaded); with --gpu-memory, which memory levers fit and the largest batch for each."""
    from bso_cache.plan import PlanOptions, lengths_from_cache, parse_bytes, plan as run_plan

    if o["cache"] is not None:
        seq, resp = run(lengths_from_cache, str(o["cache"]))
    else:
        seq, resp = o["max_length"], o["response_length"] or max(1, o["max_length"] // 2)
    if o["batch_size"] < 1 or o["grad_accum"] < 1 or o["batch_size"] % o["grad_accum"]:
        typer.echo(f"error: --batch-size ({o['batch_size']}) must be a positive multiple of --grad-accum "
                   f"({o['grad_accum']})", err=True)
        raise typer.Exit(2)
    levers = {k: o[k] for k in ("dtype", "optimizer", "lora_r", "qlora", "gradient_checkpointing",
                                "optimizer_in_backward", "optimizer_offload", "autocast", "device")}
    options = PlanOptions(**levers, micro_batch=o["batch_size"] // o["grad_accum"], seq_length=seq,
                          response_tokens=resp)
    budget = run(parse_bytes, o["gpu_memory"]) if o["gpu_memory"] else None
    res = run(run_plan, o["model"], options, gpu_memory=budget, gguf_file=o["gguf_file"],
              trust_remote_code=o["trust_remote_code"])
    if o["as_json"]:
        echo_json(res)
        return
    _print_plan(res, o["model"], options, seq, resp, o["gpu_memory"] if budget else None)


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


@app.command()
def demo(
    out: Path = typer.Option(Path("quickstart-out"), "--out", "-o", help="Folder for the demo's data, model, caches and runs."),
    steps: int = typer.Option(60, help="Training steps per run."),
):
    """The embedded default, end to end: synthetic safety data + tiny model -> one cache -> DPO-helpful,
    SafeDPO and BSO trained from it -> a held-out comparison table."""
    from bso_cache.demo import run_demo

    run(run_demo, out, steps=steps, log=typer.echo)
