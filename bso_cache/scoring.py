"""The one pair scorer: summed response log-probs of chosen and rejected, for build, train, eval, verify.

A causal LM's usual forward materialises logits for every position, (B, T, V), and a float32
log-softmax copy of them; at a 50k-150k vocabulary that dominates time and memory. Here the
backbone runs once, the hidden states of the positions that predict response tokens are
gathered, and the output projection + log-softmax runs over those positions only, in chunks,
through `head.TargetLogProbs`. Without gradients (build, eval, verify) peak extra memory is one
(chunk, V) float32 block, whatever B and T are; with gradients at most STORED_SOFTMAX_BYTES
(256 MiB: the N scored positions' softmax, kept for the backward when it fits) or one chunk's
block (the backward recomputes the logits), whichever is larger. (Models whose logits
are not a plain projection, e.g. with soft-capping, take the full-logit path instead: there a
(rows, T, V) tensor does exist.)

The batch is laid out unshared (each prompt twice) or shared (each prompt once; `layouts.py`),
decided once per model by `PairScorer`. Per-token log-probs are float32 (float64 for float64
weights); their sums are float64.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .config import PREFIX_SHARING as PREFIX_SHARING_MODES
from .head import STORED_SOFTMAX_BYTES, TargetLogProbs, default_chunk
from .layouts import TokenBatch, flex_pair_mask, pair_mask, shared_layout, unshared_layout
from .tokenize import pair_length

Tensor = torch.Tensor

# Models whose logits are not a plain linear projection of the last hidden state.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

# Where `auto` may share prompts, by device kind (docs/PERFORMANCE.md): it then estimates both
# layouts' cost on the first batch (`layout_cost`) and shares where that is lower. Both device
# kinds were measured (docs/PERFORMANCE.md: the CPU tables and "GPU check").
AUTO_PREFIX_SHARING = {"cpu": True, "cuda": True}
# Attention implementations that take the shared layout's mask as given (transformers passes a 4D
# mask, or FlexAttention's BlockMask, through).
MASK_ATTENTION = ("sdpa", "eager", "flex_attention")
# Rows are padded to a multiple of this many tokens, by device kind: each new (rows, width) shape
# costs a GPU attention kernel a one-off plan (cuDNN) or compilation (FlexAttention), so fewer
# distinct widths make a build or a run cheaper there (docs/PERFORMANCE.md, "GPU check"); the CPU
# has no per-shape cost, and padding would only add work.
WIDTH_MULTIPLE = {"cpu": 1, "cuda": 64}
# The prefix-sharing probe: pairs scored both ways, and the largest per-token difference that
# still counts as the same numbers (float32; bf16/fp16), as in the trainer's step-0 check.
PROBE_PAIRS = 2
PROBE_TOLERANCE = {False: 1e-3, True: 0.05}
# `auto` estimates both layouts' cost on this many of the first batch's longest pairs.
TIMING_PAIRS = 8
# Attention cost per score (one query-key pair of one head) in multiply-adds of a linear layer,
# fitted on the CPU with SDPA and a mask (the fit and its data: docs/PERFORMANCE.md): attention
# per FLOP costs ~20 / head_dim linear-layer FLOPs, so a score (4 * head_dim FLOPs) costs ~80
# FLOPs = 40 multiply-adds whatever the head size.
ATTENTION_SCORE_COST = 40.0


def layout_cost(config, prompts, chosen, rejected, *, shared: bool) -> float:
    """Estimated cost of one forward of these pairs, per layer, in linear-layer multiply-adds:
    padded tokens x (attention projections + MLP) + rows x width^2 x heads x the score cost.
    The output projection is the same in both layouts and left out."""
    d = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 512)
    ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 8)
    if shared:
        rows, width = len(prompts), max(pair_length(p, c, r, True) for p, c, r in zip(prompts, chosen, rejected))
    else:
        rows, width = 2 * len(prompts), max(pair_length(p, c, r, False) for p, c, r in zip(prompts, chosen, rejected))
    per_token = 4 * d * d + 3 * d * ff
    return rows * width * per_token + rows * width * width * heads * ATTENTION_SCORE_COST


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / FSDP / PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _backbone_and_head(model: nn.Module):
    """(backbone returning last hidden states, output Linear) or None when logits need the full forward."""
    config = getattr(model, "config", None)
    if config is not None and any(getattr(config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(head, nn.Linear) or not isinstance(backbone, nn.Module) or backbone is model:
        return None
    return backbone, head


def _attention_implementation(model: nn.Module) -> str | None:
    return getattr(getattr(_unwrap(model), "config", None), "_attn_implementation", None)


@contextlib.contextmanager
def _eager_flex_on_cpu(impl: str | None, device: torch.device):
    """FlexAttention on the CPU runs uncompiled: torch 2.13's inductor fails to compile the CPU
    flex kernel once shapes vary (a C++ compile error after the first dynamic-shape recompile), and
    a static compile per width would take seconds each. On a GPU transformers' compiled flex runs."""
    if impl != "flex_attention" or device.type != "cpu":
        yield
        return
    import warnings

    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as tf_flex

    wrapper = getattr(tf_flex, "WrappedFlexAttention", None)
    saved = getattr(wrapper, "__call__", None)
    if saved is None:
        yield
        return
    wrapper.__call__ = lambda self: flex_attention  # transformers asks its wrapper for the compiled function
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention.*")
            yield
    finally:
        wrapper.__call__ = saved


def _autocast_dtype(weight: Tensor) -> torch.dtype | None:
    """The dtype autocast runs a float32 linear layer's matmul in here, or None outside autocast."""
    kind = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


class SequenceScorer(nn.Module):
    """Wraps a causal LM; forward(layout tensors) -> summed log-probs (2B,) in float64.

    Wrap THIS module in DDP/FSDP (not the bare LM), so that the data-parallel hooks see the
    whole computation while the LM's full-vocabulary logits are never built.
    """

    def __init__(self, lm: nn.Module, chunk: int | None = None, store_bytes: int = STORED_SOFTMAX_BYTES):
        super().__init__()
        self.lm = lm
        self.chunk = chunk
        self.store_bytes = store_bytes

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None,
                source: Tensor, targets: Tensor, sequence: Tensor, n_sequences: int,
                segments: Tensor | None = None, segment_parts: Tensor | None = None) -> Tensor:
        inner = _unwrap(self.lm)
        parts = _backbone_and_head(inner)
        impl = _attention_implementation(inner)
        if segments is not None:  # the shared layout: its mask, built here on the device
            attention_mask = (flex_pair_mask(segments, segment_parts) if impl == "flex_attention"
                              else pair_mask(segments, segment_parts))
        if impl == "eager" and attention_mask.dim() == 4:
            # eager attention adds the mask to the scores: 0 where allowed, the float minimum elsewhere
            attention_mask = torch.zeros(attention_mask.shape, dtype=torch.float32, device=input_ids.device
                                         ).masked_fill_(~attention_mask, torch.finfo(torch.float32).min)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        with _eager_flex_on_cpu(impl, input_ids.device):
            return self._score(parts, kwargs, source, targets, sequence, n_sequences)

    def _score(self, parts, kwargs, source, targets, sequence, n_sequences) -> Tensor:
        if parts is None:  # logits are not a plain projection: the full (R, T, V) logits, then pick
            logits = self.lm(**kwargs).logits                                     # (R, T, V)
            picked = logits.reshape(-1, logits.shape[-1])[source]                 # (N, V)
            token_logps = torch.log_softmax(picked.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        else:
            backbone, head = parts
            hidden = backbone(**kwargs).last_hidden_state                         # (R, T, H)
            picked = hidden.reshape(-1, hidden.shape[-1])[source]                 # (N, H)
            needs_grad = torch.is_grad_enabled() and (picked.requires_grad or head.weight.requires_grad)
            token_logps = TargetLogProbs.apply(picked, head.weight, head.bias, targets,
                                               self.chunk or default_chunk(head.weight.shape[0], head.weight.device),
                                               self.store_bytes if needs_grad else 0, _autocast_dtype(head.weight))
        # the per-token values are float32; their sum runs in float64 (exact to ~1e-9 for any length)
        return torch.zeros(n_sequences, dtype=torch.float64, device=token_logps.device
                           ).index_add_(0, sequence, token_logps.double())


def _as_scorer(model: nn.Module, chunk: int | None = None) -> nn.Module:
    if isinstance(model, SequenceScorer) or isinstance(getattr(model, "module", None), SequenceScorer):
        return model
    return SequenceScorer(model, chunk)


def _model_device(model: nn.Module) -> torch.device:
    return next(_unwrap(model).parameters()).device


def autocast_context(device, autocast: str):
    """torch.autocast for --autocast bf16 / fp16, a no-op for none."""
    if autocast == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if autocast == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def sequence_logps(model: nn.Module, batch: TokenBatch, *, chunk: int | None = None) -> Tensor:
    """Sum over the scored positions of one right-padded batch of sequences, shape (S,), float64."""
    width = batch.input_ids.shape[1]
    rows, cols = batch.score_mask[:, 1:].nonzero(as_tuple=True)
    return _as_scorer(model, chunk)(batch.input_ids, batch.attention_mask, None, rows * width + cols,
                                    batch.input_ids[rows, cols + 1], rows, batch.input_ids.shape[0])


@dataclass
class PairLogps:
    """Summed response log-probs of a batch of pairs, each (B,) float64, and what the forward cost."""

    chosen: Tensor
    rejected: Tensor
    tokens: int
    padded_tokens: int


def score_pairs(model: nn.Module, prompts: Sequence, chosen: Sequence, rejected: Sequence, *,
                pad_id: int = 0, prefix_sharing: bool = False, pack: bool = False, device=None,
                autocast: str = "none", chunk: int | None = None, multiple: int | None = None) -> PairLogps:
    """log pi(chosen | prompt) and log pi(rejected | prompt) for each pair, in one forward.

    `model` is a causal LM or a (DDP/FSDP-wrapped) `SequenceScorer`; gradients flow when enabled.
    With `prefix_sharing` the prompt runs once per pair (`shared_layout`), else twice. Rows are
    padded to a multiple of `multiple` tokens (default: WIDTH_MULTIPLE for the device).
    """
    device = torch.device(_model_device(model) if device is None else device)
    multiple = WIDTH_MULTIPLE.get(device.type, 1) if multiple is None else multiple
    layout = (shared_layout(prompts, chosen, rejected, pad_id, pack=pack, multiple=multiple) if prefix_sharing
              else unshared_layout(prompts, chosen, rejected, pad_id, multiple))
    layout = layout.to(device)
    b = layout.n_pairs
    with autocast_context(device, autocast):
        sums = _as_scorer(model, chunk)(layout.input_ids, layout.padding_mask, layout.position_ids,
                                        layout.source, layout.targets, layout.sequence, 2 * b,
                                        layout.segments, layout.parts)
    return PairLogps(sums[:b], sums[b:], layout.tokens, layout.padded_tokens)


# --------------------------------------------------------------------------- prefix sharing, decided once

def prefix_sharing_obstacle(model: nn.Module) -> str | None:
    """Why this model cannot score with the per-pair block mask, or None when it can."""
    impl = _attention_implementation(model)
    if impl not in MASK_ATTENTION:
        return f"attention '{impl}' cannot take a per-pair block mask"
    return None


def half_precision(model: nn.Module, autocast: str) -> bool:
    return autocast != "none" or next(_unwrap(model).parameters()).dtype in (torch.float16, torch.bfloat16)


class PairScorer:
    """Scores batches of pairs with one model, sharing each prompt where that is on and exact.

    `prefix_sharing` is `auto` (on where docs/PERFORMANCE.md measured that it pays on this
    device kind: AUTO_PREFIX_SHARING), `on` or `off`. Before the first batch is scored shared,
    a few of its pairs are scored both ways; a model whose attention does not honour the block
    mask (or differs beyond `PROBE_TOLERANCE` per token) falls back to the unshared layout with
    one printed line. `module` is what runs the forward: the model, or its DDP/FSDP wrapper.
    """

    def __init__(self, model: nn.Module, *, prefix_sharing: str = "auto", device=None, pad_id: int = 0,
                 autocast: str = "none", pack: bool = False, log=print):
        if prefix_sharing not in PREFIX_SHARING_MODES:
            raise ValueError(f"prefix_sharing must be one of {PREFIX_SHARING_MODES}, got {prefix_sharing!r}")
        self.model = model
        self.module: nn.Module = model
        self.mode = prefix_sharing
        self.device = _model_device(model) if device is None else torch.device(device)
        self.pad_id = pad_id
        self.autocast = autocast
        self.pack = pack
        self.log = log
        self.sharing: bool | None = None if prefix_sharing != "off" else False
        self.probe: dict | None = None

    def with_module(self, module: nn.Module) -> "PairScorer":
        """The same decision, another module to run (e.g. the bare model for evaluation)."""
        other = copy.copy(self)
        other.module = module
        return other

    def decide(self, prompts: Sequence, chosen: Sequence, rejected: Sequence) -> bool:
        """Settle whether to share on these pairs (the first batch); idempotent.

        `on`: share unless the model cannot (a printed line). `auto`: also estimate both layouts'
        cost on the longest TIMING_PAIRS pairs (`layout_cost`) and share only where it is lower: on
        the CPU that depends on the model's shape (attention over the longer shared rows can cost
        more than the prompt tokens saved) and on how long the prompts are against the responses.
        """
        if self.sharing is not None:
            return self.sharing
        if not prompts:  # nothing to probe on: decided at the first batch
            return False
        if self.mode == "auto" and not AUTO_PREFIX_SHARING.get(self.device.type, False):
            self.sharing = False
            return False
        obstacle = prefix_sharing_obstacle(self.model)
        if obstacle:
            self.log(f"prefix sharing off: {obstacle}; each prompt is scored twice instead")
            self.sharing = False
            return False
        self.sharing = self._honours_mask(prompts, chosen, rejected)
        if self.sharing and self.mode == "auto":
            self.sharing = self._faster(prompts, chosen, rejected)
        return self.sharing

    def _sample(self, prompts, chosen, rejected, k: int, longest: bool):
        order = sorted(range(len(prompts)), key=lambda i: pair_length(prompts[i], chosen[i], rejected[i], True),
                       reverse=longest)[:k]
        return [prompts[i] for i in order], [chosen[i] for i in order], [rejected[i] for i in order]

    def _honours_mask(self, prompts, chosen, rejected) -> bool:
        """Score the shortest PROBE_PAIRS pairs both ways: a mask that is not honoured shows on any pair."""
        sample = self._sample(prompts, chosen, rejected, PROBE_PAIRS, longest=False)
        with torch.no_grad():
            shared = score_pairs(self.model, *sample, pad_id=self.pad_id, prefix_sharing=True, device=self.device,
                                 autocast=self.autocast)
            plain = score_pairs(self.model, *sample, pad_id=self.pad_id, prefix_sharing=False, device=self.device,
                                autocast=self.autocast)
        lengths = torch.tensor([len(c) for c in sample[1]] + [len(r) for r in sample[2]], dtype=torch.float64)
        diff = torch.cat([(shared.chosen - plain.chosen), (shared.rejected - plain.rejected)]).abs().cpu()
        per_token = float((diff / lengths).max())
        tol = PROBE_TOLERANCE[half_precision(self.model, self.autocast)]
        k = len(sample[0])
        self.probe = {"pairs": k, "max_abs_diff": float(diff.max()), "max_per_token": per_token, "tolerance": tol}
        if per_token > tol:
            self.log(f"prefix sharing off: on the first {k} pairs the shared scores differ from the unshared ones "
                     f"by up to {per_token:.2g} nats per token (tolerance {tol:g}); this model's attention "
                     f"({_attention_implementation(self.model)}) does not honour the block mask, so each prompt "
                     f"is scored twice instead")
            return False
        return True

    def _faster(self, prompts, chosen, rejected) -> bool:
        """Estimate both layouts' cost on the longest TIMING_PAIRS pairs (deterministic: the same
        data and model decide the same way on every run); True when sharing is the cheaper."""
        sample = self._sample(prompts, chosen, rejected, TIMING_PAIRS, longest=True)
        cost = {shared: layout_cost(_unwrap(self.model).config, *sample, shared=shared) for shared in (False, True)}
        self.probe.update(cost_shared=cost[True], cost_unshared=cost[False], costed_pairs=len(sample[0]))
        return cost[True] < cost[False]

    def length(self, prompt: Sequence, chosen: Sequence, rejected: Sequence) -> int:
        return pair_length(prompt, chosen, rejected, bool(self.sharing))

    def __call__(self, prompts: Sequence, chosen: Sequence, rejected: Sequence) -> PairLogps:
        if self.sharing is None:
            self.decide(prompts, chosen, rejected)
        return score_pairs(self.module, prompts, chosen, rejected, pad_id=self.pad_id,
                           prefix_sharing=bool(self.sharing), pack=self.pack and bool(self.sharing),
                           device=self.device, autocast=self.autocast)

    def score_all(self, prompts: Sequence, chosen: Sequence, rejected: Sequence, *, batch_size: int,
                  on_batch=None) -> tuple[list[float], list[float], dict]:
        """No-grad scores of many pairs, in length-sorted batches; returned in the given order."""
        n = len(prompts)
        if n:
            self.decide(prompts, chosen, rejected)
        order = sorted(range(n), key=lambda i: self.length(prompts[i], chosen[i], rejected[i]), reverse=True)
        out_c, out_r = [0.0] * n, [0.0] * n
        stats = {"tokens": 0, "padded_tokens": 0, "batches": 0}
        with torch.inference_mode():
            for s in range(0, n, batch_size):
                idx = order[s:s + batch_size]
                lp = self([prompts[i] for i in idx], [chosen[i] for i in idx], [rejected[i] for i in idx])
                for i, c, r in zip(idx, lp.chosen.cpu().tolist(), lp.rejected.cpu().tolist()):
                    out_c[i], out_r[i] = c, r
                stats["tokens"] += lp.tokens
                stats["padded_tokens"] += lp.padded_tokens
                stats["batches"] += 1
                if on_batch is not None:
                    on_batch(len(idx), lp.tokens)
        return out_c, out_r, stats

    def describe(self) -> str:
        state = {None: "undecided", True: "on", False: "off"}[self.sharing]
        costed = ""
        if self.probe and "cost_shared" in self.probe:
            ratio = self.probe["cost_shared"] / max(self.probe["cost_unshared"], 1e-12)
            costed = f"; estimated {ratio:.2f}x the cost of unshared on {self.probe['costed_pairs']} pairs"
        return f"prefix sharing: {state} (--prefix-sharing {self.mode}{costed})"
