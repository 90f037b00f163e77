#!/bin/bash
# Several runs of benchmarks/bench_embedding_protection.py side by side on one CUDA GPU. A 22 M-parameter encoder at
# batch 32 leaves a large GPU mostly idle (the host-side Python is the bottleneck), so running one process per CPU
# core finishes a grid sooner than running the runs one after another. These runs give scores, not timings (their
# training times are taken under that shared load).
#
#   pip install -e .
#   bash benchmarks/gpu/run_protection.sh "<arm> <config> <seed> [train.py flags...]" ...
#
# e.g. bash benchmarks/gpu/run_protection.sh "recipe heads-distillation 0" "recipe heads-distillation 1" \
#        "one-layer heads-distillation 0 --head_layers 1"
#
# Each spec is one (config, seed) run; <arm> names a variant, and the flags after the seed go to its train.py through
# the bench's --extra. The runs of an arm share the output root $OUTPUT_ROOT/<arm> (each in its own
# <config>-seed<seed> folder, with its own datasets cache). The bench reads finished runs as cached, so an arm's table
# (mean ± std over its seeds) is then printed, without training anything again, by
#   python benchmarks/bench_embedding_protection.py --data_dir DATA_DIR --configs <configs> --seeds <seeds> \
#     --steps_per_task 200 --output_root outputs/gpu-protection/<arm> [--extra <the arm's flags>]
#
# Environment: DATA_DIR (the real-data folders, default ../shared/data), OUTPUT_ROOT (default outputs/gpu-protection),
# STEPS_PER_TASK (default 200), MAX_JOBS (runs at once, default: the number of CPU cores).
set -u -o pipefail
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
DATA_DIR=${DATA_DIR:-${MTL_SHARED_DATA:-../shared/data}}
OUTPUT_ROOT=${OUTPUT_ROOT:-outputs/gpu-protection}
STEPS_PER_TASK=${STEPS_PER_TASK:-200}
MAX_JOBS=${MAX_JOBS:-$(nproc)}
[ $# -gt 0 ] || { echo "usage: $0 \"<arm> <config> <seed> [train.py flags...]\" ... (see the comments at its top)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1

# The untrained base model each arm's table compares against, saved once per arm before the runs start (every run
# would otherwise save it into the shared output root at the same moment).
for spec in "$@"; do
  read -r -a words <<< "$spec"
  root=$OUTPUT_ROOT/${words[0]}
  [ -f "$root/base-model/config.json" ] || python -c "import sys; from modeling_mtl import MultiTaskModel; \
from multitask_st import default_backbone; MultiTaskModel.from_backbone(default_backbone()).save_pretrained(sys.argv[1])" \
    "$root/base-model" || exit 1
done

for spec in "$@"; do
  read -r -a words <<< "$spec"
  arm=${words[0]} config=${words[1]} seed=${words[2]}
  extra=(); [ ${#words[@]} -gt 3 ] && extra=(--extra "${words[@]:3}")
  while [ "$(jobs -rp | wc -l)" -ge "$MAX_JOBS" ]; do wait -n; done
  (
    root=$OUTPUT_ROOT/$arm
    log=$root/$config-seed$seed.bench.log
    mkdir -p "$root"
    HF_DATASETS_CACHE=$root/.datasets-cache/$config-seed$seed \
      python benchmarks/bench_embedding_protection.py --data_dir "$DATA_DIR" --configs "$config" --seeds "$seed" \
      --steps_per_task "$STEPS_PER_TASK" --output_root "$root" "${extra[@]}" > "$log" 2>&1
    echo "$(date +%T) $arm $config seed $seed: exit $? (log: $log)"
  ) &
done
wait
echo "all done: $OUTPUT_ROOT"
