"""`bso-cache build`, `inspect` and `verify`: writing a cache, and reading one back."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bso_cache.config import DEFAULT_MAX_LENGTH, DEFAULT_ROWS_PER_SHARD, Attention, BuildConfig, PrefixSharing

from .app import app, echo_json, log, run, use_recipe
from .options import (ATTN_HELP, CACHE_HELP, DEVICE_HELP, PREFIX_SHARING_HELP, REMOTE_CODE_HELP, Opt, as_config_values,
                      recipe, with_options)

BUILD_OPTIONS = {
    'model': Opt('Reference model: local folder or hub id (in the local HF cache).', short='-m'),
    'data': Opt('Input: JSONL/JSON/Parquet/CSV file or folder, a save_to_disk folder, or a HF dataset name.', short='-d'),
    'out': Opt('Cache folder to write (resumed if unfinished).', short='-o', type=Path),
    'split': Opt('Split of a Hugging Face dataset.'),
    'hf_config': Opt('Configuration name of a HF dataset.'),
    'format': Opt("Input format: auto | pku | hh | generic | implicit (TRL's implicit prompt: chosen/rejected conversations sharing their first turns; auto: from the first row)."),
    'gguf_file': Opt('Load the model from this GGUF file inside --model.'),
    'template': Opt("Prompt rendering: auto (chat template if the tokenizer has one) | chat | plain ('Human: ...\\n\\nAssistant:')."),
    'chat_template': Opt("Jinja chat template file overriding the tokenizer's.", type=Optional[Path]),
    'system_prompt': Opt("System message added to every conversation that has none (a row's own system message is kept; the manifest notes count both)."),
    'max_length': Opt(f'Max tokens of prompt + the longer response [default: min({DEFAULT_MAX_LENGTH}, model positions)].'),
    'overlong': Opt('Pairs over --max-length: drop (counted) | truncate (responses cut).'),
    'batch_size': Opt('Pairs per reference forward (length-bucketed).'),
    'rows_per_shard': Opt(f"Input rows per Parquet shard, the unit of resume and of torchrun ranks [default: {DEFAULT_ROWS_PER_SHARD}, or the input's rows when fewer, whatever the number of ranks; build memory is bounded by it]."),
    'dtype': Opt('Reference dtype: float32 | bfloat16 | float16 (log-softmax is float32 regardless).'),
    'load_in_4bit': Opt("The reference's linear layers in 4-bit NF4 (bitsandbytes), computing in --dtype: the cache for a QLoRA run (train --load-in-4bit), whose reference is its 4-bit base. Needs pip install 'bso-cache[qlora]'."),
    'device': Opt(DEVICE_HELP),
    'prefix_sharing': Opt(PREFIX_SHARING_HELP),
    'attn_implementation': Opt(ATTN_HELP),
    'skip_bad_rows': Opt('Count malformed rows as dropped (with the reason) instead of stopping.'),
    'overwrite': Opt('Discard an existing cache in --out made with other settings.'),
    'trust_remote_code': Opt('Allow model code from the hub (off by default).'),
    'progress': Opt('Show a progress bar.'),
}


@app.command()
@with_options((recipe(use_recipe), None), (BUILD_OPTIONS, BuildConfig))
def build(**options):
    """Score preference pairs with the frozen reference model once; write Parquet shards + manifest.

    Re-running the same command on an unfinished cache resumes it; on a finished one it does nothing.
    """
    from bso_cache.build import build_cache

    options.pop("config")
    cfg = run(BuildConfig, **as_config_values(options))
    run(build_cache, cfg, log=log)


@app.command()
def inspect(
    cache: Path = typer.Option(..., "--cache", "-c", help=CACHE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    verify: bool = typer.Option(False, "--verify", help="Also check every shard's checksum."),
):
    """Rows, drops by reason, length percentiles, label mix by pair type, log-prob statistics."""
    from bso_cache.cache import counts_text
    from bso_cache.inspect_cache import inspect_cache

    info = run(inspect_cache, cache, verify=verify)
    if as_json:
        echo_json(info)
        return
    r = info["rows"]
    typer.echo(f"cache      {info['cache']}  ({info['shards']} shards, {info['bytes'] / 1e6:.2f} MB)")
    typer.echo(f"reference  {info['reference']['name_or_path']}  {info['reference']['weights_digest'][:23]}")
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


VERIFY_OPTIONS = {
    "cache": Opt(CACHE_HELP, short="-c", type=Path, default=...),
    "model": Opt("Reference to re-score with [default: the manifest's].", type=Optional[str], default=None),
    "sample": Opt("Pairs to re-score with the reference (0: integrity only).", type=int, default=0),
    "seed": Opt("Seed of the sample.", type=int, default=0),
    "device": Opt(DEVICE_HELP, type=str, default="auto"),
    "tolerance": Opt("Fail if a re-scored log-prob differs by more than this per response token (nats) [default: "
                     "by the cache's dtype, the step-0 check's rule: 0.001 for float32, 0.05 for bfloat16/float16].",
                     type=Optional[float], default=None),
    "prefix_sharing": Opt(PREFIX_SHARING_HELP, type=PrefixSharing, default=BuildConfig.prefix_sharing),
    "attn_implementation": Opt(ATTN_HELP, type=Attention, default=BuildConfig.attn_implementation),
    "gguf_file": Opt("Load --model from this GGUF file inside it [default: the manifest's, with the manifest's "
                     "reference].", type=Optional[str], default=None),
    "trust_remote_code": Opt(REMOTE_CODE_HELP, type=bool, default=False),
}


@app.command()
@with_options((VERIFY_OPTIONS, None))
def verify(**options):
    """Check every shard (checksum, size, rows, schema); optionally re-score a sample of pairs."""
    from bso_cache.verify import verify_cache

    res = run(verify_cache, options.pop("cache"), **options, log=log)
    echo_json(res, indent=None)
    if res.get("failure"):
        typer.echo(f"error: {res['failure']}", err=True)
        raise typer.Exit(2)
