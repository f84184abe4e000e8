"""The output projection + log-softmax at the N gathered positions that predict response tokens.

`TargetLogProbs` computes log softmax(h W^T + b)[target] for those positions only, in chunks of
`default_chunk` rows, so no (B, T, V) logits tensor exists. Without gradients (build, eval,
verify) its extra memory is one (chunk, V) float32 block; with gradients it keeps the (N, V)
softmax for the backward while that fits STORED_SOFTMAX_BYTES, else the backward recomputes
the logits: by chunks of positions, or for a trainable 16-bit head by blocks of vocabulary rows
of the same size (`_by_vocabulary`), so that its weight gradient needs no (V, H) float32 sum.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

# With gradients, the head keeps the (N, V) softmax for the backward when it takes at most this
# much (HH batch of 4 on the GPT-2 vocabulary: ~70 MiB), instead of recomputing the logits.
STORED_SOFTMAX_BYTES = 256 << 20
# A 16-bit head's weight gradient is computed in float32 blocks of vocabulary rows of this size.
GRAD_BLOCK_BYTES = 16 << 20


def default_chunk(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Positions per chunk so that one (chunk, V) float32 block stays near 32 MiB on the CPU
    (cache-friendly, little memory) and 256 MiB on a GPU (large matmuls)."""
    budget = (1 << 28) if torch.device(device).type == "cuda" else (1 << 25)
    return max(32, budget // (4 * max(vocab_size, 1)))


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, acc: torch.dtype, out: Tensor | None = None) -> Tensor:
    """h W^T + b in `acc`; written into `out` (a slice of the stored block) when given."""
    if out is not None and weight.dtype == acc:
        return torch.addmm(bias, h, weight.t(), out=out) if bias is not None else torch.mm(h, weight.t(), out=out)
    logits = torch.nn.functional.linear(h, weight, bias).to(acc)
    return logits if out is None else out.copy_(logits)


class TargetLogProbs(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for N gathered positions, chunked, in float32 (float64
    when the weights are float64, for gradient checks).

    d logp_t / d logits = onehot(t) - softmax. With `store_bytes` >= the (N, V) block's size, the
    forward keeps the softmax for the backward (3 matmuls of N x H x V in all, against 4);
    otherwise it saves (hidden, weight, bias, targets, logsumexp) and the backward recomputes
    each chunk's logits (4 matmuls; one (chunk, V) block at a time whatever N is).

    `matmul_dtype` (bf16/fp16 for float32 weights under autocast) runs the matmuls in that dtype,
    as autocast runs the model's own output layer; the log-softmax stays in float32. Without it a
    float32 head under autocast runs three float32 N x H x V matmuls a step, a large share of a
    GPU step at a large vocabulary (docs/GPU.md).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                store_bytes: int = 0, matmul_dtype: torch.dtype | None = None):
        n = hidden.shape[0]
        acc = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for checks
        mm = matmul_dtype or weight.dtype
        store = n * weight.shape[0] * acc.itemsize <= store_bytes
        probs = torch.empty(n, weight.shape[0], dtype=acc, device=hidden.device) if store else None
        out = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        h, w, b = hidden.to(mm), weight.to(mm), None if bias is None else bias.to(mm)
        for s in range(0, n, chunk):
            logits = _logits(h[s:s + chunk], w, b, acc, None if probs is None else probs[s:s + chunk])
            target = logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            # logsumexp in place: no second (c, V) block
            sumexp = logits.sub_(top).exp_().sum(dim=-1)
            if store:
                logits.div_(sumexp[:, None])  # the softmax, kept for the backward
            lse_c = sumexp.log_().add_(top.squeeze(1))
            lse[s:s + chunk] = lse_c
            out[s:s + chunk] = target - lse_c
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.probs, ctx.mm = chunk, probs, mm
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
            bias is not None and ctx.needs_input_grad[2]
        acc = lse.dtype
        # the stored softmax is used up (in place) by the first backward; a second one through the
        # same graph (retain_graph) recomputes it from the saved log-sum-exp
        probs, ctx.probs = ctx.probs, None
        mm = ctx.mm
        h, w, b = hidden.to(mm), weight.to(mm), None if bias is None else bias.to(mm)
        if need_w and probs is None and weight.dtype != acc:
            return _by_vocabulary(h, w, b, targets, lse, grad_out, ctx.chunk, need_h, need_b, hidden.dtype) + \
                (None, None, None, None)
        grad_h = torch.empty_like(hidden) if need_h else None
        # a 16-bit head with the softmax kept (one chunk: nothing to accumulate across chunks) gets its
        # gradient in blocks of vocabulary rows, each computed in float32 and stored in the weights'
        # dtype: no (V, H) float32 buffer (196 MiB for the GPT-2 vocabulary at H = 1024)
        direct_w = need_w and probs is not None and weight.dtype != acc
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w and not direct_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        chunk = ctx.chunk if probs is None else max(hidden.shape[0], 1)
        for s in range(0, hidden.shape[0], chunk):
            h_c = h[s:s + chunk]
            g = grad_out[s:s + chunk].to(acc)
            if probs is None:
                d = _logits(h_c, w, b, acc).sub_(lse[s:s + chunk, None]).exp_()  # the softmax again
            else:
                d = probs[s:s + chunk]
            d.mul_(-g[:, None])                                                # -g * softmax, in place
            d.scatter_add_(1, targets[s:s + chunk, None], g[:, None])          # + g * onehot
            if need_h:
                grad_h[s:s + chunk] = (d.to(mm) @ w).to(hidden.dtype)
            if direct_w:
                grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
                h_acc, rows = h_c.to(acc), max(1, GRAD_BLOCK_BYTES // (4 * max(h_c.shape[1], 1)))
                for v in range(0, weight.shape[0], rows):
                    grad_w[v:v + rows] = d[:, v:v + rows].t() @ h_acc
            elif need_w and mm != weight.dtype:  # float32 weights under autocast: the matmul in its dtype
                grad_w.add_(d.to(mm).t() @ h_c)
            elif need_w:
                grad_w.addmm_(d.t(), h_c.to(acc))
            if need_b:
                grad_b += d.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None)


def _by_vocabulary(h: Tensor, w: Tensor, b: Tensor | None, targets: Tensor, lse: Tensor, grad_out: Tensor,
                   chunk: int, need_h: bool, need_b: bool, hidden_dtype: torch.dtype) -> tuple:
    """The backward of a 16-bit head whose softmax was not kept, in blocks of vocabulary rows.

    Position chunks would need the whole (V, H) weight gradient in float32 to sum into (196 MiB at
    the GPT-2 vocabulary and H = 1024, 2.2 GB at a 152k vocabulary and H = 3584, plus its cast).
    Here each block of rows recomputes its softmax for all N positions at once (an (N, rows)
    float32 block, the size of one chunk's), gets its weight gradient from one float32 matmul over
    all positions, written in the weights' dtype, and adds its part of the hidden gradient (a
    matmul in the weights' dtype) into a float32 (N, H) sum. The same three matmuls as by chunks.
    """
    acc = lse.dtype
    n, vocab = h.shape[0], w.shape[0]
    rows = max(1, chunk * vocab // max(n, 1))
    g = grad_out.to(acc)
    h_acc = h.to(acc)
    grad_h = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
    grad_w = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    grad_b = torch.empty(b.shape, dtype=acc, device=b.device) if need_b else None
    for v in range(0, vocab, rows):
        w_v = w[v:v + rows]
        d = _logits(h, w_v, None if b is None else b[v:v + rows], acc).sub_(lse[:, None]).exp_()  # softmax
        d.mul_(-g[:, None])
        inside = (targets >= v) & (targets < v + w_v.shape[0])  # + g * onehot, where the target is in the block
        d.scatter_add_(1, (targets - v).clamp_(0, w_v.shape[0] - 1)[:, None], torch.where(inside, g, 0)[:, None])
        if need_h:
            grad_h += d.to(w.dtype) @ w_v
        grad_w[v:v + rows] = d.t() @ h_acc
        if need_b:
            grad_b[v:v + rows] = d.sum(0)
    return (grad_h.to(hidden_dtype) if need_h else None, grad_w, grad_b.to(b.dtype) if need_b else None)
