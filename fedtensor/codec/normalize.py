"""Map a volume to centred unit-range float32 and back, a few slices at a time.

The transforms work in float32 on ``(x - offset) / scale`` (offset = mean, scale = value range), so
their accuracy, step brackets and squared errors do not depend on the volume's units: a CT in HU, a
float volume around 1e-20 or one offset by 1e9 all look alike to them. The affine map itself is done
in float64, a few rows at a time, so it costs no full-volume float64 copy.
"""

from __future__ import annotations

import numpy as np

_CHUNK = 1 << 16  # voxels per step of the float64 maps: a few hundred KB of temporaries


def rows_per_chunk(shape) -> int:
    """Rows along axis 0 per chunk of about ``_CHUNK`` voxels (at least one)."""
    plane = 1
    for n in shape[1:]:
        plane *= int(n)
    return max(1, _CHUNK // max(1, plane))


def normalization(x: np.ndarray) -> tuple[float, float]:
    """``(offset, scale)``: the mean and the value range (1 for a constant volume)."""
    lo, hi = float(x.min()), float(x.max())
    offset = float(np.mean(x, dtype=np.float64))
    return offset, (hi - lo) if hi > lo else 1.0


def normalize(x: np.ndarray, offset: float, scale: float) -> np.ndarray:
    out = np.empty(x.shape, np.float32)
    c = rows_per_chunk(x.shape)
    for k in range(0, x.shape[0], c):
        out[k:k + c] = (x[k:k + c].astype(np.float64) - offset) / scale
    return out


def denormalize(xn, dtype, offset: float, scale: float) -> np.ndarray:
    """``xn · scale + offset`` cast to ``dtype`` (rounded and clipped for integer dtypes)."""
    dtype = np.dtype(dtype)
    xn = np.asarray(xn)
    out = np.empty(xn.shape, dtype)
    c = rows_per_chunk(xn.shape)
    for k in range(0, xn.shape[0], c):
        out[k:k + c] = to_dtype(xn[k:k + c].astype(np.float64) * scale + offset, dtype)
    return out


def to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """Cast a float array to ``dtype`` (round and clip for integers; clip to the float's finite range)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    info = np.finfo(dtype)
    return np.clip(x, info.min, info.max).astype(dtype)
