"""Pair handling at training time (never baked into the cache) and the streamed pair batches.

Orientation (PKU-style rows): `better` keeps chosen = the more helpful response as cached;
`safer` swaps the pairs whose safer response is the rejected one (unknown: kept as cached).
Then the pair mode, on the oriented labels (docs/LOSSES.md):
    none              pairs as given
    safedpo           keep if chosen is safe; swap if chosen unsafe and rejected safe; drop if both unsafe
    drop-both-unsafe  drop if both unsafe, no swap
Pairs without safety labels are always kept as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from bso_cache import schemas as S
from bso_cache.cache import Cache
from bso_cache.data.tokenize import pair_length


def _labels(batch, column: str) -> np.ndarray:
    """Nullable bool column -> float64 array with 1 = unsafe / True, NaN = unknown."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.cast(batch.column(column), pa.float64()).to_numpy(zero_copy_only=False)


@dataclass
class PairCounts:
    total: int = 0
    kept: int = 0
    swapped: int = 0
    dropped: int = 0
    reasons: dict = field(default_factory=dict)

    def add(self, other: "PairCounts") -> None:
        self.total += other.total
        self.kept += other.kept
        self.swapped += other.swapped
        self.dropped += other.dropped
        for k, v in other.reasons.items():
            self.reasons[k] = self.reasons.get(k, 0) + v

    def as_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "swapped": self.swapped,
                "dropped": self.dropped, "reasons": dict(self.reasons)}


def plan_pairs(safer_is_chosen: np.ndarray, chosen_unsafe: np.ndarray, rejected_unsafe: np.ndarray,
               mode: str, orientation: str) -> tuple[np.ndarray, np.ndarray, PairCounts]:
    """(keep mask, swap mask, counts) for one batch of pairs, vectorised."""
    n = len(chosen_unsafe)
    swap = np.zeros(n, dtype=bool)
    reasons: dict[str, int] = {}
    if orientation == "safer":
        swap |= safer_is_chosen == 0.0  # NaN compares False: unknown stays as cached
        reasons["oriented_safer"] = int(swap.sum())
    sw = np.where(swap, rejected_unsafe, chosen_unsafe)
    sl = np.where(swap, chosen_unsafe, rejected_unsafe)
    keep = np.ones(n, dtype=bool)
    if mode in ("safedpo", "drop-both-unsafe"):
        both = (sw == 1.0) & (sl == 1.0)
        keep &= ~both
        reasons["both_unsafe"] = int(both.sum())
    if mode == "safedpo":
        flip = (sw == 1.0) & (sl == 0.0)
        swap ^= flip
        reasons["safedpo_swapped"] = int(flip.sum())
    counts = PairCounts(total=n, kept=int(keep.sum()), swapped=int((swap & keep).sum()),
                        dropped=int((~keep).sum()), reasons={k: v for k, v in reasons.items() if v})
    return keep, swap, counts


@dataclass
class CachedPair:
    """One oriented pair ready for a batch. Labels: 1.0 unsafe, 0.0 safe, NaN unknown."""

    source_index: int
    prompt_ids: list
    chosen_ids: list
    rejected_ids: list
    ref_chosen_logp: float
    ref_rejected_logp: float
    chosen_unsafe: float
    rejected_unsafe: float

    @property
    def length(self) -> int:
        """The width it pads a batch to (what length bucketing sorts by)."""
        return pair_length(self.prompt_ids, self.chosen_ids, self.rejected_ids, shared=False)


def iter_items(cache: Cache, mode: str, orientation: str, shard_order=None) -> Iterator[CachedPair]:
    for batch in cache.iter_batches(S.TRAIN_COLUMNS, shard_order=shard_order):
        c_uns, r_uns = _labels(batch, S.CHOSEN_UNSAFE), _labels(batch, S.REJECTED_UNSAFE)
        keep, swap, _ = plan_pairs(_labels(batch, S.SAFER_IS_CHOSEN), c_uns, r_uns, mode, orientation)
        cols = {c: batch.column(c).to_pylist() for c in
                (S.SOURCE_INDEX, S.PROMPT_IDS, S.CHOSEN_IDS, S.REJECTED_IDS, S.REF_CHOSEN_LOGP,
                 S.REF_REJECTED_LOGP)}
        for i in np.flatnonzero(keep):
            a, b = (S.REJECTED_IDS, S.CHOSEN_IDS) if swap[i] else (S.CHOSEN_IDS, S.REJECTED_IDS)
            la, lb = (S.REF_REJECTED_LOGP, S.REF_CHOSEN_LOGP) if swap[i] else (S.REF_CHOSEN_LOGP, S.REF_REJECTED_LOGP)
            ua, ub = (r_uns[i], c_uns[i]) if swap[i] else (c_uns[i], r_uns[i])
            yield CachedPair(cols[S.SOURCE_INDEX][i], cols[S.PROMPT_IDS][i], cols[a][i], cols[b][i],
                           cols[la][i], cols[lb][i], float(ua), float(ub))


def count_pairs(cache: Cache, mode: str, orientation: str) -> PairCounts:
    """Counts over the whole cache from the label columns alone (cheap)."""
    total = PairCounts()
    for batch in cache.iter_batches([S.SAFER_IS_CHOSEN, S.CHOSEN_UNSAFE, S.REJECTED_UNSAFE]):
        _, _, counts = plan_pairs(_labels(batch, S.SAFER_IS_CHOSEN), _labels(batch, S.CHOSEN_UNSAFE),
                                  _labels(batch, S.REJECTED_UNSAFE), mode, orientation)
        total.add(counts)
    return total


def epoch_batches(cache: Cache, *, mode: str, orientation: str, batch_size: int, seed: int,
                  epoch: int, shuffle_buffer: int = 4096, bucket_batches: int = 16,
                  shuffle: bool = True) -> Iterator[list[CachedPair]]:
    """One epoch of micro-batches: every kept pair exactly once, order fixed by (seed, epoch).

    Shards are visited in a seeded order; pairs pass through a bounded shuffle buffer; windows
    of `bucket_batches` batches are sorted by length and cut into batches (little padding), and
    the batches of a window are yielded in a seeded order. Memory: the buffer, not the cache.
    """
    if not shuffle:
        items = iter_items(cache, mode, orientation)
        batch: list[CachedPair] = []
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(cache.shards)).tolist()
    window = batch_size * bucket_batches
    buffer: list[CachedPair] = []

    def emit(take: int) -> Iterator[list[CachedPair]]:
        picks = rng.choice(len(buffer), size=take, replace=False)
        chosen = [buffer[i] for i in picks]
        for i in sorted(picks.tolist(), reverse=True):  # remove picked items (swap with last)
            buffer[i] = buffer[-1]
            buffer.pop()
        chosen.sort(key=lambda it: it.length)
        batches = [chosen[s:s + batch_size] for s in range(0, len(chosen), batch_size)]
        for j in rng.permutation(len(batches)).tolist():
            yield batches[j]

    capacity = max(shuffle_buffer, window)
    for item in iter_items(cache, mode, orientation, shard_order=order):
        buffer.append(item)
        if len(buffer) >= capacity:
            yield from emit(window)
    while buffer:
        yield from emit(min(window, len(buffer)))


def prefetch(iterator, depth: int = 2):
    """Iterate in a background thread, `depth` items ahead, so that reading shards and building
    batches overlaps the model's work. Exceptions are re-raised in the consumer."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="bso-cache-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let it leave any native call (Parquet reads) before we go on
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def token_ids(items: list[CachedPair]) -> tuple[list, list, list]:
    """(prompts, chosen responses, rejected responses) of cached pairs, as the scorer takes them."""
    return [it.prompt_ids for it in items], [it.chosen_ids for it in items], [it.rejected_ids for it in items]


@dataclass
class PairBatch:
    """A micro-batch of cached pairs as scoring and the loss read them: the token ids of each
    pair and (B,) float64 tensors of the reference log-probs and safety labels (NaN = unknown)."""

    items: list[CachedPair]
    ref_chosen_logps: "object"
    ref_rejected_logps: "object"
    chosen_unsafe: "object"
    rejected_unsafe: "object"

    @classmethod
    def of(cls, items: list[CachedPair], device) -> "PairBatch":
        import torch

        def column(name: str):
            return torch.tensor([getattr(it, name) for it in items], dtype=torch.float64, device=device)

        return cls(items, column("ref_chosen_logp"), column("ref_rejected_logp"), column("chosen_unsafe"),
                   column("rejected_unsafe"))

    @property
    def token_ids(self) -> tuple[list, list, list]:
        """(prompts, chosen responses, rejected responses)."""
        return token_ids(self.items)
