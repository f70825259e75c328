"""The storage-size comparison of the result page: rival codecs brought to the same quality.

For a lossy result, each of JPEG2000, DWT and PCA is searched (:func:`fedtensor.baselines.find_smallest`,
the harness's search, with a coarser tolerance and fewer steps so that a ~2.5 M-voxel volume takes
seconds) for its smallest stream whose decoded PSNR reaches the PSNR fedtensor reached. For a
lossless result the lossless rivals (JPEG2000 5/3, zstd) are coded instead. A codec that is
unavailable, not applicable or cannot reach the target gets a row with the reason instead of a size.
"""

from __future__ import annotations

import time
from typing import Callable

LOSSY_RIVALS = ("jpeg2000", "dwt", "pca")
LOSSLESS_RIVALS = ("jpeg2000-lossless", "zstd")
SHORT = {"jpeg2000": "JPEG2000 (2D)", "dwt": "DWT (3D)", "pca": "PCA", "jpeg2000-lossless": "JPEG2000 5/3",
         "zstd": "zstd-19"}
TOL_DB = 0.1
MAX_STEPS = 8


def _one(name: str, volume, target: float | None) -> dict:
    from fedtensor.baselines import find_smallest, get_baseline
    from fedtensor.errors import FedtensorError

    codec = get_baseline(name)
    row = {"codec": name, "label": codec.label, "short": SHORT.get(name, name), "bytes": None, "psnr": None,
           "reason": None}
    why = codec.unavailable_reason() or codec.not_applicable_reason(volume)
    if why:
        row["reason"] = why
        return row
    t0 = time.perf_counter()
    try:
        if target is None:
            row["bytes"] = len(codec.encode(volume, lossless=True))
        else:
            prep = codec.prepare(volume)
            res = find_smallest(prep.evaluate, prep.space, target, size=prep.size, tol_db=TOL_DB,
                                max_steps=MAX_STEPS)
            if res.reached:
                row.update(bytes=int(res.nbytes), psnr=float(res.psnr))
            else:
                row["reason"] = f"does not reach {target:.2f} dB"
    except FedtensorError as e:
        row["reason"] = str(e)
    row["seconds"] = time.perf_counter() - t0
    return row


def compare(volume, psnr_db: float | None, *, progress: Callable[[int, int, str], None] = lambda i, n, s: None
            ) -> list[dict]:
    """Rows ``{codec, label, short, bytes, psnr, reason, seconds}``; ``psnr_db=None`` means lossless."""
    names = LOSSLESS_RIVALS if psnr_db is None else LOSSY_RIVALS
    rows = []
    for i, name in enumerate(names):
        progress(i, len(names), name)
        rows.append(_one(name, volume, psnr_db))
    progress(len(names), len(names), "")
    return rows
