"""`bso-cache sweep --backend ray`: the sweep's runs as Ray Tune trials.

Each trial is the same `train` as a run alone, in its own folder under the sweep's, reading the
cache read-only, in a Ray worker process with the resources it asked for (--cpus-per-run torch
threads, --gpus-per-run of a GPU: a fraction packs several runs on one). --parallel caps how many
run at once. Without --ray-address the sweep starts a local cluster and shuts it down at the end;
with it, it joins a cluster whose nodes all see the cache and the sweep folder (docs/CLUSTERS.md).

--early-stop: Ray Tune's ASHA scheduler reads the --select figure of every held-out evaluation
(a trial reports after the step's checkpoint is written, so a stopped run keeps it) and stops
the runs that are losing; its settings are config.commands.ASHA_GRACE_EVALS / ASHA_REDUCTION.

The driver (this process) writes the summary from the run folders: a run with a summary finished,
one whose trial failed says why in its sweep_status.json, any other was stopped early.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
from pathlib import Path

from bso_cache.config import ASHA_GRACE_EVALS, ASHA_REDUCTION, SweepConfig, TrainConfig, to_dict


def train_with_ray(sweep: SweepConfig, todo: list, out_dir: Path, log) -> None:
    """Train the runs of `todo` (sweep.Run) as Ray Tune trials; each ends with its status set."""
    import ray
    from ray import tune

    from bso_cache.training.sweep_runs import one_line, record_status

    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops the sweep (exit 130)
    # the sweep says what happens in its own lines: a failed trial is one line (its traceback stays
    # in the trial's error.txt under OUT/.tune), Tune's progress tables are not printed
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    started_here = not ray.is_initialized() and sweep.ray_address is None
    if started_here:
        _watchdog()
    if not ray.is_initialized():
        ray.init(address=sweep.ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"worker_process_setup_hook": "bso_cache.training.sweep_ray.warm_up"},
                 **({"num_cpus": os.cpu_count()} if started_here else {}))
    shutil.rmtree(out_dir / ".tune", ignore_errors=True)  # Tune's own records of an earlier invocation
    try:
        if sweep.early_stop:
            todo = [_with_checkpoint_at_each_evaluation(run) for run in todo]
        by_name = {run.name: run for run in todo}
        trainable = tune.with_parameters(_trial, configs={n: to_dict(r.cfg) for n, r in by_name.items()},
                                         group=out_dir.name, threads=sweep.cpus_per_run, select=sweep.select)
        trainable = tune.with_resources(trainable, {"cpu": sweep.cpus_per_run, "gpu": gpus_per_run(sweep, todo)})
        terminal = sys.stdout

        def say(line: str) -> None:  # the sweep's own lines reach the terminal; Tune's tables do not
            with contextlib.redirect_stdout(terminal):
                log(line)

        tuner = tune.Tuner(trainable, param_space={"run": tune.grid_search(list(by_name))},
                           tune_config=_tune_config(sweep, todo),
                           run_config=tune.RunConfig(name="tune", storage_path=str((out_dir / ".tune").resolve()),
                                                     verbose=0, callbacks=[_progress(by_name, say)],
                                                     failure_config=tune.FailureConfig(max_failures=0)))
        with contextlib.redirect_stdout(io.StringIO()):
            results = tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    errors = {r.config["run"]: r.error for r in results if r.config and r.error is not None}
    for run in todo:
        said = run.recorded_status()  # a trial that failed said why
        if run.layout.summary.exists():
            run.status = {"status": "finished", "detail": None}
        elif said is not None:
            run.status = said
        elif run.name in errors:
            record_status(run, "failed", one_line(errors[run.name]))
        else:
            record_status(run, "stopped_early", _last_step(run))


def _watchdog() -> None:
    """A process of its own that, should this one die, kills the local cluster it is starting."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-m", "bso_cache.training.ray_watchdog", str(os.getpid())],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)


def warm_up() -> None:
    """Each Ray worker imports what a trial runs as it starts, beside the cluster's own start-up,
    instead of after its trial is placed on it."""
    import bso_cache.training.train  # noqa: F401 - torch, transformers and the trainer


def _with_checkpoint_at_each_evaluation(run):
    """With --early-stop a run checkpoints at every evaluation, so that a stopped one keeps its last."""
    cfg = run.cfg
    if cfg.save_every == 0 or cfg.save_every % cfg.eval_every:
        run.cfg = cfg.replace(save_every=cfg.eval_every)
    return run


def _last_step(run) -> int | None:
    from bso_cache.training.checkpoint import list_checkpoints

    found = list_checkpoints(run.layout)
    return int(found[-1].name.rsplit("-", 1)[-1]) if found else None


def _tune_config(sweep: SweepConfig, todo: list):
    from ray import tune

    concurrency = {"max_concurrent_trials": sweep.parallel} if sweep.parallel else {}
    if not sweep.early_stop:
        return tune.TuneConfig(reuse_actors=False, **concurrency)
    eval_every = min(run.cfg.eval_every for run in todo)
    max_steps = max((run.cfg.max_steps or 0) for run in todo) or 10 ** 9  # rungs only where runs reach
    scheduler = _patient_asha(max_steps, ASHA_GRACE_EVALS * eval_every, ASHA_REDUCTION)
    return tune.TuneConfig(metric=sweep.select, mode="max", scheduler=scheduler, reuse_actors=False, **concurrency)


def _patient_asha(max_t: int, grace: int, rf: int):
    """Ray Tune's ASHA, which judges a run at a rung only once `rf` runs have reached it. ASHA keeps
    the best 1/rf of the runs recorded at a rung, counting the run itself: in a small sweep the first
    two runs to reach a rung would decide between themselves, and the second of two good runs would be
    stopped for being a little worse than the first on one early evaluation."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class PatientASHA(ASHAScheduler):
        def __init__(self):
            super().__init__(time_attr="step", max_t=max_t, grace_period=grace, reduction_factor=rf)
            self.milestones = [grace * rf ** k for k in range(64) if grace * rf ** k < max_t]
            self.reached: dict[int, set] = {m: set() for m in self.milestones}

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            step = result.get("step", 0)
            rung = next((m for m in reversed(self.milestones) if step >= m and trial.trial_id not in self.reached[m]),
                        None)
            if rung is None:
                return decision
            self.reached[rung].add(trial.trial_id)
            return TrialScheduler.CONTINUE if len(self.reached[rung]) < rf else decision

    return PatientASHA()


def gpus_per_run(sweep: SweepConfig, todo: list) -> float:
    """--gpus-per-run: a number, or auto: the share of this machine's GPU that `plan`'s predicted
    peak of the largest run takes with a 20% margin, rounded up to 1/k (0 without CUDA)."""
    if sweep.gpus_per_run != "auto":
        return float(sweep.gpus_per_run)
    import torch

    if not torch.cuda.is_available():
        return 0.0
    from bso_cache.cache import Cache
    from bso_cache.training.plan import PlanOptions, lengths_from_cache, plan

    total = torch.cuda.get_device_properties(0).total_memory
    seq, resp = lengths_from_cache(todo[0].cfg.cache)
    peaks = []
    for run in todo:
        options = PlanOptions.from_train(run.cfg, seq_length=seq, response_tokens=resp, device="cuda")
        model = run.cfg.policy or Cache.open(run.cfg.cache).manifest.reference_name
        peaks.append(plan(model, options, gguf_file=run.cfg.gguf_file)["peak_bytes"])
    share = 1.2 * max(peaks) / total
    if share >= 1:
        return float(-(-share // 1))
    return 1 / int(1 / share)


def _progress(runs: dict, log):
    """A Tune callback: each run's start and end as the sweep goes, in the sweep's own words."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self, runs: dict, log):
            self.runs, self.log = runs, log

        # Tune saves its experiment's state by pickling; the driver's runs and terminal are not part of it
        def __getstate__(self):
            return {}

        def __setstate__(self, state):
            self.runs, self.log = {}, None

        def on_trial_start(self, iteration, trials, trial, **info):
            run = self.runs.get(trial.config["run"])
            if run is not None:
                self.log(f"{run.index} {run.name}: training{' (resuming)' if run.cfg.resume else ''} (Ray Tune trial)")

        def on_trial_complete(self, iteration, trials, trial, **info):
            run = self.runs.get(trial.config["run"])
            if run is not None and run.layout.summary.exists():
                run.status = {"status": "finished", "detail": None}
                run.summary_row(self.log)

    return Progress(runs, log)


def _trial(config: dict, *, configs: dict, group: str, threads: int, select: str) -> None:
    """One run in a Ray worker: `train`, reporting --select at every held-out evaluation."""
    import torch
    from ray import tune

    from bso_cache.schemas import RunLayout
    from bso_cache.training.sweep_runs import check_paths, failure_reason, run_failures, write_status
    from bso_cache.training.sweep_summary import select_value
    from bso_cache.training.train import train

    torch.set_num_threads(threads)
    cfg = TrainConfig(**configs[config["run"]])
    last_step = cfg.max_steps or float("inf")

    def on_log(row: dict) -> None:
        figures = {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
        value = select_value(select, figures) if figures else None
        if value is not None and row["step"] < last_step:  # the last: the run finishes, nothing to decide
            tune.report({"step": row["step"], select: value})

    try:
        check_paths(cfg)
        train(cfg, log=lambda s: None, report_group=group, on_log=on_log)
    except run_failures() as e:  # the run's failure, said in its folder
        write_status(RunLayout(Path(cfg.out)), "failed", failure_reason(e))
        raise
