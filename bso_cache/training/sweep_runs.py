"""A sweep's runs, as the driver and the trials both see them: each run's configuration and
status, and the record of a run that did not finish (its folder's sweep_status.json)."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from bso_cache import schemas as S
from bso_cache.config import TrainConfig, names
from bso_cache.errors import BsoCacheError, ConfigError

SWEEPABLE = names(TrainConfig, sweep=True)  # the options with sweep=True (config/train.py)


@dataclass
class Run:
    """One run of the sweep: its name, settings, configuration and what became of it."""

    name: str
    cfg: TrainConfig
    status: dict | None = None  # {"status": finished | stopped_early | failed, "detail": step or reason}
    index: str = ""             # "[i/n]", its place in the sweep, for the lines it prints
    row: dict | None = None     # its summary row, once made
    curve: list = field(default_factory=list)  # its metrics.jsonl rows

    def summary_row(self, log=None) -> dict:
        """Its line of summary.csv (made once; printed when `log` is given)."""
        from bso_cache.reporting.report import read_metrics
        from bso_cache.training import sweep_summary as summary

        if self.row is None:
            self.curve = read_metrics(self.layout.root) if self.layout.metrics.exists() else []
            done = json.loads(self.layout.summary.read_text()) if self.status["status"] == "finished" else None
            settings = {k: getattr(self.cfg, k) for k in SWEEPABLE}
            self.row = summary.summary_row(self.name, settings, self.status, done, self.curve)
            if log is not None:
                log(f"{self.index} {self.name}: {summary.result_text(self.row)}")
        return self.row

    @property
    def layout(self) -> S.RunLayout:
        return S.RunLayout(Path(self.cfg.out))

    def recorded_status(self) -> dict | None:
        """What its folder's sweep_status.json says (None: nothing, or unreadable)."""
        try:
            return json.loads(self.layout.sweep_status.read_text())
        except (OSError, json.JSONDecodeError):
            return None


class SweepFailures(BsoCacheError):
    """Runs of a sweep failed (each with its reason in summary.csv); the others finished."""

    exit_code = 1  # not a mistake of the command line


def record_status(run: Run, status: str, detail) -> None:
    """A run that did not finish says why in its folder (sweep_status.json), for the summary and reruns."""
    run.status = write_status(run.layout, status, detail)


def write_status(layout: S.RunLayout, status: str, detail) -> dict:
    from bso_cache.io.files import atomic_write_json

    record = {"status": status, "detail": detail}
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.sweep_status, record)
    return record


def run_failures() -> tuple[type[BaseException], ...]:
    """The errors that end one run of a sweep and not the sweep: the project's own (a diverged
    policy, a damaged shard, ...) and running out of memory."""
    import torch

    return BsoCacheError, MemoryError, torch.OutOfMemoryError


def failure_reason(error: BaseException) -> str:
    """A failed run's one line: the project's message as it is, another error's type and last line."""
    if isinstance(error, BsoCacheError):
        return str(error)
    return one_line(error)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}".rstrip(": ")


def check_paths(cfg: TrainConfig) -> None:
    """On the trial's node: the cache readable, the run folder's parent writable (one line naming both)."""
    node = socket.gethostname()
    cache = Path(cfg.cache)
    if not (cache.is_dir() and os.access(cache, os.R_OK | os.X_OK)):
        raise ConfigError(f"node {node} cannot read the cache {cache}: put it on a filesystem every node of the "
                          f"cluster sees (docs/CLUSTERS.md)")
    parent = Path(cfg.out).parent
    if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
        raise ConfigError(f"node {node} cannot write the sweep folder {parent}: put it on a filesystem every node "
                          f"of the cluster sees and can write (docs/CLUSTERS.md)")
