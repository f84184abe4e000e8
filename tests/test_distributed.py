"""torchrun on the CPU (gloo, two processes): the same cache and the same training as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from .test_reliability import compare_caches

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=2):
    exe = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [exe, "--standalone", "--nproc-per-node", str(nproc), "-m", "bso_cache", *map(str, args)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def test_torchrun_build_equals_one_process(demo_assets, demo_cache, tmp_path):
    out = tmp_path / "c2"
    torchrun("build", "--model", demo_assets["model"], "--data", demo_assets["train"], "--out", out,
             "--max-length", 128, "--batch-size", 8, "--rows-per-shard", 40, "--no-progress")
    compare_caches(demo_cache, out)
    m = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in m["shards"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not list(out.glob("part-*.json")) and not (out / "build.json").exists()


def test_torchrun_train_equals_one_process_with_accumulation(demo_cache, tmp_path):
    from safetensors.torch import load_file

    from bso_cache.config import TrainConfig
    from bso_cache.train import train

    args = dict(generator="sba", optimizer="sgd", lr=1e-2, batch_size=8, max_steps=4, lr_schedule="constant",
                warmup_ratio=0.0, seed=0)
    train(TrainConfig(cache=str(demo_cache), out=str(tmp_path / "one"), grad_accum=2, progress=False, **args),
          log=lambda s: None)
    flags = [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", v)]
    torchrun("train", "--cache", demo_cache, "--out", tmp_path / "two", *flags, "--save-every", 2, "--no-progress")
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    # logged once, over the pairs of all ranks
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["pairs"] for r in rows] == [r["pairs"] for r in one]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-4 * max(1.0, abs(x["loss"])) for x, y in zip(one, rows))
    # resume across ranks from the step-2 checkpoint
    (tmp_path / "two" / "summary.json").unlink()
    torchrun("train", "--cache", demo_cache, "--out", tmp_path / "two", *flags, "--save-every", 2, "--no-progress",
             "--resume")
    c = load_file(str(tmp_path / "two" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], c[k], atol=1e-5), k
