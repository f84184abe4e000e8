"""The pair stream (`bso_cache.data.pairs`), property-tested on caches written without a model: every
pair exactly once per epoch, reproducible for a seed, and the pair modes keep what their counts say."""

from __future__ import annotations

import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bso_cache import schemas as S
from bso_cache.cache import Cache, empty_columns, write_shard
from bso_cache.io.files import atomic_write_json


def fake_cache(path: Path, lengths: list[int], rows_per_shard: int) -> Cache:
    """A cache written without a model (random ids, fake log-probs): for stream invariants."""
    path.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start_ in enumerate(range(0, len(lengths), rows_per_shard)):
        cols = empty_columns()
        for i in range(start_, min(start_ + rows_per_shard, len(lengths))):
            n = lengths[i]
            cols[S.PAIR_ID].append(f"p{i}")
            cols[S.SOURCE_INDEX].append(i)
            cols[S.PROMPT_IDS].append([1] * (1 + n % 5))
            cols[S.CHOSEN_IDS].append([2] * n)
            cols[S.REJECTED_IDS].append([3] * (1 + n // 2))
            cols[S.REF_CHOSEN_LOGP].append(-float(n))
            cols[S.REF_REJECTED_LOGP].append(-float(n) / 2)
            cols[S.CHOSEN_UNSAFE].append([None, True, False][i % 3])
            cols[S.REJECTED_UNSAFE].append([None, False, True][(i // 3) % 3])
            cols[S.SAFER_IS_CHOSEN].append(None)
            cols[S.CHOSEN_SEVERITY].append(None)
            cols[S.REJECTED_SEVERITY].append(None)
            cols[S.TRUNCATED].append(False)
        info = write_shard(path, k, cols)
        shards.append({**info, "input_rows": [start_, start_ + info["rows"]]})
    manifest = {"format": S.FORMAT_NAME, "schema_version": S.SCHEMA_VERSION, "created": "", "bso_cache_version": "",
                "reference": {"name_or_path": "none", "weights_digest": "sha256:0"},
                "tokenizer": {"vocab_digest": "sha256:0"}, "input": {}, "tokenization": {},
                "reference_pass": {"dtype": "float32"},
                "rows": {"input": len(lengths), "written": len(lengths), "dropped": {}}, "shards": shards,
                "columns": list(S.COLUMNS)}
    manifest["digest"] = S.manifest_digest(manifest)
    atomic_write_json(path / S.MANIFEST_NAME, manifest)
    return Cache.open(path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=120), rows_per_shard=st.integers(1, 50),
       batch_size=st.integers(1, 17), buffer=st.integers(1, 64), bucket=st.integers(1, 5),
       seed=st.integers(0, 3), epoch=st.integers(0, 2))
def test_every_pair_exactly_once_per_epoch(tmp_path_factory, lengths, rows_per_shard, batch_size, buffer,
                                           bucket, seed, epoch):
    from bso_cache.data.pairs import epoch_batches

    cache = fake_cache(tmp_path_factory.mktemp("fake"), lengths, rows_per_shard)
    batches = list(epoch_batches(cache, mode="none", orientation="better", batch_size=batch_size, seed=seed,
                                 epoch=epoch, shuffle_buffer=buffer, bucket_batches=bucket))
    seen = sorted(it.source_index for b in batches for it in b)
    assert seen == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert len(batches) == math.ceil(len(lengths) / batch_size)
    again = list(epoch_batches(cache, mode="none", orientation="better", batch_size=batch_size, seed=seed,
                               epoch=epoch, shuffle_buffer=buffer, bucket_batches=bucket))
    assert [[it.source_index for it in b] for b in again] == [[it.source_index for it in b] for b in batches]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=60), mode=st.sampled_from(["none", "safedpo",
       "drop-both-unsafe"]), batch_size=st.integers(1, 9))
def test_pair_modes_keep_what_the_counts_say(tmp_path_factory, lengths, mode, batch_size):
    from bso_cache.data.pairs import count_pairs, epoch_batches

    cache = fake_cache(tmp_path_factory.mktemp("fake"), lengths, 7)
    counts = count_pairs(cache, mode, "better")
    items = [it for b in epoch_batches(cache, mode=mode, orientation="better", batch_size=batch_size, seed=0,
                                       epoch=0) for it in b]
    assert len(items) == counts.kept and counts.kept + counts.dropped == len(lengths)
    if mode == "safedpo":  # after the transform no kept pair has an unsafe chosen and a safe rejected
        assert not any(it.chosen_unsafe == 1.0 and it.rejected_unsafe == 0.0 for it in items)
    if mode != "none":
        assert not any(it.chosen_unsafe == 1.0 and it.rejected_unsafe == 1.0 for it in items)
