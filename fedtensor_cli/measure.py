"""Quality and rate figures for the CLI's reports, computed by :mod:`fedtensor.metrics`.

Definitions are the project's (DESIGN.md): PSNR over the original's max − min, 3D SSIM, max absolute
error in the original units, bits per voxel = 8 × whole-file bytes / voxels, ratio = original bytes at
the input dtype / compressed bytes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

# Keys a codec may use for the figures it already measured (read_info(data)["stats"]).
_STAT_KEYS = {
    "psnr_db": ("psnr_db", "psnr"),
    "ssim": ("ssim", "ssim3d"),
    "max_abs_error": ("max_abs_error", "max_error"),
}


def quality(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """PSNR (dB; inf when identical), 3D SSIM and max absolute error of ``decoded`` against ``original``."""
    from fedtensor.metrics import max_abs_error, psnr, ssim3d

    return {
        "psnr_db": float(psnr(original, decoded)),
        "ssim": float(ssim3d(original, decoded)),
        "max_abs_error": float(max_abs_error(original, decoded)),
    }


def quality_from_stats(stats: Any, *, ssim: bool = True) -> dict[str, float] | None:
    """The quality figures from a stream header's ``stats`` (the encoder measured them on the decoded
    volume), or None if any is missing; without ``ssim``, PSNR and max error only."""
    if not isinstance(stats, Mapping):
        return None
    out: dict[str, float] = {}
    for key, aliases in _STAT_KEYS.items():
        if key == "ssim" and not ssim:
            continue
        value = next((stats[a] for a in aliases if a in stats and stats[a] is not None), None)
        if value is None:
            return None
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            return None
    return out


def rate(compressed_bytes: int, shape: tuple[int, ...], dtype: Any) -> dict[str, float]:
    """Bits per voxel and compression ratio of a ``compressed_bytes`` stream for a volume."""
    from fedtensor.metrics import bits_per_voxel, compression_ratio

    original_bytes = math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize
    return {
        "bpv": float(bits_per_voxel(compressed_bytes, shape)),
        "ratio": float(compression_ratio(original_bytes, compressed_bytes)),
    }
