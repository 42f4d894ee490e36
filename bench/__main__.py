"""``python -m bench --suite ...``: see bench/__init__.py."""

import sys

from .runner import main

sys.exit(main())
