"""Sweeps: failures, statuses, the Pareto front and the recommended run (sequential, fast), and the
Ray Tune backend (few, small: a local cluster on this machine's cores): the same runs as the
sequential sweep, early stopping, and a driver killed and run again."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bso_cache.config import SweepConfig
from bso_cache.errors import ConfigError
from bso_cache.training.sweep import SweepFailures, parse_grid, run_sweep
from bso_cache.training.sweep_summary import mark_pareto, recommend

from .conftest import ENV, cli_in_process, one_line_error

DPO = {"generator": "logistic", "safety_penalty": 0.0, "pairs": "none", "optimizer": "adamw",
       "lr_schedule": "constant", "warmup_ratio": 0.0, "progress": False}


def rows_of(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv") as f:
        return {r["run"]: r for r in csv.DictReader(f)}


def test_a_failing_run_is_recorded_and_the_others_go_on(demo_cache, tmp_path):
    """A diverging run is `failed` with its reason in summary.csv and its folder; the other
    finishes; the sweep raises (exit 1 from the CLI) naming it; a rerun tries it again."""
    out = tmp_path / "sweep"
    grid = parse_grid({"lr": "1e-3,1e9", "max_steps": "3", "batch_size": "8"})
    with pytest.raises(SweepFailures, match=r"1 of 2 runs failed: lr-1000000000.0 \(step \d+: the loss is not finite"):
        run_sweep(SweepConfig(cache=str(demo_cache), out=str(out)), grid, [], DPO, log=lambda s: None, plots=False)
    rows = rows_of(out)
    assert rows["lr-0.001"]["status"] == "finished" and rows["lr-0.001"]["steps"] == "3"
    assert rows["lr-1000000000.0"]["status"] == "failed" and "policy diverged" in rows["lr-1000000000.0"]["status_detail"]
    assert json.loads((out / "lr-1000000000.0" / "sweep_status.json").read_text())["status"] == "failed"
    proc = cli_in_process("sweep", "--cache", demo_cache, "--out", out, "--lr", "1e-3,1e9", "--max-steps", 3,
                          "--batch-size", 8, "--generator", "logistic", "--safety-penalty", 0, "--pairs", "none",
                          "--optimizer", "adamw", "--lr-schedule", "constant", "--warmup-ratio", 0, check=False)
    assert proc.returncode == 1 and "lr-0.001: finished earlier, skipped" in proc.stdout
    assert "lr-1000000000.0: training" in proc.stdout  # tried again
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 runs failed: lr-1000000000.0 (step")


def test_the_pareto_front_and_the_recommended_run():
    rows = [{"run": "a", "status": "finished", "eval_preference_accuracy": 0.9, "eval_safety_accuracy": 0.5},
            {"run": "b", "status": "finished", "eval_preference_accuracy": 0.7, "eval_safety_accuracy": 0.9},
            {"run": "c", "status": "stopped_early", "eval_preference_accuracy": 0.6, "eval_safety_accuracy": 0.4},
            {"run": "d", "status": "finished", "eval_preference_accuracy": 0.85, "eval_safety_accuracy": 0.8},
            {"run": "e", "status": "failed"}]
    mark_pareto(rows)
    assert [r["run"] for r in rows if r["pareto"]] == ["a", "b", "d"] and rows[4]["pareto"] is None
    assert recommend(rows, "eval_balanced")[0] == "d"  # (0.85 + 0.8) / 2 is the highest mean
    assert recommend(rows, "eval_preference_accuracy")[0] == "a"
    assert recommend(rows, "eval_safety_accuracy")[0] == "b"
    assert recommend([{"run": "x", "status": "finished"}], "eval_balanced")[0] is None


def test_sweep_options_are_checked_before_anything_runs(demo_cache, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--early-stop.*need --backend ray"):
        SweepConfig(cache="c", out="o", early_stop=True, eval_cache="e")
    with pytest.raises(ConfigError, match="--early-stop ranks runs on held-out figures"):
        SweepConfig(cache="c", out="o", early_stop=True, backend="ray")
    with pytest.raises(ConfigError, match="--gpus-per-run x"):
        SweepConfig(cache="c", out="o", backend="ray", gpus_per_run="x")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("ray") else real(name, *a))
    one_line_error(cli_in_process("sweep", "--cache", demo_cache, "--out", tmp_path / "s", "--backend", "ray",
                                  "--max-steps", 1, check=False), "pip install 'bso-cache[ray]'")
    assert not (tmp_path / "s").exists()


def test_a_node_that_cannot_see_the_paths_fails_in_one_line_naming_it(tmp_path):
    import socket

    from bso_cache.config import TrainConfig
    from bso_cache.training.sweep_runs import check_paths

    with pytest.raises(ConfigError, match=f"node {socket.gethostname()} cannot read the cache {tmp_path / 'gone'}"):
        check_paths(TrainConfig(cache=str(tmp_path / "gone"), out=str(tmp_path / "run")))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot write the sweep folder"):
        check_paths(TrainConfig(cache=str(tmp_path), out=str(tmp_path / "file" / "run")))


# --------------------------------------------------------------------------------- Ray Tune

pytest.importorskip("ray")


def test_ray_runs_the_same_runs_as_the_sequential_sweep(demo_cache, tmp_path):
    """--backend ray --parallel 2: every run's final loss within 1e-4 of the sequential sweep's."""
    grid = parse_grid({"generator": "logistic,sba", "beta": "0.1,0.5", "max_steps": "3", "batch_size": "8"})
    base = {"progress": False}
    run_sweep(SweepConfig(cache=str(demo_cache), out=str(tmp_path / "seq")), grid, [], base, log=lambda s: None,
              plots=False)
    lines = []
    run_sweep(SweepConfig(cache=str(demo_cache), out=str(tmp_path / "ray"), backend="ray", parallel=2), grid, [],
              base, log=lines.append, plots=False)
    seq, par = rows_of(tmp_path / "seq"), rows_of(tmp_path / "ray")
    assert set(seq) == set(par) and len(seq) == 4
    for name in seq:
        assert par[name]["status"] == "finished"
        assert abs(float(seq[name]["train_loss"]) - float(par[name]["train_loss"])) < 1e-4, name
    assert sum("(Ray Tune trial)" in ln for ln in lines) == 4


def test_early_stopping_stops_runs_that_cannot_learn(demo_assets, demo_cache, tmp_path, tmp_path_factory):
    """Two learning rates that learn and two that cannot, in that order: the learning ones finish,
    at least one that cannot is stopped before --max-steps and keeps its last checkpoint; the
    summary says which, and recommends a learning run."""
    from bso_cache.cache.build import build_cache
    from bso_cache.config import BuildConfig

    held_out = tmp_path_factory.mktemp("held-out") / "cache"
    build_cache(BuildConfig(model=str(demo_assets["model"]), data=str(demo_assets["eval"]), out=str(held_out),
                            max_length=128, batch_size=8, progress=False), log=lambda s: None)
    out = tmp_path / "sweep"
    grid = parse_grid({"lr": "2e-3,1e-3,1e-12,2e-12", "max_steps": "16", "batch_size": "16"})
    run_sweep(SweepConfig(cache=str(demo_cache), out=str(out), eval_cache=str(held_out), backend="ray", parallel=2,
                          early_stop=True, select="eval_preference_accuracy"),
              grid, [], {**DPO, "eval_every": 4}, log=lambda s: None)
    rows = rows_of(out)
    assert rows["lr-0.002"]["status"] == rows["lr-0.001"]["status"] == "finished"
    stopped = [n for n in ("lr-1e-12", "lr-2e-12") if rows[n]["status"] == "stopped_early"]
    assert stopped and all(int(rows[n]["steps"]) < 16 for n in stopped)
    assert all((out / n / "checkpoints").is_dir() and any((out / n / "checkpoints").iterdir()) for n in stopped)
    assert "**Take `lr-0.00" in (out / "README.md").read_text()


@pytest.mark.slow  # ~50 s: ./scripts/test.sh -m slow
def test_a_killed_driver_leaves_nothing_and_the_rerun_finishes_as_if_uninterrupted(demo_cache, tmp_path):
    """SIGKILL the driver once a run has finished: within 20 s no process it started is left (the
    watchdog), and the same command then skips the finished run, resumes the others from their
    checkpoints and ends with the weights of an uninterrupted sweep."""
    args = ["sweep", "--cache", str(demo_cache), "--out", str(tmp_path / "sweep"), "--lr", "1e-3,2e-3,3e-3",
            "--generator", "logistic", "--safety-penalty", "0", "--pairs", "none", "--optimizer", "adamw",
            "--max-steps", "12", "--save-every", "3", "--batch-size", "8", "--backend", "ray", "--parallel", "2"]
    driver = subprocess.Popen([sys.executable, "-m", "bso_cache", *args], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "sweep").glob("*/summary.json")) and time.monotonic() < deadline:
        assert driver.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    from bso_cache.training.ray_watchdog import descendants

    below = descendants(driver.pid)
    assert below, "no Ray process was started"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    from bso_cache.training.ray_watchdog import running

    gone = time.monotonic() + 20  # within 20 s no process of the killed sweep remains
    while [pid for pid, start in below.items() if running(pid, start)] and time.monotonic() < gone:
        time.sleep(0.5)
    assert not [pid for pid, start in below.items() if running(pid, start)], "processes of the killed sweep remain"
    again = subprocess.run([sys.executable, "-m", "bso_cache", *args], env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "finished earlier, skipped" in again.stdout
    whole = subprocess.run([sys.executable, "-m", "bso_cache", *[a if a != str(tmp_path / "sweep")
                                                                 else str(tmp_path / "whole") for a in args]],
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    for run in ("lr-0.001", "lr-0.002", "lr-0.003"):
        a, b = (json.loads((tmp_path / s / run / "summary.json").read_text())["final"]["loss"] for s in ("sweep", "whole"))
        assert a == b, run
        assert (tmp_path / "sweep" / run / "model.safetensors").read_bytes() == \
            (tmp_path / "whole" / run / "model.safetensors").read_bytes(), run
