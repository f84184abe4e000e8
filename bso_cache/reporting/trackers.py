"""`--report-to`: a run's configuration, every scalar of metrics.jsonl (same names, same steps),
the evaluation and the final model, in the experiment trackers people already use.

Each tracker is its library's own API, an optional extra (`pip install 'bso-cache[wandb]'`), and
takes its usual environment: W&B `WANDB_PROJECT` / `WANDB_MODE=offline`, MLflow
`MLFLOW_TRACKING_URI` / `MLFLOW_EXPERIMENT_NAME`, trackio `TRACKIO_DIR`. A sweep groups its runs:
a W&B group, an MLflow parent run, a trackio project named after the sweep. Only the main rank
reports. The run's tracker ids are kept in its folder (trackers.json), so that `--resume`
continues the same tracker run instead of starting another.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

from bso_cache.config import parse_report_to, to_dict
from bso_cache.errors import ConfigError
from bso_cache.schemas import RunLayout

_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
PROJECT = "bso-cache"  # W&B project, MLflow experiment and trackio project unless the environment names one


def require_installed(names: tuple[str, ...]) -> None:
    """One line naming the extra to install, before any model loads."""
    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ConfigError(f"--report-to {name} needs the {_MODULES[name]} package: pip install 'bso-cache[{name}]'")


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl row (not its step; None where a figure does not exist)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def for_run(cfg, run_dir: Path, group: str | None = None) -> "Reporters":
    """The trackers a TrainConfig asks for (--report-to, --tensorboard), opened for its run folder."""
    return Reporters(parse_report_to(cfg.report_to, cfg.tensorboard), run_dir=run_dir, config=to_dict(cfg),
                     group=group)


@contextlib.contextmanager
def tracker_parent(cfg, sweep_dir: Path):
    """A sweep's MLflow parent run (its runs are its children; W&B and trackio group by name):
    opened around each run, the same parent every time (its id is kept in the sweep folder)."""
    if "mlflow" not in parse_report_to(cfg.report_to, cfg.tensorboard):
        yield
        return
    import mlflow

    ids_path = Path(sweep_dir) / RunLayout.TRACKERS
    ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    if "mlflow" not in ids:
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
    with mlflow.start_run(run_id=ids.get("mlflow"), run_name=None if "mlflow" in ids else Path(sweep_dir).name) as run:
        if "mlflow" not in ids:
            ids_path.write_text(json.dumps({**ids, "mlflow": run.info.run_id}, indent=2) + "\n")
        yield


class Reporters:
    """The trackers of one run, opened together; each gets every call."""

    def __init__(self, names: tuple[str, ...], *, run_dir: Path, config: dict, group: str | None = None):
        require_installed(names)
        self.run_dir = Path(run_dir)
        ids_path = RunLayout(self.run_dir).root / RunLayout.TRACKERS
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
        name = self.run_dir.name
        self.trackers = [_OPEN[n](name=name, run_dir=self.run_dir, config=config, group=group, run_id=ids.get(n))
                         for n in names]
        if self.trackers:
            ids.update({n: t.run_id for n, t in zip(names, self.trackers) if t.run_id})
            ids_path.write_text(json.dumps(ids, indent=2) + "\n")

    def log(self, row: dict, step: int) -> None:
        values = scalars(row)
        for t in self.trackers:
            t.log(values, step)

    def finish(self, summary: dict, model_files: list[Path], step: int) -> None:
        """The held-out evaluation as eval/<name> at the last step (unless the last logged row
        already holds it), the final model as an artifact, and the run closed."""
        ev = {f"eval/{k}": v for k, v in scalars(summary.get("eval") or {}).items()}
        logged = scalars(summary.get("final") or {})
        ev = {k: v for k, v in ev.items() if k not in logged}
        for t in self.trackers:
            if ev:
                t.log(ev, step)
            t.finish(model_files)

    def close(self) -> None:
        """Closes what is still open after a failure (the trackers mark the run failed where they can)."""
        for t in self.trackers:
            t.abort()


class _TensorBoard:
    def __init__(self, *, name, run_dir, config, group, run_id):
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = None
        self.writer = SummaryWriter(str(RunLayout(run_dir).tensorboard))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, values, step):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, model_files):
        self.writer.close()

    def abort(self):
        self.writer.close()


class _WandB:
    def __init__(self, *, name, run_dir, config, group, run_id):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=name, group=group,
                              config=config, dir=str(run_dir), id=run_id, resume="allow" if run_id else None,
                              reinit="create_new")
        self.run_id = self.run.id

    def log(self, values, step):
        self.run.log(values, step=step)

    def finish(self, model_files):
        if model_files:
            artifact = self.wandb.Artifact(f"{self.run.name}-model", type="model")
            for f in model_files:
                artifact.add_file(str(f))
            self.run.log_artifact(artifact)
        self.run.finish()

    def abort(self):
        self.run.finish(exit_code=1)


class _MLflow:
    def __init__(self, *, name, run_dir, config, group, run_id):
        import mlflow

        self.mlflow = mlflow
        if run_id is None:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
        # inside a sweep's parent run (sweep.py opens it) this run is its child
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else name,
                                    nested=mlflow.active_run() is not None)
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params({k: str(v)[:6000] for k, v in _flat(config).items()})

    def log(self, values, step):
        self.mlflow.log_metrics(values, step=step, run_id=self.run_id)

    def finish(self, model_files):
        for f in model_files:
            self.mlflow.log_artifact(str(f), artifact_path="model", run_id=self.run_id)
        self.mlflow.end_run()

    def abort(self):
        self.mlflow.end_run(status="FAILED")


class _Trackio:
    def __init__(self, *, name, run_dir, config, group, run_id):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=group or os.environ.get("TRACKIO_PROJECT", PROJECT), name=name,
                                config=config, resume="allow" if run_id else "never", embed=False,
                                auto_log_gpu=False, auto_log_cpu=False)
        self.run_id = name

    def log(self, values, step):
        self.trackio.log(values, step=step)

    def finish(self, model_files):
        if model_files:
            self.trackio.log_artifact(Path(model_files[0]).parent, name=f"{self.run_id}-model", type="model")
        self.trackio.finish()

    def abort(self):
        self.trackio.finish()


_OPEN = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow, "trackio": _Trackio}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
