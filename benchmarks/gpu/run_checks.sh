#!/bin/bash
# The GPU checks of docs/BENCHMARKS.md (section "GPU"), one after another, on a machine with a CUDA GPU. From the
# repository root, with a CUDA build of torch installed:
#
#   pip install -e ".[tests]"                      # the package, plus sentence-transformers (the encode peer)
#   bash benchmarks/gpu/run_checks.sh [DATA_DIR]   # DATA_DIR: the sst2/ and stsb/ folders (default ../shared/data)
#
# 1. encode: float32 / bf16 / fp16 against sentence-transformers (benchmarks/bench_encode.py);
# 2. the embedded default job (`python train.py`) trained in bf16 and in fp16, then its STS-B;
# 3. the bf16 model loaded with `AutoModel.from_pretrained(..., trust_remote_code=True)` in a process that cannot
#    import this package, encoding and predicting on the GPU;
# 4. training throughput against the stock Trainer, bf16 and fp32 (benchmarks/bench_training_throughput.py);
# 5. `accelerate launch` of train.py on one GPU process, bf16;
# 6. pair tasks and the sentence-transformers call forms on the GPU (benchmarks/gpu/check_pair_tasks.py).
#
# Tables and logs go to $OUT (default outputs/gpu-checks). DEVICE (default cuda) picks the device; QUICK=1 runs a
# few steps of each, to try the script (QUICK=1 DEVICE=cpu works without a GPU).
set -u -o pipefail
DATA=${1:-${MTL_SHARED_DATA:-../shared/data}}
OUT=${OUT:-outputs/gpu-checks}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
step() { echo "=== $*"; }

N=4096 REPEATS=5 BATCHES="32 128 512" STEPS=40 JOB_FLAGS=() ACC_STEPS=30
if [ "$QUICK" = 1 ]; then N=64 REPEATS=1 BATCHES="32" STEPS=2 JOB_FLAGS=(--max_steps 3) ACC_STEPS=3; fi
PRECISIONS=(bf16 fp16)
[ "$DEVICE" = cpu ] && PRECISIONS=(bf16)  # fp16 mixed precision needs a GPU

step environment
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c "import torch, transformers, sentence_transformers, accelerate; print('torch', torch.__version__, \
'CUDA', torch.version.cuda, torch.cuda.is_available(), '| transformers', transformers.__version__, \
'| sentence-transformers', sentence_transformers.__version__, '| accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/env.log"

step "1. encode"
python benchmarks/bench_encode.py --device "$DEVICE" --data_dir "$DATA" --num_sentences $N --repeats $REPEATS \
  --batch_sizes $BATCHES --latency_sentences 100 2>&1 | tee "$OUT/encode.md"

for precision in "${PRECISIONS[@]}"; do
  step "2. the default job, $precision"
  python train.py --output_dir "$OUT/job-$precision" --overwrite_output_dir true --$precision true "${JOB_FLAGS[@]}" \
    > "$OUT/job-$precision.log" 2>&1
  echo "exit $?"
  grep -a "train_runtime\|eval_.*f1\|eval_.*accuracy\|rror" "$OUT/job-$precision.log" | tail -12
  python benchmarks/bench_embedding_protection.py --data_dir "$DATA" --score_model "$OUT/job-$precision" 2>&1 | tail -1
done

step "3. the bf16 model through AutoModel + trust_remote_code, without this package"
(cd /tmp && MODEL="$OUT/job-bf16" DEVICE="$DEVICE" python - <<'PY'
import os
import sys

# Importing any of this project's modules now fails: only the code files saved with the model can run.
for name in ("multitask_st", "modeling_mtl", "configuration_mtl", "inference_mtl", "tasks_mtl", "layers_mtl",
             "io_mtl", "validation_mtl", "train", "push_to_hub"):
    sys.modules[name] = None

import numpy as np
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained(os.environ["MODEL"], trust_remote_code=True).to(os.environ["DEVICE"])
texts = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."] * 50
fp32 = model.encode(texts)
bf16 = model.encode(texts, precision="bfloat16")
half = model.to(torch.float16).encode(texts)


def min_cosine(a, b):
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


print("device", model.device, "| min cosine to float32: bf16 autocast", round(min_cosine(fp32, bf16), 5),
      "| fp16 weights", round(min_cosine(fp32, half), 5))
print("predict", model.predict(texts[:2]))
PY
) 2>&1 | tee "$OUT/remote_code.log" | tail -4

for precision in --bf16 ""; do
  step "4. training throughput ${precision:-fp32}"
  python benchmarks/bench_training_throughput.py --device "$DEVICE" --data_dir "$DATA" --steps $STEPS \
    --warmup_steps 5 --repeats 2 $precision 2>&1 | tee -a "$OUT/train_throughput.md"
done

if [ "$DEVICE" != cpu ]; then
  step "5. accelerate launch, one GPU process, bf16"
  accelerate launch --num_processes 1 --mixed_precision bf16 train.py --output_dir "$OUT/job-accelerate" \
    --overwrite_output_dir true --max_steps $ACC_STEPS > "$OUT/accelerate.log" 2>&1
  echo "exit $?"
  grep -a "train_runtime\|rror" "$OUT/accelerate.log" | tail -5
fi

step "6. pair tasks on the device"
python benchmarks/gpu/check_pair_tasks.py --device "$DEVICE" 2>&1 | tee "$OUT/pair_tasks.log" | tail -3

step "done: $OUT"
