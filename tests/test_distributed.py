"""torchrun on the CPU (gloo, two processes): the same cache and the same training as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

from bso_cache import schemas as S

from .test_kills import compare_caches

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
    m = json.loads((out / S.MANIFEST_NAME).read_text())
    assert [s["file"] for s in m["shards"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert not list(out.glob("part-*.json")) and not (out / "build.json").exists()
    # without --rows-per-shard the layout does not depend on the number of ranks: the same shards
    from bso_cache.cache.build import build_cache
    from bso_cache.config import BuildConfig

    common = dict(model=str(demo_assets["model"]), data=str(demo_assets["train"]), max_length=128, batch_size=8)
    one = build_cache(BuildConfig(out=str(tmp_path / "one"), progress=False, **common), log=lambda s: None)
    torchrun("build", *[x for k, v in common.items() for x in (f"--{k.replace('_', '-')}", v)],
             "--out", tmp_path / "two", "--no-progress")
    two = json.loads((tmp_path / "two" / S.MANIFEST_NAME).read_text())
    assert two["layout"] == one.layout and [s["rows"] for s in two["shards"]] == [s.rows for s in one.shards]
    compare_caches(tmp_path / "one", tmp_path / "two")


def weights_close(a_dir, b_dir, atol=1e-5):
    from safetensors.torch import load_file

    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), k


def two_ranks_vs_one(demo_cache, tmp_path, name, optimizer, *extra):
    """Train 4 steps on 2 ranks (with a checkpoint at 2) and on 1 process with --grad-accum 2;
    the weights agree; then resume the 2-rank run from its checkpoint and agree again."""
    from bso_cache.config import TrainConfig
    from bso_cache.training.train import train

    args = dict(generator="sba", optimizer=optimizer, lr=1e-2 if optimizer == "sgd" else 1e-3, batch_size=8,
                max_steps=4, lr_schedule="constant", warmup_ratio=0.0, seed=0)
    train(TrainConfig(cache=str(demo_cache), out=str(tmp_path / "one"), grad_accum=2, progress=False, **args),
          log=lambda s: None)
    flags = [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", v)]
    cmd = ["train", "--cache", demo_cache, "--out", tmp_path / name, *flags, *extra, "--save-every", 2, "--no-progress"]
    proc = torchrun(*cmd)
    assert proc.stdout.count("trained 4 steps") == 1, proc.stdout  # the summary line once, not once per rank
    weights_close(tmp_path / "one", tmp_path / name)
    (tmp_path / name / "summary.json").unlink()
    torchrun(*cmd, "--resume")
    weights_close(tmp_path / "one", tmp_path / name)
    return tmp_path / "one", tmp_path / name


def test_torchrun_train_equals_one_process_with_accumulation(demo_cache, tmp_path):
    one, two = two_ranks_vs_one(demo_cache, tmp_path, "ddp", "sgd")
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    # logged once, over the pairs of all ranks
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["pairs"] for r in rows] == [r["pairs"] for r in ref]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-4 * max(1.0, abs(x["loss"])) for x, y in zip(ref, rows))


def test_torchrun_fsdp_train_and_resume(demo_cache, tmp_path):
    two_ranks_vs_one(demo_cache, tmp_path, "fsdp", "adamw", "--fsdp")


def test_torchrun_8bit_states_train_and_resume(demo_cache, tmp_path):
    """bitsandbytes' 8-bit RMSprop under DDP: 2 ranks equal 1 process with --grad-accum 2, also
    after resuming the 2-rank run from its checkpoint."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    two_ranks_vs_one(demo_cache, tmp_path, "ddp8", "rmsprop8bit")
