"""Map a volume to centred unit-range float32 and back, a few slices at a time.

The transforms work in float32 on ``(x - offset) / scale`` (offset = mean, scale = value range), so
their accuracy, step brackets and squared errors do not depend on the volume's units: a CT in HU, a
float volume around 1e-20 or one offset by 1e9 all look alike to them. The affine map itself is done
in float64, slab by slab, so it costs no full-volume float64 copy.
"""

from __future__ import annotations

import numpy as np

_SLAB = 16


def normalization(x: np.ndarray) -> tuple[float, float]:
    """``(offset, scale)``: the mean and the value range (1 for a constant volume)."""
    lo, hi = float(x.min()), float(x.max())
    offset = float(np.mean(x, dtype=np.float64))
    return offset, (hi - lo) if hi > lo else 1.0


def normalize(x: np.ndarray, offset: float, scale: float) -> np.ndarray:
    out = np.empty(x.shape, np.float32)
    for k in range(0, x.shape[0], _SLAB):
        out[k:k + _SLAB] = (x[k:k + _SLAB].astype(np.float64) - offset) / scale
    return out


def denormalize(xn, dtype, offset: float, scale: float) -> np.ndarray:
    """``xn · scale + offset`` cast to ``dtype`` (rounded and clipped for integer dtypes)."""
    dtype = np.dtype(dtype)
    xn = np.asarray(xn)
    out = np.empty(xn.shape, dtype)
    for k in range(0, xn.shape[0], _SLAB):
        out[k:k + _SLAB] = to_dtype(xn[k:k + _SLAB].astype(np.float64) * scale + offset, dtype)
    return out


def to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """Cast a float array to ``dtype`` (round and clip for integers; clip to the float's finite range)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    info = np.finfo(dtype)
    return np.clip(x, info.min, info.max).astype(dtype)
