#!/bin/bash
# Runs of benchmarks/bench_embedding_protection.py on a device machine, side by side on its one GPU: a 22 M-parameter
# encoder at batch 32 leaves an H100 mostly idle (the host-side Python is the bottleneck), so up to one run per CPU
# core share it. These runs give scores, not timings (their training times are under that load).
#   here:   bash benchmarks/gpu/prepare.sh          (packs ../shared/data into .gpu/data.tar.xz, never committed)
#   device: bash benchmarks/gpu/run_protection.sh "<arm> <config> <seed> [train.py flags...]" ...
#           carry [".gpu", ".whl"]
# Each spec is one (config, seed) run with its own output root and datasets cache (concurrent runs share nothing);
# <arm> names the variant, and the flags after the seed go to its train.py through the bench's --extra. Everything
# comes back in one archive, $OUT/results.tgz: <arm>/<config>-seed<seed>/bench_result.json and logs/. Unpacked
# under a local --output_root (one per arm), the bench reads the results as cached runs and prints the tables
# (python benchmarks/bench_embedding_protection.py --configs <config> --seeds ... --steps_per_task 200
# --output_root <that folder> [--extra <the same flags>]).
set -u -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/site DATA=/tmp/realdata RUNS=/tmp/runs
if [ "${QUICK:-0}" = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl || exit 1
  python3 benchmarks/gpu/make_backbone.py .gpu/minilm16 $SITE || exit 1
  export PYTHONPATH=$SITE:$PWD
fi
mkdir -p $DATA && tar -xJf .gpu/data.tar.xz -C $DATA --strip-components=1 || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$OUT/env.log"
RESULTS=/tmp/results; rm -rf $RESULTS; mkdir -p $RESULTS/logs
for spec in "$@"; do
  read -r -a words <<< "$spec"
  arm=${words[0]} config=${words[1]} seed=${words[2]}
  extra=(); [ ${#words[@]} -gt 3 ] && extra=(--extra "${words[@]:3}")
  (
    root=$RUNS/$arm-$config-$seed run=$config-seed$seed
    HF_DATASETS_CACHE=/tmp/ds/$arm-$config-$seed timeout "${RUN_TIMEOUT:-480}" \
      python3 benchmarks/bench_embedding_protection.py --data_dir $DATA --configs "$config" --seeds "$seed" \
      --steps_per_task "${STEPS_PER_TASK:-200}" --output_root "$root" "${extra[@]}" > "$RESULTS/logs/$arm-$run.log" 2>&1
    rc=$?
    if [ -f "$root/$run/bench_result.json" ]; then
      mkdir -p "$RESULTS/$arm/$run" && cp "$root/$run/bench_result.json" "$RESULTS/$arm/$run/"
    fi
    cp "$root/$run/train.log" "$RESULTS/logs/$arm-$run.train.log" 2>/dev/null
    echo "$(date +%T) $arm $config seed $seed: rc $rc"
  ) &
done
wait
# One archive: the device tool brings back only a few files, and none whose name holds a "+".
tar -czf "$OUT/results.tgz" -C "$RESULTS" . && echo "all done: $OUT/results.tgz"
