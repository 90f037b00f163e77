#!/usr/bin/env bash
# Create .venv (if needed) and install the project with the extras given as $1 (default: dev).
# torch is installed first and pinned, so pip never swaps in another build. PyPI's Linux torch is the CUDA build
# (gigabytes of nvidia-* wheels): where PyTorch's CPU index answers, torch comes from there; where it does not (a
# machine that reaches only a mirror), from pip's configured index. TORCH_INDEX_URL picks another index ("" = pip's own).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
torch_index="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
index_args=()
if [ -n "$torch_index" ] && python - "$torch_index" <<'PY' 2>/dev/null
import sys
import urllib.request

urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=10)
PY
then
    index_args=(--index-url "$torch_index")
fi
python -m pip install -q ${index_args[@]+"${index_args[@]}"} "torch==${TORCH_VERSION:-2.13.0}"  # bash 3.2-safe
python -m pip install -q -e ".[${extras}]"
