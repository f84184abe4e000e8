"""Reliability: killed builds and trainings resume exactly; property tests of readers and batching."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bso_cache import schemas as S
from bso_cache.cache import Cache, empty_columns, write_shard
from bso_cache.files import atomic_write_json

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bso_cache", *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> bool:
    """SIGKILL `proc` as soon as `ready()` holds; False if it finished first."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timed out")


def shard_rows(cache_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p) for p in Cache.open(cache_dir).shards]).to_pylist()


def compare_caches(a, b, tol=1e-4):
    ra, rb = shard_rows(a), shard_rows(b)
    assert len(ra) == len(rb) and len({r[S.PAIR_ID] for r in ra}) == len(ra)
    for x, y in zip(ra, rb):
        for k in (S.PAIR_ID, S.SOURCE_INDEX, S.PROMPT_IDS, S.CHOSEN_IDS, S.REJECTED_IDS):
            assert x[k] == y[k]
        assert abs(x[S.REF_CHOSEN_LOGP] - y[S.REF_CHOSEN_LOGP]) <= tol
        assert abs(x[S.REF_REJECTED_LOGP] - y[S.REF_REJECTED_LOGP]) <= tol
    ma = json.loads((Path(a) / S.MANIFEST_NAME).read_text())
    mb = json.loads((Path(b) / S.MANIFEST_NAME).read_text())
    assert ma["rows"] == mb["rows"]


def killed_build(args, out: Path, kill_after_shards: list[int]) -> int:
    kills = 0
    for k in kill_after_shards:
        proc = start("build", *args, "--out", out)
        if kill_when(proc, lambda: len(list(out.glob("part-*.json"))) >= k):
            kills += 1
            assert not (out / S.MANIFEST_NAME).exists()
    proc = start("build", *args, "--out", out)
    assert proc.wait() == 0, proc.stderr.read()
    return kills


def test_build_killed_repeatedly_resumes_to_the_clean_cache(demo_assets, tmp_path):
    from bso_cache.demo import synthetic_rows, write_jsonl

    data = write_jsonl(synthetic_rows(240, seed=5), tmp_path / "data.jsonl")
    args = ["--model", demo_assets["model"], "--data", data, "--max-length", 128, "--rows-per-shard", 20,
            "--batch-size", 1, "--no-progress"]
    clean = tmp_path / "clean"
    assert start("build", *args, "--out", clean).wait() == 0
    kills = killed_build(args, tmp_path / "killed", [2, 5, 9])
    assert kills >= 2
    compare_caches(clean, tmp_path / "killed", tol=0.0)  # same batch size: bit-identical numbers


@pytest.mark.slow
def test_pku_build_killed_at_random_moments(pku_path, tinystories, tmp_path):
    """The reliability issue's check: PKU 500 rows, tinystories, --rows-per-shard 50, several kills."""
    import random

    args = ["--model", tinystories, "--data", pku_path, "--max-length", 512, "--rows-per-shard", 50, "--no-progress"]
    clean = tmp_path / "clean"
    assert start("build", *args, "--out", clean).wait() == 0
    rng = random.Random(0)
    out = tmp_path / "killed"
    kills = 0
    for k in sorted(rng.sample(range(1, 10), 4)):  # after k shards, plus a random part of the next one
        proc = start("build", *args, "--out", out)
        delay = rng.uniform(0.0, 0.8)
        seen = {}

        def ready():
            if len(list(out.glob("part-*.json"))) >= k:
                seen.setdefault("t", time.time())
                return time.time() - seen["t"] >= delay
            return False

        if kill_when(proc, ready):
            kills += 1
    assert start("build", *args, "--out", out).wait() == 0
    assert kills >= 3
    compare_caches(clean, out)


def test_training_killed_after_a_checkpoint_resumes_exactly(demo_cache, tmp_path):
    from safetensors.torch import load_file

    from bso_cache.config import TrainConfig
    from bso_cache.train import train

    kw = dict(generator="sba", optimizer="adamw", lr=1e-3, batch_size=8, max_steps=30, seed=0, save_every=5,
              shuffle_buffer=32)
    train(TrainConfig(cache=str(demo_cache), out=str(tmp_path / "full"), progress=False, **kw), log=lambda s: None)
    args = ["train", "--cache", demo_cache, "--out", tmp_path / "killed", "--generator", "sba", "--optimizer",
            "adamw", "--lr", 1e-3, "--batch-size", 8, "--max-steps", 30, "--seed", 0, "--save-every", 5,
            "--shuffle-buffer", 32, "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "bso_cache", *map(str, args)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ck = tmp_path / "killed" / "checkpoints"
    assert kill_when(proc, lambda: ck.exists() and any(p.name == "step-00000005" for p in ck.iterdir())), \
        "training finished before it could be killed"
    assert not (tmp_path / "killed" / "summary.json").exists()
    proc = subprocess.Popen([sys.executable, "-m", "bso_cache", *map(str, args), "--resume"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.wait() == 0, proc.stderr.read()
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))


def test_missing_and_truncated_shards_are_named(demo_cache, tmp_path):
    import shutil

    from bso_cache.errors import CacheError

    copy = tmp_path / "c"
    shutil.copytree(demo_cache, copy)
    p = copy / "part-00001.parquet"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CacheError, match="part-00001.parquet: size"):
        Cache.open(copy)
    p.unlink()
    with pytest.raises(CacheError, match="part-00001.parquet: shard listed in the manifest is missing"):
        Cache.open(copy)


# --- property-based tests ---------------------------------------------------------------------

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
    from bso_cache.pairs import epoch_batches

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
    from bso_cache.pairs import count_pairs, epoch_batches

    cache = fake_cache(tmp_path_factory.mktemp("fake"), lengths, 7)
    counts = count_pairs(cache, mode, "better")
    items = [it for b in epoch_batches(cache, mode=mode, orientation="better", batch_size=batch_size, seed=0,
                                       epoch=0) for it in b]
    assert len(items) == counts.kept and counts.kept + counts.dropped == len(lengths)
    if mode == "safedpo":  # after the transform no kept pair has an unsafe chosen and a safe rejected
        assert not any(it.chosen_unsafe == 1.0 and it.rejected_unsafe == 0.0 for it in items)
    if mode != "none":
        assert not any(it.chosen_unsafe == 1.0 and it.rejected_unsafe == 1.0 for it in items)


text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(text, text, text, st.sampled_from([None, True, False]),
                               st.sampled_from([None, True, False])), min_size=1, max_size=15),
       suffix=st.sampled_from(["jsonl", "parquet", "json"]))
def test_generic_reader_round_trip(tmp_path_factory, rows, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bso_cache.formats import Normaliser
    from bso_cache.sources import open_source
    from bso_cache.errors import DataError

    records = [{"prompt": p, "chosen": c, "rejected": r, "chosen_unsafe": cu, "rejected_unsafe": ru}
               for p, c, r, cu, ru in rows]
    path = tmp_path_factory.mktemp("rows") / f"d.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif suffix == "json":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    norm = Normaliser()
    raws = list(open_source(str(path)).rows())
    assert len(raws) == len(records)  # every row is read back, none lost or invented
    for i, raw in enumerate(raws):
        rec = records[i]
        if rec["chosen"] == rec["rejected"]:
            with pytest.raises(DataError, match="identical"):
                norm(raw, i)
            continue
        pair = norm(raw, i)
        assert pair.prompt == (("user", rec["prompt"]),)
        assert (pair.chosen, pair.rejected) == (rec["chosen"], rec["rejected"])
        assert (pair.chosen_unsafe, pair.rejected_unsafe) == (rec["chosen_unsafe"], rec["rejected_unsafe"])
