#!/usr/bin/env python
"""Build benchmark and memory-vs-cache-size benchmark.

1. Reference pass, side by side on the same model and pairs (each in its own process):
   - bso-cache build (length-bucketed batches, target-only chunked log-softmax, shards + manifest),
     with each prompt scored once (--prefix-sharing on), with packing too, and twice (off)
   - a pure no-grad forward over the same token batches (full logits + float32 log-softmax + gather)
   - TRL's precompute pass (DPOTrainer with precompute_ref_log_probs=True, 0 training steps)
   Reported: pairs/s, tokens/s, padding share; the kinds run interleaved in --rounds rounds (order
   reversed every other round) and the table gives the median round's time and the range.
2. Peak memory of `bso-cache build` and `bso-cache train` at 1x and 10x the rows (the input
   repeated), to show that neither grows with the size of the cache.

Usage: python scripts/bench_build.py [--quick] [--data hh --max-length 512] [--no-memory]
(needs ../shared; TRL for the precompute row)
Writes into docs/PERFORMANCE.md between markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import ROOT, SHARED, median_round, paired_ratio, peak_rss_mib, setup, versions  # noqa: E402
from results import record  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def worker(kind: str, info: dict, batch_size: int, max_length: int, out: str) -> dict:
    import torch

    t0 = time.perf_counter()
    if kind.startswith("bso-cache-build"):
        from bso_cache.scoring import scorer as scoring
        from bso_cache.cache.build import build_cache
        from bso_cache.config import BuildConfig

        if kind.endswith("-packed"):  # packing is not a user option (it does not pay on the CPU): measure it here
            real = scoring.PairScorer.__init__
            scoring.PairScorer.__init__ = lambda self, *a, **k: real(self, *a, **{**k, "pack": True})
        sharing = "off" if kind.endswith("-unshared") else "on" if "-shared" in kind else "auto"
        m = build_cache(BuildConfig(model=info["model"], data=info["data"], out=out, max_length=max_length,
                                    batch_size=batch_size, rows_per_shard=info.get("rows_per_shard"),
                                    prefix_sharing=sharing, progress=False, overwrite=True), log=lambda s: None)
        pairs, tokens, padding = m.written, m.stats["tokens"], m.stats["padding_share"]
        seconds = m.stats["score_seconds"]
    elif kind == "plain-forward":
        from transformers import AutoModelForCausalLM

        from bso_cache.cache import Cache
        from bso_cache.data.pairs import epoch_batches
        from bso_cache.scoring.layouts import make_token_batch

        model = AutoModelForCausalLM.from_pretrained(info["model"]).eval()
        cache = Cache.open(info["cache"])
        items = [it for b in epoch_batches(cache, mode="none", orientation="better", batch_size=10**9, seed=0,
                                           epoch=0, shuffle=False) for it in b]
        items.sort(key=lambda it: it.length, reverse=True)  # the same bucketing as the build
        tokens = padded = 0
        t1 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(items), batch_size):
                b = items[s:s + batch_size]
                tb = make_token_batch([it.prompt_ids for it in b] * 2,
                                      [it.chosen_ids for it in b] + [it.rejected_ids for it in b])
                logits = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1]
                lp = torch.log_softmax(logits.float(), -1).gather(2, tb.input_ids[:, 1:, None]).squeeze(2)
                (lp * tb.score_mask[:, 1:]).sum(1)
                tokens += tb.tokens
                padded += tb.input_ids.numel()
        seconds = time.perf_counter() - t1
        pairs, padding = len(items), 1 - tokens / padded
    elif kind == "trl-precompute":
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        tok = AutoTokenizer.from_pretrained(info["model"])
        rows = [json.loads(x) for x in Path(info["trl_data"]).read_text().splitlines()]
        model = AutoModelForCausalLM.from_pretrained(info["model"])
        args = DPOConfig(output_dir=out, per_device_train_batch_size=batch_size, max_steps=1, learning_rate=0.0,
                         max_length=max_length, precompute_ref_log_probs=True, precompute_ref_batch_size=batch_size,
                         report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
        t1 = time.perf_counter()  # TRL 1.16 tokenizes and runs the reference pass in the constructor
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        seconds = time.perf_counter() - t1
        tokens = 0
        for batch in trainer.get_train_dataloader():
            tokens += int(batch["attention_mask"].sum())
        pairs, padding = len(rows), None
    elif kind == "train":
        from bso_cache.config import TrainConfig
        from bso_cache.training.train import train

        train(TrainConfig(cache=info["cache"], out=out, generator="sba", optimizer="adamw", lr=1e-6, batch_size=8,
                          max_steps=info["steps"], progress=False, overwrite=True, shuffle_buffer=256),
              log=lambda s: None)
        seconds, pairs, tokens, padding = time.perf_counter() - t0, None, None, None
    else:
        raise SystemExit(kind)
    return {"kind": kind, "seconds": seconds, "pairs": pairs, "tokens": tokens, "padding": padding,
            "peak_mib": peak_rss_mib()}


def run(kind, info, args, out) -> dict:
    import tempfile

    cmd = [sys.executable, __file__, "--worker", kind, "--info", json.dumps(info), "--batch-size",
           str(args.batch_size), "--max-length", str(args.max_length), "--out", out]
    # a fresh datasets cache: TRL keeps precomputed reference log-probs there and would reuse them
    env = {**os.environ, "HF_DATASETS_CACHE": tempfile.mkdtemp(prefix="hf-ds-")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--info")
    ap.add_argument("--out")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the table gives the median")
    ap.add_argument("--only-memory", action="store_true", help="skip the reference-pass comparison")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory-vs-size builds")
    ap.add_argument("--data", default="pku", choices=["pku", "hh"], help="the shared sample to take pairs from")
    ap.add_argument("--rows-per-shard", type=int, default=500, help="for the memory-vs-size builds")
    ap.add_argument("--work", default=str(ROOT / "bench-out"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.info), args.batch_size, args.max_length, args.out)))
        return
    work = Path(args.work)
    info = setup(work, args.pairs, args.max_length, args.quick, args.data)
    kinds = ("bso-cache-build-shared", "bso-cache-build-shared-packed", "bso-cache-build-unshared", "plain-forward",
             "trl-precompute")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for k in range(0 if args.only_memory else args.rounds):
        for kind in kinds if k % 2 == 0 else kinds[::-1]:
            r = run(kind, info, args, str(work / f"build-{kind}"))
            runs[kind].append(r)
            print(f"round {k + 1}:", kind, r, flush=True)
    rows = [median_round(rs, "seconds") for rs in runs.values() if rs]
    lines = ["| reference pass | pairs/s | seconds | range (s) | vs unshared (time) | vs unshared, per round | tokens fed/s "
             "| padding | peak RSS (MiB) | vs unshared |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = next((r for r in rows if r["kind"] == "bso-cache-build-unshared"), None)
    for r in rows:
        pad = f"{100 * r['padding']:.1f}%" if r["padding"] is not None else "n/a"
        vs_t = f"{r['seconds'] / base['seconds']:.2f}x" if base else "-"
        vs_m = f"{r['peak_mib'] / base['peak_mib']:.2f}x" if base else "-"
        lo, hi = r["range"]
        paired = (f"{paired_ratio(runs[r['kind']], runs['bso-cache-build-unshared'], 'seconds'):.2f}x" if base
                  else "-")
        lines.append(f"| {r['kind']} | {r['pairs'] / r['seconds']:.1f} | {r['seconds']:.2f} | {lo:.2f}-{hi:.2f} | "
                     f"{vs_t} | {paired} | {r['tokens'] / r['seconds']:,.0f} | {pad} | {r['peak_mib']:,.0f} | {vs_m} |")
    if args.no_memory:
        _write_build_section(args, info, lines)
        return
    # memory vs cache size: tinystories-260k on the PKU sample, 1x and 10x
    pku = SHARED / "data" / "PKU-Alignment_PKU-SafeRLHF_sample.jsonl"
    tiny = SHARED / "models" / "tinystories-260k"
    mem = ["| rows | build peak RSS (MiB) | train peak RSS (MiB), 40 steps |", "|---|---|---|"]
    for factor in (1, 10):
        data = work / f"pku-x{factor}.jsonl"
        data.write_text(pku.read_text() * factor)
        cache = work / f"cache-pku-x{factor}"
        b = run("bso-cache-build", {"model": str(tiny), "data": str(data), "rows_per_shard": args.rows_per_shard},
                argparse.Namespace(
            batch_size=8, max_length=512), str(cache))
        t = run("train", {"cache": str(cache), "steps": 40}, argparse.Namespace(batch_size=8, max_length=512),
                str(work / f"run-pku-x{factor}"))
        mem.append(f"| {500 * factor:,} ({b['pairs']:,} written) | {b['peak_mib']:,.0f} | {t['peak_mib']:,.0f} |")
        print(mem[-1], flush=True)
    mem_text = (f"### Memory against cache size ({time.strftime('%Y-%m-%d')})\n\ntinystories-260k, the PKU sample "
                f"repeated 1x and 10x, build with --rows-per-shard {args.rows_per_shard} --max-length 512; train: sba, "
                f"batch 8, shuffle buffer 256, 40 steps. Each in its own process.\n"
                f"Command: `python scripts/bench_build.py --only-memory --rows-per-shard {args.rows_per_shard}`\n\n"
                + "\n".join(mem))
    print(mem_text)
    if rows:
        _write_build_section(args, info, lines)
    record("bench-memory", args.doc, mem_text)


def _write_build_section(args, info: dict, lines: list[str]) -> None:
    model = "tiny Llama (quick)" if args.quick else "random-init 46M Llama, GPT-2 tokenizer"
    cmd = "python scripts/bench_build.py " + " ".join(sys.argv[1:])
    text = (f"### Reference pass, {args.data.upper()} ({time.strftime('%Y-%m-%d')})\n\n{model}; {info['pairs']} "
            f"{args.data.upper()} pairs, batch {args.batch_size} pairs, max length {args.max_length}, fp32, CPU; "
            f"median of {args.rounds} interleaved rounds (range: fastest and slowest; per round: the median over rounds of "
            f"the ratio to the unshared build of the same round); "
            f"{versions()}.\nCommand: `{cmd.strip()}`\n\n" + "\n".join(lines) + "\n\n"
            "bso-cache-build-*: scoring time of the build (tokenizing, scoring, writing shards; not the model load), "
            "each prompt once (shared; shared-packed: several pairs a row) or twice (unshared). plain-forward: a no-grad "
            "forward over the same length-sorted unshared token batches with full logits and a float32 log-softmax. "
            "trl-precompute: TRL's DPOTrainer constructor with precompute_ref_log_probs=True (tokenizing + reference "
            "pass, fresh datasets cache); its tokens are those of its own padded batches.")
    print(text)
    record(f"bench-build-{args.data}{'-quick' if args.quick else ''}", args.doc, text, data={"info": info, "table": lines})


if __name__ == "__main__":
    main()
