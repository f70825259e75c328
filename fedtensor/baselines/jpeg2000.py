"""JPEG2000 (OpenJPEG through imagecodecs), slice by slice: lossy (irreversible 9/7) and lossless (5/3).

Lossy: the searched parameter is OpenJPEG's ``level``, its per-slice PSNR-quality mode (peak
2^bits − 1, so it is not the benchmark's PSNR; the search measures the real whole-volume PSNR).
Samples are the volume shifted to unsigned with ``bitspersample`` = bits needed for max − min (see
:class:`~fedtensor.baselines.slicewise.UnsignedMap`). Streams are bare J2K codestreams (no JP2 box),
one per slice, without OpenJPEG's comment marker. OpenJPEG runs single-threaded.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from fedtensor.baselines.base import ParamSpace, imagecodecs as _ic, imagecodecs_version, to_dtype
from fedtensor.baselines.slicewise import SlicewiseCodec, UnsignedMap, without_comments


class Jpeg2000(SlicewiseCodec):
    name = "jpeg2000"
    label = "JPEG2000 (OpenJPEG, 2D)"
    imagecodecs_needs = ("JPEG2K",)

    @classmethod
    def version(cls) -> str:
        return imagecodecs_version("jpeg2k_version")

    sixteen_bits = False  # the finer variant's samples (see finer)

    def sample_map(self, data: np.ndarray) -> UnsignedMap:
        m = UnsignedMap.for_data(data)
        if not self.sixteen_bits or m.bits >= 16:
            return m
        return UnsignedMap(m.offset, m.scale / (1 << (16 - m.bits)), 16, "u2", False)

    def finer(self, volume):
        """With ``bitspersample`` the bits of max − min, OpenJPEG's finest step is about one sample: its
        PSNR stops at 57 dB on 8-bit data, 46 dB on 6-bit. Samples scaled to 16 bits go on to lossless.
        Only for targets beyond that: at 45 dB they give the same bits (the head CT: 0.4695 against 0.4686
        bpv) but encode 1.6–3.2× slower, which would flatter whatever JPEG2000 is compared with."""
        if self.sixteen_bits or UnsignedMap.for_data(np.asarray(volume.data)).bits >= 16:
            return None
        finer = copy.copy(self)
        finer.sixteen_bits = True
        return finer

    def encode_param(self, volume, param: float) -> bytes:
        data = np.asarray(volume.data)
        return self._pack(data, param, self.sample_map(data))

    def space(self, volume) -> ParamSpace:
        m = self.sample_map(np.asarray(volume.data))
        span = (float(np.max(volume.data)) - float(np.min(volume.data))) / m.scale
        shift = 20 * math.log10(((1 << m.bits) - 1) / max(span, 1.0))  # OpenJPEG's peak vs max − min
        return ParamSpace(5.0, 150.0, log=False, increasing=True, guess=lambda t: t + shift)

    def encode_slice(self, u, param, m):
        return without_comments(_ic().jpeg2k_encode(u, level=float(param), codecformat="J2K", reversible=False,
                                                    bitspersample=m.bits, numthreads=1))

    def decode_slice(self, b):
        return _ic().jpeg2k_decode(b, numthreads=1)


class Jpeg2000Lossless(Jpeg2000):
    name = "jpeg2000-lossless"
    label = "JPEG2000 lossless (OpenJPEG, 2D)"
    lossless = True

    def not_applicable_reason(self, volume):
        if not UnsignedMap.for_data(np.asarray(volume.data)).exact:
            return "needs integer-valued voxels with a range of at most 16 bits"
        return None

    def encode_slice(self, u, param, m):
        return without_comments(_ic().jpeg2k_encode(u, level=0, codecformat="J2K", reversible=True,
                                                    bitspersample=m.bits, numthreads=1))

    def encode_lossless(self, volume) -> bytes:
        data = np.asarray(volume.data)
        return self._pack(data, None, UnsignedMap.for_data(data))


class Jpeg2kSlicewise:
    """Low-level slice-wise OpenJPEG used by ``benchmarks/codec.py`` (kept API: list of codestreams).

    ``compress(data, level, codecformat="J2K")`` returns one codestream per slice ``data[:, :, k]``
    (``"JP2"`` adds the JP2 container); ``decompress(streams)`` restores the volume's dtype.

    ``packing="components"``: one codestream whose components are the slices (no inter-component
    transform: each slice is still coded in 2D on its own), so the main header is paid once and the rate
    is allocated across all slices at once; a stronger rival than one codestream per slice (as DICOM
    stores J2K frames), up to ~11 % fewer bits on the sample CTs.
    """

    def __init__(self, data: np.ndarray, numthreads: int | None = None, packing: str = "slices"):
        if packing not in ("slices", "components"):
            raise ValueError(f"packing must be 'slices' or 'components', got {packing!r}")
        self._ic = _ic()
        self.shape, self.dtype, self.numthreads, self.packing = data.shape, data.dtype, numthreads, packing
        self.map = UnsignedMap.for_data(data)
        self.integer_valued = self.map.exact
        self.offset = self.map.offset
        self.bitspersample = self.map.bits
        self.store_dtype = self.map.dtype.type

    def compress(self, data: np.ndarray, level, codecformat: str = "J2K") -> list[bytes]:
        """``level``: OpenJPEG's PSNR-quality level, one for every slice, or (one codestream per slice) a
        sequence of one level per slice."""
        if self.packing == "components":
            planes = np.ascontiguousarray(np.moveaxis(self.map.forward(data), 2, 0))
            return [without_comments(self._ic.jpeg2k_encode(
                planes, level=float(level), codecformat=codecformat, reversible=False, planar=True, mct=False,
                bitspersample=self.bitspersample, numthreads=self.numthreads))]
        levels = np.broadcast_to(np.asarray(level, np.float64), (data.shape[2],))
        return [self.compress_slice(data[:, :, k], levels[k], codecformat) for k in range(data.shape[2])]

    def compress_slice(self, plane: np.ndarray, level: float, codecformat: str = "J2K") -> bytes:
        return without_comments(self._ic.jpeg2k_encode(
            self.map.forward(plane), level=float(level), codecformat=codecformat, reversible=False,
            bitspersample=self.bitspersample, numthreads=self.numthreads))

    def decompress_slice(self, stream: bytes) -> np.ndarray:
        return to_dtype(self.map.inverse(self._ic.jpeg2k_decode(stream, numthreads=self.numthreads)), self.dtype)

    def decompress(self, streams: list[bytes]) -> np.ndarray:
        if self.packing == "components":  # decoded as (x, y, slice): the volume's own layout
            planes = self._ic.jpeg2k_decode(streams[0], numthreads=self.numthreads).reshape(self.shape)  # 1 slice: 2D
            return to_dtype(self.map.inverse(planes), self.dtype)
        out = np.empty(self.shape, dtype=self.dtype)
        for k, b in enumerate(streams):
            out[:, :, k] = self.decompress_slice(b)
        return out

