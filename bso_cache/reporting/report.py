"""PNG plots of runs (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

from bso_cache.io.files import require_writable
from bso_cache.errors import ConfigError
from bso_cache.schemas import PAIR_TYPES, RunLayout, SweepLayout

# (title, metrics.jsonl keys, y-axis label): one quantity per axis, fractions apart from u
RUN_PANELS = [
    ("loss", ["loss"], "loss (nats)"),
    ("implicit rewards", ["chosen_rewards", "rejected_rewards"], "beta x log(pi / pi_ref) (nats)"),
    ("margins", ["margin", "reward_margin"], "nats (reward_margin = beta x margin)"),
    ("accuracies", ["preference_accuracy", "safety_accuracy"], "fraction of pairs"),
    ("u, the generator's argument", ["u_mean"], "mean u"),
    ("clamp and sign of u", ["clamped_fraction", "u_positive_fraction"], "fraction of pairs"),
    ("loss by pair type (chosen/rejected)", [f"loss/{t}" for t in PAIR_TYPES], "loss (nats)"),
    ("learning rate", ["lr"], "lr"),
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
    """overview.png: one panel per RUN_PANELS entry; returns the files written."""
    plt = _plt()
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = Path(out) if out else RunLayout(run_dir).plots
    require_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    fig = run_figure(rows, str(run_dir))
    path = out / "overview.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def run_figure(rows: list[dict], name: str):
    """The overview of one run's metrics.jsonl: a panel per RUN_PANELS entry, each with its y label."""
    plt = _plt()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    for ax, (title, keys, ylabel) in zip(axes.flat, RUN_PANELS):
        for k in keys:
            ys = [r.get(k) for r in rows]
            pts = [(s, y) for s, y in zip(steps, ys) if isinstance(y, (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=k, marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if title.startswith("loss"):  # exponential generators reach e^36 at the clamp bound
            _loss_scale(ax, [y for line in ax.lines for y in line.get_ydata()])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{name}: training metrics, each point the mean over one logged window of steps "
                 f"({rows[0].get('pairs', '?')} pairs in the first)" if rows else name)
    fig.tight_layout()
    return fig


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


def plot_sweep(runs: dict[str, list[dict]], points: dict[str, dict], out: Path, *, held_out: bool) -> list[Path]:
    """Loss curves of all runs, and safety vs preference accuracy with one point per run.

    `points[name]`: preference_accuracy, safety_accuracy, pairs, safety_pairs (the pairs whose
    responses differ in safety, behind the safety figure); `held_out`: they are the --eval-cache's
    figures, else the last logged training window's (said in the title)."""
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    losses_seen = []
    for name, rows in runs.items():
        ys = [r["loss"] for r in rows]
        losses_seen += ys
        ax.plot([r["step"] for r in rows], ys, label=name, marker="o" if len(rows) < 30 else None)  # 1 step: a dot
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    _loss_scale(ax, losses_seen)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("loss curves (each point the mean over one logged window of steps)")
    fig.tight_layout()
    losses = out / SweepLayout.LOSS_CURVES
    fig.savefig(losses, dpi=100)
    plt.close(fig)
    trade = out / SweepLayout.TRADEOFF
    fig = tradeoff_figure(points, held_out=held_out)
    fig.savefig(trade, dpi=100)
    plt.close(fig)
    return [losses, trade]


_MARKERS = "osD^vP*Xh<>p"


def tradeoff_figure(points: dict[str, dict], *, held_out: bool):
    """One marker per run, named in a legend beside the axes (labels on the points overlap when
    runs agree, which is when the comparison matters)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 6))
    if not points:
        ax.text(0.5, 0.5, "no run has a safety accuracy:\nno evaluated pair has one safe and one unsafe response\n"
                "(pairs without safety labels, or --eval-cache without such pairs)", ha="center", va="center",
                fontsize=9, transform=ax.transAxes)
    colours = plt.get_cmap("tab10" if len(points) <= 10 else "tab20")
    for i, (name, p) in enumerate(points.items()):
        stopped = p.get("stopped", False)
        colour = colours(i % colours.N)  # a stopped run: hollow
        paint = {"facecolors": "none", "edgecolors": colour} if stopped else {"color": colour}
        ax.scatter([p["preference_accuracy"]], [p["safety_accuracy"]], s=70, alpha=0.8,
                   marker=_MARKERS[i % len(_MARKERS)], **paint,
                   label=f"{name}: {p['preference_accuracy']:.3f} / {p['safety_accuracy']:.3f} "
                         f"({p['safety_pairs']} safety pairs of {p['pairs']})"
                         f"{'; stopped early' if stopped else ''}{'; Pareto front' if p.get('pareto') else ''}")
    front = sorted((p["preference_accuracy"], p["safety_accuracy"]) for p in points.values() if p.get("pareto"))
    if len(front) > 1:
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="grey", alpha=0.6,
                linestyle="--", label="Pareto front (no run better on both)")
    ax.set_xlabel("preference (helpfulness) accuracy")
    ax.set_ylabel("safety accuracy (pairs whose responses differ in safety)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    where = ("held-out figures (--eval-cache)" if held_out else
             "the last logged training window, not held out: give --eval-cache for held-out figures")
    ax.set_title(f"safety-helpfulness trade-off, one point per run\n{where}", fontsize=10)
    if points:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                  title="run: preference / safety accuracy", title_fontsize=7)
    fig.tight_layout()
    return fig
