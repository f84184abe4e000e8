"""One cache, many runs: sweep, eval (cached and generation-based), report, verify."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from bso_cache.cache import Cache
from bso_cache.config import SweepConfig
from bso_cache.errors import ConfigError
from bso_cache.training.sweep import parse_grid, plan_runs, run_sweep

from .conftest import cli_in_process, one_line_error


def is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def independent_accuracies(model_dir, cache_dir):
    """preference/safety accuracy recomputed from the cache with the naive full-logit forward."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    cache = Cache.open(cache_dir)
    correct = n = safe_ok = differs = 0
    for shard in cache.shards:
        for r in pq.read_table(shard).to_pylist():
            rewards = []
            for ids, ref in (("chosen_ids", "ref_chosen_logp"), ("rejected_ids", "ref_rejected_logp")):
                seq = torch.tensor([r["prompt_ids"] + r[ids]])
                with torch.no_grad():
                    lp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
                tok = lp.gather(1, seq[0, 1:, None]).squeeze(1)[len(r["prompt_ids"]) - 1:]
                rewards.append(tok.double().sum().item() - r[ref])
            n += 1
            correct += rewards[0] > rewards[1]
            cu, ru = r["chosen_unsafe"], r["rejected_unsafe"]
            if cu is not None and ru is not None and cu != ru:
                differs += 1
                safe_ok += (rewards[0] > rewards[1]) if not cu else (rewards[1] > rewards[0])
    return correct / n, safe_ok / differs


def test_grid_parsing_and_planning():
    grid = parse_grid({"generator": "logistic,sba", "beta": "0.05,0.1", "seed": "0"})
    assert grid == {"generator": ["logistic", "sba"], "beta": [0.05, 0.1], "seed": [0]}
    runs = plan_runs(grid, [])
    assert len(runs) == 4 and runs[0][0] == "generator-logistic_beta-0.05"
    only_baselines = plan_runs(parse_grid({"seed": "0,1"}), ["dpo-helpful", "bso"])
    assert [n for n, _ in only_baselines] == ["baseline-dpo-helpful_seed-0", "baseline-dpo-helpful_seed-1",
                                              "baseline-bso_seed-0", "baseline-bso_seed-1"]
    assert only_baselines[0][1]["safety_penalty"] == 0.0 and only_baselines[2][1]["generator"] == "sba"
    with pytest.raises(ConfigError, match="cannot read"):
        parse_grid({"beta": "a,b"})
    with pytest.raises(ConfigError, match="unknown baseline"):
        plan_runs({}, ["ppo"])


def test_sweep_on_pku_then_eval_matches_independent_computation(pku_cache, tmp_path, model_loads):
    out = tmp_path / "sweep"
    grid = parse_grid({"generator": "logistic,kliep,sba", "max_steps": "4", "batch_size": "4"})
    lines = []
    run_sweep(SweepConfig(cache=str(pku_cache), out=str(out)), grid, [],
              {"progress": False, "lr": 1e-3, "optimizer": "adamw"}, log=lines.append)
    assert len(model_loads) == 3  # one policy per run, never the reference
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    # each run's figures as it finishes, equal to the summary's
    done = [ln for ln in lines if ": 4 steps, loss " in ln]
    assert [ln.split(":")[0] for ln in done] == ["[1/3] generator-logistic", "[2/3] generator-kliep", "[3/3] generator-sba"]
    assert all(f"loss {float(r['train_loss']):.4g};" in ln for r, ln in zip(table, done)), (done, table)
    assert [r["run"] for r in table] == ["generator-logistic", "generator-kliep", "generator-sba"]
    assert all(math.isfinite(float(r["train_loss"])) for r in table)
    assert is_png(out / "loss_curves.png") and is_png(out / "tradeoff.png")
    assert json.loads((out / "summary.json").read_text())[0]["run"] == "generator-logistic"
    # repeated: finished runs are skipped, no model loads
    model_loads.clear()
    run_sweep(SweepConfig(cache=str(pku_cache), out=str(out)), grid, [],
              {"progress": False, "lr": 1e-3, "optimizer": "adamw"}, log=lambda s: None, plots=False)
    assert model_loads == []
    # eval of one run's model equals the definitions computed independently
    from bso_cache.reporting.evaluate import evaluate_cache
    from bso_cache.models import load_model

    res = evaluate_cache(load_model(str(out / "generator-sba")), Cache.open(pku_cache), batch_size=8)
    pref, safe = independent_accuracies(out / "generator-sba", pku_cache)
    assert abs(res["preference_accuracy"] - pref) < 0.01 and abs(res["safety_accuracy"] - safe) < 0.01
    assert res["pairs"] == Cache.open(pku_cache).num_pairs


def test_eval_cli_json_and_generation_with_tiny_classifiers(demo_assets, demo_cache, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(demo_assets["model"]))
    for name, seed in (("cost", 1), ("reward", 2)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
        LlamaForSequenceClassification(cfg).save_pretrained(str(tmp_path / name))
        tok.save_pretrained(str(tmp_path / name))
    out = tmp_path / "eval.json"
    proc = cli_in_process("eval", "--model", demo_assets["model"], "--cache", demo_cache, "--json", "--results", out,
               "--generate", "--cost-model", tmp_path / "cost", "--reward-model", tmp_path / "reward",
               "--max-prompts", 6, "--max-new-tokens", 8)
    res = json.loads(proc.stdout)
    n = Cache.open(demo_cache).num_pairs  # a progress bar of pairs on stderr, none with --no-progress
    assert "evaluating" in proc.stderr and f"{n}/{n}" in proc.stderr, proc.stderr
    quiet = cli_in_process("eval", "--model", demo_assets["model"], "--cache", demo_cache, "--json", "--no-progress")
    assert "evaluating" not in quiet.stderr and json.loads(quiet.stdout)["pairs"] == n
    # the reference itself: every margin is 0 up to the float32 noise of batching (which the float64
    # sums keep, so the sign of each margin, and the accuracy, is noise too)
    assert abs(res["mean_margin"]) < 1e-3
    assert all(abs(t["mean_margin"]) < 1e-3 for t in res["by_pair_type"].values())
    assert json.loads(out.read_text()) == res  # --results holds what stdout printed
    gen = res["generation"]
    lines = [json.loads(x) for x in open(gen["generations"])]
    assert gen["prompts"] == len(lines) == 6 and {"prompt", "response", "cost", "reward"} <= set(lines[0])
    # the summary is the per-generation scores' (harmless: cost <= 0), recomputed here
    assert gen["harmless_rate"] == sum(x["cost"] <= 0 for x in lines) / 6
    assert gen["mean_reward"] == pytest.approx(sum(x["reward"] for x in lines) / 6, rel=1e-12)
    # the prompt as the policy saw it, markers kept (the demo tokenizer's BOS), beside the classifiers' text
    from bso_cache.reporting.generation import cache_prompts

    first = cache_prompts(Cache.open(demo_cache), 6)[0]
    assert lines[0]["prompt_rendered"] == tok.decode(first) and tok.decode(first) != tok.decode(first, skip_special_tokens=True)
    assert lines[0]["prompt"] in lines[0]["prompt_rendered"]


def test_report_and_verify(demo_cache, tmp_path):
    from bso_cache.config import TrainConfig
    from bso_cache.reporting.report import plot_run
    from bso_cache.training.train import train
    from bso_cache.config import VerifyConfig
    from bso_cache.cache.verify import verify_cache

    train(TrainConfig(cache=str(demo_cache), out=str(tmp_path / "r"), max_steps=3, batch_size=4, progress=False),
          log=lambda s: None)
    files = plot_run(tmp_path / "r")
    assert all(is_png(f) for f in files)
    # as a person reads it: every panel has a y label, u apart from the fractions, the source said
    from bso_cache.reporting.report import read_metrics, run_figure

    fig = run_figure(read_metrics(tmp_path / "r"), "r")
    assert all(ax.get_ylabel() for ax in fig.axes)
    u_axes = [ax for ax in fig.axes if "u_mean" in [ln.get_label() for ln in ax.lines]]
    assert len(u_axes) == 1 and [ln.get_label() for ln in u_axes[0].lines] == ["u_mean"]
    assert "training metrics" in fig._suptitle.get_text()
    res = verify_cache(VerifyConfig(cache=str(demo_cache), sample=10), log=lambda s: None)
    assert res["checked"] == 10 and res["max_abs_diff"] < 1e-4


def test_tradeoff_plot_names_its_runs_its_source_and_its_pair_counts():
    from bso_cache.reporting.report import tradeoff_figure

    points = {f"run-{i}": {"preference_accuracy": 0.5, "safety_accuracy": 1.0, "pairs": 8, "safety_pairs": 3}
              for i in range(3)}  # three runs on one spot: labels on the points would overlap
    fig = tradeoff_figure(points, held_out=False)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == [f"run-{i}: 0.500 / 1.000 (3 safety pairs of 8)" for i in range(3)]
    assert not ax.texts  # no labels drawn on the points
    assert "not held out" in ax.get_title() and "--eval-cache" in ax.get_title()
    assert "held-out figures" in tradeoff_figure(points, held_out=True).axes[0].get_title()


def test_eval_never_gives_rewards_against_another_reference_silently(demo_assets, demo_cache, tmp_path):
    """The implicit reward is log pi - log pi_ref of the cache's reference. A run that started from
    other weights than that reference is refused (naming both) unless --allow-other-reference, and
    the result says which reference the numbers are relative to; train --eval-cache alike."""
    from bso_cache.cache.build import build_cache
    from bso_cache.config import BuildConfig

    from .conftest import perturbed_copy

    other = perturbed_copy(demo_assets["model"], tmp_path / "other-model")  # the same tokenizer, other weights
    other_cache = tmp_path / "other-cache"
    build_cache(BuildConfig(model=str(other), data=str(demo_assets["eval"]), out=str(other_cache), max_length=128,
                            batch_size=8, progress=False), log=lambda s: None)
    run = tmp_path / "run"
    cli_in_process("train", "--cache", demo_cache, "--out", run, "--max-steps", 1, "--batch-size", 4, "--no-progress")
    proc = cli_in_process("eval", "--model", run, "--cache", other_cache, check=False)
    one_line_error(proc, "was built with the reference", str(other), "--allow-other-reference")
    res = json.loads(cli_in_process("eval", "--model", run, "--cache", other_cache, "--allow-other-reference", "--json").stdout)
    assert res["reference"] == {"name_or_path": str(other), "relation": "another model (allowed)"}
    res = json.loads(cli_in_process("eval", "--model", run, "--cache", demo_cache, "--json").stdout)
    assert res["reference"]["relation"] == "the run's starting point"
    res = json.loads(cli_in_process("eval", "--model", demo_assets["model"], "--cache", demo_cache, "--json").stdout)
    assert res["reference"]["relation"] == "the model itself"
    args = ("train", "--cache", demo_cache, "--eval-cache", other_cache, "--max-steps", 1, "--batch-size", 4,
            "--no-progress")
    one_line_error(cli_in_process(*args, "--out", tmp_path / "r2", check=False), "--eval-cache", "was built with the reference")
    cli_in_process(*args, "--out", tmp_path / "r3", "--allow-other-reference")
    # --generate without a model to score the generations is refused before the evaluation runs
    one_line_error(cli_in_process("eval", "--model", run, "--cache", demo_cache, "--generate", "--results", tmp_path / "e.json",
                       check=False), "--generate needs --cost-model")
    assert not (tmp_path / "e.json").exists()


def test_eval_on_a_checkpoint_folder_says_what_to_use(demo_cache, tmp_path):
    cli_in_process("train", "--cache", demo_cache, "--out", tmp_path / "r", "--max-steps", 2, "--batch-size", 4,
        "--save-every", 1, "--no-progress")
    ckpt = next((tmp_path / "r" / "checkpoints").iterdir())
    one_line_error(cli_in_process("eval", "--model", ckpt, "--cache", demo_cache, check=False), "training checkpoint",
                   "--resume")


def test_json_results_are_strict_null_where_a_figure_does_not_exist(tinystories, hh_path, tmp_path):
    """HH pairs carry no safety labels: safety accuracy does not exist; JSON says null, not NaN."""
    rows = hh_path.read_text().splitlines()[:12]
    data = tmp_path / "hh.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cli_in_process("build", "--model", tinystories, "--data", data, "--out", tmp_path / "c", "--max-length", 512,
        "--no-progress")
    out = tmp_path / "eval.json"
    proc = cli_in_process("eval", "--model", tinystories, "--cache", tmp_path / "c", "--json", "--results", out)
    for text in (proc.stdout, out.read_text()):
        assert "NaN" not in text
        assert json.loads(text)["safety_accuracy"] is None
    assert "safety_accuracy n/a" in cli_in_process("eval", "--model", tinystories, "--cache", tmp_path / "c").stdout


def test_sweep_passes_every_train_option_through(demo_cache, tmp_path):
    cli_in_process("sweep", "--cache", demo_cache, "--out", tmp_path / "s", "--generator", "logistic,sba", "--max-steps", 1,
        "--batch-size", 4, "--grad-accum", 2, "--clamp-upper", 20, "--optimizer", "sgd")
    for run in ("generator-logistic", "generator-sba"):
        cfg = json.loads((tmp_path / "s" / run / "run_config.json").read_text())["config"]
        assert (cfg["grad_accum"], cfg["clamp_upper"], cfg["batch_size"]) == (2, 20.0, 4), run
    one_line_error(cli_in_process("sweep", "--cache", demo_cache, "--out", tmp_path / "s2", "--grad-acum", 2, check=False),
                   "sweep", "--grad-acum")


def test_loss_plots_scale_to_the_losses():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bso_cache.reporting.report import _loss_scale

    for values, scale in (([1e14, 2.0, 0.5], "log"), ([1e14, -3.0], "symlog"), ([0.69, 0.5], "linear")):
        fig, ax = plt.subplots()
        ax.plot(range(len(values)), values)
        _loss_scale(ax, values)
        assert ax.get_yscale() == scale, values
        plt.close(fig)


def test_a_sweep_holds_one_runs_model_at_a_time(demo_cache, tmp_path, monkeypatch):
    """Each run of a sweep starts from nothing: when a run starts, no parameter of an earlier run's
    model is alive (optimizer-in-backward's hooks once kept every run's model and states)."""
    import gc
    import weakref

    import bso_cache.training.train as train_module

    loaded, alive_at_load = [], []
    real = train_module.load_model

    def load_model(*args, **kw):
        gc.collect()
        alive_at_load.append(sum(r() is not None for r in loaded))
        model = real(*args, **kw)
        loaded.extend(weakref.ref(p) for p in model.parameters())
        return model

    monkeypatch.setattr(train_module, "load_model", load_model)
    grid = parse_grid({"lr": "1e-3,1e-4,1e-5", "max_steps": "1", "batch_size": "4"})
    run_sweep(SweepConfig(cache=str(demo_cache), out=str(tmp_path / "sweep")), grid, [],
              {"progress": False, "dtype": "bfloat16", "optimizer": "adamw", "optimizer_in_backward": True,
               "grad_clip": 0.0}, log=lambda s: None, plots=False)
    gc.collect()
    assert alive_at_load == [0, 0, 0] and sum(r() is not None for r in loaded) == 0
