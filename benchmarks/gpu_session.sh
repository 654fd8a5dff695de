#!/usr/bin/env bash
# One device-machine session: GPU tests, kernel tuning, and the benchmark tables, logs under $OUT.
#   STAGES="tests tune bench cold eager generate layers grouped lean-head4 prefill grouped-compiled train train-compiled ptxas stalls cuda-probe" bash benchmarks/gpu_session.sh
# (each stage takes a few minutes on an H200; a device call of 10 minutes holds about two)
# Expects bitsandbytes (its Python files and libbitsandbytes_cuda130.so) in .bnb/ for the comparison.
# The tests stage runs each test file in a pytest process of its own (the long files in several,
# SHARDS: "file=count ..."), JOBS at a time on the one GPU
# (default 16, one a core of the H200 machine: 266 s there against 295 s at 12; the suite is bound
# by host work, Triton's compiles above all, so processes overlap well; each gets nproc/JOBS
# threads), longest-known files first, and prints each file's wall time, the total and the
# failures (per-file logs in $OUT/test_logs.tgz; a file still running after FILE_TIMEOUT
# seconds, default 480, is stopped and reported with exit 124);
# FILES replaces the file list (ALL=1 keeps the CPU-only files, the other files' CPU cases and
# the tests marked cpu_only, left out by default); DURATIONS is pytest's --durations (default 5);
# PYTEST_ARGS replaces it with one process running those arguments.
set -uo pipefail
OUT=${OUT:-/tmp/fourbit-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.bnb${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STAGES=${STAGES:-"tests tune bench"}
export PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
for stage in $STAGES; do
  case $stage in
    tests)
      start=$(date +%s)
      if [ -n "${PYTEST_ARGS:-}" ]; then
        "$PYTHON" -m pytest -q -p no:cacheprovider $PYTEST_ARGS 2>&1 | tail -n 40 | tee "$OUT/tests.log"
      else
        : > "$OUT/tests.log"
        # each process gets its share of the cores: torch's and inductor's thread pools would
        # otherwise each take all of them, JOBS times over
        jobs=${JOBS:-16}
        export THREADS=$(( ($(nproc) + jobs - 1) / jobs ))
        # the slow files first, so that none starts last (in this order: ``ls`` would sort them)
        files=${FILES:-$(printf '%s\n' tests/test_triton_tensor_core.py tests/test_triton_wgmma.py tests/test_triton_wgmma_wide.py tests/test_compiled_groups.py \
          tests/test_cli.py tests/test_triton_tiled.py tests/test_triton.py \
          tests/test_triton_quantize.py tests/test_bnb_compat.py tests/test_parametrize.py tests/test_integration_transformers.py \
          tests/test_cpu_kernels.py tests/test_linear4bit.py tests/test_*.py)}
        # the long files run as several processes each, every one taking every count-th test
        # (conftest.py: FOURBIT_TEST_SHARD); H200 times of one process: tensor-core 490 s,
        # the others 150-280 s (wgmma 149 s: started last, it set the suite's wall time)
        shards=${SHARDS:-"test_triton_tensor_core=7 test_triton=3 test_triton_tiled=4 test_triton_quantize=3 test_cpu_kernels=4 test_linear4bit=3 test_parametrize=2 test_triton_wgmma=2 test_triton_wgmma_wide=4"}
        # files that exercise no GPU (CI runs them on every push; their compiles of the CPU path
        # take a sixth of the suite's work here): left out unless ALL=1 or FILES names them; the
        # CPU cases of the other files' device parameter and the tests marked cpu_only too
        # (FOURBIT_TEST_DEVICES: tests/helpers.py, tests/conftest.py)
        if [ -z "${FILES:-}" ] && [ "${ALL:-0}" != 1 ]; then
          files=$(printf '%s\n' $files | grep -v -E '/test_(cpu_kernels|cpu_native|cpu_native_paths|cpu_build|demo|test_shards|benchmarks)\.py$')
          export FOURBIT_TEST_DEVICES=${FOURBIT_TEST_DEVICES:-cuda}
        fi
        for file in $(printf '%s\n' $files | awk '!seen[$0]++'); do
          count=1
          for entry in $shards; do [ "${entry%=*}" = "$(basename "$file" .py)" ] && count=${entry#*=}; done
          if [ "$count" -gt 1 ]; then
            for (( i = 0; i < count; i++ )); do echo "$file $i/$count"; done
          else
            echo "$file"
          fi
        done |
          JOBS_OUT="$OUT" xargs -P "$jobs" -I{} bash -c '
            set -- {}; file=$1; shard=${2:-}; name=$(basename "$file" .py)${shard:+-${shard%/*}}
            begin=$(date +%s)
            FOURBIT_TEST_SHARD=$shard OMP_NUM_THREADS=$THREADS TORCHINDUCTOR_COMPILE_THREADS=$THREADS \
              timeout "${FILE_TIMEOUT:-480}" "$PYTHON" -m pytest -q -p no:cacheprovider --durations="${DURATIONS:-5}" "$file" \
              > "$JOBS_OUT/$name.log" 2>&1
            status=$?; [ "$status" = 5 ] && status="5 (no test selected)"
            echo "$name: exit $status after $(( $(date +%s) - begin )) s" >> "$JOBS_OUT/tests.log"'
        sort -t: -k1,1 "$OUT/tests.log"
        # any other exit is a failure: failed tests (1), an error (2-4), a timeout (124)
        failed=$(grep ": exit " "$OUT/tests.log" | grep -c -v -E ": exit (0|5) ")
        # the processes' summed wall times: what the suite costs, whatever JOBS spreads it over
        process=$(awk '/: exit / { total += $(NF - 1) } END { print total + 0 }' "$OUT/tests.log")
        printf 'files with failures: %s\nprocess time: %s s\n' "$failed" "$process" | tee -a "$OUT/tests.log"
        grep -h -E "^(FAILED|ERROR)" "$OUT"/test_*.log
        # one archive of the per-file logs (a device run returns a limited number of files)
        tar czf "$OUT/test_logs.tgz" -C "$OUT" $(cd "$OUT" && ls test_*.log) && rm -f "$OUT"/test_*.log
      fi
      echo "tests: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/tests.log" ;;
    tune)
      "$PYTHON" benchmarks/tune_triton.py ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" ;;
    bench)
      "$PYTHON" benchmarks/bench_kernels.py --device cuda --shapes 4096x4096 28672x8192 --dtypes bfloat16 \
        --batches 1 16 256 2048 --memory ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_eager.md"
      "$PYTHON" benchmarks/bench_kernels.py --device cuda --shapes 4096x4096 28672x8192 --dtypes bfloat16 \
        --batches 1 16 256 2048 --cuda-graphs ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_graphs.md" ;;
    cold)  # the GPU-limit rows as graph replays over weight copies past L2: weights read from memory,
      # as a model's layers read them (an NF4 4096x14336 weight otherwise stays in an H200's L2);
      # 8192x29568 (Qwen2.5-72B's down_proj): a K of part of a 256-column iteration
      "$PYTHON" benchmarks/bench_kernels.py --device cuda --shapes 4096x4096 4096x14336 14336x4096 28672x8192 8192x29568 \
        --dtypes bfloat16 --ops Linear4bit --batches 1 16 64 256 2048 --cuda-graphs --cold 256 --min-time 0.2 \
        ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_cold.md" ;;
    eager)  # the eager per-call table and host time, back to back and inside decode steps
      "$PYTHON" benchmarks/bench_kernels.py --device cuda --shapes 4096x4096 4096x14336 28672x8192 \
        --dtypes bfloat16 --batches 1 16 64 256 --min-time 0.2 2>&1 | tee "$OUT/bench_eager_rows.md"
      "$PYTHON" benchmarks/profile_host.py --shapes 4096x4096 4096x14336 28672x8192 --rows 1 16 64 256 --captured-tables --no-dependent \
        --register-autograd 2>&1 |
        tee "$OUT/host.md"
      # the same calls where a model makes them: inside eager decode steps, each starting cold
      "$PYTHON" benchmarks/profile_step.py --device cuda --layers 8 --batches 1 8 --rounds 3 2>&1 | tee "$OUT/step.md" ;;
    generate)  # end to end: eager and the lean loop, then transformers' compiled decoding
      # (GENERATE_ARGS, for example "--rounds 4": eager rates spread 80-144 tokens/s between processes of
      # identical code on an H200's host, so a target needs several rounds)
      "$PYTHON" benchmarks/bench_generate.py --device cuda --layers 8 --modes eager lean --warmup 1 --repeats 2 \
        ${GENERATE_ARGS:-} 2>&1 | tee "$OUT/generate.md"
      "$PYTHON" benchmarks/bench_generate.py --device cuda --layers 8 --modes compiled --warmup 1 --repeats 2 \
        ${GENERATE_ARGS:-} 2>&1 | tee "$OUT/generate_compiled.md" ;;
    layers)  # a decoder's projections layer after layer, eager and as one CUDA graph, and each shape alone
      "$PYTHON" benchmarks/bench_layers.py --device cuda --per-shape ${LAYERS_ARGS:-} 2>&1 | tee "$OUT/layers.md" ;;
    grouped)  # grouped products (fourbit.compile_options): the layer chain, then the lean loop with the
      # output head in 16 bits and in 4 (as gpt-fast and torchao quantize it); about 8 minutes
      "$PYTHON" benchmarks/bench_layers.py --device cuda --per-shape \
        --libraries bf16 bitsandbytes fourbit fourbit-grouped 2>&1 | tee "$OUT/layers_grouped.md"
      for head in "" --quantize-lm-head; do
        "$PYTHON" benchmarks/bench_generate.py --device cuda --layers 8 --modes lean --warmup 1 --repeats 2 \
          --libraries bf16 fourbit fourbit-grouped $head 2>&1 | tee -a "$OUT/lean_grouped.md"
      done ;;
    lean-head4)  # the lean loop with a 4-bit output head, the prefill eager and then compiled; about 8 minutes
      for prefill in "" --compile-prefill; do
        "$PYTHON" benchmarks/bench_generate.py --device cuda --layers 8 --modes lean --warmup 1 --repeats 2 \
          --libraries bf16 fourbit fourbit-grouped --quantize-lm-head $prefill 2>&1 | tee -a "$OUT/lean_head4.md"
      done ;;
    prefill)  # where a compiled prefill's time goes (the lean loop's --compile-prefill), 8 and 1 rows, with
      # cProfile's view (torch.profiler sends the op's launches through Triton's JIT), the op's calls
      # timed in place and replayed, and the garbage collector's share; bf16 again last, to tell a
      # slow process from a slow library; about 6 minutes
      "$PYTHON" benchmarks/launch_probe.py --device cuda 2>&1 | tee "$OUT/prefill.md"
      for batch in 8 1; do
        "$PYTHON" benchmarks/profile_prefill.py --device cuda --layers 8 --batch $batch --quantize-lm-head \
          --libraries bf16 fourbit fourbit-grouped bf16 --eager-first --python-profile --op-calls --repeats 20 \
          --top 25 2>&1 | tee -a "$OUT/prefill.md"
      done ;;
    grouped-compiled)  # transformers' compiled decoding, grouped or not, in three rounds (one process's
      # rate moves by 20-30%); about 6 minutes
      "$PYTHON" benchmarks/bench_generate.py --device cuda --layers 8 --modes compiled --warmup 1 --repeats 2 \
        --rounds 3 --libraries bf16 fourbit fourbit-grouped 2>&1 | tee "$OUT/compiled_grouped.md" ;;
    train|train-compiled)  # a QLoRA training step, LoRA on bf16 against both 4-bit libraries, eager
      # (three rounds took 4.5 minutes on an H200) or compiled (one round took more than 7: each a
      # device call of its own; fourbit first, so a call cut short still prints its rows); needs
      # peft, which the GPU machine lacks: a wheel in a carried folder, installed first
      for wheel in .tx/peft-*.whl; do [ -e "$wheel" ] && "$PYTHON" -m pip install -q --no-deps "$wheel"; done
      if [ "$stage" = train ]; then
        "$PYTHON" benchmarks/bench_train.py --device cuda --layers 8 --batches 1 4 --rounds 3 2>&1 | tee -a "$OUT/train.md"
      else
        "$PYTHON" benchmarks/bench_train.py --device cuda --layers 8 --batches 1 4 --compile --warmup 1 --repeats 3 \
          --libraries fourbit bitsandbytes bf16 2>&1 | tee -a "$OUT/train_compiled.md"
      fi ;;
    ptxas)  # the few-row kernel's tests and timings with another ptxas (PTXAS, default the machine's
      # CUDA one: Triton 3.9 compiles Hopper kernels with a CUDA 13 ptxas), in a Triton cache of its own
      ptxas=${PTXAS:-/usr/local/cuda/bin/ptxas}
      "$ptxas" --version | tail -n 2 | tee "$OUT/ptxas.log"
      cache=$(mktemp -d)
      export_ptxas="TRITON_PTXAS_PATH=$ptxas TRITON_PTXAS_BLACKWELL_PATH=$ptxas TRITON_CACHE_DIR=$cache"
      # the register budget and the input layouts' bits (the whole file compiles too much for one stage)
      env $export_ptxas "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton_tensor_core.py \
        -k "budget or same_bits or refuses" 2>&1 | tail -n 5 | tee -a "$OUT/ptxas.log"
      env $export_ptxas "$PYTHON" benchmarks/bench_kernels.py --device cuda --shapes 4096x14336 28672x8192 \
        --dtypes bfloat16 --batches 1 16 --cuda-graphs --no-bnb 2>&1 | tee -a "$OUT/ptxas.log" ;;
    stalls)  # where a kernel's warps wait (KERNEL, a regex, default the wide wgmma kernel; SHAPE,
      # default 28672x8192; ROWS, default 64 and 256): ncu's stall reasons per issued instruction,
      # then a full report's per-SASS-instruction table and its summary (ncu_sass_summary.py)
      kernel=${KERNEL:-_wide_kernel}
      for rows in ${ROWS:-64 256}; do
        ncu --kernel-name "regex:$kernel" --launch-skip 1 --launch-count 1 \
          --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
          "$PYTHON" benchmarks/profile_linear.py --shape "${SHAPE:-28672x8192}" --rows "$rows" 2>&1 |
          grep stalled | tee "$OUT/stalls_$rows.txt"
        ncu --kernel-name "regex:$kernel" --launch-skip 1 --launch-count 1 --set full --import-source yes \
          -f -o "$OUT/kernel_$rows" "$PYTHON" benchmarks/profile_linear.py --shape "${SHAPE:-28672x8192}" \
          --rows "$rows" > /dev/null 2>&1
        ncu -i "$OUT/kernel_$rows.ncu-rep" --page source --csv --print-source sass > "$OUT/kernel_sass_$rows.csv" 2>&1
        "$PYTHON" benchmarks/ncu_sass_summary.py "$OUT/kernel_sass_$rows.csv" | tee "$OUT/kernel_summary_$rows.txt"
      done ;;
    cuda-probe)  # the CUDA C++ form of the fragment kernel (cuda_fragment_probe.py): its GPU test,
      # then its best configuration on tiles and rows beside fourbit's kernel, on tiles, then on
      # rows (FOURBIT_TILED_LAYOUT=0), at 1 and 16 rows (SHAPES, default the four GPU-limit
      # weights), then every configuration on tiles with 0-2 words a step decoded by byte permutes
      "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_benchmarks.py -k cuda_fragment_probe 2>&1 |
        tail -n 5 | tee "$OUT/cuda_probe.log"
      shapes=${SHAPES:-28672x8192 14336x4096 4096x14336 4096x4096}
      "$PYTHON" benchmarks/cuda_fragment_probe.py --shapes $shapes --rows 1 16 2>&1 | tee -a "$OUT/cuda_probe.log"
      FOURBIT_TILED_LAYOUT=0 "$PYTHON" benchmarks/cuda_fragment_probe.py --shapes $shapes --rows 1 16 --layouts rows \
        2>&1 | tee -a "$OUT/cuda_probe.log"
      "$PYTHON" benchmarks/cuda_fragment_probe.py --shapes 28672x8192 4096x4096 --rows 1 16 --layouts tiled \
        --alu-words 0 1 2 --every-config 2>&1 | tee -a "$OUT/cuda_probe.log" ;;
    *) echo "unknown stage: $stage (tests, tune, bench, eager, generate, layers, grouped, lean-head4, prefill, grouped-compiled, train, ptxas, stalls, cuda-probe)" >&2; exit 2 ;;
  esac
done
