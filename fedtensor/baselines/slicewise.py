"""2D image codecs applied slice by slice along the last axis (``vol[:, :, k]``).

Image codecs take unsigned integer samples, so the volume is first mapped to them by
:class:`UnsignedMap`: integer-valued volumes whose range fits 16 bits are shifted by their minimum
(exact: uint8 when the range fits 8 bits, else uint16, with ``bits`` = bits needed for max − min);
any other volume (non-integer floats, wider ranges) is scaled linearly onto 0…65535, which is itself
lossy, so lossless coders refuse it. The stream holds one section per slice, so every byte a real
file would need is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtensor.baselines.base import (
    Baseline,
    FormatError,
    header_shape_dtype,
    pack,
    to_dtype,
    unpack,
    volume_header,
)
from fedtensor.io.volume import integer_valued


@dataclass(frozen=True)
class UnsignedMap:
    """``stored = (x − offset) / scale`` as unsigned integers; ``x ≈ stored · scale + offset``."""

    offset: float
    scale: float
    bits: int
    store: str  # "u1" or "u2"
    exact: bool

    @classmethod
    def for_data(cls, data: np.ndarray) -> "UnsignedMap":
        lo, hi = float(np.min(data)), float(np.max(data))
        span = hi - lo
        if integer_valued(data) and span <= 0xFFFF:
            bits = max(1, int(round(span)).bit_length())
            return cls(lo, 1.0, bits, "u1" if bits <= 8 else "u2", True)
        return cls(lo, span / 0xFFFF if span > 0 else 1.0, 16, "u2", False)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.store)

    @property
    def peak(self) -> int:
        """Largest storable sample, the nominal peak image codecs use."""
        return (1 << (8 * self.dtype.itemsize)) - 1

    def forward(self, sl: np.ndarray) -> np.ndarray:
        if self.exact:
            if sl.dtype.kind in "iu":
                return np.ascontiguousarray(sl.astype(np.int64) - int(self.offset)).astype(self.dtype)
            return np.ascontiguousarray(np.rint(sl.astype(np.float64) - self.offset)).astype(self.dtype)
        u = np.rint((sl.astype(np.float64) - self.offset) / self.scale)
        return np.ascontiguousarray(np.clip(u, 0, 0xFFFF)).astype(self.dtype)

    def inverse(self, u: np.ndarray) -> np.ndarray:
        return u.astype(np.float64) * self.scale + self.offset

    def header(self) -> dict:
        return {"offset": self.offset, "scale": self.scale, "bits": self.bits, "store": self.store,
                "exact": self.exact}

    @classmethod
    def from_header(cls, h: dict) -> "UnsignedMap":
        try:
            return cls(float(h["offset"]), float(h["scale"]), int(h["bits"]), str(h["store"]), bool(h["exact"]))
        except (KeyError, TypeError, ValueError):
            raise FormatError("corrupted slice-wise stream header") from None


class SlicewiseCodec(Baseline):
    """Shared encode/decode for slice-wise image codecs; subclasses code one unsigned 2D slice."""

    kind = "2D slice-wise"

    def encode_slices(self, data: np.ndarray, param: float | None, m: UnsignedMap) -> list[bytes]:
        return [self.encode_slice(m.forward(data[:, :, k]), param, m) for k in range(data.shape[2])]

    def encode_slice(self, u: np.ndarray, param: float | None, m: UnsignedMap) -> bytes:
        raise NotImplementedError

    def decode_slice(self, b: bytes) -> np.ndarray:
        raise NotImplementedError

    def _pack(self, data: np.ndarray, param: float | None, m: UnsignedMap) -> bytes:
        h = {"codec": self.name, **volume_header(data), "map": m.header(), "param": param}
        return pack(h, self.encode_slices(data, param, m))

    def encode_param(self, volume, param: float) -> bytes:
        data = np.asarray(volume.data)
        return self._pack(data, param, UnsignedMap.for_data(data))

    def decode(self, blob: bytes) -> np.ndarray:
        h, sections = unpack(blob)
        if h.get("codec") != self.name:
            raise FormatError(f"not a {self.name} stream")
        shape, dtype = header_shape_dtype(h)
        m = UnsignedMap.from_header(h.get("map", {}))
        if len(shape) != 3 or len(sections) != shape[2]:
            raise FormatError(f"corrupted {self.name} stream (slice count)")
        out = np.empty(shape, dtype)
        for k, b in enumerate(sections):
            u = self.decode_slice(b)
            if u.shape != shape[:2]:
                raise FormatError(f"corrupted {self.name} stream (slice shape)")
            out[:, :, k] = to_dtype(m.inverse(u), dtype)
        return out


def without_comments(codestream: bytes) -> bytes:
    """A J2K codestream without the COM marker segments of its main header (the encoder's banner,
    "Created by OpenJPEG …": nothing a decoder needs, and slice-wise coding would pay it once per slice,
    2 % of JPEG2000's bits on a 122×101-slice CT at 45 dB)."""
    if codestream[:2] != b"\xff\x4f":  # not a bare codestream (e.g. a JP2 file): as it is
        return codestream
    kept, pos = [codestream[:2]], 2
    while pos + 4 <= len(codestream) and codestream[pos:pos + 2] != b"\xff\x90":  # up to the first tile (SOT)
        end = pos + 2 + int.from_bytes(codestream[pos + 2:pos + 4], "big")
        if codestream[pos:pos + 2] != b"\xff\x64":  # COM
            kept.append(codestream[pos:end])
        pos = end
    kept.append(codestream[pos:])
    return b"".join(kept)
