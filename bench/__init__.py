"""Side-by-side benchmarks of calibrl_kernels: kernels (``bench.run``), one RL update step
(``bench.bench_train``), plots (``bench.plot``), the README table (``bench.readme_table``) and the
one-command GPU validation (``bench/gpu_check.sh``).

Everything writes long-format CSV (``harness.CSV_COLUMNS``) under ``bench/results/<device>/``.
"""
