#!/usr/bin/env python
"""Where a build batch and a training step spend their time on a GPU, part by part.

A diagnostic beside scripts/gpu_check.py (same model and pairs): for one batch of pairs it
times the backbone alone, bso-cache's scorer (backbone + chunked head) and a plain forward with
full logits; for one training step (float32 weights, bf16 autocast, AdamW) the forward, the
backward and the optimizer step; then prints torch.profiler's tables (self CUDA time, self CPU
time) for one of each. Runs from a bare checkout:

    python scripts/gpu_profile.py OUT_DIR [--tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gpu_check import _bso_cache_importable, model_config, synthetic_pairs, sync  # noqa: E402


def timed(fn, device, reps=5, warm=2) -> float:
    for _ in range(warm):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def profile_table(fn, device, rows=22) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    avg = prof.key_averages()
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    out = avg.table(sort_by=key, row_limit=rows, max_name_column_width=60)
    if device.startswith("cuda"):
        out += "\n" + avg.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)
    del torch
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    _bso_cache_importable()
    import torch
    from transformers import LlamaForCausalLM

    from bso_cache.scoring.layouts import make_token_batch
    from bso_cache.scoring.scorer import score_pairs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bs = args.batch_size or (4 if args.tiny else 8)
    cfg = model_config(args.tiny)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()
    pairs = synthetic_pairs(64, cfg.vocab_size, args.tiny)
    pairs = sorted(pairs, key=lambda e: -e.length)[:bs]
    P, C, R = [e.prompt_ids for e in pairs], [e.chosen_ids for e in pairs], [e.rejected_ids for e in pairs]
    tb = make_token_batch(P * 2, C + R).to(device)
    report = [f"{device} {torch.cuda.get_device_name() if device == 'cuda' else ''} torch {torch.__version__}, "
              f"batch {bs} pairs, {tb.tokens} tokens, width {tb.input_ids.shape[1]}"]

    def plain():
        with torch.inference_mode():
            logits = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1]
            lp = torch.log_softmax(logits.float(), -1).gather(2, tb.input_ids[:, 1:, None]).squeeze(2)
            (lp * tb.score_mask[:, 1:]).sum(1).cpu()

    def backbone():
        with torch.inference_mode():
            model.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask, use_cache=False)

    def bso(shared=False, pack=False):
        def run():
            with torch.inference_mode():
                lp = score_pairs(model, P, C, R, prefix_sharing=shared, pack=pack, device=device)
                lp.chosen.cpu()
        return run

    for name, fn in (("build: plain forward, full logits", plain), ("build: backbone only", backbone),
                     ("build: bso-cache unshared", bso()), ("build: bso-cache shared", bso(True)),
                     ("build: bso-cache shared packed", bso(True, True))):
        report.append(f"{name}: {1000 * timed(fn, device):.1f} ms")
    report.append("\n## profile: build, bso-cache unshared\n" + profile_table(bso(), device))
    report.append("\n## profile: build, plain forward\n" + profile_table(plain, device, rows=12))

    # ---- a training step: float32 weights, bf16 autocast, fused AdamW (as bso-cache train does)
    model = model.float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, **({"fused": True} if device == "cuda" else {}))
    ref_c = torch.zeros(bs, dtype=torch.float64, device=device)

    def fwd():
        return score_pairs(model, P, C, R, device=device, autocast="bf16")

    def step():
        lp = fwd()
        loss = -torch.nn.functional.logsigmoid(0.1 * ((lp.chosen - ref_c) - (lp.rejected - ref_c))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fwd_only():
        with torch.no_grad():
            fwd()

    def plain_train_fwd_bwd():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            logits = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1]
            lp = torch.log_softmax(logits.float(), -1).gather(2, tb.input_ids[:, 1:, None]).squeeze(2)
            loss = -(lp * tb.score_mask[:, 1:]).sum() * 1e-4
        loss.backward()
        model.zero_grad(set_to_none=True)

    report.append(f"train: full step {1000 * timed(step, device, reps=3):.1f} ms")
    report.append(f"train: scorer forward (no grad) {1000 * timed(fwd_only, device, reps=3):.1f} ms")
    report.append(f"train: plain forward+backward, full logits {1000 * timed(plain_train_fwd_bwd, device, reps=3):.1f} ms")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        report.append(f"train: full step with TF32 matmuls {1000 * timed(step, device, reps=3):.1f} ms")
        torch.backends.cuda.matmul.allow_tf32 = False
    report.append("\n## profile: train step\n" + profile_table(step, device, rows=30))
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_profile.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
