"""PNG plots of runs (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

from .cache import require_writable
from .errors import ConfigError
from .schemas import PAIR_TYPES, RunLayout, SweepLayout

RUN_PANELS = [
    ("loss", ["loss"]),
    ("rewards", ["chosen_rewards", "rejected_rewards"]),
    ("margins", ["margin", "reward_margin"]),
    ("accuracies", ["preference_accuracy", "safety_accuracy"]),
    ("u", ["u_mean", "clamped_fraction", "u_positive_fraction"]),
    ("loss by pair type", [f"loss/{t}" for t in PAIR_TYPES]),
]


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install matplotlib") from None
    return plt


def read_metrics(run_dir: Path) -> list[dict]:
    path = RunLayout(run_dir).metrics
    if not path.exists():
        raise ConfigError(f"{path}: missing; is {run_dir} a bso-cache training run?")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{path}, line {i}: not valid JSON") from None
    return rows


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """One PNG per panel of RUN_PANELS plus an overview; returns the files written."""
    plt = _plt()
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = Path(out) if out else RunLayout(run_dir).plots
    require_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    written = []
    for ax, (title, keys) in zip(axes.flat, RUN_PANELS):
        for k in keys:
            ys = [r.get(k) for r in rows]
            pts = [(s, y) for s, y in zip(steps, ys) if isinstance(y, (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title.startswith("loss"):  # exponential generators reach e^36 at the clamp bound
            _loss_scale(ax, [y for line in ax.lines for y in line.get_ydata()])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    path = out / "overview.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def _loss_scale(ax, values: list[float]) -> None:
    """Log scale where the losses span decades and stay positive (exponential generators reach
    1e14), symmetric log with labelled ticks where they change sign, linear otherwise."""
    from matplotlib.ticker import LogLocator, SymmetricalLogLocator

    finite = [v for v in values if isinstance(v, (int, float)) and v == v]
    if not finite:
        return
    lo, hi = min(finite), max(finite)
    if lo > 0 and hi / lo > 1e3:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
    elif max(abs(lo), abs(hi)) > 1e3:
        ax.set_yscale("symlog", linthresh=1.0)
        ax.yaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=1.0))


def plot_sweep(runs: dict[str, list[dict]], points: dict[str, tuple[float, float]], out: Path) -> list[Path]:
    """Loss curves of all runs, and safety vs preference accuracy with one point per run."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    losses_seen = []
    for name, rows in runs.items():
        ys = [r["loss"] for r in rows]
        losses_seen += ys
        ax.plot([r["step"] for r in rows], ys, label=name, marker="o" if len(rows) < 30 else None)  # 1 step: a dot
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    _loss_scale(ax, losses_seen)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("loss curves")
    fig.tight_layout()
    losses = out / SweepLayout.LOSS_CURVES
    fig.savefig(losses, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 6))
    if not points:
        ax.text(0.5, 0.5, "no run has a safety accuracy:\nno evaluated pair has one safe and one unsafe response\n"
                "(pairs without safety labels, or --eval-cache without such pairs)", ha="center", va="center",
                fontsize=9, transform=ax.transAxes)
    for name, (pref, safe) in points.items():
        ax.scatter([pref], [safe], s=40)
        ax.annotate(name, (pref, safe), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("preference (helpfulness) accuracy")
    ax.set_ylabel("safety accuracy")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("safety-helpfulness trade-off (one point per run)")
    fig.tight_layout()
    trade = out / SweepLayout.TRADEOFF
    fig.savefig(trade, dpi=100)
    plt.close(fig)
    return [losses, trade]
