"""Integers stored with a linear scaling (NIfTI ``scl_slope``/``scl_inter``): the values a volume's
float voxels were made from.

MR images are often stored as small integers with a fractional slope (the sample ``mr_brain_gd``:
uint8 × 6.48). Read, they are floats; coded as those floats, a lossless stream is impossible and a
decoded file comes back as float32, 4× its original size. The codec codes the stored integers
instead where they reproduce the floats exactly (:func:`stored_integers`), and the NIfTI writer stores
them again with their scaling.
"""

from __future__ import annotations

import math

import numpy as np

from fedtensor.io.volume import SUPPORTED_DTYPES, Volume

#: Voxels converted at a time (two float64 temporaries of 2 MB each).
_CHUNK_VOXELS = 1 << 18


def apply_scaling(raw: np.ndarray, slope: float, inter: float, dtype) -> np.ndarray:
    """``raw · slope + inter`` in float64, cast to ``dtype``: the one expression the NIfTI reader makes its
    floats with and the decoder makes them again with (bit for bit). A few rows at a time: float64
    temporaries of a chunk, not of the volume."""
    out = np.empty(raw.shape, dtype)
    if raw.ndim == 0:
        return np.add(np.multiply(raw, slope, dtype=np.float64), inter).astype(dtype)
    rows = max(1, _CHUNK_VOXELS // max(1, math.prod(raw.shape[1:])))
    for k in range(0, raw.shape[0], rows):
        f = np.multiply(raw[k:k + rows], slope, dtype=np.float64)
        out[k:k + rows] = np.add(f, inter, out=f)
    return out


def scaling_of(meta: dict) -> tuple[float, float, np.dtype] | None:
    """``(slope, inter, stored dtype)`` recorded in ``meta["nifti_scaling"]`` by the NIfTI reader, if well
    formed: a finite non-zero slope, a finite intercept, an integer dtype fedtensor codes."""
    s = meta.get("nifti_scaling")
    if not isinstance(s, dict):
        return None
    slope, inter, stored = s.get("slope"), s.get("inter"), s.get("stored")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (slope, inter)):
        return None
    try:
        stored = np.dtype(stored)
    except (TypeError, ValueError):
        return None
    if slope == 0 or stored.kind not in "iu" or stored not in SUPPORTED_DTYPES:
        return None
    return float(slope), float(inter), stored


def fits(slope: float, inter: float, stored: np.dtype, dtype: np.dtype) -> bool:
    """Whether every integer of ``stored`` scaled by ``slope`` and ``inter`` is finite in ``dtype``."""
    info = np.iinfo(stored)
    return abs(slope) * max(-float(info.min), float(info.max)) + abs(inter) < float(np.finfo(dtype).max)


def stored_integers(volume: Volume) -> np.ndarray | None:
    """The stored integers of a float ``volume`` read from scaled NIfTI integers, when they reproduce its
    voxels bit for bit (:func:`apply_scaling`; -0.0 is not 0.0) and any integer of their dtype scales to
    a finite float; None otherwise (no scaling recorded, or voxels changed since they were read)."""
    found = scaling_of(volume.meta)
    x = volume.data
    if found is None or x.dtype.kind != "f" or x.size == 0 or not fits(*found, x.dtype):
        return None
    slope, inter, stored = found
    info = np.iinfo(stored)
    bits = np.dtype(f"u{x.dtype.itemsize}")
    raw = np.empty(x.shape, stored)
    rows = max(1, _CHUNK_VOXELS // max(1, math.prod(x.shape[1:])))
    for k in range(0, x.shape[0], rows):
        r = np.subtract(x[k:k + rows], inter, dtype=np.float64)
        np.rint(np.divide(r, slope, out=r), out=r)
        if not (np.isfinite(r).all() and r.min() >= info.min and r.max() <= info.max):
            return None
        raw[k:k + rows] = r
        again = apply_scaling(raw[k:k + rows], slope, inter, x.dtype)
        if not np.array_equal(again.view(bits), x[k:k + rows].view(bits)):
            return None
    return raw


def rounding_bound(x: np.ndarray, beyond: float = 0.0) -> float:
    """How far a scaled voxel's float may be from ``raw · slope + inter`` exactly: the rounding to its
    dtype, half a unit in the last place of the largest magnitude ``x`` holds, or a decoded voxel up to
    ``beyond`` past it (so two floats of values differing by ``slope · d`` differ by at most
    ``|slope · d|`` plus twice this)."""
    top = max(abs(float(x.min())), abs(float(x.max()))) + beyond
    return float(np.spacing(x.dtype.type(min(top, float(np.finfo(x.dtype).max))))) / 2


def float_errors(x: np.ndarray, raw: np.ndarray, slope: float, inter: float) -> tuple[float, float]:
    """``(sum of squared errors, max abs error)`` of the floats of decoded integers ``raw`` against ``x``,
    in float64, a few rows at a time."""
    sse, worst = 0.0, 0.0
    rows = max(1, _CHUNK_VOXELS // max(1, math.prod(x.shape[1:])))
    for k in range(0, x.shape[0], rows):
        d = np.subtract(x[k:k + rows], apply_scaling(raw[k:k + rows], slope, inter, x.dtype), dtype=np.float64)
        sse += float(np.vdot(d, d))
        worst = max(worst, float(np.max(np.abs(d), initial=0.0)))
    return sse, worst
