#!/usr/bin/env bash
# One device-machine session: GPU tests, kernel tuning, and the benchmark tables, logs under $OUT.
#   STAGES="tests tune bench" bash benchmarks/gpu_session.sh
# Expects bitsandbytes (its Python files and libbitsandbytes_cuda130.so) in .bnb/ for the comparison.
# The whole GPU test suite takes longer than one 10-minute device call: split it with PYTEST_ARGS,
# e.g. PYTEST_ARGS="tests/test_triton.py -k 'linear or tensor_core'" and then the other files.
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
      python3 -m pytest -q -x -p no:cacheprovider ${PYTEST_ARGS:-tests} 2>&1 | tail -n 40 | tee "$OUT/tests.log" ;;
    tune)
      python3 benchmarks/tune_triton.py ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" ;;
    bench)
      python3 benchmarks/bench_kernels.py --device cuda --shapes 4096x4096 28672x8192 --dtypes bfloat16 \
        --batches 1 16 256 2048 --memory ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_eager.md"
      python3 benchmarks/bench_kernels.py --device cuda --shapes 4096x4096 28672x8192 --dtypes bfloat16 \
        --batches 1 16 256 2048 --cuda-graphs ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_graphs.md" ;;
  esac
done
