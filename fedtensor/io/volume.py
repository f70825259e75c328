"""The :class:`Volume`: a 3D array with its geometry and provenance."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedtensor.errors import VolumeError

SUPPORTED_DTYPES = tuple(
    np.dtype(t) for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
)


@dataclass
class Volume:
    """A 3D scalar volume.

    ``data`` keeps the original dtype (so lossless coding can be bit-exact); ``spacing`` is the voxel
    size in mm along the three array axes; ``affine`` the 4×4 voxel-to-world (RAS) matrix; ``meta``
    free-form provenance (source path, modality, DICOM UIDs, ...), JSON-serialisable.
    """

    data: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.data = np.asarray(self.data)
            self.spacing = tuple(float(s) for s in self.spacing)
            self.affine = np.asarray(self.affine, dtype=np.float64)
        except (TypeError, ValueError) as e:  # a ragged list, spacing=1.0, affine="x", ...
            raise VolumeError(f"not a volume: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if self.data.dtype.kind in "iuf" and not self.data.dtype.isnative:  # big-endian data (as .npy reads it)
            self.data = self.data.astype(self.data.dtype.newbyteorder("="))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def validate(self) -> "Volume":
        """Raise :class:`VolumeError` unless this is a non-empty, finite 3D volume of a supported dtype, with
        a finite value range, spacing and affine."""
        a = self.data
        if a.ndim != 3:
            raise VolumeError(f"expected a 3D volume, got {a.ndim}D array of shape {a.shape}")
        if a.size == 0:
            raise VolumeError(f"volume is empty (shape {a.shape})")
        if a.dtype not in SUPPORTED_DTYPES:
            raise VolumeError(
                f"unsupported dtype {a.dtype}; supported: {', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise VolumeError("volume contains NaN or Inf values")
        if a.dtype.kind == "f" and not np.isfinite(float(a.max()) - float(a.min())):
            raise VolumeError("volume's value range overflows (max − min is beyond float64)")
        if len(self.spacing) != 3 or not all(np.isfinite(self.spacing)) or min(self.spacing) <= 0:
            raise VolumeError(f"invalid voxel spacing {self.spacing}")
        if self.affine.shape != (4, 4) or not np.isfinite(self.affine).all():
            raise VolumeError(f"affine must be a finite 4x4 matrix, got shape {self.affine.shape}")
        return self


def integer_valued(a: np.ndarray) -> bool:
    """Every voxel an integer an integer coder gives back bit for bit: integer dtypes, or floats that
    are whole numbers below 2⁵² and never −0.0 (it would come back as +0.0)."""
    if a.dtype.kind in "iub":
        return True
    return bool(np.all(np.abs(a) < 2**52) and np.array_equal(a, np.rint(a)) and not np.any(np.signbit(a) & (a == 0)))
