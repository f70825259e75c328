"""Plain ``.npy`` arrays (no geometry: spacing (1, 1, 1), identity affine), plus the array checks
shared by all readers."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np

from fedtensor.errors import FedtensorError, VolumeError
from fedtensor.io.atomic import atomic_path
from fedtensor.io.volume import Volume


def one_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` for wrapping third-party exceptions."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0]}" if msg else type(exc).__name__


def as_native_3d(arr: np.ndarray, source: str | os.PathLike) -> np.ndarray:
    """Native-byte-order, C-contiguous array with trailing singleton dims beyond the third squeezed away.

    C order because NIfTI's is Fortran's (x fastest): a slab along axis 0 of such an array is scattered
    in memory, and every transfer of it to JAX transposes it (8 % of a chest CT's compress time); one
    copy here (~10 ms for 2.5 MVoxels) makes them plain copies.

    Raises :class:`VolumeError` naming the dimensionality if the result is not 3D.
    """
    a = np.asarray(arr)
    while a.ndim > 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.size == 0:
        raise VolumeError(f"{source}: volume is empty (shape {tuple(a.shape)})")
    if a.ndim != 3:
        extra = f" with {a.shape[3]} volumes along the 4th axis" if a.ndim == 4 else ""
        raise VolumeError(
            f"{source}: got a {a.ndim}D image of shape {tuple(a.shape)}{extra}; a 3D volume is needed"
        )
    if not a.dtype.isnative or not a.flags.c_contiguous:
        a = a.astype(a.dtype.newbyteorder("="), order="C")
    if a.dtype.kind in "iu" and a.dtype.itemsize == 8:  # NumPy's default integer: narrow it when it can be
        narrow = np.dtype(np.int32 if a.dtype.kind == "i" else np.uint32)
        if np.iinfo(narrow).min <= a.min() and a.max() <= np.iinfo(narrow).max:
            warnings.warn(f"{source}: {a.dtype} voxels read as {narrow} (every value fits; decoded volumes are "
                          f"{narrow})", stacklevel=2)
            a = a.astype(narrow)
    return a


def validated(vol: Volume, source: str | os.PathLike) -> Volume:
    """``vol.validate()`` with the source path prefixed to any error message."""
    try:
        return vol.validate()
    except VolumeError as e:
        raise VolumeError(f"{source}: {e}") from None


# numpy parses a .npy header with ast.literal_eval, and CPython 3.11's AST construction is not safe
# across threads: the web server's parallel slice requests failed now and then with "SystemError: AST
# constructor recursion depth mismatch" (python/cpython#106905). fedtensor opens every .npy through here.
_HEADER_LOCK = threading.Lock()


def open_npy(path: str | os.PathLike) -> np.ndarray:
    """``path`` memory-mapped read-only (``allow_pickle=False``), its header parsed under a lock shared by
    every thread (a ``.npz`` gives its ``NpzFile``)."""
    with _HEADER_LOCK:
        return np.load(path, allow_pickle=False, mmap_mode="r")


def read_npy(path: str | os.PathLike) -> Volume:
    """Read a 3D ``.npy`` array (``allow_pickle=False``); spacing (1, 1, 1), identity affine."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":  # else numpy suggests loading it as a pickle
                raise VolumeError(f"cannot read .npy file {path}: not a NumPy array file")
        arr = open_npy(path)
        if isinstance(arr, np.ndarray):
            arr = np.array(arr, order="C")  # read into memory, in the order as_native_3d keeps
    except VolumeError:
        raise
    except FileNotFoundError:
        raise VolumeError(f"no such file or directory: {path}") from None
    except Exception as e:  # ValueError (pickled/object array, bad header), EOFError, OSError, ...
        raise VolumeError(f"cannot read .npy file {path}: {_npy_reason(e)}") from None
    if not isinstance(arr, np.ndarray):  # np.load on a .npz returns an NpzFile
        raise VolumeError(f"cannot read .npy file {path}: not a single array")
    data = as_native_3d(arr, path)
    vol = Volume(data=data, spacing=(1.0, 1.0, 1.0), affine=np.eye(4), meta={"source": str(path), "format": "npy"})
    return validated(vol, path)


def _npy_reason(e: Exception) -> str:
    """numpy's memory-mapping errors in a user's words (the rest as they come)."""
    text = str(e)
    if "Python objects" in text or "pickle" in text.lower():
        return "it holds Python objects (an object array), not numbers"
    if "mmap length is greater than file size" in text or "cannot mmap an empty file" in text:
        return "truncated (its header declares more data than the file holds)"
    return one_line(e)


def write_npy(volume: Volume, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``volume.data`` as ``.npy`` atomically (spacing and affine are not stored)."""
    path = Path(path)
    with atomic_path(path, force=force) as tmp:
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(volume.data), allow_pickle=False)
        except OSError as e:  # numpy reports a short write as "N requested and M written", without errno
            why = e.strerror or (f"only part of it was written ({e}): is the disk full?" if "requested" in str(e) else e)
            raise FedtensorError(f"cannot write {path}: {why}") from None
    return path
