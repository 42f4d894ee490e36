"""``python -m bench --suite tiny|cpu|cpu-vocab|gpu|gpu-targets|gpu-sweeps``: see bench/__init__.py."""

import sys

from .runner import main

sys.exit(main())
