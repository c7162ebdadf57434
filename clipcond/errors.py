"""The package's one error type."""

from __future__ import annotations


class WeightsError(ValueError):
    """Weights that cannot be loaded: missing, unexpected or misshapen tensors, unsafe or unknown files."""
