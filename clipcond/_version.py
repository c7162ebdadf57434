"""The package version (also written into every store's manifest)."""

__version__ = "0.1.0"
