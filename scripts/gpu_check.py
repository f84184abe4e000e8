#!/usr/bin/env python
"""GPU check: every layout and memory lever of bso-cache on one GPU, in one run of a few minutes.

For one GPU machine with torch, transformers, pyarrow, typer and safetensors (no polars, no
datasets, no network); bitsandbytes, torchao, peft and TRL are used where importable (carried
wheels), and each lever whose library is missing is reported as skipped with the reason. A
random-init ~0.5B Llama (Qwen2.5-0.5B-sized), synthetic token pairs, bf16:

- build (reference pass, bf16 weights): unshared (rows padded to a multiple of 64, and not),
  shared and packed with SDPA's dense mask and with FlexAttention's block mask, vs a plain
  forward with full logits; pairs/s on a first pass (every shape new: cuDNN plans, flex
  compilation) and a second (steady);
- exactness on the GPU (float32): each layout against unshared SDPA, per-sequence values and
  every parameter's gradient;
- train (bso-cache's Trainer from a cache, 2 epochs in cache order, the second timed): the
  layouts, then the memory levers (bf16 weights with stochastic rounding, 8-bit and 4-bit
  states, optimizer in backward, offload, gradient checkpointing, LoRA, QLoRA), each with its peak
  `max_memory_allocated` against `bso-cache plan`'s prediction; vs a reference-online DPO step,
  the policy-only limit and TRL's DPOTrainer on the same model and batches;
- the rule's outcome: which attention and layout `auto` should pick on CUDA.

Writes gpu_check.md / gpu_check.json into $OUT or the folder given, after every section.

    python scripts/gpu_check.py [OUT_DIR]          # on the GPU machine (381 s on an H200)
    python scripts/gpu_check.py OUT_DIR --tiny     # smoke test on the CPU
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

    from bso_cache.data.tokenize import PairTokens

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


def held_mib(device) -> float:
    """What is still allocated when a row starts (after reset_peak): earlier rows' leftovers count
    in this row's peak, so a row that starts holding memory is flagged in the table."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    import warnings

    storages = {}
    with warnings.catch_warnings():  # isinstance on some deprecated torch names warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for o in objects:  # on the CPU: the bytes of the tensors Python can still reach
        if not o.is_meta:
            try:
                storage = o.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # compile's fake and vmap's batched tensors own none
                continue
    return sum(storages.values()) / 2**20


HELD_LIMIT_MIB = 64  # a row starting with more than this still allocated is flagged


def peak_mib(device) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_cache(folder: Path, pairs, chosen, rejected, tokenizer, quantization: str | None = None) -> None:
    from bso_cache.data.tokenize import tokenizer_digest

    from bso_cache import schemas as S
    from bso_cache.cache import empty_columns, write_shard
    from bso_cache.io.files import atomic_write_json

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
        "reference_pass": {"dtype": "bfloat16", **({"quantization": quantization} if quantization else {})},
        "columns": list(S.COLUMNS),
        "rows": {"input": len(pairs), "written": len(pairs), "dropped": {}},
        "shards": [{**info, "input_rows": [0, len(pairs)]}]}
    manifest["digest"] = S.manifest_digest(manifest)
    atomic_write_json(folder / S.MANIFEST_NAME, manifest)




def make_tokenizer(vocab: int):
    """A word-level tokenizer over "t0 .. t{vocab-1}" (TRL reads text: "t5 t17 ..." round-trips)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t2", bos_token="t1")


def set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


class Check:
    """Results by section, written (JSON + Markdown) after each; a section that fails is recorded
    with its error and the rest still run; sections past the time budget are skipped, saying so."""

    def __init__(self, out: Path, budget_s: float, info: dict):
        self.out, self.budget_s, self.t0 = out, budget_s, time.perf_counter()
        self.results = {"info": info, "skipped": {}, "errors": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def run(self, name: str, fn, *args, need_s: float = 0.0):
        if self.left() < need_s:
            self.results["skipped"][name] = f"time budget: {self.left():.0f} s left, {need_s:.0f} s needed"
            return None
        t = time.perf_counter()
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a failed section is a row of the report, not the end of it
            import traceback

            self.results["errors"][name] = f"{type(e).__name__}: {e}"[:800]
            traceback.print_exc()
            return None
        finally:
            self.results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
            self.save()

    def save(self) -> None:
        self.results["info"]["wall_seconds"] = round(time.perf_counter() - self.t0, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(render(self.results) + "\n")


# ------------------------------------------------------------------------------------------- build

BUILD_VARIANTS = [  # key, label, prefix sharing, packing, attention, width multiple
    ("unshared_w64", "unshared, SDPA, rows padded to x64", False, False, "sdpa", 64),
    ("unshared_w1", "unshared, SDPA, rows as long as the longest", False, False, "sdpa", 1),
    ("shared_sdpa", "shared, SDPA dense mask", True, False, "sdpa", 64),
    ("packed_sdpa", "shared + packed, SDPA dense mask", True, True, "sdpa", 64),
    ("unshared_flex", "unshared, FlexAttention", False, False, "flex_attention", 64),
    ("shared_flex", "shared, FlexAttention block mask", True, False, "flex_attention", 64),
    ("packed_flex", "shared + packed, FlexAttention block mask", True, True, "flex_attention", 64),
]


def build_section(ctx) -> None:
    import torch

    from bso_cache.scoring.layouts import make_token_batch
    from bso_cache.scoring.scorer import score_pairs

    device, bs, pairs = ctx["device"], ctx["bs"], ctx["pairs"]
    ref = ctx["load"](torch.bfloat16).eval()
    P, C, R = ([e.prompt_ids for e in pairs], [e.chosen_ids for e in pairs], [e.rejected_ids for e in pairs])
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length, reverse=True)
    out = ctx["check"].results.setdefault("build", {})

    def one_pass(shared, pack, multiple):
        tokens = padded = 0
        chosen, rejected = [0.0] * len(pairs), [0.0] * len(pairs)
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                lp = score_pairs(ref, [P[i] for i in idx], [C[i] for i in idx], [R[i] for i in idx],
                                 prefix_sharing=shared, pack=pack, device=device, multiple=multiple)
                for i, c, r in zip(idx, lp.chosen.cpu().tolist(), lp.rejected.cpu().tolist()):
                    chosen[i], rejected[i] = c, r
                tokens += lp.tokens
                padded += lp.padded_tokens
        return chosen, rejected, tokens, padded

    for key, label, shared, pack, attn, multiple in BUILD_VARIANTS:
        set_attention(ref, attn)
        row = {"label": label}
        try:
            times = []
            for _ in range(2):
                reset_peak(device)
                sync(device)
                t0 = time.perf_counter()
                chosen, rejected, tokens, padded = one_pass(shared, pack, multiple)
                sync(device)
                times.append(time.perf_counter() - t0)
            row.update(first_pass_s=times[0], seconds=times[1], pairs_per_s=len(pairs) / times[1],
                       tokens_per_s=tokens / times[1], padding_share=1 - tokens / padded, peak_mib=peak_mib(device))
            if key == "unshared_w64":
                ctx["scores"] = (chosen, rejected)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        out[key] = row
        ctx["check"].save()
    set_attention(ref, "sdpa")

    def plain_pass():
        with torch.inference_mode():
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                tb = make_token_batch([P[i] for i in idx] * 2, [C[i] for i in idx] + [R[i] for i in idx]).to(device)
                logits = ref(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1]
                lp = torch.log_softmax(logits.float(), -1).gather(2, tb.input_ids[:, 1:, None]).squeeze(2)
                (lp * tb.score_mask[:, 1:]).sum(1).cpu()

    times = []
    for _ in range(2):
        reset_peak(device)
        sync(device)
        t0 = time.perf_counter()
        plain_pass()
        sync(device)
        times.append(time.perf_counter() - t0)
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(P, C, R))
    out["plain_forward"] = {"label": "plain forward, full logits (rows as long as the longest)",
                            "first_pass_s": times[0], "seconds": times[1], "pairs_per_s": len(pairs) / times[1],
                            "tokens_per_s": tokens / times[1], "peak_mib": peak_mib(device)}
    del ref
    reset_peak(device)


# -------------------------------------------------------------------------------------- exactness

def exactness_section(ctx) -> None:
    """Float32 on the device: every layout against unshared SDPA, values and gradients."""
    import torch

    from bso_cache.scoring.scorer import score_pairs

    device = ctx["device"]
    model = ctx["load"](torch.float32)
    model.train()
    sample = ctx["pairs"][:8]
    P, C, R = [e.prompt_ids for e in sample], [e.chosen_ids for e in sample], [e.rejected_ids for e in sample]
    out = ctx["check"].results.setdefault("exactness", {})

    def run(attn, shared, pack, grads):
        set_attention(model, attn)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grads):
            lp = score_pairs(model, P, C, R, prefix_sharing=shared, pack=pack, device=device)
            if grads:
                ((lp.chosen - lp.rejected).sum() * 0.01).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()]) if grads else None
        return torch.cat([lp.chosen, lp.rejected]).detach(), g

    can_grad_flex = not device.startswith("cpu")
    base_v, base_g = run("sdpa", False, False, True)
    for key, attn, shared, pack in (("shared_sdpa", "sdpa", True, False), ("packed_sdpa", "sdpa", True, True),
                                    ("unshared_flex", "flex_attention", False, False),
                                    ("shared_flex", "flex_attention", True, False),
                                    ("packed_flex", "flex_attention", True, True)):
        grads = can_grad_flex or attn != "flex_attention"
        try:
            v, g = run(attn, shared, pack, grads)
            out[key] = {"max_abs_seq_diff": float((v - base_v).abs().max()),
                        "grad_rel_diff": float((g - base_g).norm() / base_g.norm()) if grads else None}
        except Exception as e:  # noqa: BLE001
            out[key] = {"error": f"{type(e).__name__}: {e}"[:400]}
        ctx["check"].save()
    set_attention(model, "sdpa")
    del model
    reset_peak(device)


# ------------------------------------------------------------------------------------------ train

IN_BACKWARD = {"dtype": "bfloat16", "autocast": "none", "optimizer_in_backward": True, "grad_clip": 0.0}
TRAIN_VARIANTS = [  # key, label, TrainConfig overrides, library needed
    ("unshared", "fp32 weights + bf16 autocast, AdamW, unshared", {}, None),
    ("shared_sdpa", "the same, prefix sharing (SDPA dense mask)", {"prefix_sharing": "on"}, None),
    ("shared_flex", "the same, prefix sharing (FlexAttention)", {"prefix_sharing": "on",
                                                                 "attn_implementation": "flex_attention"}, "cuda"),
    ("ckpt", "fp32 + autocast, gradient checkpointing", {"gradient_checkpointing": True}, None),
    ("bf16", "bf16 weights (stochastic rounding), AdamW", {"dtype": "bfloat16", "autocast": "none"}, None),
    ("bf16_adamw8bit", "bf16 + 8-bit AdamW", {"dtype": "bfloat16", "autocast": "none", "optimizer": "adamw8bit"},
     "bitsandbytes"),
    ("bf16_rmsprop8bit", "bf16 + 8-bit RMSprop", {"dtype": "bfloat16", "autocast": "none",
                                                  "optimizer": "rmsprop8bit"}, "bitsandbytes"),
    ("bf16_adamw4bit", "bf16 + 4-bit AdamW", {"dtype": "bfloat16", "autocast": "none", "optimizer": "adamw4bit"},
     "torchao"),
    ("bf16_inbwd", "bf16 + optimizer in backward", IN_BACKWARD, None),
    ("bf16_inbwd_ckpt", "bf16 + in backward + checkpointing", {**IN_BACKWARD, "gradient_checkpointing": True}, None),
    ("bf16_offload_inbwd_ckpt", "bf16 + offload + in backward + checkpointing",
     {**IN_BACKWARD, "optimizer_offload": True, "gradient_checkpointing": True}, "cuda"),
    ("lora", "LoRA r16 on bf16 weights", {"dtype": "bfloat16", "autocast": "none", "lora_r": 16}, "peft"),
    # the 4-bit run reads a copy of the cache marked as the 4-bit reference's (its log-probs are the bf16
    # reference's: a memory and time row, like the others, with the step-0 check off)
    ("qlora", "QLoRA r16 (4-bit NF4 base, bf16 compute)", {"dtype": "bfloat16", "autocast": "none", "lora_r": 16,
                                                          "load_in_4bit": True}, "bitsandbytes,peft,accelerate"),
]


def importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def _missing(need: str | None, device: str) -> str | None:
    if need is None:
        return None
    if need == "cuda":
        return None if device.startswith("cuda") else "CUDA only"
    missing = [m for m in need.split(",") if not importable(m)]
    return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed here" if missing else None


def train_section(ctx) -> None:
    import torch

    from bso_cache.config import TrainConfig
    from bso_cache.training.plan import RUNTIME_CUDA, PlanOptions, load_shape, predict
    from bso_cache.training.train import Trainer

    device, bs, work = ctx["device"], ctx["bs"], ctx["work"]
    train_pairs = ctx["pairs"][:ctx["n_train"]]
    chosen, rejected = ctx["scores"]
    cache_dir = work / "cache"
    cache_dir.mkdir(exist_ok=True)
    write_cache(cache_dir, train_pairs, chosen[:len(train_pairs)], rejected[:len(train_pairs)], ctx["tokenizer"])
    nf4_dir = work / "cache-nf4"
    nf4_dir.mkdir(exist_ok=True)
    write_cache(nf4_dir, train_pairs, chosen[:len(train_pairs)], rejected[:len(train_pairs)], ctx["tokenizer"],
                quantization="nf4")
    steps_per_epoch = -(-len(train_pairs) // bs)
    shape = load_shape(str(ctx["model_dir"]))
    seq = max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in train_pairs)
    resp = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in train_pairs)
    out = ctx["check"].results.setdefault("train", {})
    base = dict(cache=str(cache_dir), policy=str(ctx["model_dir"]), generator="sba", optimizer="adamw", lr=1e-6,
                batch_size=bs, epochs=2, max_steps=2 * steps_per_epoch, shuffle=False, autocast="bf16",
                device=device, prefix_sharing="off", progress=False, overwrite=True, step0_tolerance=1e9,
                attn_implementation="sdpa")
    for key, label, over, need in TRAIN_VARIANTS:
        why = _missing(need, device)
        if why:
            out[key] = {"label": label, "skipped": why}
            continue
        if ctx["check"].left() < ctx["train_need_s"]:
            out[key] = {"label": label, "skipped": "time budget"}
            continue
        opts = {**base, **over, "out": str(work / f"run-{key}")}
        if over.get("load_in_4bit"):
            opts["cache"] = str(nf4_dir)
        row = {"label": label}
        try:
            reset_peak(device)
            row["held_before_mib"] = held_mib(device)
            trainer = Trainer(TrainConfig(**opts), log=lambda s: None)
            trainer.run()
            rows = [json.loads(x) for x in (work / f"run-{key}" / "metrics.jsonl").read_text().splitlines()]
            timed = rows[-steps_per_epoch:]
            row.update(step_seconds=sum(r["step_seconds"] for r in timed) / len(timed),
                       first_epoch_step_seconds=sum(r["step_seconds"] for r in rows[:-steps_per_epoch])
                       / max(1, len(rows) - steps_per_epoch),
                       tokens_per_s=sum(r["tokens_per_s"] for r in timed) / len(timed), peak_mib=peak_mib(device),
                       prefix_sharing=trainer.pair_scorer.sharing, final_loss=rows[-1]["loss"])
            plan_opts = PlanOptions(dtype=opts.get("dtype", "float32"), optimizer=opts["optimizer"],
                                    lora_r=opts.get("lora_r", 0), qlora=opts.get("load_in_4bit", False),
                                    gradient_checkpointing=opts.get("gradient_checkpointing", False),
                                    optimizer_in_backward=opts.get("optimizer_in_backward", False),
                                    optimizer_offload=opts.get("optimizer_offload", False), autocast=opts["autocast"],
                                    micro_batch=bs, seq_length=seq, response_tokens=resp, device="cuda")
            row["plan_mib"] = (predict(shape, plan_opts)["peak_bytes"] - RUNTIME_CUDA) / 2**20
            del trainer
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        out[key] = row
        reset_peak(device)
        ctx["check"].save()
    del torch


_RUN_ONE = """import json, sys, torch
from bso_cache.config import TrainConfig
from bso_cache.training.train import train
summary = train(TrainConfig(**json.loads(sys.argv[1])), log=lambda s: None)
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print(json.dumps({"peak_mib": peak, "loss": summary["final"]["loss"]}))
"""


def concurrent_section(ctx) -> None:
    """What sharing one GPU buys a sweep: N runs of the model one after another, then N at once
    (each its own process on the same GPU, as Ray Tune's --gpus-per-run 1/N places them; Ray itself
    is not on the GPU image), the same cache and settings: wall time, throughput ratio, peak per run."""
    import subprocess
    import sys

    device, work, bs = ctx["device"], ctx["work"], ctx["bs"]
    n = 2 if ctx["tiny"] else 4
    steps = -(-ctx["n_train"] // bs)
    base = dict(cache=str(work / "cache"), policy=str(ctx["model_dir"]), generator="sba", optimizer="adamw", lr=1e-6,
                batch_size=bs, max_steps=2 * steps, shuffle=False, autocast="bf16" if device != "cpu" else "none",
                device=device, prefix_sharing="off", progress=False, overwrite=True, step0_tolerance=1e9,
                attn_implementation="sdpa")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def launch(mode: str, i: int):
        opts = {**base, "out": str(work / f"concurrent-{mode}-{i}"), "seed": i}
        return subprocess.Popen([sys.executable, "-c", _RUN_ONE, json.dumps(opts)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    def finish(proc) -> dict:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
        return json.loads(out.strip().splitlines()[-1])

    t = time.perf_counter()
    alone = [finish(launch("sequential", i)) for i in range(n)]
    sequential_s = time.perf_counter() - t
    t = time.perf_counter()
    together = [finish(p) for p in [launch("concurrent", i) for i in range(n)]]
    concurrent_s = time.perf_counter() - t
    ctx["check"].results["concurrent"] = {
        "runs": n, "steps_per_run": 2 * steps, "sequential_s": sequential_s, "concurrent_s": concurrent_s,
        "throughput_ratio": sequential_s / concurrent_s,
        "peak_mib_alone": [r["peak_mib"] for r in alone], "peak_mib_concurrent": [r["peak_mib"] for r in together],
        "same_losses": all(abs(a["loss"] - b["loss"]) < 1e-3 for a, b in zip(alone, together))}
    ctx["check"].save()


def dpo_baseline_step(policy, ref, batch, opt, device, beta=0.1):
    """Reference online, full logits (what the usual trainers do)."""
    import torch

    def logps(model, tb):
        logits = model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits[:, :-1]  # (S, T-1, V)
        lp = torch.log_softmax(logits.float(), -1).gather(2, tb.input_ids[:, 1:, None]).squeeze(2)
        return (lp * tb.score_mask[:, 1:]).sum(1)

    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        pol = logps(policy, batch)
        with torch.no_grad():
            r = logps(ref, batch)
    n = pol.shape[0] // 2
    m = (pol[:n] - r[:n]) - (pol[n:] - r[n:])
    loss = -torch.nn.functional.logsigmoid(beta * m).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def policy_only_step(policy, batch, opt, device):
    import torch

    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
        loss = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def baselines_section(ctx) -> None:
    """The same batches (cache order, `bs` pairs), two passes, the second timed."""
    import torch

    from bso_cache.scoring.layouts import make_token_batch

    device, bs = ctx["device"], ctx["bs"]
    train_pairs = ctx["pairs"][:ctx["n_train"]]
    batches = [make_token_batch([e.prompt_ids for e in train_pairs[s:s + bs]] * 2,
                                [e.chosen_ids for e in train_pairs[s:s + bs]] + [e.rejected_ids for e in train_pairs[s:s + bs]]
                                ).to(device) for s in range(0, len(train_pairs), bs)]
    out = ctx["check"].results.setdefault("train", {})
    fused = {"fused": True} if device.startswith("cuda") else {}
    for key, label in (("reference_online", "reference online DPO (policy + bf16 reference, full logits)"),
                       ("policy_only", "policy only (plain forward + backward, the limit)")):
        reset_peak(device)
        policy = ctx["load"](torch.float32)
        policy.train()
        refm = ctx["load"](torch.bfloat16).eval() if key == "reference_online" else None
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, **fused)
        times = []
        for k in range(2 * len(batches)):
            b = batches[k % len(batches)]
            sync(device)
            t0 = time.perf_counter()
            if refm is not None:
                dpo_baseline_step(policy, refm, b, opt, device)
            else:
                policy_only_step(policy, b, opt, device)
            sync(device)
            if k >= len(batches):
                times.append(time.perf_counter() - t0)
        out[key] = {"label": label, "step_seconds": sum(times) / len(times),
                    "tokens_per_s": sum(b.tokens for b in batches) / sum(times), "peak_mib": peak_mib(device)}
        del policy, refm, opt
        reset_peak(device)
        ctx["check"].save()


def trl_section(ctx) -> None:
    out = ctx["check"].results.setdefault("train", {})
    label = "TRL DPOTrainer (reference online, bf16 autocast, fused AdamW; gradient checkpointing, its default)"
    for need in ("trl", "datasets"):
        if not importable(need):
            out["trl"] = {"label": label, "skipped": f"{need} is not installed here"}
            return
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    device, bs = ctx["device"], ctx["bs"]
    train_pairs = ctx["pairs"][:ctx["n_train"]]

    def text(ids):
        return " ".join(f"t{i}" for i in ids)

    rows = [{"prompt": text(e.prompt_ids), "chosen": text(e.chosen_ids), "rejected": text(e.rejected_ids)}
            for e in train_pairs]
    steps_per_epoch = -(-len(rows) // bs)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            self.times.append(time.perf_counter() - self.t0)

    reset_peak(device)
    model = ctx["load"](torch.float32)
    args = DPOConfig(output_dir=str(ctx["work"] / "trl"), per_device_train_batch_size=bs, max_steps=2 * steps_per_epoch,
                     learning_rate=1e-6, optim="adamw_torch_fused" if device.startswith("cuda") else "adamw_torch",
                     lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=10.0, max_length=4096,
                     bf16=True, precompute_ref_log_probs=False, report_to="none", logging_steps=10_000,
                     save_strategy="no", use_cpu=device == "cpu", dataloader_num_workers=0, beta=0.1, seed=0,
                     disable_tqdm=True)
    clock = Clock()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=ctx["tokenizer"], callbacks=[clock])
    trainer.train()
    timed = clock.times[-steps_per_epoch:]
    out["trl"] = {"label": label, "step_seconds": sum(timed) / len(timed), "peak_mib": peak_mib(device)}
    del trainer, model
    reset_peak(device)


# ----------------------------------------------------------------------------------------- report

def _f(value, fmt="{:.3f}"):
    return "-" if value is None else fmt.format(value)


def decide(res: dict) -> dict:
    """The rule that turns the table into `auto` on this device kind (docs/PERFORMANCE.md):
    - attention and layout for scoring: the fastest steady build among the layouts whose values
      are exact on this device (|difference| <= 2e-4 nats per sequence in float32);
    - sharing in training: on where the shared step (with the attention chosen above) is faster
      than the unshared one, else off."""
    build, exact, train = res.get("build", {}), res.get("exactness", {}), res.get("train", {})
    ok = {k for k, v in exact.items() if v.get("max_abs_seq_diff") is not None and v["max_abs_seq_diff"] <= 2e-4}
    ok |= {"unshared_w64", "unshared_w1"}
    timed = {k: v["seconds"] for k, v in build.items() if "seconds" in v and k in ok}
    if not timed:
        return {}
    best = min(timed, key=timed.get)
    attention = "flex_attention" if best.endswith("flex") else "sdpa"
    shared_key = "shared_flex" if attention == "flex_attention" else "shared_sdpa"
    t_shared, t_unshared = train.get(shared_key, {}).get("step_seconds"), train.get("unshared", {}).get("step_seconds")
    return {"build_best": best, "attention": attention, "build_sharing": not best.startswith("unshared"),
            "train_sharing": bool(t_shared and t_unshared and t_shared < t_unshared),
            "width_multiple_64_faster_first_pass": (build.get("unshared_w64", {}).get("first_pass_s", 1e9)
                                                    < build.get("unshared_w1", {}).get("first_pass_s", 0))}


def render(res: dict) -> str:
    info = res["info"]
    lines = [f"GPU check: {info.get('device')}, torch {info.get('torch')}, transformers {info.get('transformers')}, "
             f"{info.get('params', 0) / 1e6:.0f}M-parameter random Llama, {info.get('pairs')} synthetic pairs "
             f"(build), {info.get('train_pairs')} (train), batch {info.get('batch_size')} pairs, "
             f"{info.get('wall_seconds', 0):.0f} s in all", ""]
    build = res.get("build", {})
    if build:
        base = build.get("unshared_w64", {}).get("seconds")
        lines += ["| build (reference pass, bf16) | pairs/s | vs unshared | first pass s | steady pass s | padding | "
                  "peak MiB |", "|---|---|---|---|---|---|---|"]
        for k, v in build.items():
            if "error" in v:
                lines.append(f"| {v['label']} | failed: {v['error'][:120]} | | | | | |")
                continue
            ratio = _f(v["seconds"] / base, "{:.2f}x") if base else "-"
            lines.append(f"| {v['label']} | {v['pairs_per_s']:.1f} | {ratio} | {v['first_pass_s']:.2f} | "
                         f"{v['seconds']:.2f} | {_f(v.get('padding_share'), '{:.1%}')} | {v['peak_mib']:,.0f} |")
    exact = res.get("exactness", {})
    if exact:
        lines += ["", "| exactness vs unshared SDPA (float32) | max per-sequence difference (nats) | gradient "
                  "relative difference |", "|---|---|---|"]
        for k, v in exact.items():
            lines.append(f"| {k} | {v['error'][:120] if 'error' in v else _f(v['max_abs_seq_diff'], '{:.2e}')} | "
                         f"{_f(v.get('grad_rel_diff'), '{:.2e}') if 'error' not in v else ''} |")
    train = res.get("train", {})
    if train:
        ref = train.get("reference_online", {}).get("step_seconds")
        ref_mem = train.get("reference_online", {}).get("peak_mib")
        lines += ["", "| train | s/step | vs reference online | first-epoch s/step | peak MiB | vs reference online "
                  "| plan predicts MiB | plan / measured |", "|---|---|---|---|---|---|---|---|"]
        for k, v in train.items():
            if "skipped" in v or "error" in v:
                lines.append(f"| {v['label']} | {'skipped: ' + v['skipped'] if 'skipped' in v else 'failed: ' + v['error'][:160]}"
                             f" | | | | | | |")
                continue
            plan = v.get("plan_mib")
            lines.append(f"| {v['label']} | {v['step_seconds']:.3f} | {_f(v['step_seconds'] / ref if ref else None, '{:.2f}x')} | "
                         f"{_f(v.get('first_epoch_step_seconds'))} | {v['peak_mib']:,.0f} | "
                         f"{_f(v['peak_mib'] / ref_mem if ref_mem else None, '{:.2f}x')} | {_f(plan, '{:,.0f}')} | "
                         f"{_f(plan / v['peak_mib'] if plan else None, '{:.2f}')} |")
        held = [(v["label"], v["held_before_mib"]) for v in train.values()
                 if v.get("held_before_mib", 0) > HELD_LIMIT_MIB]
        lines += [f"- {label}: started with {mib:,.0f} MiB still allocated by earlier rows; its peak includes them"
                  for label, mib in held]
    conc = res.get("concurrent")
    if conc:
        peaks = [p for p in conc["peak_mib_concurrent"] if p is not None]
        lines += ["", f"Sharing one device (a sweep's --gpus-per-run 1/{conc['runs']}): {conc['runs']} runs of "
                      f"{conc['steps_per_run']} steps one after another {conc['sequential_s']:.1f} s, at once "
                      f"{conc['concurrent_s']:.1f} s: {conc['throughput_ratio']:.2f}x the throughput"
                      + (f"; peak per run {max(peaks):,.0f} MiB" if peaks else "")
                      + f"; losses {'the same' if conc['same_losses'] else 'DIFFERENT'} either way."]
    rule = decide(res)
    if rule:
        lines += ["", f"Rule outcome (`auto` on this device): attention {rule['attention']}; build layout "
                      f"{rule['build_best']} (sharing {'on' if rule['build_sharing'] else 'off'}); training sharing "
                      f"{'on' if rule['train_sharing'] else 'off'}; rows padded to x64 "
                      f"{'faster' if rule['width_multiple_64_faster_first_pass'] else 'not faster'} on a first pass."]
    for what in ("skipped", "errors"):
        for k, v in res.get(what, {}).items():
            lines.append(f"- {what[:-1] if what == 'skipped' else 'error'} {k}: {v}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip what would run past this many seconds")
    args = ap.parse_args()
    if not args.out:
        raise SystemExit("give an output folder (or set $OUT)")
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny
    n_pairs = args.pairs or (32 if tiny else 256)
    bs = args.batch_size or (4 if tiny else 8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    cfg = model_config(tiny)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model_dir = work / "model"
    model.save_pretrained(str(model_dir))
    del model
    tok = make_tokenizer(cfg.vocab_size)
    tok.save_pretrained(str(model_dir))
    pairs = synthetic_pairs(n_pairs, cfg.vocab_size, tiny)
    info = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "params": n_params,
            "pairs": n_pairs, "train_pairs": min(n_pairs, 8 * bs), "batch_size": bs, "torch": torch.__version__,
            "transformers": transformers.__version__}
    check = Check(out, args.budget_s, info)

    def load(dtype):
        return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)

    ctx = {"device": device, "bs": bs, "pairs": pairs, "n_train": info["train_pairs"], "work": work, "load": load,
           "check": check, "tokenizer": tok, "model_dir": model_dir, "train_need_s": 5 if tiny else 20, "tiny": tiny}
    check.run("build", build_section, ctx)
    check.run("exactness", exactness_section, ctx, need_s=30)
    check.run("baselines", baselines_section, ctx, need_s=30)
    if "scores" in ctx:
        check.run("train", train_section, ctx, need_s=60)
        check.run("concurrent", concurrent_section, ctx, need_s=60)
    else:
        check.results["skipped"]["train"] = "the build section gave no scores to make a cache of"
    check.run("trl", trl_section, ctx, need_s=40)
    check.results["rule"] = decide(check.results)
    check.save()
    print(render(check.results))


if __name__ == "__main__":
    main()
