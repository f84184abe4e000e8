"""Prefix sharing: whether a scorer scores each prompt once for both responses (one row
prompt + chosen + rejected with a block mask, `layouts.shared_layout`) or twice. Decided once per
scorer by `decide`, on pairs that are the same on every resume of a job (a build's first shard, a
run's first pairs in stored order), so nothing needs recording; the `SharingDecision` is reported
(a build's shard stats, a run's run_config.json). The numbers are the same either way, only the
cost differs.

Why a cost model (docs/PERFORMANCE.md, "Prefix sharing", and docs/GPU.md): sharing saves the
prompt's second pass but makes rows longer, and attention over longer rows can cost more than the
tokens saved (a model of many small heads). So `auto` shares where a cost model of both layouts
(`layout_cost`, fitted on the CPU) says the shared one is cheaper on the decision's pairs, on the
device kinds that were measured; `on` shares whenever the model can; `off` never. Before sharing, a probe scores a few
pairs both ways: a model whose attention ignores the mask falls back to unshared, with one line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from bso_cache.config import PREFIX_SHARING
from bso_cache.errors import ConfigError
from bso_cache.data.tokenize import pair_length

# The device kinds where `auto` may share (both were measured: docs/PERFORMANCE.md, the CPU tables
# and "GPU check"); on any other, `auto` does not share.
MEASURED_DEVICES = ("cpu", "cuda")
# Attention implementations that take the shared layout's mask as given (transformers passes a 4D
# mask, or FlexAttention's BlockMask, through).
MASK_ATTENTION = ("sdpa", "eager", "flex_attention")
# The probe: pairs scored both ways, and the largest per-token difference that still counts as the
# same numbers (float32; bf16/fp16), as in the trainer's step-0 check.
PROBE_PAIRS = 2
PROBE_TOLERANCE = {False: 1e-3, True: 0.05}
# `auto` estimates both layouts' cost on this many of the first batch's longest pairs.
TIMING_PAIRS = 8
# Attention cost per score (one query-key pair of one head) in multiply-adds of a linear layer,
# fitted on the CPU with SDPA and a mask (the fit and its data: docs/PERFORMANCE.md): attention
# per FLOP costs ~20 / head_dim linear-layer FLOPs, so a score (4 * head_dim FLOPs) costs ~80
# FLOPs = 40 multiply-adds whatever the head size.
ATTENTION_SCORE_COST = 40.0


@dataclass(frozen=True)
class SharingDecision:
    """What was decided, asked how (`mode`), and why (`why`); `probe`: the probe's and the cost
    model's figures when they ran."""

    mode: str
    used: bool
    why: str
    probe: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def check_mode(mode: str) -> str:
    if mode not in PREFIX_SHARING:
        raise ConfigError(f"unknown --prefix-sharing '{mode}'; valid: {', '.join(PREFIX_SHARING)}")
    return mode


def layout_cost(config, prompts, chosen, rejected, *, shared: bool) -> float:
    """Estimated cost of one forward of these pairs, per layer, in linear-layer multiply-adds:
    padded tokens x (attention projections + MLP) + rows x width^2 x heads x the score cost.
    The output projection is the same in both layouts and left out."""
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 512)
    ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 8)
    rows = len(prompts) if shared else 2 * len(prompts)
    width = max(pair_length(p, c, r, shared) for p, c, r in zip(prompts, chosen, rejected))
    per_token = 4 * d * d + 3 * d * ff
    return rows * width * per_token + rows * width * width * heads * ATTENTION_SCORE_COST


def _sample(prompts, chosen, rejected, k: int, longest: bool):
    order = sorted(range(len(prompts)), key=lambda i: pair_length(prompts[i], chosen[i], rejected[i], True),
                   reverse=longest)[:k]
    return [prompts[i] for i in order], [chosen[i] for i in order], [rejected[i] for i in order]


def decide(mode: str, prompts: Sequence, chosen: Sequence, rejected: Sequence, *, device_kind: str,
           attention: str | None, config, score: Callable, half: bool, log=print) -> SharingDecision:
    """The one decision. `score(prompts, chosen, rejected, shared)` returns the pairs' summed
    log-probs (a `PairLogps`) without gradients; `half`: the scorer computes in bf16/fp16;
    `config`: the model's config (for the cost model); `attention`: its attention implementation."""
    import torch

    if check_mode(mode) == "off":
        return SharingDecision(mode, False, "asked")
    if mode == "auto" and device_kind not in MEASURED_DEVICES:
        return SharingDecision(mode, False, f"not measured on {device_kind}")
    if attention not in MASK_ATTENTION:
        log(f"prefix sharing off: attention '{attention}' cannot take a per-pair block mask; each prompt is "
            f"scored twice instead")
        return SharingDecision(mode, False, f"attention '{attention}' cannot take the mask")
    sample = _sample(prompts, chosen, rejected, PROBE_PAIRS, longest=False)
    shared, plain = score(*sample, True), score(*sample, False)
    lengths = torch.tensor([len(c) for c in sample[1]] + [len(r) for r in sample[2]], dtype=torch.float64)
    diff = torch.cat([(shared.chosen - plain.chosen), (shared.rejected - plain.rejected)]).abs().cpu()
    per_token = float((diff / lengths).max())
    probe = {"pairs": len(sample[0]), "max_abs_diff": float(diff.max()), "max_per_token": per_token,
             "tolerance": PROBE_TOLERANCE[half]}
    if per_token > probe["tolerance"]:
        log(f"prefix sharing off: on the first {probe['pairs']} pairs the shared scores differ from the unshared "
            f"ones by up to {per_token:.2g} nats per token (tolerance {probe['tolerance']:g}); this model's "
            f"attention ({attention}) does not honour the block mask, so each prompt is scored twice instead")
        return SharingDecision(mode, False, "the model's attention does not honour the mask", probe)
    if mode == "on":
        return SharingDecision(mode, True, "asked", probe)
    costed = _sample(prompts, chosen, rejected, TIMING_PAIRS, longest=True)
    cost = {s: layout_cost(config, *costed, shared=s) for s in (False, True)}
    probe.update(cost_shared=cost[True], cost_unshared=cost[False], costed_pairs=len(costed[0]))
    ratio = cost[True] / max(cost[False], 1e-12)
    return SharingDecision(mode, ratio < 1, f"estimated {ratio:.2f}x the cost of unshared on {len(costed[0])} "
                                            f"pairs", probe)
