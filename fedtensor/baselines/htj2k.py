"""High-throughput JPEG2000 (HTJ2K, Part 15; OpenJPH through imagecodecs), slice by slice.

The searched parameter is OpenJPH's irreversible quantisation step ``qstep`` (relative to the nominal
sample range: 2^8 − 1 or 2^16 − 1 for the stored uint8/uint16 slices); smaller is better.
"""

from __future__ import annotations

import math

import numpy as np

from fedtensor.baselines.base import ParamSpace, imagecodecs as _ic, imagecodecs_version, rmse_for
from fedtensor.baselines.slicewise import SlicewiseCodec, UnsignedMap, without_comments


class Htj2k(SlicewiseCodec):
    name = "htj2k"
    label = "HTJ2K (OpenJPH, 2D)"
    imagecodecs_needs = ("HTJ2K",)

    @classmethod
    def version(cls) -> str:
        return imagecodecs_version("htj2k_version")

    def space(self, volume) -> ParamSpace:
        data = np.asarray(volume.data)
        m = UnsignedMap.for_data(data)
        span = float(data.max()) - float(data.min())

        def guess(t: float) -> float:  # uniform quantiser noise: rmse ≈ Δ/√12, in stored units
            return rmse_for(span, t) / m.scale * math.sqrt(12) / m.peak

        return ParamSpace(1e-7, 1.0, log=True, increasing=False, guess=guess)

    def encode_slice(self, u, param, m):
        return without_comments(_ic().htj2k_encode(u, level=float(param), reversible=False))

    def decode_slice(self, b):
        return _ic().htj2k_decode(b)
