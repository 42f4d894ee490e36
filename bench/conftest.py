"""Options of the pytest-benchmark entry point (bench/test_kernels_benchmark.py)."""


def pytest_addoption(parser):
    parser.addoption("--bench-sizes", default="cpu",
                     help="size set of bench/test_kernels_benchmark.py: cpu (the README's CPU shapes) or tiny")
