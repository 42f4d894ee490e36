"""Options of the pytest-benchmark entry point (bench/test_kernels_benchmark.py)."""


def pytest_addoption(parser):
    parser.addoption("--bench-sizes", default="cpu", choices=("tiny", "cpu"), help="the python -m bench suite's sizes")
