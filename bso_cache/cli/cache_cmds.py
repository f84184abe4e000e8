"""`bso-cache build`, `inspect` and `verify`: writing a cache, and reading one back."""

from __future__ import annotations

from pathlib import Path

import typer

from bso_cache.config import BuildConfig, VerifyConfig
from bso_cache.config.choices import CACHE_HELP

from bso_cache.cli.options import as_config_values, config_parameters, recipe_parameter, with_options
from bso_cache.cli.output import echo_json, log
from bso_cache.cli.recipes import use_recipe


@with_options([recipe_parameter(use_recipe)], config_parameters(BuildConfig))
def build(**options):
    """Score preference pairs with the frozen reference model once; write Parquet shards + manifest.

    Re-running the same command on an unfinished cache resumes it; on a finished one it does nothing.
    """
    from bso_cache.cache.build import build_cache

    options.pop("config")
    build_cache(BuildConfig(**as_config_values(options)), log=log)


def inspect(
    cache: Path = typer.Option(..., "--cache", "-c", help=CACHE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    verify: bool = typer.Option(False, "--verify", help="Also check every shard's checksum."),
):
    """Rows, drops by reason, length percentiles, label mix by pair type, log-prob statistics."""
    from bso_cache.cache import counts_text
    from bso_cache.cache.inspect import inspect_cache

    info = inspect_cache(cache, verify=verify)
    if as_json:
        echo_json(info)
        return
    r = info["rows"]
    typer.echo(f"cache      {info['cache']}  ({info['shards']} shards, {info['bytes'] / 1e6:.2f} MB)")
    typer.echo(f"digest     {info['digest']}  (pin it: --expect-digest)")
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


@with_options(config_parameters(VerifyConfig))
def verify(**options):
    """Check every shard (checksum, size, rows, schema); optionally re-score a sample of pairs."""
    from bso_cache.cache.verify import verify_cache

    res = verify_cache(VerifyConfig(**as_config_values(options)), log=log)
    echo_json(res, indent=None)
    if res.get("failure"):
        typer.echo(f"error: {res['failure']}", err=True)
        raise typer.Exit(2)
