"""`bso-cache sweep`: many runs from one cache, one summary, plots.

A grid is given as comma-separated values of train options; named baselines (docs/LOSSES.md) are
crossed with the grid's other options. Each run gets its own folder; a run whose summary exists
is skipped when the sweep is repeated, and an interrupted one resumes from its checkpoint.
Each run loads its policy once; the reference is never loaded.
"""

from __future__ import annotations

import csv
import gc
import itertools
import json
import re
from pathlib import Path

from bso_cache import schemas as S
from bso_cache.config import BASELINES, TrainConfig, names, options, section_names
from bso_cache.reporting.card import sweep_card
from bso_cache.errors import ConfigError
from bso_cache.reporting.trackers import tracker_parent

SWEEPABLE = names(TrainConfig, sweep=True)  # the options with sweep=True (config/train.py)
# sweepable options whose grid may hold "none" (the option's default: automatic bounds, no step limit)
NONE_ALLOWED = tuple(o.name for o in options(TrainConfig) if o.name in SWEEPABLE and o.optional)
# what a baseline shares with the grid: the optimisation section (a baseline fixes the loss and the pairs)
SHARED_KEYS = tuple(n for n in section_names(TrainConfig, "optim") if n in SWEEPABLE)
SUMMARY_METRICS = ("loss", "preference_accuracy", "safety_accuracy", "margin", "reward_margin",
                   "chosen_rewards", "rejected_rewards", "u_mean", "clamped_fraction")


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


def _result_text(row: dict) -> str:
    """One run's figures as the sweep goes: the last logged training batch, and held-out ones."""
    def fig(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    text = (f"{row['steps']} steps, loss {fig(row.get('train_loss'), '.4g')}; last logged window "
            f"({row.get('train_pairs')} pairs) pref. acc. {fig(row.get('train_preference_accuracy'))}, "
            f"safety acc. {fig(row.get('train_safety_accuracy'))}")
    if "eval_pairs" in row:
        text += (f"; held-out ({row['eval_pairs']} pairs) pref. acc. {fig(row['eval_preference_accuracy'])}, "
                 f"safety acc. {fig(row['eval_safety_accuracy'])}")
    return text


def run_sweep(cache: str, out: str, grid: dict[str, list], baselines: list[str], base: dict,
              eval_cache: str | None = None, log=print, plots: bool = True) -> list[dict]:
    """The sweep, holding its folder's lock (one sweep at a time in a folder)."""
    from bso_cache.io.locks import folder_lock

    refuse = lambda holder: ConfigError(f"{out}: another sweep is running in this folder ({holder}); wait for "  # noqa: E731
                                        f"it to finish, or choose another --out")
    from bso_cache.io.files import check_out

    check_out(Path(out), "sweep")
    with folder_lock(Path(out), S.SweepLayout.LOCK, refuse=refuse):
        return _run_sweep(cache, out, grid, baselines, base, eval_cache, log, plots)


def _run_sweep(cache: str, out: str, grid: dict[str, list], baselines: list[str], base: dict,
               eval_cache: str | None, log, plots: bool) -> list[dict]:
    from bso_cache.training.checkpoint import list_checkpoints
    from bso_cache.training.train import train

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(grid, baselines)
    # validate every configuration before any model loads: a typo fails now, not at run 7
    configs = []
    for name, settings in runs:
        cfg = TrainConfig(**{**base, **settings, "cache": cache, "out": str(out_dir / name),
                             "eval_cache": eval_cache})  # validated as it is made
        configs.append((name, settings, cfg))
    log(f"sweep: {len(configs)} runs -> {out_dir}")
    summaries = []
    curves: dict[str, list[dict]] = {}
    for i, (name, settings, cfg) in enumerate(configs, start=1):
        run_dir = Path(cfg.out)
        summary_path = S.RunLayout(run_dir).summary
        if summary_path.exists():
            log(f"[{i}/{len(configs)}] {name}: finished earlier, skipped")
        else:
            resume = run_dir.exists() and bool(list_checkpoints(S.RunLayout(run_dir)))
            cfg = cfg.replace(resume=resume, overwrite=not resume)
            log(f"[{i}/{len(configs)}] {name}: training{' (resuming)' if resume else ''}")
            with tracker_parent(cfg, out_dir):
                train(cfg, log=lambda s: None, report_group=out_dir.name)
            gc.collect()
        summary = json.loads(summary_path.read_text())
        from bso_cache.reporting.report import read_metrics

        curves[name] = read_metrics(run_dir)
        row = _summary_row(name, cfg, summary, curves[name])
        summaries.append(row)
        log(f"[{i}/{len(configs)}] {name}: {_result_text(row)}")
    _write_summary(out_dir, summaries)
    if plots:
        files = _plot(curves, summaries, out_dir, held_out=eval_cache is not None)
        log("plots: " + ", ".join(str(f) for f in files))
    log(f"summary: {S.SweepLayout(out_dir).summary_csv}")
    return summaries


def _summary_row(name: str, cfg: TrainConfig, summary: dict, curve: list[dict]) -> dict:
    """A run's line of summary.csv: its swept settings, the last logged window's figures (and the
    pairs behind them), and the held-out figures when there are any."""
    final = summary.get("final") or {}
    row = {"run": name, **{k: getattr(cfg, k) for k in SWEEPABLE},
           **{f"train_{k}": final.get(k) for k in SUMMARY_METRICS}, "steps": summary.get("steps")}
    last = curve[-1] if curve else {}
    row.update({"train_pairs": last.get("pairs"),
                "train_safety_pairs": sum(last.get(f"pairs/{t}", 0) for t in ("safe/unsafe", "unsafe/safe"))})
    ev = summary.get("eval") or {}
    if ev:
        row.update({f"eval_{k}": ev.get(k) for k in ("preference_accuracy", "safety_accuracy", "mean_margin",
                                                      "pairs", "safety_pairs")})
    return row


def _plot(curves: dict, summaries: list[dict], out_dir: Path, *, held_out: bool) -> list[Path]:
    """The loss curves and the trade-off: held-out figures with --eval-cache, else the last
    logged training window's (the plot says which)."""
    from bso_cache.reporting.report import plot_sweep

    side = "eval" if held_out else "train"
    points = {r["run"]: {"preference_accuracy": r.get(f"{side}_preference_accuracy"),
                         "safety_accuracy": r.get(f"{side}_safety_accuracy"),
                         "pairs": r.get(f"{side}_pairs"), "safety_pairs": r.get(f"{side}_safety_pairs")}
              for r in summaries}
    points = {k: v for k, v in points.items() if v["preference_accuracy"] is not None
              and v["safety_accuracy"] is not None}
    return plot_sweep(curves, points, out_dir, held_out=held_out)


def _write_summary(out_dir: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    layout = S.SweepLayout(out_dir)
    with open(layout.summary_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    layout.summary_json.write_text(json.dumps(rows, indent=2))
    (out_dir / "README.md").write_text(sweep_card(rows))
