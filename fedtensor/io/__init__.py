"""Volume I/O: NIfTI (``.nii``/``.nii.gz``), ``.npy`` and DICOM series directories.

``read_volume`` / ``write_volume`` dispatch on the path; every failure on bad input is a one-line
:class:`~fedtensor.errors.VolumeError` (or :class:`~fedtensor.errors.FedtensorError` for output
problems), never a third-party exception.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedtensor.errors import VolumeError
from fedtensor.io.atomic import atomic_path, atomic_write_bytes
from fedtensor.io.dicom import read_dicom_series
from fedtensor.io.nifti import read_nifti, write_nifti
from fedtensor.io.npy import read_npy, write_npy
from fedtensor.io.volume import SUPPORTED_DTYPES, Volume

READ_FORMATS = ".nii, .nii.gz, .npy, or a DICOM series directory"
WRITE_FORMATS = ".nii, .nii.gz, .npy"

__all__ = [
    "Volume",
    "SUPPORTED_DTYPES",
    "read_volume",
    "write_volume",
    "read_nifti",
    "write_nifti",
    "read_npy",
    "write_npy",
    "read_dicom_series",
    "atomic_path",
    "atomic_write_bytes",
    "first_repeat",
]


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".nii.gz") or name.endswith(".nii"):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    return None


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D volume: ``.nii``/``.nii.gz`` (nibabel), ``.npy``, or a directory = one DICOM series.

    The returned volume is validated (3D, non-empty, finite, supported dtype).
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"no such file or directory: {path}")
    if path.is_dir():
        return read_dicom_series(path)
    kind = _kind(path)
    if kind == "nifti":
        return read_nifti(path)
    if kind == "npy":
        return read_npy(path)
    raise VolumeError(f"unsupported input file type: {path.name}; supported: {READ_FORMATS}")


def write_volume(volume: Volume, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``volume`` atomically as NIfTI (``.nii``/``.nii.gz``) or ``.npy``; return the path.

    NIfTI keeps the affine, spacing (header zooms) and ``volume.data``'s dtype; ``.npy`` stores the
    array only. Refuses to overwrite an existing file unless ``force``.
    """
    path = Path(path)
    kind = _kind(path)
    if kind is None:
        raise VolumeError(f"unsupported output file type: {path.name}; supported: {WRITE_FORMATS}")
    volume.validate()
    if kind == "nifti":
        return write_nifti(volume, path, force=force)
    return write_npy(volume, path, force=force)


def first_repeat(paths: list[Path]) -> tuple[Path, Path] | None:
    """The first two of ``paths`` that name the same file or directory (after resolving), or ``None``."""
    seen: dict[Path, Path] = {}
    for p in paths:
        r = p.resolve()
        if r in seen:
            return seen[r], p
        seen[r] = p
    return None
