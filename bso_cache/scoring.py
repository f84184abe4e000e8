"""The one function that scores token ids: summed response log-probs, shared by build, train, verify.

A causal LM's usual forward materialises logits for every position, (B, T, V), and a float32
log-softmax copy of them; at a 50k-150k vocabulary that dominates time and memory. Here the
backbone runs once, the hidden states of the positions that predict response tokens are
gathered, and the output projection + log-softmax runs over those positions only, in chunks,
through `TargetLogProbs`, whose backward recomputes each chunk's logits instead of storing them.
Peak extra memory is one (chunk, V) float32 block, whatever B and T are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

Tensor = torch.Tensor

# Models whose logits are not a plain linear projection of the last hidden state.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class TargetLogProbs(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for N gathered positions, chunked, in float32 (float64
    when the weights are float64, for gradient checks).

    forward saves (hidden, weight, bias, targets, logsumexp); backward recomputes each chunk's
    logits: d logp_t / d logits = onehot(t) - softmax.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int):
        n = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for checks
        out = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        h = hidden.to(weight.dtype)
        for s in range(0, n, chunk):
            logits = torch.nn.functional.linear(h[s:s + chunk], weight, bias).to(acc)  # (c, V)
            target = logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            # logsumexp in place: no second (c, V) block
            lse_c = logits.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(1))
            lse[s:s + chunk] = lse_c
            out[s:s + chunk] = target - lse_c
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
            bias is not None and ctx.needs_input_grad[2]
        acc = lse.dtype
        h = hidden.to(weight.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        chunk = ctx.chunk
        for s in range(0, hidden.shape[0], chunk):
            h_c = h[s:s + chunk]
            g = grad_out[s:s + chunk].to(acc)
            logits = torch.nn.functional.linear(h_c, weight, bias).to(acc)
            d = logits.sub_(lse[s:s + chunk, None]).exp_().mul_(-g[:, None])  # -g * softmax, in place
            d.scatter_add_(1, targets[s:s + chunk, None], g[:, None])        # + g * onehot
            if need_h:
                grad_h[s:s + chunk] = (d.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(d.t(), h_c.to(acc))
            if need_b:
                grad_b += d.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None)


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


def default_chunk(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Positions per chunk so that one (chunk, V) float32 block stays near 32 MiB on the CPU
    (cache-friendly, little memory) and 256 MiB on a GPU (large matmuls)."""
    budget = (1 << 28) if torch.device(device).type == "cuda" else (1 << 25)
    return max(32, budget // (4 * max(vocab_size, 1)))


@dataclass
class TokenBatch:
    """Right-padded sequences and the mask of the positions whose tokens are scored."""

    input_ids: Tensor       # (S, T) int64
    attention_mask: Tensor  # (S, T) int64
    score_mask: Tensor      # (S, T) bool: True at response tokens (never at position 0)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device, non_blocking=True),
                          self.attention_mask.to(device, non_blocking=True),
                          self.score_mask.to(device, non_blocking=True))


def make_token_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0) -> TokenBatch:
    """Sequences prompt + response, right-padded to the longest, scored on the response positions."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(lengths), width), dtype=torch.long)
    score = torch.zeros((len(lengths), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :n] = 1
        score[i, len(p):n] = True
    if bool(score[:, 0].any()):
        raise ValueError("a response starting at position 0 has no context to be scored from; "
                         "every prompt needs at least one token")
    return TokenBatch(ids, attn, score)


class SequenceScorer(nn.Module):
    """Wraps a causal LM; forward(input_ids, attention_mask, score_mask) -> summed logps (S,).

    Wrap THIS module in DDP/FSDP (not the bare LM), so that the data-parallel hooks see the
    whole computation while the LM's full-vocabulary logits are never built.
    """

    def __init__(self, lm: nn.Module, chunk: int | None = None):
        super().__init__()
        self.lm = lm
        self.chunk = chunk

    def forward(self, input_ids: Tensor, attention_mask: Tensor, score_mask: Tensor) -> Tensor:
        inner = _unwrap(self.lm)
        parts = _backbone_and_head(inner)
        # position t is predicted by the hidden state at t - 1
        pred_mask = score_mask[:, 1:]                            # (S, T-1)
        targets = input_ids[:, 1:][pred_mask]                    # (N,)
        seq_index = pred_mask.nonzero()[:, 0]                    # (N,)
        if parts is None:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=False).logits[:, :-1]    # (S, T-1, V)
            token_logps = torch.log_softmax(logits[pred_mask].float(), dim=-1).gather(
                1, targets[:, None]).squeeze(1)
        else:
            backbone, head = parts
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state  # (S, T, H)
            picked = hidden[:, :-1][pred_mask]                   # (N, H)
            token_logps = TargetLogProbs.apply(picked, head.weight, head.bias, targets,
                                               self.chunk or default_chunk(head.weight.shape[0], head.weight.device))
        return torch.zeros(input_ids.shape[0], dtype=torch.float32, device=token_logps.device
                           ).index_add_(0, seq_index, token_logps)


def sequence_logps(model: nn.Module, batch: TokenBatch, *, chunk: int | None = None) -> Tensor:
    """Sum over the scored positions of log pi(token | preceding tokens), shape (S,), float32.

    `model` is a causal LM or a (DDP-wrapped) `SequenceScorer`. Log-softmax runs in float32
    whatever the model's dtype. Gradients flow when enabled.
    """
    scorer = model if isinstance(model, SequenceScorer) or isinstance(
        getattr(model, "module", None), SequenceScorer) else SequenceScorer(model, chunk)
    return scorer(batch.input_ids, batch.attention_mask, batch.score_mask)
