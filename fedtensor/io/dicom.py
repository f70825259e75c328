"""A DICOM series directory → :class:`Volume`.

Conventions (the same as dicom2nifti / dcm2niix produce, so a series read here lines up with the
NIfTI those tools write):

* array axes are ``(x, y, z)`` = (column index, row index, slice index): ``data[i, j, k]`` is
  ``pixel_array[j, i]`` of the k-th slice, i.e. each slice's ``pixel_array`` is transposed;
* slices are sorted by the projection of ``ImagePositionPatient`` onto the slice normal
  ``n = r × c`` (``r``, ``c`` = the row and column direction cosines of ``ImageOrientationPatient``),
  ascending — never by file name or InstanceNumber;
* ``spacing = (PixelSpacing[1], PixelSpacing[0], slice gap)`` where the slice gap is the distance
  between consecutive slice planes along ``n`` (not SliceThickness, which may differ);
* ``affine`` maps ``(i, j, k, 1)`` to RAS+ millimetres. DICOM patient coordinates are LPS+, so with
  ``P0`` = ImagePositionPatient of the first sorted slice and ``s = (P_last - P0) / (N - 1)``::

      LPS = [[r*dx, c*dy, s, P0], [0, 0, 0, 1]]     (columns; dx = PixelSpacing[1], dy = PixelSpacing[0])
      affine = diag(-1, -1, 1, 1) @ LPS             (LPS → RAS: negate the x and y rows)

  The third column is the actual slice step, so a gantry tilt is represented as a shear.
* values are ``stored * RescaleSlope + RescaleIntercept`` (per slice). When every slope is 1 and every
  intercept an integer the values are exact integers, in int16 when they fit, else in the stored dtype
  or int32; otherwise float32 (float64 for 32-bit stored integers). A slope of 0 is refused.
* files without the Part 10 preamble and file meta are read too, when they open with a data set's
  first group (0008, little endian) and hold an image slice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedtensor.errors import VolumeError
from fedtensor.io.npy import one_line, validated
from fedtensor.io.volume import Volume

# Relative tolerance on slice gaps (and on deviation from a straight slice stack).
GAP_RTOL = 0.01
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ts_name(ts) -> str:
    """A transfer syntax UID with its name (``1.2.840.10008.1.2.4.80, JPEG-LS Lossless``) where pydicom knows it."""
    name = getattr(ts, "name", "")
    return f"{ts}, {name}" if name and name != str(ts) else str(ts)


def _floats(ds, keyword: str, n: int, fname: str) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.isfinite(arr).all():
        raise VolumeError(f"DICOM file {fname} has no valid {keyword}; cannot build a 3D volume")
    return arr


def _scalar(ds, keyword: str, default: float, fname: str) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise VolumeError(f"DICOM file {fname} has an invalid {keyword}: {value!r}") from None
    if not np.isfinite(v):
        raise VolumeError(f"DICOM file {fname} has an invalid {keyword}: {value!r}")
    return v


def _int(ds, keyword: str, default: int, fname: str) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise VolumeError(f"DICOM file {fname} has an invalid {keyword}: {value!r}") from None


def looks_like_dicom(path: Path) -> bool:
    """The DICOM Part 10 magic ``DICM`` after the 128-byte preamble (a name says nothing: macOS leaves
    ``._IM0001.dcm`` resource files next to the slices)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


_MUTED = {"readers": 0, "was": False}
_MUTED_LOCK = threading.Lock()


@contextlib.contextmanager
def _pydicom_log_muted():
    """pydicom logs every warning it issues; while a file is read its warnings are caught instead,
    to become the error's cause or be re-issued, so the log would only repeat them. (Counted: readers
    in several threads, e.g. the web server's, overlap; the last one out restores the logger.)"""
    logger = logging.getLogger("pydicom")
    with _MUTED_LOCK:
        if _MUTED["readers"] == 0:
            _MUTED["was"] = logger.disabled
            logger.disabled = True
        _MUTED["readers"] += 1
    try:
        yield
    finally:
        with _MUTED_LOCK:
            _MUTED["readers"] -= 1
            if _MUTED["readers"] == 0:
                logger.disabled = _MUTED["was"]


def _headerless_slice(path: Path):
    """``path`` as a DICOM image slice written without the Part 10 preamble, ``DICM`` magic and file
    meta (older scanners and tools write such files; pydicom reads them when forced), or None for
    anything else.

    Only a file opening with a group 0008 element (a data set's first group, little endian) is read:
    a forced read parses anything (zeros at ~2 MB/s, minutes for a large stray file), and a file that
    opens with file meta could name a deflated transfer syntax, which pydicom inflates whole in memory.
    """
    import pydicom

    try:
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x08\x00":
                return None
    except OSError:
        return None
    try:
        with warnings.catch_warnings(), _pydicom_log_muted():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
        if not ("PixelData" in ds and "ImagePositionPatient" in ds and "Rows" in ds):
            return None
        # No file meta: the data set's own encoding, which pydicom detected (native pixels only).
        implicit, _ = ds.original_encoding
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                                          pydicom.uid.ExplicitVRLittleEndian)
        return ds
    except Exception:  # a stray file that merely began like a dataset
        return None


def _read_datasets(directory: Path) -> list[tuple[str, object]]:
    """(file name, dataset) for every DICOM image file directly in ``directory``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        entries = sorted(directory.iterdir())
    except OSError as e:
        raise VolumeError(f"cannot list DICOM directory {directory}: {e.strerror or e}") from None
    out, n_subdirs = [], 0
    for p in entries:
        if p.is_dir():
            n_subdirs += 1
            continue
        if not p.is_file():
            continue
        try:
            with warnings.catch_warnings(record=True) as caught, _pydicom_log_muted():
                warnings.simplefilter("always")
                ds = pydicom.dcmread(p, force=False)
        except InvalidDicomError as e:
            if looks_like_dicom(p):  # a damaged slice, not a stray file: skipping it would hide the cause
                raise VolumeError(f"cannot read DICOM file {p.name} (truncated or corrupt?): {one_line(e)}") from None
            ds = _headerless_slice(p)
            if ds is None:
                continue  # not a DICOM file (README, .DS_Store, ...)
            caught = []
        except Exception as e:  # truncated / corrupt DICOM
            raise VolumeError(f"cannot read DICOM file {p.name}: {one_line(e)}") from None
        eof = [w for w in caught if "end of file" in str(w.message).lower()]
        if eof:
            why = str(eof[0].message).splitlines()[0].split(" found in file")[0]
            raise VolumeError(f"cannot read DICOM file {p.name} (truncated or corrupt?): {why}")
        if "PixelData" not in ds:
            if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
                raise VolumeError(f"DICOM file {p.name} holds float pixel data (parametric map), which is not "
                                  "supported; convert the series to NIfTI first")
            sop = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
            if "Rows" in ds or "ImagePositionPatient" in ds or "Image Storage" in getattr(sop, "name", ""):
                why = "; ".join(str(w.message).splitlines()[0] for w in caught[:1]) or "no pixel data"
                raise VolumeError(f"cannot read DICOM image file {p.name} (truncated or corrupt?): {why}")
            continue  # DICOMDIR, structured report, presentation state, ...
        for w in caught:  # a readable file's notes reach the caller once (pydicom also logs each)
            warnings.warn(str(w.message), w.category, stacklevel=2)
        out.append((p.name, ds))
    if not out:
        hint = " (subdirectories are not searched; pass the series directory itself)" if n_subdirs else ""
        raise VolumeError(f"no DICOM image files in directory {directory}{hint}")
    return out


def _rescaled(raw: np.ndarray, slopes: np.ndarray, inters: np.ndarray) -> np.ndarray:
    """``raw * slope + intercept`` per slice (the last axis): exact integers in the first of int16, the
    stored dtype and int32 that holds them (unit slopes, integer intercepts); else float32, or float64
    for 32-bit stored values (float32 would round those above 2²⁴)."""
    if raw.dtype.kind in "iub" and np.all(slopes == 1.0) and np.all(inters == np.round(inters)):
        ints = raw.astype(np.int64) + inters.astype(np.int64)[None, None, :]
        lo, hi = (int(ints.min()), int(ints.max())) if ints.size else (0, 0)
        for dtype in (np.int16, raw.dtype, np.int32):
            if np.dtype(dtype).kind in "iu" and np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return ints.astype(dtype)
        del ints
    out = np.float64 if raw.dtype.kind in "iu" and raw.dtype.itemsize >= 4 or raw.dtype.itemsize > 4 else np.float32
    return (raw.astype(np.float64) * slopes[None, None, :] + inters[None, None, :]).astype(out)


def read_dicom_series(directory: str | os.PathLike, max_voxels: int | None = None) -> Volume:
    """Read a directory holding exactly one DICOM image series as an (x, y, z) volume.

    See the module docstring for the axis, spacing, affine (LPS → RAS) and rescale conventions.
    Raises :class:`VolumeError` (one line) for: several series in the directory, multi-frame or
    colour images, inconsistent Rows/Columns/orientation/pixel spacing, duplicate slice positions,
    missing or uneven slice gaps (tolerance 1 % of the gap), undecodable pixel data, and more than
    ``max_voxels`` voxels (checked from the headers, before any pixel data is decoded: compressed
    pixel data can be far smaller than the array it decodes to).
    """
    directory = Path(directory)
    if not directory.exists():
        raise VolumeError(f"no such file or directory: {directory}")
    if not directory.is_dir():
        raise VolumeError(f"not a DICOM series directory: {directory}")

    files = _read_datasets(directory)
    series: dict[str, list] = defaultdict(list)
    for name, ds in files:
        series[str(ds.get("SeriesInstanceUID", ""))].append((name, ds))
    if len(series) > 1:
        raise VolumeError(
            f"directory holds {len(series)} DICOM series; pass one series directory ({directory})"
        )
    (uid, slices), = series.items()
    if len(slices) < 2:
        raise VolumeError(
            f"DICOM series in {directory} has a single slice; a 3D volume needs at least 2 slices"
        )

    # --- geometry: orientation, pixel spacing, size consistency --------------------------------
    name0, ds0 = slices[0]
    iop0 = _floats(ds0, "ImageOrientationPatient", 6, name0)
    ps0 = _floats(ds0, "PixelSpacing", 2, name0)
    rows0, cols0 = _int(ds0, "Rows", 0, name0), _int(ds0, "Columns", 0, name0)
    for name, ds in slices:
        frames = _int(ds, "NumberOfFrames", 1, name) or 1  # 0 is written by some tools for single frames
        if frames != 1:
            raise VolumeError(f"DICOM file {name} is multi-frame ({frames} frames); only single-frame series are supported")
        if (_int(ds, "SamplesPerPixel", 1, name) or 1) != 1:
            raise VolumeError(f"DICOM file {name} is not a greyscale image (SamplesPerPixel={ds.SamplesPerPixel})")
        rows, cols = _int(ds, "Rows", 0, name), _int(ds, "Columns", 0, name)
        if (rows, cols) != (rows0, cols0):
            raise VolumeError(
                f"inconsistent image size in DICOM series: {name} is {rows}x{cols}, "
                f"{name0} is {rows0}x{cols0} (rows x columns)"
            )
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, name), iop0, atol=1e-4):
            raise VolumeError(f"inconsistent ImageOrientationPatient in DICOM series: {name} differs from {name0}")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, name), ps0, rtol=1e-4, atol=1e-6):
            raise VolumeError(f"inconsistent PixelSpacing in DICOM series: {name} differs from {name0}")
    if rows0 <= 0 or cols0 <= 0:
        raise VolumeError(f"DICOM file {name0} has an invalid image size {rows0}x{cols0}")
    if max_voxels is not None and rows0 * cols0 * len(slices) > max_voxels:
        raise VolumeError(f"DICOM series in {directory} has {rows0 * cols0 * len(slices):,} voxels; "
                          f"at most {max_voxels:,} are accepted")

    r, c = iop0[:3], iop0[3:]
    normal = np.cross(r, c)
    # unit row and column directions at right angles (else the affine's columns disagree with the spacing)
    if not np.allclose([np.linalg.norm(r), np.linalg.norm(c), np.linalg.norm(normal)], 1.0, atol=1e-3):
        raise VolumeError(f"DICOM file {name0} has an invalid ImageOrientationPatient {[float(v) for v in iop0]}")

    # --- sort by position along the normal; check gaps ------------------------------------------
    positions = np.array([_floats(ds, "ImagePositionPatient", 3, name) for name, ds in slices])
    proj = positions @ normal
    order = np.argsort(proj, kind="stable")
    slices = [slices[i] for i in order]
    positions, proj = positions[order], proj[order]
    gaps = np.diff(proj)
    n = len(slices)
    for k in range(n - 1):
        if gaps[k] <= 1e-3:
            raise VolumeError(
                f"duplicate slice position {proj[k]:.3f} mm along the slice normal in DICOM series "
                f"({slices[k][0]} and {slices[k + 1][0]})"
            )
    expected = float(np.median(gaps))
    for k in range(n - 1):
        if abs(gaps[k] - expected) > GAP_RTOL * expected:
            raise VolumeError(
                f"uneven slice spacing in DICOM series: gap between sorted slices {k} and {k + 1} "
                f"({slices[k][0]}, {slices[k + 1][0]}) is {gaps[k]:.4g} mm, expected {expected:.4g} mm "
                f"(missing slice?)"
            )
    step = (positions[-1] - positions[0]) / (n - 1)
    line = positions[0] + np.arange(n)[:, None] * step
    if np.max(np.linalg.norm(positions - line, axis=1)) > GAP_RTOL * expected:
        raise VolumeError("DICOM slice positions do not lie on a straight line; cannot build a 3D volume")
    slice_gap = float((proj[-1] - proj[0]) / (n - 1))

    # --- pixels + rescale -----------------------------------------------------------------------
    raw = None
    slopes, inters = np.empty(n), np.empty(n)
    for k, (name, ds) in enumerate(slices):
        try:
            px = ds.pixel_array
        except Exception as e:
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
            raise VolumeError(
                f"cannot decode pixel data of DICOM file {name} (transfer syntax {_ts_name(ts)}): "
                f"{'; '.join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__}"
            ) from None
        if px.shape != (rows0, cols0):
            raise VolumeError(f"DICOM file {name}: pixel data shape {px.shape} != Rows x Columns {(rows0, cols0)}")
        if raw is None:
            raw = np.empty((cols0, rows0, n), dtype=px.dtype)
        elif px.dtype != raw.dtype:
            raw = raw.astype(np.result_type(raw.dtype, px.dtype))
        raw[:, :, k] = px.T
        slopes[k] = _scalar(ds, "RescaleSlope", 1.0, name)
        inters[k] = _scalar(ds, "RescaleIntercept", 0.0, name)
        if slopes[k] == 0:
            raise VolumeError(f"DICOM file {name} has RescaleSlope 0 (every voxel would read as the intercept)")

    data = _rescaled(raw, slopes, inters)

    dx, dy = float(ps0[1]), float(ps0[0])
    lps = np.eye(4)
    lps[:3, 0] = r * dx
    lps[:3, 1] = c * dy
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = _LPS_TO_RAS @ lps

    meta = {
        "format": "dicom",
        "source": str(directory),
        "SeriesInstanceUID": uid,
        "Modality": str(ds0.get("Modality", "")),
    }
    vol = Volume(data=data, spacing=(dx, dy, slice_gap), affine=affine, meta=meta)
    return validated(vol, directory)
