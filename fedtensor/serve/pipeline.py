"""One web compression: compress a volume for a chosen target, decode (and optionally restore) it,
measure it, and leave the outputs in a work directory.

No Flask here: :func:`run` takes a :class:`~fedtensor.io.Volume` and :class:`Settings` and returns a
JSON-able result; the web views only call it. Outputs in ``workdir``: ``result.ftz`` (the stream),
``decoded.nii.gz`` (what the viewer shows: restored when a model was used), and ``original.npy`` /
``decoded.npy`` (memory-mapped by the slice viewer).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fedtensor.errors import RateError

MODES = {
    "psnr": ("target PSNR", "dB"),
    "max_error": ("max error", "intensity units"),
    "bpv": ("bits per voxel", "bits"),
    "lossless": ("lossless", ""),
}
DEFAULTS = {"psnr": 45.0, "max_error": 2.0, "bpv": 1.0}


@dataclass(frozen=True)
class Settings:
    mode: str = "psnr"
    value: float | None = 45.0
    model_version: int | None = None

    def kwargs(self) -> dict:
        """The keyword arguments of :func:`fedtensor.codec.compress` for this mode."""
        return {"lossless": True} if self.mode == "lossless" else {self.mode: self.value}

    def describe(self) -> str:
        label, unit = MODES[self.mode]
        return label if self.mode == "lossless" else f"{label} {self.value:g} {unit}".strip()


def parse_settings(mode: str | None, value: str | None, model: str | None) -> Settings:
    """:class:`Settings` from form strings; :class:`RateError` with a one-line reason if invalid."""
    mode = (mode or "psnr").strip()
    if mode not in MODES:
        raise RateError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    v = None
    if mode != "lossless":
        text = (value or "").strip()
        try:
            v = float(text) if text else DEFAULTS[mode]
        except ValueError:
            raise RateError(f"{MODES[mode][0]} must be a number, got {text[:20]!r}") from None
        if not math.isfinite(v):
            raise RateError(f"{MODES[mode][0]} must be finite")
        limits = {"psnr": (1.0, 200.0), "max_error": (0.0, 1e12), "bpv": (1e-3, 64.0)}[mode]
        if not limits[0] <= v <= limits[1]:
            raise RateError(f"{MODES[mode][0]} must be between {limits[0]:g} and {limits[1]:g}, got {v:g}")
    version = None
    if model not in (None, "", "none"):
        try:
            version = int(model)
        except ValueError:
            raise RateError(f"unknown model choice {model[:20]!r}") from None
        if version < 1:
            raise RateError(f"unknown model version {version}")
    return Settings(mode, v, version)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def diff_scale(a: np.ndarray, b: np.ndarray) -> float:
    """A display ceiling for |a − b|: its 99.9th percentile (on a subsample), so that the few largest
    errors do not turn the rest of the difference image black; 1 for identical volumes."""
    step = max(1, round((a.size / 4e6) ** (1 / 3)))
    sub = slice(None, None, step)
    d = np.abs(a[sub, sub, sub].astype(np.float64) - b[sub, sub, sub])
    v = float(np.percentile(d, 99.9)) if d.size else 0.0
    return v if v > 0 else (float(d.max()) or 1.0)


def _ras_orientation(affine) -> np.ndarray:
    """nibabel's orientation array taking the voxel axes to the closest RAS+ order (the viewer's planes
    assume it: a DICOM series or an LPS-stored NIfTI was shown upside down); none for a degenerate
    affine."""
    from nibabel.orientations import io_orientation

    try:
        ornt = io_orientation(np.asarray(affine, np.float64))
    except (ValueError, np.linalg.LinAlgError):
        ornt = np.full((3, 2), np.nan)
    if np.isnan(ornt).any():  # an axis with no direction of its own
        return np.array([[0, 1], [1, 1], [2, 1]], np.float64)
    return ornt


def _in_view_order(ornt: np.ndarray, values) -> list:
    """Per-axis ``values`` (shape, spacing) in the viewer's axis order (``ornt``: :func:`_ras_orientation`)."""
    out = [None] * 3
    for src, (dst, _) in enumerate(ornt):
        out[int(dst)] = values[src]
    return out


def run(volume, settings: Settings, workdir: Path, *, model_dir: Path | None = None,
        progress: Callable[[str], None] = lambda s: None) -> dict:
    """Compress, decode (restore with the model in ``model_dir`` if given), score; return the figures.

    PSNR is ``None`` (shown as ∞) for an exact reconstruction.
    """
    from fedtensor.bench.harness import compile_count
    from fedtensor.codec import compress, decompress, read_info
    from fedtensor.io import write_volume
    from fedtensor.metrics import max_abs_error, psnr, ssim3d

    data = np.asarray(volume.data)
    from nibabel.orientations import apply_orientation

    ornt = _ras_orientation(volume.affine)
    np.save(workdir / "original.npy", np.ascontiguousarray(apply_orientation(data, ornt)))
    progress("compressing")
    compiles = compile_count()
    t0 = time.perf_counter()
    blob = compress(volume, **settings.kwargs())
    encode_s = time.perf_counter() - t0
    compiled = compile_count() > compiles  # first use of a shape: the time includes JAX compilation
    (workdir / "result.ftz").write_bytes(blob)
    progress("decoding")
    t0 = time.perf_counter()
    decoded = decompress(blob)
    decode_s = time.perf_counter() - t0
    info = read_info(blob)
    out = {"codec": info.get("codec"), "settings": asdict(settings), "target": settings.describe(),
           "shape": list(data.shape), "dtype": data.dtype.name, "spacing": list(volume.spacing),
           "view_shape": _in_view_order(ornt, data.shape), "view_spacing": _in_view_order(ornt, volume.spacing),
           "original_bytes": int(data.nbytes), "ftz_bytes": len(blob), "bpv": info["bits_per_voxel"],
           "ratio": info["ratio"], "encode_s": encode_s, "decode_s": decode_s, "compiled": compiled,
           "psnr": _finite(psnr(data, decoded.data)), "max_error": max_abs_error(data, decoded.data),
           "diff_scale": diff_scale(data, decoded.data)}
    progress("measuring SSIM")
    out["ssim"] = float(ssim3d(data, decoded.data))
    shown = decoded
    if model_dir is not None:
        progress("restoring with the model")
        from fedtensor.nn.infer import load_model, model_mismatch, restore

        model = load_model(model_dir)
        t0 = time.perf_counter()
        restored = restore(decoded, info, model)
        out["restore"] = {"model_id": model.model_id, "seconds": time.perf_counter() - t0,
                          "applied": restored is not decoded, "warning": model_mismatch(info, model, decoded.data),
                          "psnr": _finite(psnr(data, restored.data)), "ssim": float(ssim3d(data, restored.data)),
                          "max_error": max_abs_error(data, restored.data)}
        # A model that lowers this volume's PSNR (trained on other data) is shown, not used: the slices
        # and the download stay the decoded volume, which meets the target.
        db = [math.inf if v is None else v for v in (out["restore"]["psnr"], out["psnr"])]  # (None: exact)
        worse = restored is not decoded and db[0] < db[1]
        out["restore"]["declined"] = worse
        shown = decoded if worse else restored
    np.save(workdir / "decoded.npy", np.ascontiguousarray(apply_orientation(np.asarray(shown.data), ornt)))
    write_volume(shown, workdir / "decoded.nii.gz")
    return out
