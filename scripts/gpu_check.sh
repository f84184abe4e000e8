#!/usr/bin/env bash
# The prepared GPU check (one H200-class GPU; torch, transformers, pyarrow, typer, safetensors;
# no polars, no datasets, no network). Runs from a bare checkout, no install needed.
# Writes gpu_check.md and gpu_check.json into $OUT or the folder given as first argument.
#   bash scripts/gpu_check.sh [OUT_DIR]            # on the GPU machine: 381 s on an H200 (2026-12-04)
#   bash scripts/gpu_check.sh OUT_DIR --tiny       # smoke test on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check-out}}
shift || true
PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py "$out" "$@"
