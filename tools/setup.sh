#!/usr/bin/env bash
# Create .venv (if needed) and install specc into it, editable, with the test extras.
# torch is installed first and pinned, so that pip takes the CPU build on this machine instead of
# resolving a loose requirement to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q --disable-pip-version-check "torch==${SPECC_TORCH_VERSION:-2.13.0}"
python -m pip install -q --disable-pip-version-check -e ".[test,tvm]"
