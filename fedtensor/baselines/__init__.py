"""Rival codecs behind one interface, for the rate–distortion benchmark (:mod:`fedtensor.bench`).

Every codec is a :class:`Baseline`: ``encode(volume, psnr=T)`` returns the smallest stream whose
decoded PSNR is ≥ T (``lossless=True`` for the lossless ones) and ``decode(blob)`` returns the array in
the volume's shape and dtype. A codec whose library is missing on this machine reports it through
``unavailable_reason()`` instead of failing at import time.

=====================  ==============================================================================
name                   codec
=====================  ==============================================================================
fedtensor              fedtensor block Tucker (its own PSNR rate control)
omlsvd-global          fedtensor's global truncated OMLSVD (the paper's method)
jpeg2000               OpenJPEG, irreversible 9/7, slice by slice
htj2k                  HTJ2K (OpenJPH), slice by slice
jpegxl                 JPEG-XL (libjxl, effort 7), slice by slice
dwt                    3D CDF 9/7 wavelets (PyWavelets) + fedtensor's quantiser and context coder
pca                    slice-row PCA, truncated + fedtensor's quantiser and context coder
sz3                    SZ3, 3D, absolute error bound
zfp                    ZFP, 3D, fixed accuracy
sperr                  SPERR, 3D, PSNR mode
fedtensor-lossless     fedtensor's exact mode
jpeg2000-lossless      OpenJPEG reversible 5/3, slice by slice
zstd                   zstd-19 on the raw voxels (the lossless floor)
=====================  ==============================================================================
"""

from __future__ import annotations

from fedtensor.baselines.base import (
    Baseline,
    NotApplicableError,
    ParamSpace,
    SearchResult,
    Trial,
    UnavailableError,
    find_smallest,
    psnr_db,
)
from fedtensor.baselines.dwt import Dwt
from fedtensor.baselines.errorbounded import Sperr, Sz3, Zfp
from fedtensor.baselines.fedtensor_codecs import Fedtensor, FedtensorLossless, OmlsvdGlobal
from fedtensor.baselines.htj2k import Htj2k
from fedtensor.baselines.jpeg2000 import Jpeg2000, Jpeg2000Lossless
from fedtensor.baselines.jpegxl import JpegXl
from fedtensor.baselines.pca import Pca
from fedtensor.baselines.zstd import Zstd

_CLASSES: tuple[type[Baseline], ...] = (
    Fedtensor, OmlsvdGlobal, Jpeg2000, Htj2k, JpegXl, Dwt, Pca, Sz3, Zfp, Sperr,
    FedtensorLossless, Jpeg2000Lossless, Zstd,
)
BASELINES: dict[str, type[Baseline]] = {c.name: c for c in _CLASSES}
#: every codec name, in report order
NAMES: tuple[str, ...] = tuple(BASELINES)
LOSSY: tuple[str, ...] = tuple(n for n, c in BASELINES.items() if not c.lossless)
LOSSLESS: tuple[str, ...] = tuple(n for n, c in BASELINES.items() if c.lossless)


def get_baseline(name: str) -> Baseline:
    """A codec instance by name (see :data:`NAMES`); raise ``KeyError`` with the choices otherwise."""
    try:
        return BASELINES[name]()
    except KeyError:
        raise KeyError(f"unknown codec {name!r}; choose from {', '.join(NAMES)}") from None


def availability() -> dict[str, str | None]:
    """name → ``None`` (available) or the reason it is not, for every codec."""
    return {n: c.unavailable_reason() for n, c in BASELINES.items()}


__all__ = [
    "BASELINES", "NAMES", "LOSSY", "LOSSLESS", "Baseline", "ParamSpace", "Trial", "SearchResult",
    "UnavailableError", "NotApplicableError", "find_smallest", "get_baseline", "availability", "psnr_db",
]
