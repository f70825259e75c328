"""Shared helpers for the fedtensor benchmark scripts (not part of the library, not a test).

What lives here:

* locating the sample data (``--data`` / ``FEDTENSOR_DATA`` / ``<repo>/../shared/data``) and loading
  volumes with :func:`fedtensor.io.read_volume` (with a clearly-flagged nibabel/pydicom fallback
  while the library reader is unavailable);
* the metric definitions every benchmark must share: :func:`psnr` and :func:`bits_per_voxel`;
* timing (:func:`time_best`, :func:`mvoxels_per_s`) and peak-memory measurement
  (:class:`RssPeakSampler`, :func:`measure_peak_rss`);
* output helpers: environment description, tables (rich when installed), JSON dump.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # allow `python benchmarks/x.py` from a source checkout
    sys.path.insert(0, str(REPO_ROOT))

#: The CT sample volumes, in the order benchmarks report them.
CT_VOLUMES = ("ct_abdomen.nii.gz", "ct_chest.nii.gz", "ct_head_uint8.nii.gz", "ct_series_dicom")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """``$FEDTENSOR_DATA`` if set, else ``<repo>/../shared/data``."""
    env = os.environ.get("FEDTENSOR_DATA")
    if env:
        return Path(env).expanduser()
    return (REPO_ROOT / ".." / "shared" / "data").resolve()


def resolve_volume_path(name: str, data_dir: Path) -> Path:
    """A volume given by name (relative to ``data_dir``) or by path; raise if it does not exist."""
    p = Path(name).expanduser()
    if not p.exists():
        p = data_dir / name
    if not p.exists():
        raise FileNotFoundError(f"volume {name!r} not found (looked in {data_dir})")
    return p


def volume_label(path: Path) -> str:
    """Short display name: file name without ``.nii.gz``/``.nii``, or the directory name."""
    n = path.name.rstrip("/")
    for suf in (".nii.gz", ".nii"):
        if n.endswith(suf):
            return n[: -len(suf)]
    return n


@dataclass
class _FallbackVolume:
    """Minimal stand-in for :class:`fedtensor.io.Volume`, used only by the temporary fallback reader."""

    data: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    meta: dict = field(default_factory=dict)


def _fallback_read(path: Path) -> _FallbackVolume:
    """TEMPORARY reader (nibabel / pydicom) for when ``fedtensor.io.read_volume`` is not importable.

    Keeps the stored dtype for NIfTI (no scaling applied when slope/intercept are identity); for a DICOM
    series, sorts slices by ImagePositionPatient along the slice normal, applies RescaleSlope/Intercept
    and stacks the (column, row) slices along the last axis.
    """
    if path.is_dir():
        import pydicom

        ds = [pydicom.dcmread(f) for f in sorted(path.iterdir()) if f.is_file()]
        iop = np.asarray(ds[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        ds.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, dtype=float))))
        slope = float(getattr(ds[0], "RescaleSlope", 1.0))
        inter = float(getattr(ds[0], "RescaleIntercept", 0.0))
        raw = np.stack([d.pixel_array.T for d in ds], axis=-1)  # (columns, rows, slices), like read_volume
        if slope.is_integer() and inter.is_integer():
            data = raw.astype(np.int32) * int(slope) + int(inter)
            lo, hi = int(data.min()), int(data.max())
            for t in (np.int16, np.int32):
                if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                    data = data.astype(t)
                    break
        else:
            data = raw.astype(np.float32) * slope + inter
        ps = [float(x) for x in ds[0].PixelSpacing]
        dz = abs(
            float(np.dot(normal, np.asarray(ds[-1].ImagePositionPatient, float)))
            - float(np.dot(normal, np.asarray(ds[0].ImagePositionPatient, float)))
        ) / max(len(ds) - 1, 1)
        return _FallbackVolume(data, (ps[0], ps[1], dz or 1.0), meta={"source": str(path), "reader": "fallback"})
    import nibabel as nib

    img = nib.load(str(path))
    slope, inter = img.dataobj.slope, img.dataobj.inter
    if (slope in (None, 1) or np.isnan(slope)) and (inter in (None, 0) or np.isnan(inter)):
        data = np.asarray(img.dataobj)
    else:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    return _FallbackVolume(
        data,
        tuple(float(z) for z in img.header.get_zooms()[:3]),
        img.affine,
        meta={"source": str(path), "reader": "fallback"},
    )


def load_volume(path: Path):
    """Load a volume with :func:`fedtensor.io.read_volume`.

    If the library reader cannot be imported, warn loudly and use a temporary nibabel/pydicom reader
    (marked ``meta["reader"] == "fallback"``) so benchmark development is not blocked.
    """
    try:
        from fedtensor.io import read_volume
    except ImportError as exc:  # pragma: no cover - transitional
        warnings.warn(
            f"fedtensor.io.read_volume unavailable ({exc}); using the nibabel/pydicom fallback reader",
            stacklevel=2,
        )
        fv = _fallback_read(path)
        try:  # hand the codec a real Volume when that class already exists
            from fedtensor.io.volume import Volume

            return Volume(fv.data, fv.spacing, fv.affine, fv.meta)
        except ImportError:
            return fv
    return read_volume(path)


def volume_reader_name() -> str:
    """``"fedtensor.io.read_volume"`` or ``"fallback (nibabel/pydicom)"``."""
    try:
        from fedtensor.io import read_volume  # noqa: F401
    except ImportError:
        return "fallback (nibabel/pydicom)"
    return "fedtensor.io.read_volume"


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def value_range(original: np.ndarray) -> float:
    """max − min of the original volume, in original units (the PSNR peak)."""
    return float(np.max(original)) - float(np.min(original))


def rmse(original: np.ndarray, decoded: np.ndarray) -> float:
    """Root-mean-square error over all voxels, in original units (float64 accumulation)."""
    if original.shape != decoded.shape:
        raise ValueError(f"shape mismatch: original {original.shape} vs decoded {decoded.shape}")
    o = original.reshape(-1)
    d = decoded.reshape(-1)
    total = 0.0
    step = 1 << 22  # bounded temporaries for large volumes
    for i in range(0, o.size, step):
        e = o[i : i + step].astype(np.float64) - d[i : i + step].astype(np.float64)
        total += float(np.dot(e, e))
    return math.sqrt(total / o.size)


def psnr(original: np.ndarray, decoded: np.ndarray, peak: float | None = None) -> float:
    """PSNR = 20·log10((max − min of original) / RMSE), over all voxels, in original units.

    ``inf`` when the reconstruction is exact.
    """
    e = rmse(original, decoded)
    p = value_range(original) if peak is None else float(peak)
    if e == 0.0:
        return math.inf
    return 20.0 * math.log10(p / e)


def bits_per_voxel(nbytes: int, nvoxels: int) -> float:
    """bpv = 8 · (total compressed bytes) / voxels."""
    return 8.0 * nbytes / nvoxels


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    best_s: float
    all_s: list
    warmup: int
    result: Any = None  # return value of the last call

    def to_dict(self) -> dict:
        return {"best_s": self.best_s, "all_s": self.all_s, "warmup": self.warmup}


def time_best(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed (JIT compilation, caches), then ``repeat`` times timed.

    Returns the best (minimum) wall time — the least-disturbed run on a shared machine — together
    with all timed runs and the last return value.
    """
    result = None
    for _ in range(max(0, warmup)):
        result = fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return Timing(min(times), times, warmup, result)


def mvoxels_per_s(nvoxels: int, seconds: float) -> float:
    """Throughput in MVoxel/s = voxels / seconds / 1e6."""
    return nvoxels / seconds / 1e6 if seconds > 0 else math.inf


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------

# The sampler lives in the library now (``fedtensor.bench.memory``), shared with ``fedtensor bench``.
from fedtensor.bench.memory import (  # noqa: E402,F401 - re-exported for the benchmark scripts
    MemoryResult,
    RssPeakSampler,
    _read_hwm,
    _reset_hwm,
    current_rss,
    measure_peak_rss,
    release_free_memory,
)


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------


def environment() -> dict:
    """Versions and machine description recorded with every benchmark result."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for mod in ("jax", "jaxlib", "imagecodecs", "nibabel", "pydicom"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional
            pass
    try:
        import imagecodecs

        info["openjpeg"] = imagecodecs.jpeg2k_version()
    except Exception:  # noqa: BLE001
        pass
    try:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001
        pass
    try:
        import fedtensor

        info["fedtensor"] = getattr(fedtensor, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    return info


def fmt(x: Any, spec: str = ".3f", none: str = "—") -> str:
    """Format a number (``none`` for None, ``inf`` for infinities)."""
    if x is None:
        return none
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return format(x, spec)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], caption: str | None = None) -> None:
    """Print a table with rich when available, else as aligned plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None  # type: ignore[assignment]
    if Console is not None:
        t = Table(title=title, caption=caption, caption_justify="left")
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
        for r in rows:
            t.add_row(*[str(x) for x in r])
        Console(width=max(160, _term_width())).print(t)
        return
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(str(c)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    line = "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths))))
    if caption:
        print(caption)


def _term_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 160


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (inf/nan as strings, numpy scalars as numbers)."""
    from fedtensor.jsonable import jsonable

    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as f:
        json.dump(jsonable(obj), f, indent=2, default=_json_default)
        f.write("\n")


def tiled_ct(source: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """An int16 volume of ``shape`` made of mirrored copies of ``source`` (real texture, no seams)."""
    a = source.astype(np.int16)
    for ax, n in enumerate(shape):
        reps = -(-n // a.shape[ax])
        a = np.concatenate([a if i % 2 == 0 else np.flip(a, ax) for i in range(reps)], axis=ax)
    return np.ascontiguousarray(a[:shape[0], :shape[1], :shape[2]])
