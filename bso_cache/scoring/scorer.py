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

from bso_cache.scoring.head import STORED_SOFTMAX_BYTES, TargetLogProbs, default_chunk
from bso_cache.scoring.layouts import TokenBatch, flex_pair_mask, pair_mask, shared_layout, unshared_layout
from bso_cache.scoring.sharing import SharingDecision, check_mode, decide
from bso_cache.data.tokenize import pair_length

Tensor = torch.Tensor

# Models whose logits are not a plain linear projection of the last hidden state.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

# Rows are padded to a multiple of this many tokens, by device kind: each new (rows, width) shape
# costs a GPU attention kernel a one-off plan (cuDNN) or compilation (FlexAttention), so fewer
# distinct widths make a build or a run cheaper there (docs/GPU.md); the CPU
# has no per-shape cost, and padding would only add work.
WIDTH_MULTIPLE = {"cpu": 1, "cuda": 64}

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

def half_precision(model: nn.Module, autocast: str) -> bool:
    return autocast != "none" or next(_unwrap(model).parameters()).dtype in (torch.float16, torch.bfloat16)


class PairScorer:
    """Scores batches of pairs with one model, sharing each prompt where that is on and exact.

    `prefix_sharing` is `auto`, `on` or `off`, settled by `sharing.decide` (the rule and its
    measurements are there) when the scorer is made, on `sample`: pairs that are the same on every
    run and resume of a job (a build's first shard, a run's first pairs in stored order), so a
    resume scores as the run it continues did and nothing needs recording; without a sample, on
    the first pairs it scores. `model` is the bare model (the probe runs it without gradients,
    so a trainer makes its scorer before wrapping the model), `module` what runs the forward: the
    model, or its DDP/FSDP wrapper (`with_module`: the same decision, another module).
    """

    def __init__(self, model: nn.Module, *, prefix_sharing: str, module: nn.Module | None = None,
                 sample: tuple[Sequence, Sequence, Sequence] | None = None, device=None, pad_id: int = 0,
                 autocast: str = "none", pack: bool = False, log=print):
        self.model = model
        self.module: nn.Module = model if module is None else module
        self.mode = check_mode(prefix_sharing)
        self.device = _model_device(model) if device is None else torch.device(device)
        self.pad_id = pad_id
        self.autocast = autocast
        self.pack = pack
        self.log = log
        self.decision: SharingDecision | None = None
        if prefix_sharing == "off":
            self.decision = SharingDecision("off", False, "asked")
        elif sample is not None:
            self.decide(*sample)

    @property
    def sharing(self) -> bool | None:
        """Whether prompts are scored once (None until the first batch decides)."""
        return None if self.decision is None else self.decision.used

    def with_module(self, module: nn.Module) -> "PairScorer":
        """The same decision, another module to run (e.g. the bare model for evaluation)."""
        other = copy.copy(self)
        other.module = module
        return other

    def decide(self, prompts: Sequence, chosen: Sequence, rejected: Sequence) -> bool | None:
        """Settle whether to share on these pairs (`sharing.decide`); idempotent."""
        if self.decision is None and prompts:
            def score(p, c, r, shared):
                with torch.no_grad():
                    return score_pairs(self.model, p, c, r, pad_id=self.pad_id, prefix_sharing=shared,
                                       device=self.device, autocast=self.autocast)

            self.decision = decide(self.mode, prompts, chosen, rejected, device_kind=self.device.type,
                                   attention=_attention_implementation(self.model),
                                   config=_unwrap(self.model).config, score=score,
                                   half=half_precision(self.model, self.autocast), log=self.log)
        return self.sharing

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
        d = self.decision
        state = "undecided" if d is None else ("on" if d.used else "off")
        why = f"; {d.why}" if d is not None and d.mode == "auto" and d.why != "asked" else ""
        return f"prefix sharing: {state} (--prefix-sharing {self.mode}{why})"
