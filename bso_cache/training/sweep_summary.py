"""A sweep's summary: one row per run (its settings, status, figures), the runs on the Pareto front
of held-out (preference accuracy, safety accuracy), the run --select recommends, and the files a
person reads: summary.csv / summary.json, the sweep's README.md and the plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from bso_cache import schemas as S
from bso_cache.reporting.card import sweep_card

SUMMARY_METRICS = ("loss", "preference_accuracy", "safety_accuracy", "margin", "reward_margin",
                   "chosen_rewards", "rejected_rewards", "u_mean", "clamped_fraction")
EVAL_KEYS = ("preference_accuracy", "safety_accuracy", "mean_margin", "pairs", "safety_pairs")


def select_value(select: str, figures: dict) -> float | None:
    """--select's figure from held-out figures named as evaluate_cache names them (None: missing)."""
    pref, safe = figures.get("preference_accuracy"), figures.get("safety_accuracy")
    if select == "eval_balanced":
        if pref is None:
            return None
        return pref if safe is None else (pref + safe) / 2
    return figures.get(select.removeprefix("eval_"))


def last_evaluation(curve: list[dict]) -> tuple[int | None, dict]:
    """The step and the held-out figures of a run's last logged evaluation (metrics.jsonl's eval/ keys)."""
    for row in reversed(curve):
        figures = {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
        if figures:
            return row.get("step"), figures
    return None, {}


def summary_row(name: str, settings: dict, status: dict, summary: dict | None, curve: list[dict]) -> dict:
    """A run's line: its swept settings, its status (finished | stopped_early | failed, with the
    step or the reason), the last logged window's figures and the held-out ones."""
    final = (summary or {}).get("final") or (curve[-1] if curve else {})
    last = curve[-1] if curve else {}
    row = {"run": name, **settings, "status": status["status"], "status_detail": status.get("detail"),
           **{f"train_{k}": final.get(k) for k in SUMMARY_METRICS},
           "steps": (summary or {}).get("steps", last.get("step")),
           "train_pairs": last.get("pairs"),
           "train_safety_pairs": sum(last.get(f"pairs/{t}", 0) for t in ("safe/unsafe", "unsafe/safe"))}
    evaluation = (summary or {}).get("eval") or last_evaluation(curve)[1]
    if evaluation:
        row.update({f"eval_{k}": evaluation.get(k) for k in EVAL_KEYS})
    return row


def mark_pareto(rows: list[dict]) -> None:
    """`pareto`: on the front of held-out (preference accuracy, safety accuracy): no other run is at
    least as good on both and better on one. Runs without both figures are not on it."""
    points = {r["run"]: (r.get("eval_preference_accuracy"), r.get("eval_safety_accuracy")) for r in rows}
    for r in rows:
        p = points[r["run"]]
        if None in p:
            r["pareto"] = False if "eval_preference_accuracy" in r else None
            continue
        r["pareto"] = not any(None not in q and q[0] >= p[0] and q[1] >= p[1] and q != p for q in points.values())


def recommend(rows: list[dict], select: str) -> tuple[str | None, str]:
    """The run to take, and why: the best --select figure among the Pareto front's runs (all runs
    with held-out figures where none has a safety figure), the other accuracy breaking a tie."""
    scored = [(select_value(select, {k.removeprefix("eval_"): v for k, v in r.items() if k.startswith("eval_")}), r)
              for r in rows if r["status"] != "failed"]
    scored = [(v, r) for v, r in scored if v is not None]
    if not scored:
        return None, "no run has held-out figures: give --eval-cache to have the sweep recommend one"
    front = [(v, r) for v, r in scored if r.get("pareto")] or scored
    value, best = max(front, key=lambda vr: (vr[0], vr[1].get("eval_safety_accuracy") or 0,
                                              vr[1].get("eval_preference_accuracy") or 0))
    where = "on the Pareto front of preference and safety accuracy" if any(r.get("pareto") for _, r in front) else \
        "among the runs with held-out figures"
    return best["run"], f"the highest {select} ({value:.4g}) {where}"


def result_text(row: dict) -> str:
    """One run's figures as the sweep goes: the last logged training window, and held-out ones."""
    def fig(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    if row["status"] == "failed":
        return f"failed: {row['status_detail']}"
    text = (f"{row['steps']} steps{' (stopped early)' if row['status'] == 'stopped_early' else ''}, loss "
            f"{fig(row.get('train_loss'), '.4g')}; last logged window ({row.get('train_pairs')} pairs) pref. acc. "
            f"{fig(row.get('train_preference_accuracy'))}, safety acc. {fig(row.get('train_safety_accuracy'))}")
    if "eval_pairs" in row:
        text += (f"; held-out ({row['eval_pairs']} pairs) pref. acc. {fig(row['eval_preference_accuracy'])}, "
                 f"safety acc. {fig(row['eval_safety_accuracy'])}")
    return text


def write_summary(out_dir: Path, rows: list[dict], recommendation: tuple[str | None, str]) -> None:
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
    (out_dir / "README.md").write_text(sweep_card(rows, recommendation))


def plot(curves: dict, rows: list[dict], out_dir: Path, *, held_out: bool) -> list[Path]:
    """The loss curves and the trade-off: held-out figures with --eval-cache, else the last logged
    training window's (the plot says which); stopped runs and the Pareto front marked."""
    from bso_cache.reporting.report import plot_sweep

    side = "eval" if held_out else "train"
    points = {r["run"]: {"preference_accuracy": r.get(f"{side}_preference_accuracy"),
                         "safety_accuracy": r.get(f"{side}_safety_accuracy"),
                         "pairs": r.get(f"{side}_pairs"), "safety_pairs": r.get(f"{side}_safety_pairs"),
                         "stopped": r["status"] == "stopped_early", "pareto": bool(r.get("pareto"))}
              for r in rows if r["status"] != "failed"}
    points = {k: v for k, v in points.items() if v["preference_accuracy"] is not None
              and v["safety_accuracy"] is not None}
    return plot_sweep({k: v for k, v in curves.items() if v}, points, out_dir, held_out=held_out)
