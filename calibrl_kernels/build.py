"""``python -m calibrl_kernels.build``: prebuild the C++ CPU kernels (see ``calibrl_kernels.cpu.build``)."""

import sys

from .cpu.build import main

if __name__ == "__main__":
    sys.exit(main())
