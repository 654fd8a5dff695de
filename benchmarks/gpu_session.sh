#!/usr/bin/env bash
# One device-machine session: GPU tests, kernel tuning, and the benchmark tables, logs under $OUT.
#   STAGES="tests tune bench" bash benchmarks/gpu_session.sh
# Expects bitsandbytes (its Python files and libbitsandbytes_cuda130.so) in .bnb/ for the comparison.
# The tests stage runs each test file in a pytest process of its own, JOBS at a time on the one GPU
# (default 8: the suite is bound by host work, Triton's compiles above all, so processes overlap
# well), longest-known files first, and prints each file's wall time and the total;
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
        : > "$OUT/tests.log"
        # the slow files first, so that none starts last
        ls tests/test_triton.py tests/test_triton_tensor_core.py tests/test_triton_quantize.py tests/test_fsdp.py \
          tests/test_cpu_kernels.py tests/test_linear4bit.py tests/test_bnb_compat.py tests/test_*.py 2>/dev/null |
          awk '!seen[$0]++' |
          JOBS_OUT="$OUT" xargs -P "${JOBS:-8}" -I{} bash -c '
            name=$(basename {} .py); begin=$(date +%s)
            python3 -m pytest -q -p no:cacheprovider --durations=5 {} > "$JOBS_OUT/$name.log" 2>&1
            echo "$name: exit $? after $(( $(date +%s) - begin )) s" >> "$JOBS_OUT/tests.log"'
        sort -t: -k1,1 "$OUT/tests.log"
        tail -q -n 1 "$OUT"/test_*.log | grep -c -E " failed| error" | sed 's/^/files with failures: /'
        grep -h -E "^(FAILED|ERROR)" "$OUT"/test_*.log
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
