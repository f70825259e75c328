"""NIfTI (``.nii`` / ``.nii.gz``) via nibabel."""

from __future__ import annotations

import gzip
import math
import os
import warnings
from pathlib import Path

import numpy as np

from fedtensor.errors import FedtensorError, VolumeError
from fedtensor.io.atomic import atomic_path
from fedtensor.io.npy import as_native_3d, one_line, validated
from fedtensor.io.scaling import apply_scaling, scaling_of, stored_integers
from fedtensor.io.volume import Volume


def _is_identity_scaling(slope, inter) -> bool:
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    return slope == 1.0 and inter == 0.0


def _scaled(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """``raw · slope + inter``: integers stay integers (the on-disk dtype, else int16, else int32, the
    first that holds them: CT stored as uint16 with ``scl_inter`` −1024 reads as int16), the rest float32
    (float64 from 32-bit integers or float64, or beyond float32's range)."""
    if raw.dtype.kind in "iu" and raw.size and all(math.isfinite(v) and v == round(v) for v in (slope, inter)):
        # the scaled range, exactly (Python integers), before any int64 arithmetic that could wrap
        ends = [int(v) * int(slope) + int(inter) for v in (raw.min(), raw.max())]
        lo, hi = min(ends), max(ends)
        for dtype in (raw.dtype.newbyteorder("="), np.dtype(np.int16), np.dtype(np.int32)):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return (raw.astype(np.int64) * int(slope) + int(inter)).astype(dtype, order="C")
    scaled = apply_scaling(raw, slope, inter, np.float64)  # (the decoder of scaled streams makes them alike)
    # float32 holds 24 bits: wider stored data (32-bit integers, float64) keeps float64, as the DICOM
    # reader does, and so does a scaled range float32 cannot hold (it would read as Inf)
    wide = raw.dtype.itemsize >= 4 and raw.dtype != np.float32
    if wide or (scaled.size and np.abs(scaled).max() > np.finfo(np.float32).max):
        return np.ascontiguousarray(scaled)
    return scaled.astype(np.float32, order="C")


_CHUNK = 1 << 24  # bytes read at a time
#: Bytes a ``.nii.gz`` may inflate to after the voxels (padding some writers leave); more is refused.
MAX_GZ_TAIL = 1 << 20
_TAIL_CHUNK = 1 << 16


def _read_unscaled(path: Path, proxy) -> np.ndarray:
    """The unscaled array of nibabel's ``proxy`` (its dtype, shape and order), read from ``path`` in one
    pass of our own: a ``.gz``'s CRC and length are checked at its end (nibabel reads only the bytes it
    needs, so a corrupted ``.nii.gz`` went unnoticed), and a header that declares more data than the
    file holds fails as soon as the file ends, before memory for the rest is touched (nibabel zeroes
    a buffer of the declared size first)."""
    dtype, shape = np.dtype(proxy.dtype), tuple(int(n) for n in proxy.shape)
    size, offset = math.prod(shape) * dtype.itemsize, int(proxy.offset)
    gz = path.name.lower().endswith(".gz")
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
        held = None if gz else os.fstat(f.fileno()).st_size
        if held is not None and held < offset + size:
            raise VolumeError(f"cannot read NIfTI file {path}: truncated (its header declares {offset + size} bytes, "
                              f"the file holds {held})")
        f.seek(offset)
        buf = np.empty(size, np.uint8)  # pages are touched only as they are filled
        view, got = memoryview(buf), 0
        while got < size:
            n = f.readinto(view[got:got + _CHUNK])
            if not n:
                raise VolumeError(f"cannot read NIfTI file {path}: truncated (its header declares {size} bytes of "
                                  f"voxels, the file holds {got})")
            got += n
        tail = 0
        while gz and (n := len(f.read(_TAIL_CHUNK))):  # to the stream's end: gzip checks its CRC and length there
            tail += n
            if tail > MAX_GZ_TAIL:  # a small upload could inflate to gigabytes here, for minutes
                raise VolumeError(f"cannot read NIfTI file {path}: over {MAX_GZ_TAIL >> 20} MiB of data after the "
                                  "voxels its header declares")
    return buf.view(dtype).reshape(shape, order=proxy.order)


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a 3D NIfTI volume, keeping the on-disk dtype.

    If the header has a non-identity ``scl_slope``/``scl_inter``, the scaling is applied: integers
    scaled by an integer slope and intercept stay integers (see :func:`_scaled`), anything else is
    returned as float32 (float64 where float32 would lose the stored precision), the stored integers'
    scaling recorded in ``meta["nifti_scaling"]``. ``spacing`` = first three header zooms (falling back
    to the affine's column norms if those are missing/zero), ``affine`` = ``img.affine``. A 4D image
    with one volume is squeezed to 3D; 2D and true 4D images raise :class:`VolumeError`.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"no such file or directory: {path}")
    try:
        img = _load_header(path)
        proxy = img.dataobj
        slope = getattr(proxy, "slope", 1.0)
        inter = getattr(proxy, "inter", 0.0)
        raw = _read_unscaled(path, proxy)  # the on-disk dtype
        data = raw if _is_identity_scaling(slope, inter) else _scaled(raw, float(slope), float(inter))
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        affine = np.array(img.affine, dtype=np.float64)
        qform = _qform(img.header)
        units = _UNITS.get(int(img.header["xyzt_units"]) & 7, "mm")  # (nibabel raises on codes off its table)
    except VolumeError:
        raise
    except MemoryError:
        raise VolumeError(f"cannot read NIfTI file {path}: its header declares a volume larger than this "
                          "machine's memory holds") from None
    except Exception as e:  # ImageFileError, HeaderDataError, gzip/zlib errors, EOFError, OSError, ...
        raise VolumeError(f"cannot read NIfTI file {path}: {one_line(e)}") from None

    data = as_native_3d(data, path)
    meta = {"source": str(path), "format": "nifti"}
    if data.dtype.kind == "f" and raw.dtype.kind in "iu":  # integers scaled to floats: the codec codes them
        meta["nifti_scaling"] = {"slope": float(slope), "inter": float(inter),
                                 "stored": raw.dtype.newbyteorder("=").str}
    codes = {"qform_code": int(img.header["qform_code"]), "sform_code": int(img.header["sform_code"])}
    if codes != {"qform_code": 1, "sform_code": 1}:  # the space the affine is in (scanner, aligned, MNI, …)
        meta["nifti_codes"] = codes
    if units in ("meter", "micron"):  # the affine and zooms are in these units: written back in them
        meta["nifti_units"] = units
    if extras := nifti_extras({"nifti_header": _header_extras(img.header)}):
        meta["nifti_header"] = extras
    if not _usable(affine) and qform is not None and _usable(qform):  # a broken sform, a good qform
        affine = qform
        meta["affine"] = "the file's sform is unusable (non-finite or singular); its qform is used"
        codes["sform_code"] = codes["qform_code"]  # written back as the sform: in the qform's space
        meta["nifti_codes"] = codes
    if qform is not None and _usable(qform) and not np.allclose(qform, affine, rtol=0, atol=1e-6):
        meta["nifti_qform"] = qform.tolist()  # a second space (e.g. scanner beside a template's sform)
    usable = _usable(affine)
    if len(zooms) < 3 or not all(np.isfinite(zooms)) or min(zooms) <= 0:
        zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0)) if usable else (1.0, 1.0, 1.0)
    if not usable:  # a broken header (NaN or all-zero sform, no usable qform): the plain voxel grid
        affine = np.diag([*zooms, 1.0])
        meta["affine"] = "the file's affine is unusable (non-finite or singular); replaced by diag(spacing)"
    if "affine" in meta:
        warnings.warn(f"{path}: {meta['affine']}", stacklevel=2)
    vol = Volume(data=data, spacing=zooms, affine=affine, meta=meta)
    return validated(vol, path)


def _load_header(path: Path):
    """nibabel's image of the NIfTI file at exactly ``path`` (its header; the voxels stay on disk).

    Read from an open stream, not by name: ``nib.load`` maps suffixes it does not know by case
    (``scan.Nii``) onto other files (``scan.nii``), missing or foreign."""
    import nibabel as nib

    with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
        head = f.read(4)
        sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")}
        klass = nib.Nifti1Image if 348 in sizes else nib.Nifti2Image if 540 in sizes else None
        if klass is None:
            raise VolumeError(f"cannot read NIfTI file {path}: not a NIfTI image (no NIfTI-1 or -2 header)")
        f.seek(0)
        return klass.from_stream(f)


_UNITS = {1: "meter", 3: "micron"}  # NIfTI xyz unit codes other than mm (2) and unknown (0)


def _qform(header) -> np.ndarray | None:
    """The header's qform, or None when its code is 0 or its quaternion is not one (nibabel raises on a
    quaternion a float32 ulp past unit length, which some public data sets hold)."""
    if header["qform_code"] <= 0:
        return None
    try:
        return np.array(header.get_qform(), dtype=np.float64)
    except ValueError:
        return None


def _usable(affine: np.ndarray) -> bool:
    return bool(np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 0)


def nifti_qform(meta: dict) -> np.ndarray | None:
    """The file's own qform recorded in ``meta`` (when it differed from the affine), if well formed."""
    q = meta.get("nifti_qform")
    try:
        q = np.asarray(q, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return q if q.shape == (4, 4) and _usable(q) else None


#: NIfTI time unit codes (bits 3–5 of ``xyzt_units``): s, ms, µs, Hz, ppm, rad/s.
_TIME_UNITS = (8, 16, 24, 32, 40, 48)


def _header_extras(header) -> dict:
    """The header fields beyond geometry and data that a round trip keeps: the description, the intent
    (a label map, a statistic), the display window, the time unit and offset, and which axes are the
    frequency, phase and slice directions. Only those that are set."""
    out: dict = {}
    descrip = bytes(header["descrip"].item()).split(b"\0")[0].decode("utf-8", "replace").strip()
    if descrip:
        out["descrip"] = descrip
    if int(header["intent_code"]):
        name = bytes(header["intent_name"].item()).split(b"\0")[0].decode("utf-8", "replace").strip()
        out["intent"] = [int(header["intent_code"]), *(float(header[f"intent_p{k}"]) for k in (1, 2, 3)), name]
    cal = [float(header["cal_min"]), float(header["cal_max"])]
    if any(cal):
        out["cal"] = cal
    if time := int(header["xyzt_units"]) & 0x38:
        out["time_units"] = time
    if float(header["toffset"]):
        out["toffset"] = float(header["toffset"])
    if int(header["dim_info"]):
        out["dim_info"] = int(header["dim_info"])
    return out


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def nifti_extras(meta: dict) -> dict:
    """The well-formed entries of ``meta["nifti_header"]`` (:func:`_header_extras`; a stream's header is
    untrusted: anything else is dropped)."""
    extras = meta.get("nifti_header")
    if not isinstance(extras, dict):
        return {}
    out: dict = {}
    d = extras.get("descrip")
    if isinstance(d, str) and d and len(d.encode("utf-8", "replace")) <= 80:
        out["descrip"] = d
    i = extras.get("intent")
    if (isinstance(i, list) and len(i) == 5 and isinstance(i[0], int) and not isinstance(i[0], bool)
            and 0 < i[0] < 1 << 15 and all(_finite_number(p) for p in i[1:4]) and isinstance(i[4], str)
            and len(i[4].encode("utf-8", "replace")) <= 16):
        out["intent"] = i
    c = extras.get("cal")
    if isinstance(c, list) and len(c) == 2 and all(_finite_number(v) and abs(v) < 3e38 for v in c):
        out["cal"] = c
    if extras.get("time_units") in _TIME_UNITS:
        out["time_units"] = extras["time_units"]
    if _finite_number(extras.get("toffset")) and abs(extras["toffset"]) < 3e38:
        out["toffset"] = extras["toffset"]
    di = extras.get("dim_info")
    if isinstance(di, int) and not isinstance(di, bool) and 0 < di < 256:
        out["dim_info"] = di
    return out


def _set_extras(header, extras: dict) -> None:
    if "descrip" in extras:
        header["descrip"] = extras["descrip"].encode("utf-8", "replace")[:80]
    if "intent" in extras:
        code, p1, p2, p3, name = extras["intent"]
        header["intent_code"], header["intent_name"] = code, name.encode("utf-8", "replace")[:16]
        header["intent_p1"], header["intent_p2"], header["intent_p3"] = p1, p2, p3
    if "cal" in extras:
        header["cal_min"], header["cal_max"] = extras["cal"]
    if "toffset" in extras:
        header["toffset"] = extras["toffset"]
    if "dim_info" in extras:
        header["dim_info"] = extras["dim_info"]


def nifti_units(meta: dict) -> str:
    """The spatial units recorded in ``meta`` (``meter`` or ``micron``), else ``mm``."""
    return meta.get("nifti_units") if meta.get("nifti_units") in ("meter", "micron") else "mm"


def space_codes(meta: dict) -> dict[str, int]:
    """The ``qform_code``/``sform_code`` recorded in ``meta`` (NIfTI codes 0–5: unknown, scanner, aligned,
    Talairach, MNI, other template), each 1 (scanner) when absent or invalid."""
    codes = meta.get("nifti_codes") if isinstance(meta.get("nifti_codes"), dict) else {}
    return {k: v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 5 else 1
            for k, v in ((k, codes.get(k)) for k in ("qform_code", "sform_code"))}


def write_nifti(volume: Volume, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``volume`` as NIfTI-1 (``.nii`` or ``.nii.gz``, chosen by suffix; NIfTI-2 when an axis is
    longer than NIfTI-1's 32767), atomically.

    Data are stored unscaled in ``volume.data``'s dtype, or, for floats read from scaled integers
    (``meta["nifti_scaling"]``) that still match them, as those integers with their scaling (where
    float32 holds it). The affine goes to the sform, with the codes of ``volume.meta["nifti_codes"]``
    (as read from a NIfTI file; else 1, scanner; both 0, "unknown", stay 0). The qform is the file's
    own (``meta["nifti_qform"]``, where it differed from the affine), else the affine when that agrees
    with ``volume.spacing`` (and is not singular). The header zooms are ``volume.spacing``, in
    ``meta["nifti_units"]`` (else mm); the description, intent, display window, time unit and offset and
    ``dim_info`` are ``meta["nifti_header"]``'s (:func:`nifti_extras`). NIfTI-1 stores the sform in
    float32, so an affine round-trips exactly when its entries are float32-representable (always the
    case for one read from a NIfTI file).
    """
    import nibabel as nib

    path = Path(path)
    data = np.ascontiguousarray(volume.data)
    # floats made from scaled integers: those integers, and their scaling, where NIfTI-1's float32 scl
    # fields hold it exactly (a NIfTI-2 source's float64 slope of 0.1 would change every voxel)
    found = scaling_of(volume.meta)
    stored = None if found is None or any(float(np.float32(v)) != v for v in found[:2]) else stored_integers(volume)
    if stored is not None:
        data = stored
    affine = np.asarray(volume.affine, dtype=np.float64)
    spacing = tuple(float(s) for s in volume.spacing)
    with np.errstate(over="ignore", under="ignore"):
        narrow = np.float32(spacing), np.float32(affine)
    if not (np.isfinite(narrow[0]).all() and narrow[0].min() > 0 and np.isfinite(narrow[1]).all()):
        raise VolumeError(f"cannot write {path} as NIfTI: its spacing or affine is beyond float32, which NIfTI "
                          "stores (write .npy instead)")
    try:
        # NIfTI-1 stores dimensions as int16: a longer axis (NIfTI-2 input) needs NIfTI-2's int64
        klass = nib.Nifti2Image if max(data.shape) > np.iinfo(np.int16).max else nib.Nifti1Image
        img = klass(data, None)
        img.header.set_data_dtype(data.dtype)
        if stored is not None:
            img.header.set_slope_inter(*scaling_of(volume.meta)[:2])
        img.header.set_zooms(spacing)  # first too: an "unknown" space's affine is made from them
        codes = space_codes(volume.meta)
        unknown = codes == {"qform_code": 0, "sform_code": 0}  # the affine was made from the zooms: so again
        # else an affine is always written, so never code 0: a missing sform takes the qform's space
        img.set_sform(affine, code=0 if unknown else codes["sform_code"] or codes["qform_code"] or 1)
        consistent = np.allclose(np.linalg.norm(affine[:3, :3], axis=0), spacing, rtol=1e-5, atol=1e-6)
        qform = nifti_qform(volume.meta)  # (not when the volume was resampled since: its zooms differ)
        if (qform is not None and codes["qform_code"]
                and np.allclose(np.linalg.norm(qform[:3, :3], axis=0), spacing, rtol=1e-4, atol=1e-6)):
            img.set_qform(qform, code=codes["qform_code"])
        elif consistent and abs(np.linalg.det(affine[:3, :3])) > 0 and not unknown:
            img.set_qform(affine, code=codes["qform_code"] or codes["sform_code"] or 1)
        else:  # a qform must be a rotation and zooms: none matches this affine
            img.set_qform(None, code=0)
        img.header.set_zooms(spacing)
        extras = nifti_extras(volume.meta)
        img.header.set_xyzt_units(xyz=nifti_units(volume.meta), t=extras.get("time_units"))
        _set_extras(img.header, extras)
    except Exception as e:
        raise VolumeError(f"cannot encode NIfTI for {path}: {one_line(e)}") from None
    with atomic_path(path, force=force) as tmp:
        try:
            nib.save(img, str(tmp))
        except OSError as e:
            raise FedtensorError(f"cannot write {path}: {e.strerror or e}") from None
    return path
