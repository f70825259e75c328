"""zstd (level 19) on the raw voxel bytes: the lossless floor every codec must beat."""

from __future__ import annotations

import numpy as np

from fedtensor.baselines.base import (
    Baseline,
    FormatError,
    header_shape_dtype,
    imagecodecs as _ic,
    imagecodecs_version,
    pack,
    unpack,
    volume_header,
)

LEVEL = 19


class Zstd(Baseline):
    name = "zstd"
    label = f"zstd-{LEVEL} on raw voxels (lossless)"
    kind = "raw bytes"
    lossless = True
    imagecodecs_needs = ("ZSTD",)

    @classmethod
    def version(cls) -> str:
        return imagecodecs_version("zstd_version")

    def encode_lossless(self, volume) -> bytes:
        data = np.ascontiguousarray(volume.data)
        return pack({"codec": self.name, **volume_header(data)}, [_ic().zstd_encode(data.tobytes(), level=LEVEL)])

    def decode(self, blob: bytes) -> np.ndarray:
        h, sections = unpack(blob)
        if h.get("codec") != self.name or len(sections) != 1:
            raise FormatError("not a zstd stream")
        shape, dtype = header_shape_dtype(h)
        raw = _ic().zstd_decode(sections[0])
        if len(raw) != int(np.prod(shape)) * dtype.itemsize:
            raise FormatError("corrupted zstd stream (size)")
        return np.frombuffer(raw, dtype).reshape(shape).copy()
