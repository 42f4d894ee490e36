"""The single source of the package version (read by pyproject.toml and both packages)."""

__version__ = "0.1.0"
