"""Data parallelism for training: wrapping (DDP / FSDP2), gradient synchronisation, gathering the
full state, and cutting a step's pairs into each rank's micro-batches.

What is wrapped is the `scoring.SequenceScorer` around the LM (not the bare LM), so the hooks
see the whole computation while full-vocabulary logits are never built.
"""

from __future__ import annotations

import contextlib

from bso_cache.io.dist import Dist
from bso_cache.errors import ConfigError


def wrap(scorer, model, *, fsdp: bool, dist: Dist, device: str):
    """The scorer as the training step runs it: FSDP2-sharded (one unit per decoder layer plus the
    embeddings/head in the root), DDP-wrapped under torchrun, or as it is in one process."""
    if fsdp:
        if not dist.enabled:
            raise ConfigError("--fsdp shards the model over torchrun processes; run under torchrun "
                              "(torchrun --nproc-per-node N -m bso_cache train ...)")
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(scorer)  # embeddings, final norm and head: gathered in the scorer's forward
        return scorer
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(scorer, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
    return scorer


def grad_sync(scorer, *, fsdp: bool, dist: Dist, last: bool):
    """A context for one micro-batch: gradients are synchronised only on the step's last one."""
    if not dist.enabled or last:
        if fsdp:
            scorer.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if fsdp:
        scorer.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return scorer.no_sync()


def full_state(scorer, optimizer, *, fsdp: bool):
    """(model state dict without the scorer's `lm.` prefix, optimizer state dict), full, on the CPU,
    under FSDP (a collective: every rank must call it); (None, None) otherwise."""
    if not fsdp:
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(scorer, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("lm."): v for k, v in msd.items()}, osd


def share_step(pairs: list, *, grad_accum: int, dist: Dist) -> list[tuple[list, float]]:
    """This rank's micro-batches of a step, as (pairs, weight).

    The step's pairs are cut into grad_accum x world contiguous slices, slice i going to rank
    i % world, so a step's updates are the same whatever the number of processes. Every rank runs
    the same number of forward/backward passes (DDP needs each to join every all-reduce); a rank
    whose slice is empty (a short last step) re-runs a pair with weight 0.
    """
    parts = grad_accum * dist.world
    size = -(-len(pairs) // parts)
    slices = [pairs[i * size:(i + 1) * size] for i in range(parts)]
    mine = slices[dist.rank::dist.world]
    return [(b, 1.0) if b else (pairs[:1], 0.0) for b in mine]
