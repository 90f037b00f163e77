#!/bin/bash
# The GPU checks, in one call on a device machine (repo root), after benchmarks/gpu/prepare.sh here:
#   device run: bash benchmarks/gpu/run_checks.sh 2>&1 | tee $OUT/run.log      carry: [".gpu", ".whl"]
# encode (float32 / bf16 / fp16 against sentence-transformers), the embedded default job trained in bf16 and in
# fp16 (then its STS-B), the saved model loaded through AutoModel + trust_remote_code without this package and
# run on the GPU, training throughput against the stock Trainer (bf16 and fp32), `accelerate launch` on the GPU.
# Figures go to $OUT (docs/BENCHMARKS.md, section GPU). QUICK=1 DEV=cpu: a few steps of each, to try it here.
# ONLY_JOBS=1: the training and loading checks only.
set -u -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
QUICK=${QUICK:-0}
SITE=/tmp/site
start=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - start )) s] $*"; }
if [ "$QUICK" = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl || exit 1
  python3 benchmarks/gpu/make_backbone.py .gpu/minilm16 $SITE || exit 1
fi
export PYTHONPATH=$SITE:$PWD
export DEV=${DEV:-cuda}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, transformers, datasets, evaluate, sentence_transformers, accelerate as a; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'st', sentence_transformers.__version__, 'accelerate', a.__version__)"
  lscpu | grep "Model name"; nproc
} 2>&1 | tee $OUT/env.log
N=4096; R=5; BS="32 128 512"; STEPS=40; TRAIN_EXTRA=""
[ "$QUICK" = 1 ] && { N=64; R=1; BS="32"; STEPS=2; TRAIN_EXTRA="--max_steps 3"; }

if [ "${ONLY_JOBS:-0}" = 0 ]; then
stamp encode
timeout 150 python3 benchmarks/bench_encode.py --device $DEV --data_dir .gpu/data --num_sentences $N --repeats $R \
  --batch_sizes $BS --latency_sentences 100 2>&1 | grep -v "Loading weights" | tee $OUT/encode.md

fi
for precision in bf16 fp16; do
  stamp "default job, $precision"
  timeout 120 python3 train.py --output_dir /tmp/job-$precision --$precision true $TRAIN_EXTRA \
    > $OUT/job-$precision.log 2>&1; echo "rc $?"
  grep -a "train_runtime\|eval_.*f1\|eval_.*accuracy\|Error\|error" $OUT/job-$precision.log | tail -12
  timeout 45 python3 benchmarks/bench_embedding_protection.py --data_dir .gpu/data --score_model /tmp/job-$precision 2>&1 | tail -1
done

stamp "load without the package (trust_remote_code), encode on the GPU"
(cd /tmp && PYTHONPATH=$SITE timeout 60 python3 - <<'PY'
import importlib.util, os, numpy as np, torch
from transformers import AutoModel
print("multitask_st importable here:", importlib.util.find_spec("multitask_st") is not None)  # False: Hub files alone
model = AutoModel.from_pretrained("/tmp/job-bf16", trust_remote_code=True).to(os.environ["DEV"])
texts = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."] * 50
fp32 = model.encode(texts)
bf16 = model.encode(texts, precision="bfloat16")
half = model.to(torch.float16).encode(texts)
cos = lambda a, b: ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min()
print("device", model.device, "| min cosine bf16-autocast vs fp32", round(float(cos(fp32, bf16)), 5), "| fp16 weights vs fp32", round(float(cos(fp32, half)), 5))
print("predict", model.predict(texts[:2]))
PY
) 2>&1 | grep -v "Loading weights" | tail -4
if [ "${ONLY_JOBS:-0}" = 0 ]; then
for precision in "--bf16" ""; do
  stamp "training throughput $precision"
  timeout 100 python3 benchmarks/bench_training_throughput.py --device $DEV --data_dir .gpu/data --steps $STEPS \
    --warmup_steps 5 --repeats 2 $precision 2>&1 | grep -v "Loading weights\|it/s\]" | tee -a $OUT/train_throughput.md
done

fi
stamp "accelerate launch, 1 GPU process, bf16"
timeout 90 accelerate launch --num_processes 1 --mixed_precision bf16 train.py --output_dir /tmp/job-acc --max_steps 30 \
  > $OUT/accelerate.log 2>&1; echo "rc $?"; grep -a "train_runtime\|device\|Error" $OUT/accelerate.log | tail -5

stamp done
