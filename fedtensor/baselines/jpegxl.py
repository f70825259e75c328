"""JPEG-XL (libjxl through imagecodecs), slice by slice, lossy VarDCT at effort 7.

The searched parameter is libjxl's Butteraugli ``distance`` (smaller is better). Slices are given with
``bitspersample`` = bits needed for max − min, so that libjxl's nominal range is the data's range.
"""

from __future__ import annotations

import numpy as np

from fedtensor.baselines.base import ParamSpace, imagecodecs as _ic, imagecodecs_version
from fedtensor.baselines.slicewise import SlicewiseCodec

EFFORT = 7


class JpegXl(SlicewiseCodec):
    name = "jpegxl"
    label = "JPEG-XL (libjxl, 2D)"
    imagecodecs_needs = ("JPEGXL",)

    @classmethod
    def version(cls) -> str:
        return imagecodecs_version("jpegxl_version")

    def space(self, volume) -> ParamSpace:
        return ParamSpace(0.005, 25.0, log=True, increasing=False, guess=lambda t: 10 ** ((46.0 - t) / 20))

    def encode_slice(self, u, param, m):
        return _ic().jpegxl_encode(u, distance=float(param), effort=EFFORT, bitspersample=m.bits, numthreads=1)

    def decode_slice(self, b):
        return np.asarray(_ic().jpegxl_decode(b, numthreads=1))
