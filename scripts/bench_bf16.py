#!/usr/bin/env python
"""bf16 end to end on the CPU: how far a bf16 cache's log-probs are from a float64 recomputation,
per token and per sequence, against a float32 cache; and what the step-0 check sees when a bf16
policy scores a bf16 cache (the case `train --dtype bfloat16` on a `build --dtype bfloat16` cache).

Needs ../shared (tinystories-260k, the PKU and HH samples). Prints a Markdown table and writes it
into docs/PERFORMANCE-MEMORY.md between the bench-bf16 markers.

    python scripts/bench_bf16.py [--rows 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BSO_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "PERFORMANCE-MEMORY.md"))
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from bso_cache.cache.build import build_cache
    from bso_cache.cache import Cache
    from bso_cache.config import BuildConfig
    from bso_cache.data.pairs import epoch_batches
    from bso_cache.scoring.scorer import score_pairs

    model_dir = SHARED / "models" / "tinystories-260k"
    data = {"PKU": SHARED / "data" / "PKU-Alignment_PKU-SafeRLHF_sample.jsonl",
            "HH": SHARED / "data" / "harmless_train_sample.jsonl"}
    work = Path(tempfile.mkdtemp(prefix="bench_bf16_"))
    f64 = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    rows = []
    for name, path in data.items():
        sample = work / f"{name}.jsonl"
        sample.write_text("".join(path.read_text().splitlines(keepends=True)[:args.rows]))
        caches = {}
        for dtype in ("float32", "bfloat16"):
            caches[dtype] = work / f"{name}-{dtype}"
            build_cache(BuildConfig(model=str(model_dir), data=str(sample), out=str(caches[dtype]), dtype=dtype,
                                    max_length=512, batch_size=8, prefix_sharing="off", progress=False),
                        log=lambda s: None)
        items = {d: [it for b in epoch_batches(Cache.open(c), mode="none", orientation="better", batch_size=10**6,
                                               seed=0, epoch=0, shuffle=False) for it in b] for d, c in caches.items()}
        P = [it.prompt_ids for it in items["float32"]]
        C = [it.chosen_ids for it in items["float32"]]
        R = [it.rejected_ids for it in items["float32"]]
        lengths = torch.tensor([len(c) for c in C] + [len(r) for r in R], dtype=torch.float64)
        with torch.no_grad():
            exact = score_pairs(f64, P, C, R)
            again = [score_pairs(bf16, P[i:i + 8], C[i:i + 8], R[i:i + 8]) for i in range(0, len(P), 8)]
        exact = torch.cat([exact.chosen, exact.rejected])
        policy_bf16 = torch.cat([torch.cat([a.chosen for a in again]), torch.cat([a.rejected for a in again])])

        def cached(d):
            return torch.tensor([it.ref_chosen_logp for it in items[d]] + [it.ref_rejected_logp for it in items[d]],
                                dtype=torch.float64)

        for label, values, against in (("float32 cache vs float64", cached("float32"), exact),
                                       ("bf16 cache vs float64", cached("bfloat16"), exact),
                                       ("bf16 cache vs float32 cache", cached("bfloat16"), cached("float32")),
                                       ("bf16 policy vs bf16 cache (step 0)", policy_bf16, cached("bfloat16"))):
            diff = (values - against).abs()
            per_token = diff / lengths
            rows.append(f"| {name} | {label} | {len(diff)} | {per_token.max():.2e} | "
                        f"{per_token.quantile(0.99):.2e} | {per_token.mean():.2e} | {diff.max():.3g} | {diff.mean():.3g} |")
    text = ("| data | comparison | sequences | per token: max | p99 | mean | per sequence: max | mean |\n"
            "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    print(text)
    from results import record

    record("bench-bf16", args.doc, text)


if __name__ == "__main__":
    main()
