"""`bso-cache verify`: every shard's integrity, and a sample of pairs re-scored with the reference."""

from __future__ import annotations

import math
import random

from bso_cache import schemas as S
from bso_cache.cache import Cache, check_digest, check_tokenizer, read_manifest, verify_shards
from bso_cache.config import VerifyConfig
from bso_cache.training.metrics import token_tolerance


def verify_cache(cfg: VerifyConfig, *, log=print) -> dict:
    """The verdict is in the result: `failure` names the worst pair when a re-scored log-prob is
    further from the cache than the tolerance, or not a finite number (None when it passes)."""
    path, model, gguf_file, trust_remote_code = cfg.cache, cfg.model, cfg.gguf_file, cfg.trust_remote_code
    manifest = read_manifest(path)
    check_digest(path, manifest, cfg.expect_digest)
    verify_shards(path, manifest)
    cache = Cache(path, manifest)
    log(f"{path}: {len(manifest.shards)} shards, {cache.num_pairs} pairs: checksums, sizes, row counts "
        f"and schema OK")
    result = {"shards": len(manifest.shards), "pairs": cache.num_pairs, "checked": 0, "max_abs_diff": None}
    if not cfg.sample:
        return result
    from bso_cache.models import load_model, load_tokenizer, locate_reference, resolve_attention, resolve_device
    from bso_cache.scoring.scorer import PairScorer

    name = model or locate_reference(manifest.reference)
    gguf = gguf_file if model else (gguf_file or manifest.reference_gguf)
    tok = load_tokenizer(name, gguf_file=gguf, trust_remote_code=trust_remote_code)
    check_tokenizer(path, manifest, tok, name)
    rng = random.Random(cfg.seed)
    picks = sorted(rng.sample(range(cache.num_pairs), min(cfg.sample, cache.num_pairs)))
    rows, i, want = [], 0, set(picks)
    for batch in cache.iter_batches([S.PAIR_ID, S.PROMPT_IDS, S.CHOSEN_IDS, S.REJECTED_IDS,
                                     S.REF_CHOSEN_LOGP, S.REF_REJECTED_LOGP]):
        for r in batch.to_pylist():
            if i in want:
                rows.append(r)
            i += 1
    dev = resolve_device(cfg.device)
    lm = load_model(name, dtype=manifest.reference_dtype, device=dev, gguf_file=gguf, log=log,
                    trust_remote_code=trust_remote_code, load_in_4bit=manifest.reference_quantization is not None,
                    attn_implementation=resolve_attention(cfg.attn_implementation, dev, training=False)).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    scorer = PairScorer(lm, prefix_sharing=cfg.prefix_sharing, device=dev, pad_id=pad, log=log)
    chosen, rejected, _ = scorer.score_all([r[S.PROMPT_IDS] for r in rows], [r[S.CHOSEN_IDS] for r in rows],
                                           [r[S.REJECTED_IDS] for r in rows], batch_size=cfg.batch_size)
    # (|difference| per response token, per sequence, pair id, which response)
    diffs = [(abs(v - r[ref]) / max(1, len(r[ids])), abs(v - r[ref]), r[S.PAIR_ID], which)
             for which, values, ids, ref in (("chosen", chosen, S.CHOSEN_IDS, S.REF_CHOSEN_LOGP),
                                             ("rejected", rejected, S.REJECTED_IDS, S.REF_REJECTED_LOGP))
             for v, r in zip(values, rows)]
    # a NaN compares false with everything: it would never be the largest, so it is put first
    worst = max(diffs, key=lambda d: (not math.isfinite(d[0]), d[0]))
    tolerance = cfg.tolerance
    limit = token_tolerance(manifest.reference_dtype, manifest.reference_dtype) if tolerance is None else tolerance
    largest = max((d[1] for d in diffs), key=lambda v: (not math.isfinite(v), v))
    result.update(checked=len(rows), max_abs_diff=largest, max_token_diff=worst[0],
                  worst_pair=worst[2], worst_response=worst[3], tolerance_per_token=limit, model=name)
    result["prefix_sharing"] = scorer.sharing
    result["failure"] = None if worst[0] <= limit else (
        f"{path}: pair {worst[2]} ({worst[3]}) re-scores {worst[0]:.3g} nats per token off the cache (> {limit:g}); "
        f"the cache does not match this model: rebuild it, or pass the model it was built with"
        if math.isfinite(worst[0]) else
        f"{path}: pair {worst[2]} ({worst[3]}): the cache's or the re-scored log-prob is not a finite number "
        f"(difference {worst[0]}); the cache is damaged: rebuild it")
    log(f"re-scored {len(rows)} pairs with {name} ({scorer.describe()}): largest |difference| "
        f"{worst[0]:.3g} nats per token ({worst[1]:.3g} for the sequence; pair {worst[2]}, {worst[3]}), "
        f"tolerance {limit:g} per token for a {manifest.reference_dtype} cache")
    return result
