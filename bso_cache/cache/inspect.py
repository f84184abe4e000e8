"""`bso-cache inspect`: what a cache holds, computed lazily with polars (never a whole cache in RAM)."""

from __future__ import annotations

from pathlib import Path

from bso_cache import schemas as S
from bso_cache.cache import Cache, counts_text, verify_shards
from bso_cache.errors import CacheError


def inspect_cache(path: str | Path, *, verify: bool = False) -> dict:
    """The report; every shard is checked first (present, size, rows, schema; checksums with
    `verify`), so a damaged cache is named, not a polars traceback."""
    cache = Cache.open(path, verify=False)
    verify_shards(cache.path, cache.manifest, checksums=verify)
    if cache.num_pairs == 0:
        raise CacheError(f"{cache.path}: the cache holds no pairs (input {cache.manifest.rows['input']} rows, "
                         f"dropped {counts_text(cache.manifest.rows['dropped'])}); rebuild it")
    try:
        return _report(cache)
    except Exception as e:  # noqa: BLE001 - polars raises its own types; name the cache and what to do
        raise CacheError(f"{cache.path}: cannot be read ({type(e).__name__}: {e}); run `bso-cache verify --cache "
                         f"{cache.path}`") from None


def _report(cache: Cache) -> dict:
    import polars as pl

    lf = pl.scan_parquet([str(p) for p in cache.shards])
    prompt = pl.col(S.PROMPT_IDS).list.len()
    chosen = pl.col(S.CHOSEN_IDS).list.len()
    rejected = pl.col(S.REJECTED_IDS).list.len()
    total = prompt + pl.max_horizontal(chosen, rejected)
    qs = (0.5, 0.9, 0.99)
    lengths = lf.select(
        *[total.quantile(q).alias(f"total_p{int(q * 100)}") for q in qs],
        total.max().alias("total_max"),
        prompt.mean().alias("prompt_mean"), chosen.mean().alias("chosen_mean"),
        rejected.mean().alias("rejected_mean"),
        pl.col(S.TRUNCATED).sum().alias("truncated"),
    ).collect().to_dicts()[0]

    index = 2 * pl.col(S.CHOSEN_UNSAFE).cast(pl.Int8) + pl.col(S.REJECTED_UNSAFE).cast(pl.Int8)
    mix = (lf.select(index.fill_null(S.UNLABELLED).alias("index")).group_by("index").len().sort("index").collect())
    logps = lf.select(
        pl.col(S.REF_CHOSEN_LOGP).mean().alias("chosen_mean"),
        pl.col(S.REF_REJECTED_LOGP).mean().alias("rejected_mean"),
        (pl.col(S.REF_CHOSEN_LOGP) / chosen).mean().alias("chosen_per_token_mean"),
        (pl.col(S.REF_REJECTED_LOGP) / rejected).mean().alias("rejected_per_token_mean"),
        (pl.col(S.REF_CHOSEN_LOGP) > pl.col(S.REF_REJECTED_LOGP)).mean().alias("ref_prefers_chosen"),
        pl.col(S.REF_CHOSEN_LOGP).min().alias("min"),
        pl.col(S.REF_CHOSEN_LOGP).max().alias("max"),
    ).collect().to_dicts()[0]
    safer = lf.select(pl.col(S.SAFER_IS_CHOSEN).value_counts()).collect()
    m = cache.manifest
    return {
        "cache": str(cache.path),
        "digest": m.digest,
        "rows": m.rows,
        "notes": m.notes,
        "shards": len(m.shards),
        "bytes": sum(s.bytes for s in m.shards),
        "reference": {k: m.reference.get(k) for k in ("name_or_path", "weights_digest", "model_type")},
        "tokenization": m.tokenization,
        "reference_pass": m.reference_pass,
        "lengths": lengths,
        "pair_types": {S.PAIR_TYPES[i]: n for i, n in zip(mix["index"].to_list(), mix["len"].to_list())},
        "safer_is_chosen": {str(r[S.SAFER_IS_CHOSEN]): r["count"]
                            for r in safer.to_series().to_list()},
        "ref_logps": logps,
        "stats": m.stats,
    }
