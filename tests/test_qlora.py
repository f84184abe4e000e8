"""QLoRA (`--load-in-4bit`): the 4-bit NF4 reference scores the cache, the policy trains adapters on
the same 4-bit base, and the saved model is the trained function de-quantized."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bso_cache import schemas as S
from bso_cache.cache import Cache
from bso_cache.errors import ConfigError

from .conftest import read_jsonl, train_run

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

DPO = dict(generator="logistic", safety_penalty=0.0, pairs="none", optimizer="adamw", lr=1e-2, batch_size=8,
           shuffle=False)


@pytest.fixture(scope="module")
def nf4_cache(demo_assets, tmp_path_factory):
    from bso_cache.cache.build import build_cache
    from bso_cache.config import BuildConfig

    out = tmp_path_factory.mktemp("nf4") / "cache"
    build_cache(BuildConfig(model=str(demo_assets["model"]), data=str(demo_assets["train"]), out=str(out),
                            max_length=128, batch_size=8, rows_per_shard=40, load_in_4bit=True, progress=False),
                log=lambda s: None)
    return out


def independent_logps(model, rows) -> list[tuple[float, float]]:
    """Summed response log-probs from the full logits, one sequence at a time, in float64 sums.
    Train mode under no_grad: bitsandbytes' de-quantizing path (no dropout in these models)."""
    model.train()
    out = []
    with torch.no_grad():
        for r in rows:
            sums = []
            for resp in (r[S.CHOSEN_IDS], r[S.REJECTED_IDS]):
                ids = torch.tensor([r[S.PROMPT_IDS] + resp])
                logp = model(ids).logits.float().log_softmax(-1)[0, :-1]
                n = len(r[S.PROMPT_IDS])
                sums.append(float(logp[n - 1:].gather(1, ids[0, n:, None]).double().sum()))
            out.append(tuple(sums))
    return out


def nf4_model(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(path), quantization_config=q, device_map={"": "cpu"},
                                                dtype=torch.float32)


def first_rows(cache_dir, n=6):
    return next(Cache.open(cache_dir).iter_batches(list(S.COLUMNS))).to_pylist()[:n]


def test_the_4bit_cache_holds_the_4bit_references_log_probs(demo_assets, demo_cache, nf4_cache):
    manifest = json.loads((nf4_cache / S.MANIFEST_NAME).read_text())
    assert manifest["reference_pass"]["quantization"] == "nf4"
    rows = first_rows(nf4_cache)
    want = independent_logps(nf4_model(demo_assets["model"]), rows)
    for r, (c, rej) in zip(rows, want):
        assert r[S.REF_CHOSEN_LOGP] == pytest.approx(c, abs=1e-3) and r[S.REF_REJECTED_LOGP] == pytest.approx(rej, abs=1e-3)
    # and they are not the full-precision reference's: the quantization is real
    full = {r[S.PAIR_ID]: r for r in first_rows(demo_cache, 40)}
    gaps = [abs(r[S.REF_CHOSEN_LOGP] - full[r[S.PAIR_ID]][S.REF_CHOSEN_LOGP]) for r in rows]
    assert max(gaps) > 0.01, gaps


def test_qlora_starts_at_its_reference_learns_and_saves_the_trained_function(demo_assets, nf4_cache, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = tmp_path / "r"
    summary = train_run(nf4_cache, run, load_in_4bit=True, lora_r=4, lora_alpha=8, max_steps=6,
                        eval_cache=str(nf4_cache), **DPO)
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # the policy is its 4-bit reference at step 0
    assert losses[-1] < losses[0] - 0.05, losses
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    # the saved model: ordinary float weights, loadable without bitsandbytes' config, equal to the
    # 4-bit base with the saved adapters (the function that was trained)
    config = json.loads((run / "config.json").read_text())
    assert "quantization_config" not in config
    saved = AutoModelForCausalLM.from_pretrained(str(run), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in saved.parameters())
    trained = PeftModel.from_pretrained(nf4_model(demo_assets["model"]), str(run / "adapter"))
    rows = first_rows(nf4_cache)
    for a, b in zip(independent_logps(saved, rows), independent_logps(trained, rows)):
        assert a == pytest.approx(b, abs=1e-3)
    moved = independent_logps(saved, rows)
    assert max(abs(m[0] - r[S.REF_CHOSEN_LOGP]) for m, r in zip(moved, rows)) > 0.01  # it did train
    # the run's own evaluation (of the 4-bit model as trained, before the merge) is the saved model's
    from bso_cache.reporting.evaluate import evaluate_cache

    again = evaluate_cache(saved, Cache.open(nf4_cache), batch_size=8)
    assert summary["eval"]["pairs"] == again["pairs"] == 96
    assert summary["eval"]["mean_margin"] == pytest.approx(again["mean_margin"], abs=1e-4)


def test_qlora_resumes_exactly_from_a_checkpoint_of_its_adapters(nf4_cache, tmp_path):
    kw = dict(load_in_4bit=True, lora_r=4, max_steps=6, save_every=3, warmup_ratio=0.2, **DPO)
    train_run(nf4_cache, tmp_path / "full", **kw)
    part = tmp_path / "part"
    train_run(nf4_cache, part, **kw)
    for f in ("model.safetensors", "summary.json"):
        (part / f).unlink()
    from safetensors.torch import load_file

    ckpt = load_file(str(part / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)  # the frozen 4-bit base is not copied into checkpoints
    train_run(nf4_cache, part, **kw, resume=True)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_and_a_policy_of_other_quantizations_are_refused(demo_cache, nf4_cache, tmp_path):
    with pytest.raises(ConfigError, match="build the cache with `bso-cache build --load-in-4bit`"):
        train_run(demo_cache, tmp_path / "a", load_in_4bit=True, lora_r=4, max_steps=1)
    with pytest.raises(ConfigError, match="scored by the 4-bit .nf4. reference; train QLoRA on it"):
        train_run(nf4_cache, tmp_path / "b", lora_r=4, max_steps=1)
    with pytest.raises(ConfigError, match="scored by the 4-bit"):
        train_run(nf4_cache, tmp_path / "c", max_steps=1)
    with pytest.raises(ConfigError, match="--eval-cache .*build the cache with"):
        train_run(nf4_cache, tmp_path / "d", load_in_4bit=True, lora_r=4, max_steps=1, eval_cache=str(demo_cache))
    with pytest.raises(ConfigError, match="4-bit weights are not trained directly.*--lora-r"):
        train_run(nf4_cache, tmp_path / "e", load_in_4bit=True, max_steps=1)
    with pytest.raises(ConfigError, match="GGUF"):
        train_run(nf4_cache, tmp_path / "f", load_in_4bit=True, lora_r=4, gguf_file="m.gguf")
    assert not any((tmp_path / n).exists() and any((tmp_path / n).iterdir()) for n in "abcdef")


@pytest.mark.parametrize("missing", ["bitsandbytes", "peft", "accelerate"])
def test_a_missing_qlora_library_is_one_line_before_any_model_loads(demo_assets, nf4_cache, tmp_path, monkeypatch,
                                                                    missing, model_loads):
    import importlib.util

    from bso_cache.cache.build import build_cache
    from bso_cache.config import BuildConfig
    from bso_cache.training.preflight import check_build

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(ConfigError, match=rf"--load-in-4bit needs {missing}: pip install 'bso-cache\[qlora\]'"):
        train_run(nf4_cache, tmp_path / "r", load_in_4bit=True, lora_r=4)
    build = BuildConfig(model=str(demo_assets["model"]), data=str(demo_assets["train"]), out=str(tmp_path / "c"),
                        load_in_4bit=True)  # values only: the packages are the preflight's (build_cache's first step)
    if missing == "peft":  # a build scores with the 4-bit model alone: no adapters
        check_build(build)
    else:
        with pytest.raises(ConfigError, match=rf"needs {missing}"):
            build_cache(build, log=lambda s: None)
    assert model_loads == [] and not (tmp_path / "c").exists()


def test_qlora_under_torchrun_equals_one_process(nf4_cache, tmp_path):
    """DDP over the adapters of a 4-bit base (gloo, 2 ranks) equals 1 process with --grad-accum 2."""
    from .test_distributed import torchrun, weights_close

    train_run(nf4_cache, tmp_path / "one", load_in_4bit=True, lora_r=4, max_steps=3, grad_accum=2, **DPO)
    torchrun("train", "--cache", nf4_cache, "--out", tmp_path / "two", "--load-in-4bit", "--lora-r", 4,
             "--max-steps", 3, "--generator", "logistic", "--safety-penalty", 0, "--pairs", "none",
             "--optimizer", "adamw", "--lr", 1e-2, "--batch-size", 8, "--no-shuffle", "--no-progress")
    weights_close(tmp_path / "one", tmp_path / "two")


def test_eval_of_the_reference_on_a_4bit_cache_needs_the_4bit_model(demo_assets, nf4_cache, tmp_path):
    """The model files are the cache's reference, but the cache holds its 4-bit version's
    log-probs: evaluated in full precision its margins would be quantization noise called rewards."""
    from .conftest import cli_in_process, one_line_error

    one_line_error(cli_in_process("eval", "--model", demo_assets["model"], "--cache", nf4_cache, check=False),
                   "scored by the 4-bit (nf4) version", "--load-in-4bit")
    res = json.loads(cli_in_process("eval", "--model", demo_assets["model"], "--cache", nf4_cache, "--load-in-4bit",
                                    "--json", "--no-progress").stdout)
    assert res["reference"]["relation"] == "the model itself" and abs(res["mean_margin"]) < 1e-4
