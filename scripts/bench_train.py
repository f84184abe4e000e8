#!/usr/bin/env python
"""Training-step benchmark: bso-cache train vs TRL DPOTrainer vs the policy-only limit.

Same model, same pairs, same batch size and length, measured side by side in one run:
- bso-cache train (policy alone, reference log-probs from the cache; DPO loss: logistic, C=0),
  with each prompt scored once (bso-cache-shared, --prefix-sharing on) and twice
  (bso-cache-unshared, --prefix-sharing off)
- TRL DPOTrainer, reference model online (precompute_ref_log_probs=False)
- TRL DPOTrainer, precompute_ref_log_probs=True
- the policy-only limit: a plain forward + backward with labels on the same token batches + AdamW

Each (system, steps) runs in its own process. Per-step time = (T(long) - T(short)) / (long - short),
so start-up, model loading and TRL's reference pre-pass cancel; by default long - short is an
epoch's worth of steps, so every batch length counts. The systems run interleaved in --rounds
rounds (the order reversed every other round) and the table gives the median round and the
range: on a shared 2-core machine one round can be off by 30%. Peak memory is the process's
max RSS (CPU) or torch.cuda.max_memory_allocated (GPU) in the long run (median over rounds).
Optimizers: bso-cache's (fused AdamW), TRL's default (adamw_torch_fused), fused AdamW for the
policy-only limit. tokens/s is the same
measure of work for every system: the pairs' tokens as two sequences each ((prompt + chosen) +
(prompt + rejected), no padding) times the pairs per step, over the time per step; a system that
shares the prompt feeds fewer tokens for the same pairs.

Usage (needs ../shared for the PKU sample and the GPT-2 tokenizer, and `pip install trl`):
    python scripts/bench_train.py                          # 46M Llama, 64 PKU pairs, batch 4, length 256
    python scripts/bench_train.py --data hh --max-length 512   # 64 HH-RLHF pairs (multi-turn prompts)
    python scripts/bench_train.py --quick                  # a tiny model, for a smoke test
Writes the table to stdout and into docs/PERFORMANCE.md (between markers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BSO_SHARED", ROOT.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SYSTEMS = ("bso-cache-shared", "bso-cache-unshared", "trl", "trl-precompute")
EXTRA_SYSTEMS = ("policy-only", "bso-cache-ckpt")  # the plain limit; bso-cache with --gradient-checkpointing
DATASETS = {"pku": ("PKU-Alignment_PKU-SafeRLHF_sample.jsonl", "pku"), "hh": ("harmless_train_sample.jsonl", "hh")}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------- setup
def setup(work: Path, n_pairs: int, max_length: int, quick: bool, data: str = "pku",
          model: tuple[str, dict] | None = None) -> dict:
    """Model (random init, GPT-2 tokenizer), the pairs (PKU or HH, nothing truncated), the cache.
    `model`: (folder name, LlamaConfig overrides) instead of the 46M benchmark model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bso_cache.data.formats import Normaliser
    from bso_cache.data.sources import open_source
    from bso_cache.data.tokenize import PairTokenizer

    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / (model[0] if model else "model-tiny" if quick else "model-46m")
    tok = AutoTokenizer.from_pretrained(str(SHARED / "models" / "gpt2-tokenizer"))
    tok.pad_token = tok.eos_token
    if not (model_dir / "model.safetensors").exists():
        torch.manual_seed(0)
        shape = model[1] if model else dict(hidden_size=64 if quick else 512, intermediate_size=128 if quick else 1536,
                                            num_hidden_layers=2 if quick else 6, num_attention_heads=8,
                                            num_key_value_heads=8)
        cfg = LlamaConfig(vocab_size=len(tok), **shape, max_position_embeddings=1024, tie_word_embeddings=True,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        LlamaForCausalLM(cfg).save_pretrained(str(model_dir))
        tok.save_pretrained(str(model_dir))
    filename, fmt = DATASETS[data]
    ptok = PairTokenizer(tok)
    norm = Normaliser(fmt)
    rows, trl_rows, pair_tokens, shared_tokens = [], [], [], []
    for i, raw in enumerate(open_source(str(SHARED / "data" / filename)).rows()):
        pair = norm(raw, i)
        enc = ptok.encode_many([pair])[0]
        if enc.length > max_length:
            continue
        prompt, chosen, rejected = ptok.render(pair)
        rows.append(raw.data)
        trl_rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        pair_tokens.append(2 * len(enc.prompt_ids) + len(enc.chosen_ids) + len(enc.rejected_ids))
        shared_tokens.append(len(enc.prompt_ids) + len(enc.chosen_ids) + len(enc.rejected_ids))
        if len(rows) == n_pairs:
            break
    tag = f"{data}-{n_pairs}-{max_length}"
    data_file = work / f"pairs-{tag}.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trl_data = work / f"pairs-{tag}-trl.jsonl"
    trl_data.write_text("".join(json.dumps(r) + "\n" for r in trl_rows))
    cache = work / f"cache-{model_dir.name}-{tag}"
    from bso_cache import schemas as S
    from bso_cache.cache.build import build_cache
    from bso_cache.config import BuildConfig

    if not (cache / S.MANIFEST_NAME).exists():
        build_cache(BuildConfig(model=str(model_dir), data=str(data_file), out=str(cache), max_length=max_length,
                                batch_size=8, progress=False, overwrite=True), log=lambda s: None)
    return {"model": str(model_dir), "data": str(data_file), "trl_data": str(trl_data), "cache": str(cache),
            "pairs": len(rows), "dataset": data, "format": fmt,
            "pair_tokens_mean": sum(pair_tokens) / len(pair_tokens),
            "shared_tokens_mean": sum(shared_tokens) / len(shared_tokens)}


# ---------------------------------------------------------------------------------- workers
def worker(system: str, steps: int, info: dict, batch_size: int, max_length: int, device: str) -> dict:
    import torch

    t0 = time.perf_counter()
    tokens = 0
    if system.startswith("bso-cache"):
        from bso_cache.config import TrainConfig
        from bso_cache.training.train import train

        out = Path(info["cache"]).parent / f"run-{system}-{steps}"
        train(TrainConfig(cache=info["cache"], out=str(out), generator="logistic", safety_penalty=0.0,
                                    pairs="none", optimizer="adamw", lr=1e-6, lr_schedule="constant",
                                    warmup_ratio=0.0, grad_clip=0.0, batch_size=batch_size, max_steps=steps,
                                    epochs=100, device=device, progress=False, overwrite=True,
                                    gradient_checkpointing=system == "bso-cache-ckpt", log_every=1,
                                    prefix_sharing="off" if system == "bso-cache-unshared" else "on"),
              log=lambda s: None)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        tokens = sum(r["tokens_per_s"] * r["step_seconds"] for r in rows) / len(rows)
    elif system in ("trl", "trl-precompute"):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        tok = AutoTokenizer.from_pretrained(info["model"])
        rows = [json.loads(x) for x in Path(info["trl_data"]).read_text().splitlines()]
        model = AutoModelForCausalLM.from_pretrained(info["model"])
        args = DPOConfig(output_dir=str(Path(info["cache"]).parent / f"run-{system}-{steps}"),
                         per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=1e-6,
                         optim="adamw_torch_fused", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                         max_length=max_length, precompute_ref_log_probs=system == "trl-precompute",
                         report_to="none", logging_steps=10_000, save_strategy="no", use_cpu=device == "cpu",
                         dataloader_num_workers=0, beta=0.1, seed=0, disable_tqdm=True)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        trainer.train()
        lengths = []
        for batch in trainer.get_train_dataloader():
            lengths.append(int(batch["attention_mask"].sum()))
            if len(lengths) >= 4:
                break
        tokens = sum(lengths) / len(lengths)
    elif system == "policy-only":
        from transformers import AutoModelForCausalLM

        from bso_cache.cache import Cache
        from bso_cache.data.pairs import epoch_batches
        from bso_cache.scoring.layouts import make_token_batch

        model = AutoModelForCausalLM.from_pretrained(info["model"]).to(device)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
        cache = Cache.open(info["cache"])
        done, counted = 0, []
        while done < steps:
            for batch in epoch_batches(cache, mode="none", orientation="better", batch_size=batch_size, seed=0,
                                       epoch=done, shuffle=False):
                prompts = [it.prompt_ids for it in batch] * 2
                responses = [it.chosen_ids for it in batch] + [it.rejected_ids for it in batch]
                tb = make_token_batch(prompts, responses, pad_id=0)
                labels = tb.input_ids.masked_fill(tb.attention_mask == 0, -100)
                loss = model(input_ids=tb.input_ids.to(device), attention_mask=tb.attention_mask.to(device),
                             labels=labels.to(device)).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                counted.append(tb.tokens)
                done += 1
                if done >= steps:
                    break
        tokens = sum(counted) / len(counted)
    else:
        raise SystemExit(f"unknown system {system}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mib()
    return {"system": system, "steps": steps, "seconds": seconds, "peak_mib": mem, "tokens_per_step": tokens}


def run_worker(system: str, steps: int, args, info: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--steps", str(steps), "--info", json.dumps(info),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{system} ({steps} steps) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def versions() -> str:
    import importlib.metadata as md

    parts = []
    for p in ("torch", "transformers", "trl", "pyarrow"):
        try:
            parts.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(parts)


def median_round(rounds: list[dict], key: str) -> dict:
    """The round with the median `key` (the lower middle one for an even count), with the range
    of `key` over the rounds and the median peak memory."""
    by_key = sorted(rounds, key=lambda r: r[key])
    mid = by_key[(len(by_key) - 1) // 2]
    return {**mid, "range": (by_key[0][key], by_key[-1][key]),
            "peak_mib": statistics.median(r["peak_mib"] for r in rounds)}


def paired_ratio(rounds: list[dict], base: list[dict], key: str) -> float:
    """The median over rounds of (this system's `key` / the base system's `key` in the same round):
    the two ran back to back in each round, so a host that drifts across rounds cancels out."""
    return statistics.median(r[key] / b[key] for r, b in zip(rounds, base))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--info")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--data", default="pku", choices=sorted(DATASETS), help="the shared sample to take pairs from")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--long", type=int, help="steps of the long run (default: --short + an epoch's steps)")
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the table gives the median")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"of {', '.join(SYSTEMS + EXTRA_SYSTEMS)}")
    ap.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    ap.add_argument("--work", default=str(ROOT / "bench-out"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    args = ap.parse_args()
    if args.worker:
        res = worker(args.worker, args.steps, json.loads(args.info), args.batch_size, args.max_length, args.device)
        print(json.dumps(res))
        return
    info = setup(Path(args.work), args.pairs, args.max_length, args.quick, args.data)
    systems = [s for s in args.systems.split(",") if s]
    if args.long is None:
        args.long = args.short + -(-info["pairs"] // args.batch_size)
    rounds: dict[str, list[dict]] = {s: [] for s in systems}
    for k in range(args.rounds):
        for s in systems if k % 2 == 0 else systems[::-1]:
            short = run_worker(s, args.short, args, info)
            long = run_worker(s, args.long, args, info)
            per_step = (long["seconds"] - short["seconds"]) / (args.long - args.short)
            rounds[s].append({"per_step": per_step, "peak_mib": long["peak_mib"]})
            print(f"round {k + 1}: {s}: {per_step:.2f} s/step, peak {long['peak_mib']:.0f} MiB", flush=True)
    results = {s: median_round(rs, "per_step") for s, rs in rounds.items()}
    ref = results.get("trl")
    unshared = results.get("bso-cache-unshared")
    mem = "peak RSS (MiB)" if args.device == "cpu" else "peak GPU memory (MiB)"
    lines = [f"| system | s/step | range | vs TRL (ref online) | vs unshared | vs unshared, per round | {mem} | vs TRL "
             f"| vs unshared | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(a, b):
        return f"{a / b:.2f}x" if b else "-"

    def per_round(s):
        if "bso-cache-unshared" not in rounds:
            return "-"
        return f"{paired_ratio(rounds[s], rounds['bso-cache-unshared'], 'per_step'):.2f}x"

    work_per_step = args.batch_size * info["pair_tokens_mean"]
    for s, r in results.items():
        tps = work_per_step / r["per_step"] if r["per_step"] > 0 else float("nan")
        lo, hi = r["range"]
        lines.append(f"| {s} | {r['per_step']:.2f} | {lo:.2f}-{hi:.2f} | {ratio(r['per_step'], ref and ref['per_step'])} | "
                     f"{ratio(r['per_step'], unshared and unshared['per_step'])} | {per_round(s)} | {r['peak_mib']:,.0f} | "
                     f"{ratio(r['peak_mib'], ref and ref['peak_mib'])} | "
                     f"{ratio(r['peak_mib'], unshared and unshared['peak_mib'])} | {tps:,.0f} |")
    cmd = "python scripts/bench_train.py " + " ".join(a for a in sys.argv[1:])
    model = "tiny Llama (quick)" if args.quick else "random-init 46M Llama (hidden 512, 6 layers, intermediate 1536, tied) with the GPT-2 tokenizer"
    text = (f"### Training step, {args.data.upper()} ({time.strftime('%Y-%m-%d')})\n\n"
            f"{model}; {info['pairs']} {args.data.upper()} pairs (nothing truncated; mean {info['pair_tokens_mean']:.0f} "
            f"tokens a pair as two sequences, {info['shared_tokens_mean']:.0f} with the prompt once), batch "
            f"{args.batch_size}, max length "
            f"{args.max_length}, AdamW lr 1e-6, fp32, device {args.device}; per-step time from a {args.long}-step "
            f"minus a {args.short}-step run, each in its own process; median of {args.rounds} interleaved rounds "
            f"(range: the fastest and slowest round; per round: the median over rounds of the ratio to the unshared run "
            f"of the same round); bso-cache and TRL both with fused AdamW.\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; {versions()}.\n"
            f"Command: `{cmd.strip()}`\n\n" + "\n".join(lines))
    print(text)
    marker = f"bench-train-{args.data}-{args.device}{'-quick' if args.quick else ''}"
    if set(systems) != set(SYSTEMS):
        marker += "-" + "-".join(systems)
    from results import record

    record(marker, args.doc, text, data={"info": info, "results": results})


if __name__ == "__main__":
    main()
