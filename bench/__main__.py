"""``python -m bench --suite ...``: see bench/__init__.py."""

from .runner import main

raise SystemExit(main())
