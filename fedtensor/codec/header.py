"""The ``.ftz`` header's checks and :func:`read_info`, without JAX: reading a header (``fedtensor info``)
should not cost JAX's import (most of a second)."""

from __future__ import annotations

import math

import numpy as np

from fedtensor.codec.container import unpack
from fedtensor.errors import FormatError
from fedtensor.io.scaling import fits
from fedtensor.io.volume import SUPPORTED_DTYPES

#: Most voxels a stream may declare. Exact-mode decoding peaks at ~25 bytes a voxel (int64 residuals and
#: their reordered copy; measured on 160³ uint8), so the largest stream needs ~27 GB to decode.
MAX_VOXELS = 1 << 30


def check_header(h: dict) -> tuple[tuple[int, int, int], np.dtype]:
    """``(shape, dtype)`` of a decoded header, whose shape, dtype and geometry are checked."""
    try:
        shape = tuple(h["shape"])
        dtype = np.dtype(h["dtype"])
        spacing = np.asarray(h["spacing"], float)
        affine = np.asarray(h["affine"], float)
        if (len(shape) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
                or math.prod(shape) >= MAX_VOXELS or dtype not in SUPPORTED_DTYPES
                or affine.shape != (4, 4) or not np.isfinite(affine).all()
                or spacing.shape != (3,) or not np.isfinite(spacing).all() or spacing.min() <= 0
                or not isinstance(h.get("params"), dict)):
            raise ValueError
    except (KeyError, TypeError, ValueError, OverflowError, SyntaxError):  # (SyntaxError: np.dtype("f4,("))
        raise FormatError("corrupted .ftz header: bad shape, dtype or geometry") from None
    return shape, dtype


def check_scaling(scaling, stored: np.dtype) -> tuple[float, float, np.dtype]:
    """``(slope, inter, dtype)`` of a header's ``"scaling"``: the integers of dtype ``stored`` times a finite
    non-zero slope plus a finite intercept, as float32 or float64 that hold every such value."""
    try:
        slope, inter, dtype = float(scaling["slope"]), float(scaling["inter"]), scaling["dtype"]
        if not (isinstance(dtype, str) and dtype in ("<f4", "<f8") and _finite(slope) and _finite(inter)
                and all(type(scaling[k]) in (int, float) for k in ("slope", "inter"))):
            raise ValueError
    except Exception:  # noqa: BLE001 - a forged header: KeyError, TypeError, OverflowError (10**400), …
        raise FormatError("corrupted .ftz header: bad scaling") from None
    dtype = np.dtype(dtype)
    if slope == 0 or stored.kind not in "iu":
        raise FormatError("corrupted .ftz header: bad scaling")
    if not fits(slope, inter, stored, dtype):
        raise FormatError("corrupted .ftz header: a scaling beyond its float type")
    return slope, inter, dtype


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: The transform codecs a caller picks (``fedtensor.codec.CODECS``).
TRANSFORM_CODECS = ("block-tucker", "omlsvd-global")
#: The codecs a stream may name: the transform codecs, and those the encoder picks itself (exact
#: streams, a constant volume).
STREAM_CODECS = (*TRANSFORM_CODECS, "lossless", "max-error", "constant")
#: Largest quantiser step of the transform codecs, in normalised units. Every coefficient of a unit-range
#: volume is zero far below it (|c| ≤ √(voxels per block or volume) ≤ 2¹⁵), so the encoders write no
#: larger one; a forged one near float32's limit would decode to inf and NaN.
MAX_TRANSFORM_STEP = 1e6
_F32_MAX = float(np.finfo(np.float32).max)


def _in_range(offset, scale, dtype: np.dtype) -> bool:
    """Whether a transform codec's ``offset`` and ``scale`` are those of a volume of ``dtype``: a value
    of it, and at most its range (the encoders refuse values beyond float32's)."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return info.min <= offset <= info.max and scale <= float(info.max) - float(info.min)
    return abs(offset) <= _F32_MAX and scale <= 2 * _F32_MAX


def check_params(codec, p: dict, dtype: np.dtype) -> None:
    """Refuse an unknown codec, and codec parameters no encoder writes (a forged header whose checksum
    was re-computed would otherwise decode to garbage, e.g. a NaN step to a constant, or a huge one to
    NaN)."""
    if codec not in STREAM_CODECS:
        raise FormatError(f"unknown codec {codec!r} in .ftz file (written by a newer fedtensor?)")
    keys = {"block-tucker": ("step", "scale"), "omlsvd-global": ("step", "scale"), "lossless": ("step",),
            "max-error": ("step",)}
    try:
        if codec in keys:
            ok = _finite(p.get("offset")) and all(_finite(p.get(k)) and p[k] > 0 for k in keys[codec])
            if ok and "scale" in keys[codec]:
                ok = p["step"] <= MAX_TRANSFORM_STEP and _in_range(p["offset"], p["scale"], dtype)
        else:
            value = p.get("value")
            ok = _finite(value) and np.array(value).astype(dtype).item() == value
    except (OverflowError, TypeError, ValueError):
        ok = False
    if not ok:
        raise FormatError(f"corrupted .ftz header: bad {codec} parameters")


def orthonormal_bases(section: bytes, codec: str) -> np.ndarray:
    """A transform codec's bases section as float32 (little-endian on disk), refused unless every entry
    could be one of orthonormal columns' (finite, within ±1): a forged one decoded to NaN or garbage."""
    flat = np.frombuffer(section, "<f4")
    if flat.size and not (np.isfinite(flat).all() and float(np.abs(flat).max()) <= 1.001):
        raise FormatError(f"corrupted {codec} payload: its bases are not orthonormal")
    return flat


def read_info(data: bytes) -> dict:
    """The validated header of ``.ftz`` bytes, plus ``file_bytes``, ``bits_per_voxel`` and ``ratio`` (to the
    decoded volume's size). ``dtype`` is the decoded volume's; a stream of scaled integers (``"scaling"``)
    adds the integers' as ``stored_dtype``."""
    h, _ = unpack(data)
    shape, dtype = check_header(h)
    check_params(h.get("codec"), h["params"], dtype)
    n = math.prod(shape)
    if "scaling" in h:  # the stream codes stored integers; the decoded volume is their floats
        slope, inter, out = check_scaling(h["scaling"], dtype)
        p = h["params"]
        if h.get("codec") in TRANSFORM_CODECS:  # offset and scale (× step) in the floats' units, for restoration
            p = {**p, "scale": float(p["scale"]) * abs(slope), "offset": inter + slope * float(p["offset"])}
        h = {**h, "dtype": out.str, "stored_dtype": dtype.str, "params": p}
        dtype = out
    return {**h, "file_bytes": len(data), "bits_per_voxel": 8 * len(data) / n,
            "ratio": n * dtype.itemsize / len(data)}
