"""--report-to with the real trackers, offline: W&B in offline mode, MLflow on a SQLite store,
trackio locally, TensorBoard; what each holds read back equals metrics.jsonl."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ENV, cli, cli_in_process, one_line_error, read_jsonl

TRACKERS = ("wandb", "mlflow", "trackio", "tensorboard")


def tracker_env(root: Path) -> dict:
    return {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
            "TRACKIO_DIR": str(root / "trackio"), "MLFLOW_EXPERIMENT_NAME": "bso-test"}


def wandb_records(run_dir: Path) -> list:
    """The records of W&B's offline run file (its LevelDB-style log: 32 KiB blocks of
    crc/length/type-framed chunks, after a 7-byte header), as wandb's own protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data, pos, block, pending, out = files[0].read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def expected(run_dir: Path) -> dict[int, dict]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return {r["step"]: {k: float(v) for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
            for r in rows}


def check_wandb(run_dir: Path, group: str | None = None) -> None:
    records = wandb_records(run_dir)
    history = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(row["_step"], {}).update(row)
    want = expected(run_dir)
    for step, values in want.items():
        assert {k: history[step][k] for k in values} == pytest.approx(values, rel=1e-12), step
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["lr"] == json.loads((run_dir / "run_config.json").read_text())["config"]["lr"]
    assert run.run_group == (group or "")
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [(a.type, a.name) for a in artifacts] == [("model", f"{run_dir.name}-model")]
    names = {e.path for a in artifacts for e in a.manifest.contents}
    assert {"model.safetensors", "config.json", "README.md"} <= names


def mlflow_run(root: Path, run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    return client, client.get_run(run_id)


def check_mlflow(root: Path, run_dir: Path, summary: dict) -> None:
    client, run = mlflow_run(root, run_dir)
    want = expected(run_dir)
    for key in {k for v in want.values() for k in v}:
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert got == pytest.approx({s: v[key] for s, v in want.items() if key in v}, rel=1e-12), key
    assert run.data.params["lr"] == str(json.loads((run_dir / "run_config.json").read_text())["config"]["lr"])
    assert run.data.metrics["eval/preference_accuracy"] == pytest.approx(summary["eval"]["preference_accuracy"])
    stored = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"model.safetensors", "config.json", "README.md"} <= stored
    assert run.info.status == "FINISHED"


def check_trackio(root: Path, project: str, run_name: str, run_dir: Path) -> None:
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps(S.get_logs(sys.argv[1], sys.argv[2])))")
    proc = subprocess.run([sys.executable, "-c", code, project, run_name], capture_output=True, text=True,
                          env={**os.environ, "TRACKIO_DIR": str(root / "trackio")}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    logs = {}
    for row in json.loads(proc.stdout):  # the evaluation is a second row at the last step
        logs.setdefault(row["step"], {}).update(row)
    for step, values in expected(run_dir).items():
        assert {k: logs[step][k] for k in values} == pytest.approx(values, rel=1e-12), step


def test_report_to_every_tracker_holds_what_metrics_jsonl_holds(demo_cache, tmp_path):
    # run in the test's folder (cwd): MLflow keeps artifacts under ./mlruns of the working folder
    for name in ("wandb", "mlflow", "trackio", "tensorboard"):
        pytest.importorskip(name)
    env, run = tracker_env(tmp_path), tmp_path / "run"
    cli("train", "--cache", demo_cache, "--eval-cache", demo_cache, "--out", run, "--max-steps", 3,
            "--batch-size", 8, "--report-to", ",".join(TRACKERS), "--no-progress", env=env, cwd=tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    check_wandb(run)
    check_mlflow(tmp_path, run, summary)
    check_trackio(tmp_path, "bso-cache", "run", run)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # the model folder is still exactly the model: tracker files are the run's own, not model files
    assert not {"wandb", "trackers.json", "tensorboard"} & set(summary["files"])


def test_a_sweep_groups_its_runs_in_each_tracker(demo_cache, tmp_path):
    for name in ("wandb", "mlflow", "trackio"):
        pytest.importorskip(name)
    env, sweep = tracker_env(tmp_path), tmp_path / "sw"
    cli("sweep", "--cache", demo_cache, "--out", sweep, "--generator", "logistic,sba", "--max-steps", 2,
            "--batch-size", 8, "--report-to", "wandb,mlflow,trackio", "--log-every", 1, env=env, cwd=tmp_path)
    parent = json.loads((sweep / "trackers.json").read_text())["mlflow"]
    for name in ("generator-logistic", "generator-sba"):
        run = sweep / name
        check_wandb(run, group="sw")
        check_trackio(tmp_path, "sw", name, run)
        _, child = mlflow_run(tmp_path, run)
        assert child.data.tags["mlflow.parentRunId"] == parent
    # repeated: nothing retrains, the same parent
    cli("sweep", "--cache", demo_cache, "--out", sweep, "--generator", "logistic,sba", "--max-steps", 2,
            "--batch-size", 8, "--report-to", "wandb,mlflow,trackio", "--log-every", 1, env=env, cwd=tmp_path)
    assert json.loads((sweep / "trackers.json").read_text())["mlflow"] == parent


def test_unknown_or_missing_trackers_are_one_line(demo_cache, tmp_path, monkeypatch):
    one_line_error(cli_in_process("train", "--cache", demo_cache, "--out", tmp_path / "a", "--report-to", "wandb,comet",
                                  check=False), "unknown tracker 'comet'", "wandb, mlflow, trackio")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    one_line_error(cli_in_process("train", "--cache", demo_cache, "--out", tmp_path / "b", "--report-to", "mlflow",
                                  check=False), "pip install 'bso-cache[mlflow]'")
    assert not (tmp_path / "b").exists()


def test_a_resumed_run_continues_its_tracker_runs(demo_cache, tmp_path, monkeypatch):
    """Interrupted after its step-2 checkpoint and resumed: the same W&B id and MLflow run, every
    step logged once, the MLflow run finished."""
    for name in ("wandb", "mlflow"):
        pytest.importorskip(name)
    from mlflow.tracking import MlflowClient

    from bso_cache.training import train as T
    from bso_cache.config import TrainConfig

    for k, v in tracker_env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # MLflow keeps artifacts under ./mlruns of the working folder
    cfg = dict(cache=str(demo_cache), out=str(tmp_path / "run"), max_steps=4, batch_size=8, save_every=2,
               report_to="wandb,mlflow", progress=False)
    real, calls = T.Trainer._step, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(T.Trainer, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train(TrainConfig(**cfg), log=lambda s: None)
    ids = json.loads((tmp_path / "run" / "trackers.json").read_text())
    monkeypatch.setattr(T.Trainer, "_step", real)
    T.train(TrainConfig(**cfg, resume=True), log=lambda s: None)
    assert json.loads((tmp_path / "run" / "trackers.json").read_text()) == ids
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    losses = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "loss")}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")})
    assert sorted(losses) == [1, 2, 3, 4] and client.get_run(ids["mlflow"]).info.status == "FINISHED"
    assert {p.name.rsplit("-", 1)[1] for p in (tmp_path / "run" / "wandb").glob("offline-run-*")} == {ids["wandb"]}
