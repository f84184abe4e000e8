#!/usr/bin/env bash
# Quick start: create .venv if needed, install, and run the main job on the embedded default:
# synthetic safety preferences + a tiny model made here -> one cache -> DPO-helpful, SafeDPO and
# BSO trained from it -> a held-out comparison table. A few minutes on 2 CPU cores at most.
# Usage: ./scripts/quickstart.sh [OUT_DIR]   (default: quickstart-out)
source "$(dirname "$0")/_env.sh"
python -m pip install -q -e .
bso-cache demo --out "${1:-quickstart-out}"
