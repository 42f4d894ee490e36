"""Side-by-side benchmarks of calibrl_kernels (long-format CSV, PNG, markdown tables); docs/benchmarks.md.

python -m bench --suite tiny|cpu|cpu-vocab|cpu-compile|gpu|gpu-targets|gpu-sweeps  # every op, then the train step
python -m bench.bench_<op> --suite cpu                          # one op
python -m bench.bench_train --config cpu                        # one RL update step
python -m bench.table DIR --plots                               # tables and PNGs of a results folder
python -m pytest bench/ --benchmark-only [--bench-sizes tiny]   # pytest-benchmark over the same ops
bash bench/gpu_check.sh [--dry-run | --plan]                    # the GPU check (see its header)
"""
