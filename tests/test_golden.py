"""The same bytes across refactors: the shards of a tinystories PKU build and the weights after a
20-step sba run, pinned to digests recorded from the code before the configuration redesign
(issue 28). A change that moves any number fails here; a deliberate change of numbers updates
the digests in the same commit and says why."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .conftest import train_run

# recorded at be12fdf (torch 2.13.0+cpu, transformers 5.25.0) by this test's own code
SHARDS_DIGEST = "573f54c5adbc776dcb90b269785220a578a5a5f9ebcf4bd880d148fc47c639e8"
WEIGHTS_DIGEST = "e08ff2997dd90502abfd7b8c48c84ba28fd53391ebfe01e844945799f42a3246"


def _shards_digest(cache: Path) -> str:
    manifest = json.loads((cache / ".manifest.json").read_text())
    return hashlib.sha256(json.dumps([s["sha256"] for s in manifest["shards"]]).encode()).hexdigest()


def test_a_pku_build_and_a_20_step_sba_run_keep_their_bytes(pku_cache, tmp_path):
    shards = _shards_digest(pku_cache)
    run = tmp_path / "run"
    train_run(pku_cache, run, max_steps=20, batch_size=8, lr=1e-4, seed=0)
    weights = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    assert (shards, weights) == (SHARDS_DIGEST, WEIGHTS_DIGEST)
