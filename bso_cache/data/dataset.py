"""A cache as a PyTorch dataset, for a training loop of one's own.

`CacheDataset` is an `IterableDataset` over a cache's pairs (after the pair handling of
`--pairs` and `--orientation`), streamed shard by shard: memory is one row group, not the cache.
Under a `DataLoader` with several workers each worker reads its own shards. `collate_pairs`
makes a batch: the token ids as lists (a layout of `bso_cache.scoring.layouts` or `score_pairs` pads
them), the reference log-probs and the safety labels as float64 tensors (1 unsafe, 0 safe, NaN
unknown), the keys named as `bso_loss`'s arguments.
"""

from __future__ import annotations

from typing import Iterator

import torch

from bso_cache.cache import Cache
from bso_cache.data.pairs import CachedPair, iter_items


class CacheDataset(torch.utils.data.IterableDataset):
    """The pairs of a cache (a `Cache` or its folder), in cache order."""

    def __init__(self, cache, *, pairs: str = "none", orientation: str = "better"):
        super().__init__()
        self.cache = cache if isinstance(cache, Cache) else Cache.open(cache)
        self.pairs, self.orientation = pairs, orientation

    def __iter__(self) -> Iterator[CachedPair]:
        info = torch.utils.data.get_worker_info()
        shards = range(len(self.cache.shards))
        if info is not None:  # each worker its own shards
            shards = [k for k in shards if k % info.num_workers == info.id]
        yield from iter_items(self.cache, self.pairs, self.orientation, shard_order=shards)


def collate_pairs(items: list[CachedPair]) -> dict:
    """A batch of pairs: token id lists and float64 tensors keyed as `bso_loss` and `score_pairs` take them."""
    def f64(values):
        return torch.tensor(values, dtype=torch.float64)

    return {"prompt_ids": [it.prompt_ids for it in items], "chosen_ids": [it.chosen_ids for it in items],
            "rejected_ids": [it.rejected_ids for it in items],
            "ref_chosen_logps": f64([it.ref_chosen_logp for it in items]),
            "ref_rejected_logps": f64([it.ref_rejected_logp for it in items]),
            "chosen_unsafe": f64([it.chosen_unsafe for it in items]),
            "rejected_unsafe": f64([it.rejected_unsafe for it in items]),
            "source_index": [it.source_index for it in items]}
