#!/usr/bin/env bash
# Create .venv (if needed) and install the project with the extras given as $1 (default: dev).
# torch is installed first and pinned, so pip never swaps in a multi-gigabyte CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[${extras}]"
