"""`bso-cache sweep`: many runs from one cache, one summary, plots.

A grid is given as comma-separated values of train options; named baselines (docs/LOSSES.md) are
crossed with the grid's other options. Each run gets its own folder and is the same `train` as
alone; the runs go one after another in this process (`--backend sequential`), or as Ray Tune
trials, several at once, with early stopping (`--backend ray`: sweep_ray.py). A run whose summary
exists, or that was stopped early, is skipped when the sweep is repeated; an interrupted one
resumes from its checkpoint; a failed one is tried again. A run that fails is recorded with its
reason and the others go on. Each run loads its policy once; the reference is never loaded.
"""

from __future__ import annotations

import gc
import itertools
import re
from pathlib import Path

from bso_cache import schemas as S
from bso_cache.config import BASELINES, SweepConfig, TrainConfig, options, section_names
from bso_cache.errors import ConfigError
from bso_cache.reporting.trackers import tracker_parent
from bso_cache.training.sweep_runs import (SWEEPABLE, Run, SweepFailures, failure_reason, record_status,  # noqa: F401
                                           run_failures)

# sweepable options whose grid may hold "none" (the option's default: automatic bounds, no step limit)
NONE_ALLOWED = tuple(o.name for o in options(TrainConfig) if o.name in SWEEPABLE and o.optional)
# what a baseline shares with the grid: the optimisation section (a baseline fixes the loss and the pairs)
SHARED_KEYS = tuple(n for n in section_names(TrainConfig, "optim") if n in SWEEPABLE)


def _field_types() -> dict[str, type]:
    import typing

    out = {}
    for o in options(TrainConfig):
        if o.name not in SWEEPABLE:
            continue
        if o.choices:  # one of the allowed names: read as text, checked by the config
            out[o.name] = str
            continue
        args = [a for a in typing.get_args(o.hint) if a is not type(None)]
        out[o.name] = args[0] if args else o.hint
    return out


def parse_grid(values: dict[str, str | None]) -> dict[str, list]:
    """{'beta': '0.05,0.1'} -> {'beta': [0.05, 0.1]} with each option's type; names checked."""
    types = _field_types()
    grid = {}
    for name, text in values.items():
        if text is None:
            continue
        if name not in types:
            raise ConfigError(f"'{name}' cannot be swept; sweepable: {', '.join(SWEEPABLE)}")
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        try:
            grid[name] = [None if p.lower() == "none" and name in NONE_ALLOWED else types[name](p) for p in parts]
        except ValueError:
            raise ConfigError(f"--{name.replace('_', '-')}: cannot read '{text}' as {types[name].__name__} values") from None
    return grid


def _slug(settings: dict) -> str:
    text = "_".join(f"{k.replace('_', '-')}-{v}" for k, v in settings.items()) or "default"
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text)


def plan_runs(grid: dict[str, list], baselines: list[str]) -> list[tuple[str, dict]]:
    """(run name, settings) for the grid and the baselines crossed with the grid's other options."""
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline(s) {unknown}; valid: {', '.join(BASELINES)}")
    keys = list(grid)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]
    runs: list[tuple[str, dict]] = []
    # with baselines, the grid adds runs of its own only when it varies the loss or pairs
    if not baselines or any(k not in SHARED_KEYS for k in grid):
        for combo in combos:
            varied = {k: v for k, v in combo.items() if len(grid[k]) > 1}
            runs.append((_slug(varied) if varied else _slug(combo), combo))
    for b in baselines:
        seen = set()
        for combo in combos:
            rest = {k: v for k, v in combo.items() if k not in BASELINES[b]}
            varied = {k: v for k, v in rest.items() if len(grid[k]) > 1}
            name = f"baseline-{b}" + (f"_{_slug(varied)}" if varied else "")
            if name not in seen:
                seen.add(name)
                runs.append((name, {**rest, **BASELINES[b]}))
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise ConfigError("two runs of the sweep would share a folder; vary fewer options at once")
    return runs


def run_sweep(sweep: SweepConfig, grid: dict[str, list], baselines: list[str], base: dict, log=print,
              plots: bool = True) -> list[dict]:
    """The sweep, holding its folder's lock (one sweep at a time in a folder); its summary rows.
    Raises SweepFailures (after writing the summary) when a run failed."""
    from bso_cache.io.files import check_out
    from bso_cache.io.locks import folder_lock

    refuse = lambda holder: ConfigError(f"{sweep.out}: another sweep is running in this folder ({holder}); "  # noqa: E731
                                        f"wait for it to finish, or choose another --out")
    from bso_cache.training.preflight import check_sweep

    check_sweep(sweep)
    out_dir = Path(sweep.out)
    check_out(out_dir, "sweep")
    with folder_lock(out_dir, S.SweepLayout.LOCK, refuse=refuse):
        runs = _plan(sweep, grid, baselines, base, out_dir)
        log(f"sweep: {len(runs)} runs -> {out_dir}" + (" (Ray Tune)" if sweep.backend == "ray" else ""))
        todo = _todo(runs, log)
        if todo and sweep.backend == "ray":
            from bso_cache.training.sweep_ray import train_with_ray

            train_with_ray(sweep, todo, out_dir, log)
        elif todo:
            _train_sequentially(todo, out_dir, log)
        rows = _summarise(sweep, runs, out_dir, log, plots)
    failed = [r for r in runs if r.status["status"] == "failed"]
    if failed:
        raise SweepFailures(f"{len(failed)} of {len(runs)} runs failed: " + "; ".join(
            f"{r.name} ({r.status['detail']})" for r in failed) + f"; the others are in {sweep.out}/summary.csv")
    return rows


def _plan(sweep: SweepConfig, grid: dict, baselines: list[str], base: dict, out_dir: Path) -> list[Run]:
    """Every run's configuration, validated before any model loads: a typo fails now, not at run 7."""
    out_dir.mkdir(parents=True, exist_ok=True)
    planned = plan_runs(grid, baselines)
    return [Run(name, TrainConfig(**{**base, **settings, "cache": sweep.cache, "out": str(out_dir / name),
                                                "eval_cache": sweep.eval_cache}), index=f"[{i}/{len(planned)}]")
            for i, (name, settings) in enumerate(planned, start=1)]


def _todo(runs: list[Run], log) -> list[Run]:
    """The runs to train now: not finished, not stopped early; each resumes from its checkpoint if
    it has one (a failed run starts again)."""
    from bso_cache.training.checkpoint import list_checkpoints

    todo = []
    for run in runs:
        marker = run.recorded_status()
        if run.layout.summary.exists():
            run.status = {"status": "finished", "detail": None}
            log(f"{run.index} {run.name}: finished earlier, skipped")
        elif marker and marker["status"] == "stopped_early":
            run.status = marker
            log(f"{run.index} {run.name}: stopped early before (step {marker['detail']}), skipped")
        else:
            if marker:  # failed before: tried again
                run.layout.sweep_status.unlink()
            resume = run.layout.root.exists() and bool(list_checkpoints(run.layout))
            run.cfg = run.cfg.replace(resume=resume, overwrite=not resume)
            todo.append(run)
    return todo


def _train_sequentially(todo: list[Run], out_dir: Path, log) -> None:
    from bso_cache.training.train import train

    for run in todo:
        log(f"{run.index} {run.name}: training{' (resuming)' if run.cfg.resume else ''}")
        try:
            with tracker_parent(run.cfg, out_dir):
                train(run.cfg, log=lambda s: None, report_group=out_dir.name)
            run.status = {"status": "finished", "detail": None}
        except run_failures() as e:  # this run's, not the sweep's
            record_status(run, "failed", failure_reason(e))
        gc.collect()
        run.summary_row(log)  # its figures as it finishes


def _summarise(sweep: SweepConfig, runs: list[Run], out_dir: Path, log, plots: bool) -> list[dict]:
    from bso_cache.training import sweep_summary as summary

    rows = [run.summary_row(log if run.row is None else None) for run in runs]
    curves = {run.name: run.curve for run in runs}
    if sweep.eval_cache:
        summary.mark_pareto(rows)
    recommendation = summary.recommend(rows, sweep.select)
    summary.write_summary(out_dir, rows, recommendation)
    if plots:
        files = summary.plot(curves, rows, out_dir, held_out=sweep.eval_cache is not None)
        log("plots: " + ", ".join(str(f) for f in files))
    if recommendation[0]:
        log(f"take {recommendation[0]}: {recommendation[1]}")
    log(f"summary: {S.SweepLayout(out_dir).summary_csv}")
    return rows
