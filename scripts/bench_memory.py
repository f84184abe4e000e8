#!/usr/bin/env python
"""Memory benchmark: the memory levers of `bso-cache train` side by side, against TRL's most
frugal DPO run on this CPU and against `bso-cache plan`'s predictions.

A random-init Llama of ~200M parameters (GPT-2 tokenizer, tied embeddings), 64 HH-RLHF pairs of
at most --max-length tokens, batch 2, 5 steps, full fine-tuning unless the row says LoRA. Each
configuration runs in its own process, which reports:
- runtime: its RSS after importing torch, transformers, bso-cache (and TRL), before any model;
- peak: its peak RSS (ru_maxrss) over the whole run;
- bytes/param: (peak - runtime) / the model's parameters;
- s/step: the mean of the logged steps after the first.
`plan` predicts (peak - runtime) from the model's config and the longest pair the 5 steps took.

Usage (needs ../shared for the HH sample and the GPT-2 tokenizer):
    python scripts/bench_memory.py                  # ~25 minutes on 2 cores
    python scripts/bench_memory.py --quick          # a tiny model, a smoke test
    python scripts/bench_memory.py --configs fp32-rmsprop,bf16-8bit
Writes the table to stdout and into docs/PERFORMANCE-MEMORY.md (between markers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bso_cache.config import TrainConfig, names

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BSO_SHARED", ROOT.parent / "shared"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT / "scripts"))

# name -> (train options, the same as `plan` options); "trl" is TRL's DPOTrainer
BF16_8BIT = {"dtype": "bfloat16", "optimizer": "rmsprop8bit"}
LORA = {"dtype": "bfloat16", "lora_r": 16, "lora_alpha": 32.0}
CONFIGS = {
    "fp32-rmsprop": {},
    "fp32-adamw": {"optimizer": "adamw"},
    "bf16": {"dtype": "bfloat16"},
    "bf16-8bit": {"dtype": "bfloat16", "optimizer": "rmsprop8bit"},
    "bf16-8bit-inbackward": {**BF16_8BIT, "optimizer_in_backward": True, "grad_clip": 0.0},
    "bf16-8bit-inbackward-ckpt": {**BF16_8BIT, "optimizer_in_backward": True, "grad_clip": 0.0,
                                  "gradient_checkpointing": True},
    "lora-r16-bf16": {"dtype": "bfloat16", "lora_r": 16, "lora_alpha": 32.0},
    # QLoRA trains on a cache of its 4-bit reference (built in setup, outside the measured process)
    "qlora-r16-bf16": {"dtype": "bfloat16", "lora_r": 16, "lora_alpha": 32.0, "load_in_4bit": True},
    "lora-r16-bf16-ckpt": {"dtype": "bfloat16", "lora_r": 16, "lora_alpha": 32.0, "gradient_checkpointing": True},
    "qlora-r16-bf16-ckpt": {**LORA, "load_in_4bit": True, "gradient_checkpointing": True},
    "trl": None,
}
PLAN_KEYS = tuple(n for n in names(TrainConfig, plan=True) if n not in ("batch_size", "grad_accum", "autocast",
                                                                       "load_in_4bit"))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def setup(work: Path, n_pairs: int, max_length: int, quick: bool, nf4: bool = False) -> dict:
    """The model (random init, saved once), the HH pairs (nothing truncated) and the float32 cache."""
    from bench_train import setup as bench_setup

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=8) if quick else \
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
             num_key_value_heads=16)
    info = bench_setup(work, n_pairs, max_length, quick, "hh", model=("model-tiny" if quick else "model-200m", shape))
    if not nf4:  # only a QLoRA row needs the 4-bit reference's cache (and bitsandbytes)
        return info
    nf4_cache = Path(info["cache"] + "-nf4")
    if not (nf4_cache / ".manifest.json").exists():
        from bso_cache.cache.build import build_cache
        from bso_cache.config import BuildConfig

        build_cache(BuildConfig(model=info["model"], data=info["data"], out=str(nf4_cache), max_length=max_length,
                                batch_size=8, dtype="bfloat16", load_in_4bit=True, progress=False, overwrite=True),
                    log=lambda s: None)
    return {**info, "cache_nf4": str(nf4_cache)}


def worker(name: str, info: dict, steps: int, batch_size: int, max_length: int) -> dict:
    import importlib

    from bench_train import peak_rss_mib

    from bso_cache.io.allocator import return_freed_memory
    from bso_cache.config import TrainConfig
    from bso_cache.training.train import train

    if not os.environ.get("BENCH_GLIBC_DEFAULTS"):
        return_freed_memory()  # as `bso-cache train` runs (a MALLOC_* variable in the environment wins)
    # the runtime's own memory: every library a run imports, loaded before the baseline is read
    for module in ("torch", "transformers", "pyarrow.parquet", "safetensors.torch", "tqdm.auto", "bso_cache.scoring.scorer",
                   "bso_cache.data.pairs", "bso_cache.cache", "bitsandbytes", "peft", "transformers.models.llama") + \
            (("trl", "datasets") if name == "trl" else ()):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    runtime = rss_mib()
    out = Path(info["cache"]).parent / f"run-{name}"
    if name != "trl":
        cache = info["cache_nf4"] if CONFIGS[name].get("load_in_4bit") else info["cache"]
        cfg = TrainConfig(cache=cache, out=str(out), generator="logistic", safety_penalty=0.0, pairs="none",
                          lr=1e-6, batch_size=batch_size, max_steps=steps, epochs=100, progress=False,
                          overwrite=True, **CONFIGS[name])
        if not os.environ.get("BENCH_GLIBC_DEFAULTS"):
            from bso_cache.io.allocator import memory_first

            memory_first(cfg, "cpu")  # as `bso-cache train` runs (its levers' heap policy)
        train(cfg, log=lambda s: None)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        from bso_cache.training.plan import load_shape

        params = load_shape(info["model"]).params
        per_step = sum(r["step_seconds"] for r in rows[1:]) / max(1, len(rows) - 1)
        return {"name": name, "runtime_mib": runtime, "peak_mib": peak_rss_mib(), "s_per_step": per_step,
                "params": params}
    return trl_worker(info, out, steps, batch_size, max_length, runtime)


def trl_worker(info: dict, out: Path, steps: int, batch_size: int, max_length: int, runtime: float) -> dict:
    """TRL 1.16 DPOTrainer with its most frugal settings that run on this CPU: bf16 weights, the
    reference log-probs precomputed (no reference forward in the steps), 8-bit AdamW from
    bitsandbytes where it runs (else torch's AdamW)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from bench_train import peak_rss_mib

    tok = AutoTokenizer.from_pretrained(info["model"])
    rows = [json.loads(x) for x in Path(info["trl_data"]).read_text().splitlines()]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    optim = "adamw_bnb_8bit"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        optim = "adamw_torch"
    model = AutoModelForCausalLM.from_pretrained(info["model"], dtype=torch.bfloat16)
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=1e-6,
                     optim=optim, lr_scheduler_type="constant", warmup_steps=0, max_length=max_length,
                     precompute_ref_log_probs=True, bf16=True, report_to="none", logging_steps=10_000,
                     save_strategy="no", use_cpu=True, dataloader_num_workers=0, beta=0.1, seed=0,
                     disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Timer()])
    trainer.train()
    params = sum(p.numel() for p in model.parameters())
    return {"name": "trl", "runtime_mib": runtime, "peak_mib": peak_rss_mib(),
            "s_per_step": sum(times[1:]) / max(1, len(times) - 1), "params": params, "optim": optim}


def seen_lengths(info: dict, batch_size: int, steps: int) -> tuple[int, int]:
    """(longest prompt + longer response, longest response) over the pairs the run's steps took:
    the same stream as `train` (seed 0, epoch 0, the default shuffle and bucketing)."""
    from bso_cache.cache import Cache
    from bso_cache.config import TrainConfig
    from bso_cache.data.pairs import epoch_batches

    d = TrainConfig(cache="-", out="-")
    seq = resp = 0
    stream = epoch_batches(Cache.open(info["cache"]), mode="none", orientation="better", batch_size=batch_size,
                           seed=d.seed, epoch=0, shuffle=True, shuffle_buffer=d.shuffle_buffer,
                           bucket_batches=d.bucket_batches)
    for _, batch in zip(range(steps), stream):
        for it in batch:
            longer = max(len(it.chosen_ids), len(it.rejected_ids))
            seq, resp = max(seq, len(it.prompt_ids) + longer), max(resp, longer)
    return seq, resp


def predict(name: str, info: dict, batch_size: int, steps: int) -> int | None:
    from bso_cache.training.plan import PlanOptions, load_shape, predict as plan_predict

    if CONFIGS.get(name) is None:
        return None
    seq, resp = seen_lengths(info, batch_size, steps)
    kw = {k: v for k, v in CONFIGS[name].items() if k in PLAN_KEYS}
    opts = PlanOptions(**kw, qlora=CONFIGS[name].get("load_in_4bit", False), micro_batch=batch_size, seq_length=seq, response_tokens=resp, device="cpu")
    return plan_predict(load_shape(info["model"]), opts)["peak_bytes"]


def run_worker(name: str, args, info: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--info", json.dumps(info), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"name": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from bench_train import versions
    from results import record

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--info")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default=str(ROOT / "bench-out" / "memory"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "PERFORMANCE-MEMORY.md"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.info), args.steps, args.batch_size, args.max_length)))
        return
    names = [c for c in args.configs.split(",") if c]
    info = setup(Path(args.work), args.pairs, args.max_length, args.quick,
                 nf4=any((CONFIGS.get(n) or {}).get("load_in_4bit") for n in names))
    from bso_cache.training.plan import load_shape

    shape = load_shape(info["model"])
    results = []
    for name in names:
        r = run_worker(name, args, info)
        r["predicted"] = predict(name, info, args.batch_size, args.steps)
        results.append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in results if r["name"] == "fp32-rmsprop" and "error" not in r), None)
    lines = ["| configuration | peak RSS (MiB) | vs fp32 RMSprop | runtime (MiB) | peak - runtime (MiB) | bytes/param "
             "| plan predicts (MiB) | plan / measured | s/step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} | | | | | | | |")
            continue
        used = r["peak_mib"] - r["runtime_mib"]
        pred = r.get("predicted")
        pred_cell = f"{pred / 2**20:,.0f}" if pred else "-"
        ratio_cell = f"{pred / 2**20 / used:.2f}x" if pred else "-"
        vs = f"{r['peak_mib'] / base['peak_mib']:.2f}x" if base else "-"
        label = r["name"] + (f" ({r['optim']}, bf16, precomputed reference)" if r["name"] == "trl" else "")
        lines.append(f"| {label} | {r['peak_mib']:,.0f} | {vs} | {r['runtime_mib']:,.0f} | {used:,.0f} | "
                     f"{used * 2**20 / r['params']:.1f} | {pred_cell} | {ratio_cell} | {r['s_per_step']:.2f} |")
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if threshold:
        allocator = (f"glibc with MALLOC_MMAP_THRESHOLD_={threshold} (freed blocks go back to the OS: RSS follows "
                     f"the live tensors)")
        prefix, marker = f"MALLOC_MMAP_THRESHOLD_={threshold} ", "-mmap"
    elif os.environ.get("BENCH_GLIBC_DEFAULTS"):
        allocator, prefix, marker = "glibc defaults (freed memory is kept for reuse)", "BENCH_GLIBC_DEFAULTS=1 ", \
            "-glibc"
    else:
        allocator, prefix, marker = ("as `bso-cache train` runs it (glibc's mmap threshold fixed at 4 MiB, at 128 "
                                     "KiB with checkpointing or the optimizer in the backward pass: "
                                     "bso_cache/io/allocator.py)"), "", ""
    cmd = prefix + "python scripts/bench_memory.py " + " ".join(sys.argv[1:])
    text = (f"### Memory levers, full fine-tuning, {allocator.split(' (')[0]} ({time.strftime('%Y-%m-%d')})\n\n"
            f"{'tiny Llama (quick)' if args.quick else 'random-init Llama'} of {shape.params / 1e6:.0f}M parameters "
            f"(hidden {shape.hidden}, {shape.layers} layers, intermediate {shape.intermediate}, tied embeddings, GPT-2 "
            f"tokenizer); {info['pairs']} HH-RLHF pairs of at most {args.max_length} tokens; batch {args.batch_size}; "
            f"{args.steps} steps; DPO loss (logistic, C = 0), lr 1e-6, default RMSprop unless named; one process per row "
            f"on the CPU. runtime = RSS after the imports, before any model; bytes/param = (peak - runtime) / "
            f"parameters; `plan` predicts peak - runtime from the config and the longest pair the steps took. "
            f"Allocator: {allocator}.\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; {versions()}.\n"
            f"Command: `{cmd.strip()}`\n\n" + "\n".join(lines))
    print(text)
    record("bench-memory-levers" + ("-quick" if args.quick else "") + marker, args.doc, text)


if __name__ == "__main__":
    main()
