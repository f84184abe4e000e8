"""Token layouts of a batch of pairs (prompt, chosen, rejected) for one forward.

- unshared: 2B right-padded rows, prompt + chosen and prompt + rejected (each prompt runs twice);
- shared (prefix sharing): one segment prompt + chosen + rejected per pair, with a block mask and
  position ids that restart after the prompt, so the prompt runs once and each response sees
  exactly the prompt and itself; `pack` puts several pairs in a row, each masked to itself.

A layout says which hidden state predicts each scored token and which summed value (chosen or
rejected of which pair) it adds to; `scoring.SequenceScorer` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from bso_cache.errors import DataError
from bso_cache.data.tokenize import pair_length

Tensor = torch.Tensor


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


def _check_prompts(prompts: Sequence) -> None:
    if any(len(p) == 0 for p in prompts):
        raise DataError("a response starting at position 0 has no context to be scored from; every prompt "
                        "needs at least one token (a BOS token at least)", reason="empty_prompt")


def padded_width(width: int, multiple: int = 1) -> int:
    """`width` rounded up to a multiple of `multiple` (fewer distinct shapes: see WIDTH_MULTIPLE in scoring)."""
    return -(-width // multiple) * multiple


def make_token_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     pad_id: int = 0, multiple: int = 1) -> TokenBatch:
    """Sequences prompt + response, right-padded to the longest (rounded up to `multiple`), scored on
    the response positions."""
    _check_prompts(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = padded_width(max(lengths), multiple)
    ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    attn = np.zeros((len(lengths), width), dtype=np.int64)
    score = np.zeros((len(lengths), width), dtype=bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = lengths[i]
        ids[i, :len(p)] = p
        ids[i, len(p):n] = r
        attn[i, :n] = 1
        score[i, len(p):n] = True
    return TokenBatch(torch.from_numpy(ids), torch.from_numpy(attn), torch.from_numpy(score))


@dataclass
class ScoringLayout:
    """Token rows for one forward and the plan of what to read from its hidden states.

    Scored token k is `targets[k]`, predicted by the hidden state at flat position `source[k]`
    (row * T + column) and summed into `sequence[k]`: i for the chosen response of pair i,
    B + i for its rejected one.
    """

    input_ids: Tensor            # (R, T) int64
    padding_mask: Tensor         # (R, T) int64: 1 = a token, 0 = padding
    position_ids: Tensor | None  # (R, T) int64; None: 0..T-1 in every row
    source: Tensor               # (N,) int64
    targets: Tensor              # (N,) int64
    sequence: Tensor             # (N,) int64 in [0, 2B)
    n_pairs: int
    tokens: int                  # non-padding tokens fed to the model
    # shared layout: the pair of each token (-1 = padding) and its part (0 prompt, 1 chosen, 2
    # rejected), from which `pair_mask` (dense, for SDPA/eager) or `flex_pair_mask` (FlexAttention's
    # block mask) is built on the device; None for the unshared layout (a plain padding mask)
    segments: Tensor | None = None  # (R, T) int64
    parts: Tensor | None = None     # (R, T) int8

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def attention_mask(self) -> Tensor:
        """(R, T) padding mask (unshared) or (R, 1, T, T) bool: True = may attend (shared)."""
        return self.padding_mask if self.segments is None else pair_mask(self.segments, self.parts)

    def to(self, device) -> "ScoringLayout":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return ScoringLayout(move(self.input_ids), move(self.padding_mask), move(self.position_ids),
                             move(self.source), move(self.targets), move(self.sequence), self.n_pairs,
                             self.tokens, move(self.segments), move(self.parts))


def pair_mask(segments: Tensor, parts: Tensor) -> Tensor:
    """The shared layout's mask, (R, 1, T, T) bool on the tensors' device: causal within a pair; a
    token sees the prompt and its own part (a rejected token never sees the chosen response); a
    padding query sees itself only (no fully masked row: its softmax would be NaN)."""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril_()
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] >= 0)
    branch = (parts[:, None, :] == 0) | (parts[:, None, :] == parts[:, :, None])
    mask = causal & same & branch
    mask |= torch.eye(width, dtype=torch.bool, device=segments.device) & (segments < 0)[:, :, None]
    return mask[:, None]


def flex_pair_mask(segments: Tensor, parts: Tensor):
    """`pair_mask` as FlexAttention's BlockMask (the same rule, evaluated per block: blocks that
    no query may see are skipped, so the shared rows cost attention only where pairs attend)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        sq, skv = segments[b, q], segments[b, kv]
        pkv = parts[b, kv]
        seen = (q >= kv) & (sq == skv) & (skv >= 0) & ((pkv == 0) | (pkv == parts[b, q]))
        return seen | ((q == kv) & (sq < 0))

    rows, width = segments.shape
    return create_block_mask(mask_mod, rows, None, width, width, device=segments.device)


def unshared_layout(prompts: Sequence, chosen: Sequence, rejected: Sequence, pad_id: int = 0,
                    multiple: int = 1) -> ScoringLayout:
    """2B right-padded rows: prompt + chosen for each pair, then prompt + rejected."""
    b = len(prompts)
    tb = make_token_batch(list(prompts) * 2, list(chosen) + list(rejected), pad_id, multiple)
    width = tb.input_ids.shape[1]
    rows, cols = tb.score_mask[:, 1:].nonzero(as_tuple=True)  # token at cols + 1, predicted at cols
    return ScoringLayout(tb.input_ids, tb.attention_mask, None, rows * width + cols,
                         tb.input_ids[rows, cols + 1], rows, b, tb.tokens)


def _pack_rows(lengths: list[int], pack: bool) -> list[list[int]]:
    """Pairs per row: one each, or (pack) first-fit decreasing into rows as wide as the longest pair."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def shared_layout(prompts: Sequence, chosen: Sequence, rejected: Sequence, pad_id: int = 0, *,
                  pack: bool = False, multiple: int = 1) -> ScoringLayout:
    """One segment [prompt, chosen, rejected] per pair, the prompt scored once.

    The block mask lets every token attend causally within its own pair, and a rejected token
    only to the prompt and to the rejected tokens before it (never to the chosen response);
    position ids restart at len(prompt) for the rejected response. So each response sees exactly
    what it sees in the unshared layout, and the prompt's activations serve (and receive
    gradient from) both. With `pack`, several pairs share a row (each masked to itself), as many
    as fit in the width of the longest pair.
    """
    _check_prompts(prompts)
    b = len(prompts)
    lengths = [pair_length(p, c, r, True) for p, c, r in zip(prompts, chosen, rejected)]
    rows = _pack_rows(lengths, pack)
    width = padded_width(max(sum(lengths[i] for i in row) for row in rows), multiple)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    seg = np.full((len(rows), width), -1, dtype=np.int64)   # pair index of each token, -1 = padding
    part = np.zeros((len(rows), width), dtype=np.int8)      # 0 prompt, 1 chosen, 2 rejected
    source, targets, sequence = [], [], []
    for r, row in enumerate(rows):
        o = 0
        for i in row:
            p, c, j = len(prompts[i]), len(chosen[i]), len(rejected[i])
            ids[r, o:o + p] = prompts[i]
            ids[r, o + p:o + p + c] = chosen[i]
            ids[r, o + p + c:o + p + c + j] = rejected[i]
            pos[r, o:o + p + c] = np.arange(p + c)
            pos[r, o + p + c:o + p + c + j] = np.arange(p, p + j)
            seg[r, o:o + p + c + j] = i
            part[r, o + p:o + p + c] = 1
            part[r, o + p + c:o + p + c + j] = 2
            flat = r * width + o
            # chosen token k (at p + k) is predicted at p + k - 1; rejected token k (at p + c + k) at
            # p - 1 (the prompt's last token) for k = 0, else at p + c + k - 1
            source.append(flat + np.arange(p - 1, p + c - 1))
            source.append(flat + np.concatenate(([p - 1], np.arange(p + c, p + c + j - 1))).astype(np.int64))
            targets.append(np.asarray(chosen[i], dtype=np.int64))
            targets.append(np.asarray(rejected[i], dtype=np.int64))
            sequence.append(np.full(c, i, dtype=np.int64))
            sequence.append(np.full(j, b + i, dtype=np.int64))
            o += p + c + j
    return ScoringLayout(torch.from_numpy(ids), torch.from_numpy((seg >= 0).astype(np.int64)), torch.from_numpy(pos),
                         torch.from_numpy(np.concatenate(source)), torch.from_numpy(np.concatenate(targets)),
                         torch.from_numpy(np.concatenate(sequence)), b, sum(lengths),
                         torch.from_numpy(seg), torch.from_numpy(part))
