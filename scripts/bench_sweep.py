"""Sweeps, measured side by side in one run (docs/PERFORMANCE.md, "Sweeps"):

1. a 4-run grid (--generator logistic,sba --beta 0.1,0.5) sequentially and with --backend ray
   --parallel 2 (one torch thread a run): the wall time of each command and their ratio, and the
   runs' final losses (equal within float noise);
2. --early-stop on a grid of two learning rates that learn and two (1e-12, 2e-12) that cannot:
   the steps trained against the steps without early stopping.

Usage: python scripts/bench_sweep.py [--steps 60] [--quick]   (tinystories-260k on the PKU sample
from ../shared; --quick: the project's demo data and tiny model, a few seconds a run)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BSO_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT / "scripts"))


def caches(work: Path, quick: bool) -> tuple[Path, Path, str]:
    """(train cache, held-out cache, what they are)."""
    from bso_cache.cache.build import build_cache
    from bso_cache.config import BuildConfig

    if quick:
        from bso_cache.reporting.demo import make_demo_assets

        assets = make_demo_assets(work / "demo", n_train=96, n_eval=48)
        model, train, held = assets["model"], assets["train"], assets["eval"]
        what = "the demo's tiny Llama and synthetic pairs"
    else:
        model = SHARED / "models" / "tinystories-260k"
        rows = (SHARED / "data" / "PKU-Alignment_PKU-SafeRLHF_sample.jsonl").read_text().splitlines()
        train, held = work / "train.jsonl", work / "held.jsonl"
        train.write_text("\n".join(rows[:400]) + "\n")
        held.write_text("\n".join(rows[400:]) + "\n")
        what = "tinystories-260k, 400 PKU-SafeRLHF sample rows (held out: the other 100)"
    out = []
    for name, data in (("train", train), ("held", held)):
        build_cache(BuildConfig(model=str(model), data=str(data), out=str(work / f"cache-{name}"), max_length=256,
                                overlong="truncate", progress=False), log=lambda s: None)
        out.append(work / f"cache-{name}")
    return out[0], out[1], what


def sweep(args: list[str]) -> tuple[float, dict[str, dict]]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bso_cache", "sweep", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    out = Path(args[args.index("--out") + 1])
    with open(out / "summary.csv") as f:
        return seconds, {r["run"]: r for r in csv.DictReader(f)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-early-stop", action="store_true", help="measure the parallel sweep only")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    train, held, what = caches(work, args.quick)
    common = ["--cache", str(train), "--max-steps", str(args.steps), "--epochs", "1000", "--batch-size", "8"]
    grid = ["--generator", "logistic,sba", "--beta", "0.1,0.5"]
    seq_s, seq = sweep([*common, *grid, "--out", str(work / "seq")])
    ray_s, par = sweep([*common, *grid, "--out", str(work / "ray"), "--backend", "ray", "--parallel", "2"])
    diff = max(abs(float(seq[n]["train_loss"]) - float(par[n]["train_loss"])) / max(1.0, abs(float(seq[n]["train_loss"])))
               for n in seq)  # relative: sba's loss at the bound is ~1e14
    if args.no_early_stop:
        _record(args, what, [f"| 4 runs, sequential | {seq_s:.1f} | 1.00x | |",
                             f"| 4 runs, `--backend ray --parallel 2` | {ray_s:.1f} | {ray_s / seq_s:.2f}x | final "
                             f"losses within {diff:.1e} (relative) of the sequential runs' |"],
                {"sequential_s": seq_s, "ray_s": ray_s, "max_loss_diff": diff})
        return
    dpo = ["--generator", "logistic", "--safety-penalty", "0", "--pairs", "none", "--optimizer", "adamw",
           "--lr-schedule", "constant", "--eval-cache", str(held), "--eval-every", str(max(1, args.steps // 8))]
    lrs = ["--lr", "2e-3,1e-3,1e-12,2e-12"]
    full_s, full = sweep([*common, *dpo, *lrs, "--out", str(work / "full"), "--backend", "ray", "--parallel", "2"])
    stop_s, stopped = sweep([*common, *dpo, *lrs, "--out", str(work / "stop"), "--backend", "ray", "--parallel", "2",
                             "--early-stop", "--select", "eval_preference_accuracy"])
    steps_full = sum(int(r["steps"]) for r in full.values())
    steps_stop = sum(int(r["steps"]) for r in stopped.values())
    lines = ["| sweep | wall time (s) | ratio | notes |", "|---|---|---|---|",
             f"| 4 runs, sequential | {seq_s:.1f} | 1.00x | |",
             f"| 4 runs, `--backend ray --parallel 2` | {ray_s:.1f} | {ray_s / seq_s:.2f}x | final losses within "
             f"{diff:.1e} (relative) of the sequential runs' |",
             f"| 4 lrs, ray, no early stop | {full_s:.1f} | 1.00x | {steps_full} steps |",
             f"| 4 lrs, ray, `--early-stop` | {stop_s:.1f} | {stop_s / full_s:.2f}x | {steps_stop} steps "
             f"({1 - steps_stop / steps_full:.0%} saved); " + ", ".join(
                 f"{n}: {r['status']} at {r['steps']}" for n, r in stopped.items()) + " |"]
    _record(args, what, lines[2:], {"sequential_s": seq_s, "ray_s": ray_s, "max_loss_diff": diff, "no_stop_s": full_s,
                                    "early_stop_s": stop_s, "steps_no_stop": steps_full,
                                    "steps_early_stop": steps_stop,
                                    "statuses": {n: (r["status"], r["steps"]) for n, r in stopped.items()}})
    print(json.dumps({"work": str(work)}))


def _record(args, what: str, rows: list[str], data: dict) -> None:
    lines = ["| sweep | wall time (s) | ratio | notes |", "|---|---|---|---|", *rows]
    text = (f"### Sweeps ({time.strftime('%Y-%m-%d')})\n\n{what}; {args.steps} steps a run, batch 8, on "
            f"{os.cpu_count()} CPU cores (Ray: one torch thread a run; sequential: torch's default)."
            + ("" if args.no_early_stop else f" The early-stop grid: DPO, AdamW constant lr, held-out evaluation "
                                             f"every {max(1, args.steps // 8)} steps, --select eval_preference_accuracy.")
            + "\n\nCommand: `python scripts/bench_sweep.py "
            + f"{' '.join(sys.argv[1:])}`\n\n" + "\n".join(lines))
    print(text)
    from results import record

    marker = "bench-sweep" + ("-quick" if args.quick else "") + (f"-{args.steps}-steps" if args.no_early_stop else "")
    record(marker, ROOT / "docs" / "PERFORMANCE.md", text, data=data)


if __name__ == "__main__":
    main()
