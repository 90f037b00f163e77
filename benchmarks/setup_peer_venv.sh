#!/usr/bin/env bash
# Build .venv-peer: the peer of benchmarks/bench_onnx.py, sentence-transformers 5.1.2 with its ONNX backend
# (optimum-onnx + onnxruntime) and, when it installs, its OpenVINO backend (optimum-intel + openvino).
#
#   bash benchmarks/setup_peer_venv.sh            # then: python benchmarks/bench_onnx.py --data_dir ../shared/data
#
# A separate environment because optimum-onnx needs transformers < 4.58 while this project needs transformers 5.
# torch is installed first, pinned to the CPU wheel of this project's environment (2.13.0): an unpinned torch, or
# any version that is not on local disk, pulls the CUDA wheels (gigabytes). Environment variables:
#   PEER_VENV   where to build it (default: .venv-peer at the repository root)
#   PYTHON      the interpreter to build it with (default: the one this project's .venv was made with, else python3)
#   TORCH_SPEC  the torch requirement (default: torch==2.13.0)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PEER_VENV:-$ROOT/.venv-peer}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then
        PYTHON="$("$ROOT/.venv/bin/python" -c 'import sys; print(sys._base_executable)')"
    else
        PYTHON="python3"
    fi
fi
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

echo "building $VENV with $("$PYTHON" --version 2>&1) ($PYTHON)"
"$PYTHON" -m venv "$VENV"
# Keep git from seeing the environment (what Python 3.13's venv writes itself).
printf '# created by benchmarks/setup_peer_venv.sh\n*\n' > "$VENV/.gitignore"
PIP=("$VENV/bin/python" -m pip)

"${PIP[@]}" install "$TORCH_SPEC"
# The ONNX backend of sentence-transformers: optimum-onnx (ORTModelForFeatureExtraction, the O1-O4 optimisers and
# the avx2/avx512/avx512_vnni dynamic quantisation configurations), onnxruntime, and transformers < 4.58 for it.
"${PIP[@]}" install "$TORCH_SPEC" "sentence-transformers==5.1.2" "transformers>=4.41,<4.58" "optimum-onnx" \
    "onnxruntime" "onnx" "scipy"
# The OpenVINO backend is optional: the benchmark skips it (saying so) when it is missing. It must not move what the
# ONNX backend needs (optimum-onnx pins optimum), so it installs under a constraint file of what is there now.
CONSTRAINTS="$VENV/peer-constraints.txt"
"${PIP[@]}" freeze | grep -i -E '^(optimum|optimum-onnx|transformers|torch|sentence-transformers|onnxruntime)==' \
    > "$CONSTRAINTS"
if ! "${PIP[@]}" install -c "$CONSTRAINTS" "optimum-intel[openvino]"; then
    echo "note: optimum-intel[openvino] did not install; the benchmark runs without the OpenVINO contender" >&2
fi
# optimum-intel pulls torchvision, whose PyPI wheel does not load with the CPU torch; transformers imports it when
# present (and then fails), while text models never need it.
if ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    "${PIP[@]}" uninstall -y torchvision >/dev/null 2>&1 || true
fi

"$VENV/bin/python" - <<'PY'
import importlib

import onnxruntime
import sentence_transformers
import torch
import transformers

import optimum.onnxruntime  # noqa: F401  the ONNX backend

line = (
    f"peer venv ready: sentence-transformers {sentence_transformers.__version__}, transformers "
    f"{transformers.__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
)
try:
    importlib.import_module("optimum.intel")
    import openvino

    line += f", openvino {openvino.__version__}"
except ImportError:
    line += ", no OpenVINO"
print(line)
PY
