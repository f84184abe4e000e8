"""Training metrics: the window of per-pair diagnostics between two logged steps, and the
step-0 check (evaluation on a cache is in evaluate.py)."""

from __future__ import annotations

from bso_cache.errors import MismatchError
from bso_cache.losses import pair_diagnostics
from bso_cache.schemas import PAIR_TYPES


class MetricsWindow:
    """Sums of per-pair diagnostics between two logged steps."""

    TYPES = PAIR_TYPES

    def __init__(self):
        self.reset()

    def reset(self):
        self.s = {k: 0.0 for k in ("loss", "chosen_rewards", "rejected_rewards", "margin", "reward_margin",
                                   "correct", "u", "clamped", "u_pos", "safety_pairs", "safe_wins")}
        self.n = 0
        self.by_type = {t: [0, 0.0] for t in self.TYPES}
        self.seconds = self.tokens = self.steps = 0
        self.grad_norm = self.lr = 0.0

    def add(self, spec, terms, policy_chosen_logps, policy_rejected_logps, batch) -> None:
        """Add one micro-batch: its `losses.LossTerms`, the policy's log-probs and its `PairBatch`."""
        d = pair_diagnostics(spec, policy_chosen_logps, policy_rejected_logps, batch.ref_chosen_logps,
                             batch.ref_rejected_logps, batch.chosen_unsafe, batch.rejected_unsafe, terms=terms)
        losses = terms.losses.detach()
        self.s["loss"] += float(losses.double().sum())
        self.s["chosen_rewards"] += float(d["chosen_rewards"].sum())
        self.s["rejected_rewards"] += float(d["rejected_rewards"].sum())
        self.s["margin"] += float(d["margin"].sum())
        self.s["reward_margin"] += float((d["chosen_rewards"] - d["rejected_rewards"]).sum())
        self.s["correct"] += float(d["correct"].sum())
        self.s["u"] += float(d["u"].sum())
        self.s["clamped"] += float(d["clamped"].sum())
        self.s["u_pos"] += float((d["u"] > 0).sum())
        self.s["safety_pairs"] += float(d["safety_differs"].sum())
        self.s["safe_wins"] += float(d["safe_wins"].sum())
        self.n += len(losses)
        for t, loss in zip(d["pair_type"].tolist(), losses.double().tolist()):
            entry = self.by_type[self.TYPES[t]]
            entry[0] += 1
            entry[1] += loss

    def tick(self, seconds, tokens, grad_norm, lr):
        self.seconds += seconds
        self.tokens += tokens
        self.steps += 1
        self.grad_norm = grad_norm
        self.lr = lr

    def _merge(self, dist) -> None:
        """Sum the window over ranks, so the metrics cover every pair of the step."""
        if dist is None or not dist.enabled:
            return
        parts = dist.all_gather_object((self.s, self.n, self.by_type, self.tokens))
        self.s = {k: sum(p[0][k] for p in parts) for k in self.s}
        self.n = sum(p[1] for p in parts)
        self.by_type = {t: [sum(p[2][t][0] for p in parts), sum(p[2][t][1] for p in parts)] for t in self.TYPES}
        self.tokens = sum(p[3] for p in parts)

    def flush(self, step: int, epoch: int, dist=None) -> dict:
        self._merge(dist)
        n = max(self.n, 1)
        s = self.s
        row = {
            "step": step, "epoch": epoch, "pairs": self.n,
            "loss": s["loss"] / n,
            "chosen_rewards": s["chosen_rewards"] / n, "rejected_rewards": s["rejected_rewards"] / n,
            "margin": s["margin"] / n, "reward_margin": s["reward_margin"] / n,
            "preference_accuracy": s["correct"] / n,
            "safety_accuracy": s["safe_wins"] / s["safety_pairs"] if s["safety_pairs"] else None,
            "u_mean": s["u"] / n, "clamped_fraction": s["clamped"] / n, "u_positive_fraction": s["u_pos"] / n,
            "lr": self.lr, "grad_norm": self.grad_norm,
            "step_seconds": self.seconds / max(self.steps, 1),
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
        }
        for t, (count, loss) in self.by_type.items():
            if count:
                row[f"loss/{t}"] = loss / count
                row[f"pairs/{t}"] = count
        self.reset()
        return row


# --- the step-0 check -----------------------------------------------------------------------

def step0_tolerance(cfg, manifest: dict) -> float:
    """Largest |log pi - log pi_ref| per response token (nats) still counted as agreement.

    float32 on both sides differs by ~1e-6 per token (batching, padding); bf16/fp16 on either
    side by up to a few 1e-2. A cache of other weights, tokenizer or template is off by ~0.1 to
    several nats per token.
    """
    if cfg.step0_tolerance is not None:
        return cfg.step0_tolerance
    return token_tolerance(cfg.dtype, manifest.reference_dtype, cfg.autocast)


def token_tolerance(scoring_dtype: str, cache_dtype: str, autocast: str = "none") -> float:
    """The one rule for the step-0 check and `verify`: per response token, 1e-3 nats when both the
    cache and the scoring ran in float32, 0.05 when either ran in bf16/fp16."""
    exact = scoring_dtype == "float32" and cache_dtype == "float32" and autocast == "none"
    return 1e-3 if exact else 0.05


def step0_check(batch, lp, *, tolerance: float, policy_is_reference: bool, log=print, hint: str = "") -> dict:
    """Compare the policy's first log-probs (`lp`, a scoring.PairLogps) with the cached ones of
    `batch` (a pairs.PairBatch), per response token; refuse a disagreement when the policy is the
    reference itself (that is a wrong cache, not a different policy)."""
    import torch

    diff = torch.cat([lp.chosen.detach() - batch.ref_chosen_logps,
                      lp.rejected.detach() - batch.ref_rejected_logps]).abs().cpu()
    _, chosen, rejected = batch.token_ids
    tokens = torch.tensor([len(c) for c in chosen] + [len(r) for r in rejected], dtype=torch.float64)
    per_token = diff / tokens
    figure = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
              "max_per_token": float(per_token.max()), "sequences": int(diff.numel()),
              "tolerance_per_token": tolerance, "policy_is_reference": policy_is_reference}
    ok = figure["max_per_token"] <= tolerance
    log(f"step-0 check: max |log pi - log pi_ref| = {figure['max_abs_diff']:.3g} nats per sequence "
        f"({figure['max_per_token']:.2g} per token; mean {figure['mean_abs_diff']:.3g}) over "
        f"{figure['sequences']} sequences: {'agree' if ok else 'DISAGREE'} (tolerance {tolerance:g} nats per "
        f"token; policy {'is' if policy_is_reference else 'is not'} the reference weights)")
    if policy_is_reference and not ok:
        raise MismatchError(
            f"step-0 check failed: the policy starts from the cache's reference weights, yet its "
            f"log-probs differ from the cached ones by up to {figure['max_abs_diff']:.3g} nats "
            f"({figure['max_per_token']:.2g} per token, tolerance {tolerance:g}). Usual causes: the cache was "
            f"built from other weights or another tokenizer/template, or in another dtype ({hint}). Rebuild "
            f"the cache, or raise --step0-tolerance if the difference is intended")
    return figure
