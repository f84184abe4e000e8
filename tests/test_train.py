"""`bso-cache train`: the policy alone, step-0 check, learning, resume, refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from bso_cache.config import TrainConfig
from bso_cache.errors import ConfigError, MismatchError
from bso_cache.training.train import train

from .conftest import read_jsonl, train_run


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_lr0_logistic_is_log2_every_step_on_pku(pku_cache, tmp_path):
    summary = train_run(pku_cache, tmp_path / "r", generator="logistic", safety_penalty=0.0, lr=0.0,
                  max_steps=3, batch_size=4)
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert abs(r["loss"] - math.log(2)) < 1e-4
    assert summary["step0"]["policy_is_reference"] and summary["step0"]["max_abs_diff"] < 1e-3


def test_sba_run_loads_one_model_and_weights_move(pku_cache, tinystories, tmp_path, model_loads):
    from transformers import AutoModelForCausalLM

    train_run(pku_cache, tmp_path / "r", generator="sba", safety_penalty=30.0, lr=1e-3, max_steps=8, batch_size=4,
        optimizer="adamw")
    # the policy, once (from the folder the build resolved); never a reference
    assert [Path(p).resolve() for p in model_loads] == [Path(tinystories).resolve()]
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert len(rows) == 8 and all(math.isfinite(r["loss"]) for r in rows)
    for key in ("step", "loss", "chosen_rewards", "rejected_rewards", "margin", "preference_accuracy",
                "safety_accuracy", "u_mean", "clamped_fraction", "lr", "grad_norm", "tokens_per_s"):
        assert key in rows[0]
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "r"))
    original = AutoModelForCausalLM.from_pretrained(str(tinystories))
    ref = dict(original.named_parameters())
    for name, p in trained.named_parameters():
        assert not torch.equal(p, ref[name]), f"{name} did not move"
    cfg = json.loads((tmp_path / "r" / "run_config.json").read_text())
    assert cfg["config"]["generator"] == "sba" and cfg["loss"]["clamp_upper"] == 30.0


def test_loss_falls_on_learnable_data(demo_cache, tmp_path):
    train_run(demo_cache, tmp_path / "r", generator="logistic", safety_penalty=0.0, pairs="none",
        optimizer="adamw", lr=3e-3, lr_schedule="constant", warmup_ratio=0.0, batch_size=16, max_steps=25,
        epochs=10)
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 0: policy = reference
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.5 * math.log(2)
    assert rows[-1]["preference_accuracy"] > 0.8


def test_tokenizer_mismatch_is_refused(demo_cache, tinystories, tmp_path, model_loads):
    with pytest.raises(MismatchError, match="tokenizer.*tinystories-260k.*not the tokenizer"):
        train_run(demo_cache, tmp_path / "r", policy=str(tinystories), max_steps=1)
    assert model_loads == []  # refused before any model loaded


def test_step0_check_catches_a_wrong_cache(demo_cache, tmp_path):
    """A cache whose log-probs are not the reference's (here: shifted) stops training at step 0."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from bso_cache import schemas as S
    from bso_cache.hashing import file_sha256

    bad = tmp_path / "bad"
    shutil.copytree(demo_cache, bad)
    manifest = json.loads((bad / S.MANIFEST_NAME).read_text())
    for shard in manifest["shards"]:
        path = bad / shard["file"]
        table = pq.read_table(path)
        col = table.schema.get_field_index(S.REF_CHOSEN_LOGP)
        # the same schema (non-nullable), other numbers
        table = table.set_column(col, table.schema.field(col), pc.add(table[S.REF_CHOSEN_LOGP], 0.5))
        pq.write_table(table, path)
        shard["sha256"], shard["bytes"] = file_sha256(path), path.stat().st_size
    manifest["digest"] = S.manifest_digest(manifest)  # a consistent forgery: only step 0 can tell
    (bad / S.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(MismatchError, match="step-0 check failed.*other weights"):
        train_run(bad, tmp_path / "r", max_steps=2, batch_size=4)


def test_other_policy_weights_are_allowed_and_reported(demo_assets, demo_cache, tmp_path):
    from .conftest import perturbed_copy

    other = perturbed_copy(demo_assets["model"], tmp_path / "other")
    summary = train_run(demo_cache, tmp_path / "r", policy=str(other), max_steps=2, batch_size=4)
    assert not summary["step0"]["policy_is_reference"] and summary["step0"]["max_abs_diff"] > 0.05


def test_resume_matches_an_uninterrupted_run(demo_cache, tmp_path):
    kw = dict(generator="sba", optimizer="adamw", lr=1e-3, batch_size=8, max_steps=6, seed=0, save_every=3,
              shuffle_buffer=32, warmup_ratio=0.2)
    train_run(demo_cache, tmp_path / "full", **kw)
    train_run(demo_cache, tmp_path / "part", **{**kw, "save_every": 3})
    # pretend the second run died after its step-3 checkpoint: drop everything after it
    part = tmp_path / "part"
    for f in ("model.safetensors", "summary.json"):
        (part / f).unlink()
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-00000003"]
    train_run(demo_cache, part, **{**kw, "resume": True})
    a, b = weights(tmp_path / "full"), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [r["step"] for r in read_jsonl(part / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_out_folder_is_not_clobbered(demo_cache, tmp_path):
    train_run(demo_cache, tmp_path / "r", max_steps=1, batch_size=4)
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        train_run(demo_cache, tmp_path / "r", max_steps=1, batch_size=4)


def test_pair_handling_counts(pku_cache):
    from bso_cache.cache import Cache
    from bso_cache.data.pairs import count_pairs

    cache = Cache.open(pku_cache)
    none = count_pairs(cache, "none", "better")
    safedpo = count_pairs(cache, "safedpo", "better")
    safer = count_pairs(cache, "none", "safer")
    both = count_pairs(cache, "drop-both-unsafe", "better")
    assert none.kept == none.total == cache.num_pairs and none.swapped == 0
    assert safedpo.dropped == both.dropped == safedpo.reasons["both_unsafe"] > 0
    assert safedpo.swapped == safedpo.reasons["safedpo_swapped"] > 0
    assert safer.swapped == safer.reasons["oriented_safer"] > 0


def test_every_pair_once_per_epoch(demo_cache):
    from bso_cache.cache import Cache
    from bso_cache.data.pairs import epoch_batches

    cache = Cache.open(demo_cache)
    for bs in (1, 5, 16):
        seen = [it.source_index for b in epoch_batches(cache, mode="none", orientation="better", batch_size=bs,
                                                        seed=1, epoch=0, shuffle_buffer=7, bucket_batches=2)
                for it in b]
        assert sorted(seen) == list(range(cache.num_pairs))


def test_divergence_stops_with_a_clear_error(demo_cache, tmp_path):
    from bso_cache.errors import TrainingError

    with pytest.raises(TrainingError, match="not finite.*lower --lr"):
        train_run(demo_cache, tmp_path / "r", generator="kliep", optimizer="sgd", lr=1e6, grad_clip=0.0, max_steps=20,
            batch_size=8, lr_schedule="constant", warmup_ratio=0.0)


def test_overwrite_removes_only_what_a_run_wrote(demo_cache, tmp_path):
    """--overwrite replaces a run folder; a folder holding a file of the user's is refused, file kept."""
    out = tmp_path / "r"
    train_run(demo_cache, out, max_steps=1, batch_size=4)
    summary = json.loads((out / "summary.json").read_text())
    assert "model.safetensors" in summary["files"] and "config.json" in summary["files"]
    train_run(demo_cache, out, max_steps=1, batch_size=4, overwrite=True)  # a run folder: replaced
    assert (out / "model.safetensors").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt.*no training run wrote"):
        train_run(demo_cache, out, max_steps=1, batch_size=4, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match="data.csv"):
        train_run(demo_cache, other, max_steps=1, batch_size=4, overwrite=True)
    assert (other / "data.csv").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        train_run(demo_cache, afile, max_steps=1, batch_size=4)


def test_the_log_and_summary_say_which_bound_ends_the_run(demo_cache, tmp_path):
    """96 pairs at batch 64: 2 steps an epoch. --max-steps 1000 with --epochs 1 runs 2 steps and
    says that --epochs ended it; the step size logged is the real one (the data holds fewer pairs
    than a batch of 128)."""
    lines = []
    cfg = dict(cache=str(demo_cache), out=str(tmp_path / "a"), progress=False, batch_size=64, epochs=1,
               max_steps=1000, lr=0.0)
    summary = train(TrainConfig(**cfg), log=lines.append)
    assert summary["steps"] == 2 and summary["stopped_by"] == "epochs"
    assert any("--epochs 1 ends the run before --max-steps 1000" in ln for ln in lines), lines
    lines.clear()
    summary = train(TrainConfig(**{**cfg, "out": str(tmp_path / "b"), "max_steps": 1, "batch_size": 128, "epochs": 2}),
                    log=lines.append)
    assert summary["stopped_by"] == "max_steps"
    kept = summary["pairs"]["kept"]
    assert kept < 128 and any(f"1 steps of {kept} pairs" in ln and "--max-steps 1 ends the run" in ln
                              for ln in lines), lines


def test_no_shuffle_trains_in_cache_order_whatever_the_seed(demo_cache, tmp_path):
    from bso_cache.cache import Cache
    from bso_cache.config import TrainConfig
    from bso_cache.data.pairs import epoch_batches
    from bso_cache.training.train import Trainer

    order = [it.source_index for b in epoch_batches(Cache.open(demo_cache), mode="none", orientation="better",
                                                    batch_size=10**6, seed=0, epoch=0, shuffle=False) for it in b]
    assert order == sorted(order)
    seen = {}
    for seed in (0, 1):
        trainer = Trainer(TrainConfig(cache=str(demo_cache), out=str(tmp_path / f"s{seed}"), pairs="none",
                                      shuffle=False, seed=seed, batch_size=8, max_steps=3, progress=False),
                          log=lambda s: None)
        trainer._open_caches()
        steps = trainer._step_batches()
        seen[seed] = [[it.source_index for it in next(steps)[2]] for _ in range(3)]
    assert seen[0] == seen[1] == [order[0:8], order[8:16], order[16:24]]
