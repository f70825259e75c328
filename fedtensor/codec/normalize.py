"""Map a volume to centred unit-range float32 and back.

The transforms work in float32 on ``(x - offset) / scale`` (offset = mean, scale = value range), so
their accuracy, step brackets and squared errors do not depend on the volume's units: a CT in HU, a
float volume around 1e-20 or one offset by 1e9 all look alike to them.

Two implementations of the same map. :func:`normalize` / :func:`denormalize` run on the host in
float64, a few rows at a time (no full-volume float64 copy). A :class:`DeviceMap` does it inside the
codec's jitted slab functions, so the host sends the raw slab (2 bytes a voxel for int16 CT instead of
4) and never makes a float copy: integers are shifted by ``floor(offset)`` in exact int32 arithmetic
first, so float32 only ever holds values below 2**24 in magnitude, where it is exact. Volumes for which
float32 is not enough (float64, integer ranges of 2**24 or more, float32 of extreme scale) have no
device map and take the host path. The device map backwards is what decoders return (docs/codec.md).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

_CHUNK = 1 << 16  # voxels per step of the float64 maps: a few hundred KB of temporaries


def rows_per_chunk(shape) -> int:
    """Rows along axis 0 per chunk of about ``_CHUNK`` voxels (at least one)."""
    plane = 1
    for n in shape[1:]:
        plane *= int(n)
    return max(1, _CHUNK // max(1, plane))


def normalization(x: np.ndarray) -> tuple[float, float]:
    """``(offset, scale)``: the volume's most common value and its value range (1 for a constant
    volume).

    The offset normalises to 0, so a block of the most common value — the air or padding around a CT,
    the background of an MR — has only zero coefficients and decodes exactly. With the mean as the
    offset such blocks shared one nonzero DC coefficient, whose quantisation error then rose and fell
    with the step: on an MR whose background is 67 % of the voxels, PSNR swung by 0.3 dB between steps
    1 % apart. The streams of the shipped CTs and MR are 0.2–5.5 % smaller at 40–50 dB for it.
    """
    lo, hi = float(x.min()), float(x.max())
    return most_common(x), (hi - lo) if hi > lo else 1.0


_MODE_SAMPLE = 1 << 18  # voxels of the strided sample whose most common value is taken


def most_common(x: np.ndarray) -> float:
    """The most common value of an evenly strided sample of about 2¹⁸ voxels of ``x`` (the smallest of
    those tied)."""
    stride = max(1, math.ceil((x.size / _MODE_SAMPLE) ** (1 / max(1, x.ndim))))
    values, counts = np.unique(x[(slice(None, None, stride),) * x.ndim], return_counts=True)
    return float(values[np.argmax(counts)])


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


#: Integers below this magnitude are exact in float32.
EXACT_F32 = 1 << 24


class DeviceMap(NamedTuple):
    """The normalisation as the jitted slab functions apply it (a pytree of scalars).

    ``unit = ((x - shift) - frac) / scale`` with ``x - shift`` in wrapping int32 arithmetic (exact: it is
    below the value range, < 2**24); decoded ``x = clip(round(unit · scale + frac), lo, hi) + shift``.
    Float32 volumes have ``shift`` 0 and ``frac`` the offset.
    """

    shift: np.int32
    frac: np.float32
    scale: np.float32
    lo: np.float32  # bounds of the decoded x − shift: the dtype's range, shifted, within ±2**24
    hi: np.float32


def device_map(dtype, offset: float, scale: float) -> DeviceMap | None:
    """The :class:`DeviceMap` of a volume of ``dtype`` normalised by ``(offset, scale)`` (``scale`` is its
    value range), or None when the map needs float64 (the host path). Both sides of the codec derive it
    from the stream header alike."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        if not (1e-30 < scale < 1e30 and abs(offset) < 1e30):  # far from float32's comfortable range
            return None
        return DeviceMap(np.int32(0), np.float32(offset), np.float32(scale), np.float32(0), np.float32(0))
    if dtype.kind not in "iu" or not scale < EXACT_F32:
        return None
    shift, info = math.floor(offset), np.iinfo(dtype)
    wrapped = np.int64(shift).astype(np.uint32).view(np.int32)  # two's complement, like the device adds
    lo, hi = max(int(info.min) - shift, -EXACT_F32), min(int(info.max) - shift, EXACT_F32)
    return DeviceMap(wrapped, np.float32(offset - shift), np.float32(scale), np.float32(lo), np.float32(hi))


def _as_int32(x):
    return lax.bitcast_convert_type(x, jnp.int32) if x.dtype == jnp.uint32 else x.astype(jnp.int32)


def shifted(x, m: DeviceMap):
    """``x − shift`` in float32 (traceable; exact for integer volumes)."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return (_as_int32(x) - m.shift).astype(jnp.float32)
    return x.astype(jnp.float32)


def to_unit(x, m: DeviceMap | None):
    """Normalised float32 of a raw slab (traceable). ``m`` None: ``x`` is already normalised."""
    return x if m is None else (shifted(x, m) - m.frac) / m.scale


def decoded_shifted(unit, m: DeviceMap, dtype):
    """What :func:`from_unit` returns, less ``shift``, in float32 (traceable)."""
    v = unit * m.scale + m.frac
    if np.dtype(dtype).kind in "iu":
        return jnp.clip(jnp.round(v), m.lo, m.hi)
    return jnp.clip(v, np.finfo(np.float32).min, np.finfo(np.float32).max)


def from_unit(unit, m: DeviceMap | None, dtype):
    """The decoded voxels in ``dtype`` (traceable); ``m`` None: ``unit`` as is, for the host to map."""
    if m is None:
        return unit
    dtype = np.dtype(dtype)
    v = decoded_shifted(unit, m, dtype)
    if dtype.kind not in "iu":
        return v
    x = v.astype(jnp.int32) + m.shift  # wraps exactly like the shift did
    return lax.bitcast_convert_type(x, jnp.uint32) if dtype == np.uint32 else x.astype(dtype)
