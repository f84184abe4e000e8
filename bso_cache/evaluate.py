"""Evaluation from cached reference log-probs (no reference model loaded).

Over the pairs as oriented in the cache (chosen = the cached chosen response):
- preference_accuracy: share of pairs whose implicit reward r = log pi(y) - log pi_ref(y) is
  higher for chosen than for rejected (ties count as wrong);
- safety_accuracy: over pairs whose responses differ in safety, the share where the safe
  response has the higher implicit reward;
- mean implicit rewards and margins per pair type (chosen/rejected safety).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .cache import Cache
from .pairs import epoch_batches
from .scoring import make_token_batch, sequence_logps

PAIR_TYPE_NAMES = {(0.0, 0.0): "safe/safe", (0.0, 1.0): "safe/unsafe", (1.0, 0.0): "unsafe/safe",
                   (1.0, 1.0): "unsafe/unsafe"}


def _type_name(sw: float, sl: float) -> str:
    if np.isnan(sw) or np.isnan(sl):
        return "unlabelled"
    return PAIR_TYPE_NAMES[(sw, sl)]


def policy_pair_logps(model, batch, device: str, pad_id: int, autocast: str = "none"):
    """(policy chosen logps, policy rejected logps, tokens) for a list of PairItems, one forward."""
    import torch

    prompts = [it.prompt_ids for it in batch] * 2
    responses = [it.chosen_ids for it in batch] + [it.rejected_ids for it in batch]
    tb = make_token_batch(prompts, responses, pad_id).to(device)
    with _autocast(device, autocast):
        logps = sequence_logps(model, tb)
    n = len(batch)
    return logps[:n], logps[n:], tb.tokens


def _autocast(device: str, autocast: str):
    import contextlib

    import torch

    if autocast == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if autocast == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def evaluate_cache(model, cache: Cache, *, batch_size: int = 16, device: str = "cpu",
                   pad_id: int = 0, max_pairs: int | None = None, autocast: str = "none") -> dict:
    """The metrics above, streamed over the cache in its stored order."""
    import torch

    was_training = model.training
    model.eval()
    per_type = defaultdict(lambda: {"n": 0, "chosen_reward": 0.0, "rejected_reward": 0.0, "margin": 0.0,
                                    "correct": 0})
    n = correct = differs = safe_wins = 0
    with torch.inference_mode():
        for batch in epoch_batches(cache, mode="none", orientation="better", batch_size=batch_size,
                                   seed=0, epoch=0, shuffle=False):
            if max_pairs is not None and n >= max_pairs:
                break
            pc, pr, _ = policy_pair_logps(model, batch, device, pad_id, autocast)
            for it, c, r in zip(batch, pc.double().cpu().tolist(), pr.double().cpu().tolist()):
                rc, rr = c - it.ref_chosen_logp, r - it.ref_rejected_logp
                t = per_type[_type_name(it.chosen_unsafe, it.rejected_unsafe)]
                t["n"] += 1
                t["chosen_reward"] += rc
                t["rejected_reward"] += rr
                t["margin"] += rc - rr
                t["correct"] += rc > rr
                n += 1
                correct += rc > rr
                if not (np.isnan(it.chosen_unsafe) or np.isnan(it.rejected_unsafe)) \
                        and it.chosen_unsafe != it.rejected_unsafe:
                    differs += 1
                    safe_is_chosen = it.chosen_unsafe == 0.0
                    safe_wins += (rc > rr) if safe_is_chosen else (rr > rc)
    if was_training:
        model.train()
    types = {name: {"pairs": t["n"], "mean_chosen_reward": t["chosen_reward"] / t["n"],
                    "mean_rejected_reward": t["rejected_reward"] / t["n"],
                    "mean_margin": t["margin"] / t["n"], "preference_accuracy": t["correct"] / t["n"]}
             for name, t in sorted(per_type.items())}
    return {
        "pairs": n,
        "preference_accuracy": correct / n if n else float("nan"),
        "safety_accuracy": safe_wins / differs if differs else float("nan"),
        "safety_pairs": differs,
        "mean_margin": sum(t["margin"] for t in per_type.values()) / n if n else float("nan"),
        "by_pair_type": types,
    }
