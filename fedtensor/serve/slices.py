"""Slice images for the viewer: one plane of original / decoded / |difference| as a PNG.

Volumes are read memory-mapped from the job's ``.npy`` files, so a slice costs one plane's I/O.
The job's ``.npy`` files hold the voxels in the closest RAS+ order (the pipeline reorders them by
the affine), so axis 0 is sagittal, 1 coronal and 2 axial whatever the file's own order; each plane is
transposed and flipped so the superior / anterior side is up. Original and decoded share one
window/level (grey); the difference is shown in a heat colour map from 0 to ``diff_max``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from fedtensor.io.npy import open_npy

KINDS = ("original", "decoded", "diff")
VIEWS = ("sagittal", "coronal", "axial")


@functools.lru_cache(maxsize=1)
def _heat_lut() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def load(workdir: Path, kind: str) -> np.ndarray:
    return open_npy(workdir / f"{kind}.npy")


def plane(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    p = np.take(vol, index, axis=axis)  # the two remaining axes in order
    return np.asarray(p).T[::-1]


def window_stats(data: np.ndarray) -> dict:
    """Value range and percentiles (for the viewer's presets), from a subsample."""
    sub = np.asarray(data[::2, ::2, ::2], np.float64).ravel()
    qs = (1, 5, 95, 99, 99.9)
    vals = np.percentile(sub, qs) if sub.size else np.zeros(len(qs))
    return {"min": float(data.min()), "max": float(data.max()),
            **{f"p{q:g}": float(v) for q, v in zip(qs, vals)}}


def render(workdir: Path, kind: str, axis: int, index: int, center: float, width: float,
           diff_max: float) -> bytes:
    """PNG bytes of one plane; ``index`` is clipped to the volume."""
    import imagecodecs

    orig = load(workdir, "original")
    index = int(np.clip(index, 0, orig.shape[axis] - 1))
    if kind == "diff":
        d = np.abs(plane(orig, axis, index).astype(np.float64) - plane(load(workdir, "decoded"), axis, index))
        img = _heat_lut()[np.clip(d / max(diff_max, 1e-12) * 255, 0, 255).astype(np.uint8)]
    else:
        src = orig if kind == "original" else load(workdir, "decoded")
        p = plane(src, axis, index).astype(np.float64)
        width = max(width, 1e-12)
        img = np.clip((p - (center - width / 2)) / width * 255, 0, 255).astype(np.uint8)
    return imagecodecs.png_encode(np.ascontiguousarray(img), level=1)
