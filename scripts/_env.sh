# Shared by quickstart.sh and test.sh: a .venv with torch (installed first) and the project.
# torch: the CPU build `torch==2.13.0` by default (on this kind of machine it comes from local disk).
# On a GPU machine install your CUDA build of torch into .venv first (see README); an importable
# torch is left as it is. Override with TORCH_SPEC="torch==X.Y.Z" if you need another pin.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON_BIN=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON_BIN" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  echo "installing ${TORCH_SPEC:-torch==2.13.0} (before the project, so pip does not pull a CUDA build)"
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false
