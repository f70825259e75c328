"""Uploaded volumes: recognise the file by its content, store it under a fixed name, read it.

The client's file name is never used as a path: the upload is sniffed (gzip / NIfTI-1 / NIfTI-2 /
zip magic bytes) and written as ``input.nii.gz``, ``input.nii`` or ``input.zip`` in the job's own
directory. A zipped DICOM series is extracted member by member into flat, generated names
(``dicom/00000.dcm`` …), so ``..``, absolute paths and links inside the archive cannot reach outside;
the number of members and the bytes actually inflated are capped (zip bombs). Every failure is an
:class:`UploadError` with a one-line message that names the upload, never a server path.
"""

from __future__ import annotations

import re
import shutil
import stat
import struct
import unicodedata
import zipfile
from pathlib import Path
from typing import BinaryIO

from fedtensor.errors import FedtensorError, VolumeError
from fedtensor.io.npy import open_npy

MAX_ZIP_MEMBERS = 4096
MAX_INFLATED_BYTES = 4 << 30  # what a zipped series may expand to on disk
_CHUNK = 1 << 20


class UploadError(FedtensorError):
    """The uploaded file is not a volume the web interface can read."""


def display_name(name: str | None) -> str:
    """A short, printable version of the client's file name (for messages and download names only)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = unicodedata.normalize("NFC", base)  # (macOS writes é as e + a combining accent)
    # letters, marks and digits of any script, and "._ -"; controls, format characters and the rest: "_"
    base = "".join(c if c in "._ -" or unicodedata.category(c)[0] in "LMN" else "_" for c in base).strip(" .")
    return base[:80] or "upload"


def sniff(head: bytes) -> str | None:
    """``"nii.gz"``, ``"nii"``, ``"zip"`` or ``None`` from a file's first bytes."""
    if head[:2] == b"\x1f\x8b":
        return "nii.gz"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 4:
        for order in "<>":
            if struct.unpack(order + "i", head[:4])[0] in (348, 540):
                return "nii"
    return None


def save_upload(stream: BinaryIO, dest_dir: Path) -> Path:
    """Write the upload into ``dest_dir`` under a name chosen from its content; return that path."""
    head = stream.read(16)
    kind = sniff(head)
    if kind is None:
        raise UploadError("not a NIfTI volume (.nii, .nii.gz) or a .zip of one DICOM series")
    path = dest_dir / f"input.{kind}"
    with open(path, "wb") as fh:
        fh.write(head)
        shutil.copyfileobj(stream, fh, _CHUNK)
    return path


def _junk(name: str) -> bool:
    """Hidden files and macOS resource forks (``.DS_Store``, ``__MACOSX/._x``), not part of a series."""
    parts = re.split(r"[\\/]", name)
    return parts[-1].startswith(".") or "__MACOSX" in parts


def _is_link(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


_INDEX_ENTRY = 46 + 256  # bytes an accepted file may take in a zip's central directory (a long name)


def _declared_index(zip_path: Path) -> tuple[int, int] | None:
    """The entry count and central directory size a zip's end record declares (zip64 too), read without
    the directory itself: ``ZipFile`` builds an object per entry before anything can be refused (a
    23 MB zip of 300,000 empty files took 146 MiB). None where the record cannot be read (``ZipFile``
    then says why)."""
    end_record = getattr(zipfile, "_EndRecData", None)  # (private, but stable since Python 2)
    if end_record is None:
        return None
    with open(zip_path, "rb") as f:
        rec = end_record(f)
    return None if not rec else (int(rec[zipfile._ECD_ENTRIES_TOTAL]), int(rec[zipfile._ECD_SIZE]))


def extract_series(zip_path: Path, dest: Path, *, max_members: int = MAX_ZIP_MEMBERS,
                   max_bytes: int = MAX_INFLATED_BYTES) -> Path:
    """Extract the regular files of a zip into ``dest`` under generated names; return ``dest``."""
    dest.mkdir()
    try:
        index = _declared_index(zip_path)  # before ZipFile reads the whole index: its count (which ZipFile
        # never checks, so a forged one is caught by the size) and its size (46 bytes an entry and a name)
        if index is not None and (index[0] > 4 * max_members or index[1] > 4 * max_members * _INDEX_ENTRY):
            raise UploadError(f"the zip file holds {index[0]} entries in a {index[1] >> 10} KiB index; at most "
                              f"{max_members} files are accepted")
        with zipfile.ZipFile(zip_path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir() and not _is_link(i) and not _junk(i.filename)]
            if not members:
                raise UploadError("the zip file holds no files")
            if len(members) > max_members:
                raise UploadError(f"the zip file holds {len(members)} files; at most {max_members} are accepted")
            total = 0
            for n, info in enumerate(members):
                if info.flag_bits & 0x1:
                    raise UploadError("the zip file is encrypted")
                with zf.open(info) as src, open(dest / f"{n:05d}.dcm", "wb") as out:
                    while chunk := src.read(_CHUNK):  # count what is inflated, not what the header claims
                        total += len(chunk)
                        if total > max_bytes:
                            raise UploadError(f"the zip file expands to more than {max_bytes >> 20} MiB")
                        out.write(chunk)
    except UploadError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, ValueError) as e:
        raise UploadError(f"not a readable zip file ({type(e).__name__})") from None
    except OSError as e:
        raise UploadError(f"cannot extract the zip file: {e.strerror or type(e).__name__}") from None
    return dest


def read_upload(path: Path, name: str, max_voxels: int | None = None):
    """The :class:`~fedtensor.io.Volume` in a saved upload; messages mention ``name``, not the path.

    ``max_voxels`` is checked *before* the voxels are read (a NIfTI's header, a zipped series' inflated
    size, a DICOM series' headers), so a small compressed file that claims a huge volume cannot exhaust
    the server's memory."""
    from fedtensor.io import read_dicom_series, read_volume

    if path.name.endswith(".zip"):
        # 8 bytes per voxel covers any DICOM pixel encoding plus its per-file headers
        cap = MAX_INFLATED_BYTES if max_voxels is None else min(MAX_INFLATED_BYTES, 8 * max_voxels + (64 << 20))
        source = extract_series(path, path.parent / "dicom", max_bytes=cap)
        _refuse_deflated(source, name)
    else:
        source = path
        if max_voxels is not None:
            _check_declared_size(source, name, max_voxels)
    try:
        if source.is_dir():  # the pixel data may be compressed: the cap is checked on the headers
            return read_dicom_series(source, max_voxels=max_voxels).validate()
        return read_volume(source).validate()
    except VolumeError as e:
        raise UploadError(_scrub(str(e), source, name)) from None
    except MemoryError:
        raise UploadError(f"{name}: not enough memory to read this volume") from None


def _refuse_deflated(directory: Path, name: str) -> None:
    """Refuse a series with deflate-compressed files: pydicom inflates a whole such file when it reads
    it, before any header can be checked, so a few kilobytes could expand to gigabytes."""
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    for p in sorted(directory.iterdir()):
        try:
            syntax = read_file_meta_info(p).get("TransferSyntaxUID")
        except Exception:  # noqa: BLE001 - not a DICOM file: the series reader skips or reports it
            continue
        if syntax == DeflatedExplicitVRLittleEndian:
            raise UploadError(f"{name}: deflate-compressed DICOM files are not accepted by this server")


def _check_declared_size(path: Path, name: str, max_voxels: int) -> None:
    """Refuse a NIfTI (or .npy) whose header declares more than ``max_voxels`` voxels."""
    import math

    try:
        if path.name.endswith(".npy"):
            shape = open_npy(path).shape  # maps, reads no voxels
        else:
            import nibabel as nib

            shape = nib.load(str(path)).header.get_data_shape()
    except Exception:  # noqa: BLE001 - not readable as either: read_volume gives the proper message
        return
    n = math.prod(int(d) for d in shape)
    if n > max_voxels:
        raise UploadError(f"{name}: {n:,} voxels; this server accepts at most {max_voxels:,}")


def _scrub(msg: str, source: Path, name: str) -> str:
    """Replace server paths in a library message by the upload's name."""
    for p in (str(source), str(source.parent)):
        msg = msg.replace(p, name)
    return msg
