#!/usr/bin/env bash
# One device-machine session: GPU tests, kernel tuning, and the benchmark tables, logs under $OUT.
#   STAGES="tests tune bench" bash benchmarks/gpu_session.sh
# Expects bitsandbytes (its Python files and libbitsandbytes_cuda130.so) in .bnb/ for the comparison.
# The tests stage runs the suite in SHARDS pytest processes at once on the one GPU (default 4;
# the suite is bound by host work, so shards overlap well) and prints each shard's wall time;
# PYTEST_ARGS replaces the file list (then one process runs it).
set -uo pipefail
OUT=${OUT:-/tmp/fourbit-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.bnb${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STAGES=${STAGES:-"tests tune bench"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
for stage in $STAGES; do
  case $stage in
    tests)
      start=$(date +%s)
      if [ -n "${PYTEST_ARGS:-}" ]; then
        python3 -m pytest -q -p no:cacheprovider $PYTEST_ARGS 2>&1 | tail -n 40 | tee "$OUT/tests.log"
      else
        files=(tests/test_*.py)
        shards=${SHARDS:-4}
        for ((i = 0; i < shards; i++)); do
          part=()
          for ((j = i; j < ${#files[@]}; j += shards)); do part+=("${files[j]}"); done
          ( python3 -m pytest -q -p no:cacheprovider "${part[@]}" > "$OUT/tests-$i.log" 2>&1
            echo "shard $i: exit $? after $(( $(date +%s) - start )) s" >> "$OUT/tests.log" ) &
        done
        wait
        cat "$OUT/tests.log"
        grep -h -E "passed|failed|error" "$OUT"/tests-*.log | tail -n "$shards"
      fi
      echo "tests: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/tests.log" ;;
    tune)
      python3 benchmarks/tune_triton.py ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" ;;
    bench)
      python3 benchmarks/bench_kernels.py --device cuda --shapes 4096x4096 28672x8192 --dtypes bfloat16 \
        --batches 1 16 256 2048 --memory ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_eager.md"
      python3 benchmarks/bench_kernels.py --device cuda --shapes 4096x4096 28672x8192 --dtypes bfloat16 \
        --batches 1 16 256 2048 --cuda-graphs ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_graphs.md" ;;
  esac
done
