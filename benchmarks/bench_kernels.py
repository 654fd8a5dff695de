"""Print the kernel benchmark table: fourbit vs plain torch vs bitsandbytes (see fourbit.tools.bench).

python benchmarks/bench_kernels.py                    # 4096x4096 and 11008x4096, bf16 and fp32
python benchmarks/bench_kernels.py --device cuda --batches 1 16 256 2048
"""

from fourbit.tools.bench import main

if __name__ == "__main__":
    main()
