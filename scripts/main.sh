#!/usr/bin/env bash
# Set up the environment and run the main job: train the default multi-task model on the embedded dataset,
# then print its metrics and example predictions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh train
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python train.py "$@"
