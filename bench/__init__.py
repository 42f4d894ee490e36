"""Side-by-side benchmarks of calibrl_kernels (long-format CSV, PNG, markdown tables): ``python -m bench``,
``bench.bench_<op>``, ``bench.bench_train``, ``bench.table``, ``bench/gpu_check.sh``; docs/benchmarks.md."""
