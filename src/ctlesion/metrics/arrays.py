"""Inputs of the metrics as numpy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_numpy"]


def as_numpy(x: Any) -> np.ndarray:
    """Tensor (any device) or array-like -> numpy array, without copying when possible."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
