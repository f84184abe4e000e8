#!/usr/bin/env python
"""GPU check: build throughput, train step time and peak memory, bso-cache vs the alternatives.

For one GPU machine with torch, transformers, pyarrow, typer and safetensors (no polars, no
datasets, no network). A random-init ~0.5B Llama (Qwen2.5-0.5B-sized) and synthetic token
batches, bf16:
- build: bso-cache's reference pass (scoring.py: target-only chunked log-softmax) with each
  prompt scored once (prefix sharing), with sharing and packing, and without sharing, vs a plain
  no-grad forward that materialises full logits + float32 log-softmax;
- train, per step and peak memory: bso-cache train (policy alone, from a cache) with and
  without prefix sharing vs a reference-online DPO step (policy + frozen reference in memory,
  full logits, as the usual trainers do) vs the policy-only limit (plain forward + backward
  with labels).
Writes gpu_check.md / gpu_check.json into $OUT, or the folder given as argument.

    python scripts/gpu_check.py [OUT_DIR]          # on the GPU machine
    python scripts/gpu_check.py --tiny OUT_DIR     # smoke test on the CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _bso_cache_importable() -> None:
    """bso_cache.schemas lives in schemas/ (mapped at install time); map it for a bare checkout."""
    try:
        import bso_cache.schemas  # noqa: F401
    except ImportError:
        import importlib.util

        root = Path(__file__).resolve().parents[1]
        for name, folder in (("bso_cache.schemas", "schemas"), ("bso_cache.cli", "cli")):
            spec = importlib.util.spec_from_file_location(name, root / folder / "__init__.py",
                                                          submodule_search_locations=[str(root / folder)])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)


def model_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           tie_word_embeddings=True)
    return LlamaConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True, rope_theta=1000000.0)


def synthetic_pairs(n: int, vocab: int, tiny: bool, seed: int = 0):
    import torch

    from bso_cache.tokenize import PairTokens

    g = torch.Generator().manual_seed(seed)
    lo_p, hi_p, lo_r, hi_r = (8, 32, 8, 48) if tiny else (64, 320, 64, 448)
    out = []
    for _ in range(n):
        p = int(torch.randint(lo_p, hi_p, (1,), generator=g))
        c = int(torch.randint(lo_r, hi_r, (1,), generator=g))
        r = int(torch.randint(lo_r, hi_r, (1,), generator=g))
        ids = torch.randint(3, vocab, (p + c + r,), generator=g).tolist()
        out.append(PairTokens(ids[:p], ids[p:p + c], ids[p + c:]))
    return out


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device):
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_cache(folder: Path, pairs, chosen, rejected, tokenizer) -> None:
    from bso_cache.tokenize import tokenizer_digest

    from bso_cache import schemas as S
    from bso_cache.cache import atomic_write_json, empty_columns, write_shard

    cols = empty_columns()
    for i, (e, c, r) in enumerate(zip(pairs, chosen, rejected)):
        for key, value in ((S.PAIR_ID, f"p{i}"), (S.SOURCE_INDEX, i), (S.PROMPT_IDS, e.prompt_ids),
                           (S.CHOSEN_IDS, e.chosen_ids), (S.REJECTED_IDS, e.rejected_ids), (S.REF_CHOSEN_LOGP, c),
                           (S.REF_REJECTED_LOGP, r), (S.CHOSEN_UNSAFE, i % 3 == 0), (S.REJECTED_UNSAFE, i % 3 == 1),
                           (S.SAFER_IS_CHOSEN, None), (S.CHOSEN_SEVERITY, None), (S.REJECTED_SEVERITY, None),
                           (S.TRUNCATED, False)):
            cols[key].append(value)
    info = write_shard(folder, 0, cols)
    manifest = {
        "format": S.FORMAT_NAME, "schema_version": S.SCHEMA_VERSION, "created": "", "bso_cache_version": "",
        "reference": {"name_or_path": "", "weights_digest": ""},
        "tokenizer": {"vocab_digest": tokenizer_digest(tokenizer, None)}, "input": {}, "tokenization": {},
        "reference_pass": {"dtype": "bfloat16"}, "columns": list(S.COLUMNS),
        "rows": {"input": len(pairs), "written": len(pairs), "dropped": {}},
        "shards": [{**info, "input_rows": [0, len(pairs)]}]}
    manifest["digest"] = S.manifest_digest(manifest)
    atomic_write_json(folder / S.MANIFEST_NAME, manifest)


def dpo_baseline_step(policy, ref, batch, opt, device, beta=0.1):
    """Reference online, full logits (what the usual trainers do)."""
    import torch

    def logps(model, tb):
        logits = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1]  # (S, T-1, V)
        lp = torch.log_softmax(logits.float(), -1).gather(2, tb.input_ids[:, 1:, None]).squeeze(2)
        return (lp * tb.score_mask[:, 1:]).sum(1)

    with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
        pol = logps(policy, batch)
        with torch.no_grad():
            r = logps(ref, batch)
    n = pol.shape[0] // 2
    m = (pol[:n] - r[:n]) - (pol[n:] - r[n:])
    loss = -torch.nn.functional.logsigmoid(beta * m).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def policy_only_step(policy, batch, opt, device):
    import torch

    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
        loss = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    if not args.out:
        raise SystemExit("give an output folder (or set $OUT)")
    _bso_cache_importable()
    import torch
    from transformers import LlamaForCausalLM

    from bso_cache.config import TrainConfig
    from bso_cache.layouts import make_token_batch
    from bso_cache.train import Trainer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    n_pairs = args.pairs or (32 if tiny else 256)
    bs = args.batch_size or (4 if tiny else 8)
    steps = args.steps or (4 if tiny else 10)
    warm = 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    cfg = model_config(tiny)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model_dir = work / "model"
    model.save_pretrained(str(model_dir))
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)},
                                                                               unk_token="t0")),
                                  pad_token="t0", eos_token="t2", bos_token="t1")
    tok.save_pretrained(str(model_dir))
    pairs = synthetic_pairs(n_pairs, cfg.vocab_size, tiny)
    results = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
               "params": n_params, "pairs": n_pairs, "batch_size": bs, "steps": steps, "torch": torch.__version__}

    # ---- build: bso-cache reference pass (shared, shared + packed, unshared) vs plain forward with full logits
    from bso_cache.scoring import PairScorer

    ref = model.to(device=device, dtype=torch.bfloat16).eval()
    P, C, R = ([e.prompt_ids for e in pairs], [e.chosen_ids for e in pairs], [e.rejected_ids for e in pairs])
    for key, mode, pack in (("build", "off", False), ("build_shared", "on", False), ("build_shared_packed", "on", True)):
        scorer = PairScorer(ref, prefix_sharing=mode, device=device, pad_id=0, pack=pack)
        reset_peak(device)
        scorer.score_all(P[:bs], C[:bs], R[:bs], batch_size=bs)  # warm-up (and the sharing probe)
        sync(device)
        t0 = time.perf_counter()
        chosen, rejected, stats = scorer.score_all(P, C, R, batch_size=bs)
        sync(device)
        seconds = time.perf_counter() - t0
        results[key] = {"seconds": seconds, "tokens_per_s": stats["tokens"] / seconds,
                        "pairs_per_s": n_pairs / seconds, "padding_share": 1 - stats["tokens"] / stats["padded_tokens"],
                        "peak_mib": peak_mib(device), "prefix_sharing": scorer.sharing, "probe": scorer.probe}
    stats = {"tokens": sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(P, C, R))}  # the unshared rows
    reset_peak(device)
    order = sorted(range(n_pairs), key=lambda i: pairs[i].length, reverse=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n_pairs, bs):
            idx = order[s:s + bs]
            tb = make_token_batch([pairs[i].prompt_ids for i in idx] * 2,
                                  [pairs[i].chosen_ids for i in idx] + [pairs[i].rejected_ids for i in idx]).to(device)
            logits = ref(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1]
            lp = torch.log_softmax(logits.float(), -1).gather(2, tb.input_ids[:, 1:, None]).squeeze(2)
            (lp * tb.score_mask[:, 1:]).sum(1).cpu()
    sync(device)
    t_plain = time.perf_counter() - t0
    results["build_plain_forward"] = {"seconds": t_plain, "tokens_per_s": stats["tokens"] / t_plain,
                                      "pairs_per_s": n_pairs / t_plain, "peak_mib": peak_mib(device)}
    cache_dir = work / "cache"
    cache_dir.mkdir()
    write_cache(cache_dir, pairs, chosen, rejected, tok)
    del ref, model
    reset_peak(device)

    # ---- train: bso-cache (policy alone, fp32 master weights + bf16 autocast), unshared and shared
    for key, mode in (("train_bso_cache", "off"), ("train_bso_cache_shared", "on")):
        trainer = Trainer(TrainConfig(cache=str(cache_dir), out=str(work / f"run-{mode}"), policy=str(model_dir),
                                      generator="sba", optimizer="adamw", lr=1e-6, batch_size=bs,
                                      max_steps=warm + steps, epochs=100, autocast="bf16", device=device,
                                      prefix_sharing=mode, progress=False, overwrite=True, step0_tolerance=1e9),
                          log=lambda s: None)
        trainer.run()
        rows = [json.loads(x) for x in (work / f"run-{mode}" / "metrics.jsonl").read_text().splitlines()][warm:]
        results[key] = {"step_seconds": sum(r["step_seconds"] for r in rows) / len(rows),
                        "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
                        "peak_mib": peak_mib(device), "prefix_sharing": trainer.pair_scorer.sharing}
        del trainer
        reset_peak(device)

    # ---- the alternatives, on the same token batches
    batches = []
    for s in range(0, n_pairs, bs):
        chunk = pairs[s:s + bs]
        batches.append(make_token_batch([e.prompt_ids for e in chunk] * 2,
                                        [e.chosen_ids for e in chunk] + [e.rejected_ids for e in chunk]).to(device))
    for name in ("train_reference_online", "train_policy_only"):
        policy = LlamaForCausalLM.from_pretrained(str(model_dir)).to(device)
        policy.train()
        refm = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).to(device).eval() \
            if name == "train_reference_online" else None
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        reset_peak(device)
        times, toks = [], []
        for k in range(warm + steps):
            b = batches[k % len(batches)]
            sync(device)
            t0 = time.perf_counter()
            if refm is not None:
                dpo_baseline_step(policy, refm, b, opt, device)
            else:
                policy_only_step(policy, b, opt, device)
            sync(device)
            if k >= warm:
                times.append(time.perf_counter() - t0)
                toks.append(b.tokens)
        results[name] = {"step_seconds": sum(times) / len(times), "tokens_per_s": sum(toks) / sum(times),
                         "peak_mib": peak_mib(device)}
        del policy, refm, opt
        reset_peak(device)

    base = results["train_reference_online"]
    unshared = results["build"]
    lines = [f"GPU check: {results['device']}, torch {results['torch']}, {n_params / 1e6:.0f}M-parameter random "
             f"Llama, {n_pairs} synthetic pairs, batch {bs} pairs, bf16", "",
             "| build (reference pass) | pairs/s | tokens/s | vs unshared (time) | padding | peak MiB |",
             "|---|---|---|---|---|---|"]
    for key, label in (("build", "bso-cache, unshared"), ("build_shared", "bso-cache, prefix sharing"),
                       ("build_shared_packed", "bso-cache, prefix sharing + packing"),
                       ("build_plain_forward", "plain forward, full logits")):
        r = results[key]
        pad = f"{100 * r['padding_share']:.1f}%" if "padding_share" in r else "-"
        used = " (sharing fell back to off)" if key.startswith("build_shared") and not r["prefix_sharing"] else ""
        lines.append(f"| {label}{used} | {r['pairs_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['seconds'] / unshared['seconds']:.2f}x | {pad} | {r['peak_mib']:,.0f} |")
    lines += ["", "| train | s/step | vs reference-online | peak MiB | vs reference-online | tokens/s |",
              "|---|---|---|---|---|---|"]
    for key, label in (("train_bso_cache", "bso-cache train, unshared"),
                       ("train_bso_cache_shared", "bso-cache train, prefix sharing"),
                       ("train_reference_online", "reference online (DPO)"),
                       ("train_policy_only", "policy only (limit)")):
        r = results[key]
        lines.append(f"| {label} | {r['step_seconds']:.3f} | {r['step_seconds'] / base['step_seconds']:.2f}x | "
                     f"{r['peak_mib']:,.0f} | {r['peak_mib'] / base['peak_mib']:.2f}x | {r['tokens_per_s']:,.0f} |")
    text = "\n".join(lines)
    print(text)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
