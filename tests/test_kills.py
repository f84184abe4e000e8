"""Builds and trainings killed at any moment (SIGKILL) resume to exactly what an unkilled run makes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bso_cache import schemas as S
from bso_cache.cache import Cache

from .conftest import ENV


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
    from bso_cache.reporting.demo import synthetic_rows, write_jsonl

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
    from bso_cache.training.train import train

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
