"""Volume I/O: NIfTI / .npy / DICOM series readers, writers and atomic output."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fedtensor.errors import FedtensorError, VolumeError
from fedtensor.io import (
    SUPPORTED_DTYPES,
    Volume,
    atomic_path,
    atomic_write_bytes,
    read_volume,
    write_volume,
)

# The README table, except where it is wrong about what is on disk (see comments).
EXPECTED = {
    "ct_chest.nii.gz": ((120, 126, 164), np.int16, (1.5, 1.5, 1.5), (-1078, 3343)),
    "ct_abdomen.nii.gz": ((122, 101, 112), np.int32, (3.0, 3.0, 3.0), (-1207, 3382)),
    # README: "0.98×0.98×3" — 3 mm is SliceThickness; ImagePositionPatient steps by 2 mm
    # (-766.5, -768.5, ... -804.5), so the true slice spacing is 2.0 mm (overlapping slices).
    "ct_series_dicom": ((512, 512, 20), np.int16, (0.9765625, 0.9765625, 2.0), (-1024, 1839)),
    "ct_head_uint8.nii.gz": ((175, 248, 58), np.uint8, (0.8125, 0.8125, 2.397), (0, 255)),
    # README: "float64 holding 0…1653" — on disk it is uint8 with scl_slope 6.48235; the reader
    # applies the slope and returns float32 (nibabel's get_fdata() would give float64).
    "mr_brain_gd.nii.gz": ((176, 188, 144), np.float32, (0.976562, 0.976562, 1.0026), (0.0, 1653.0)),
}


@pytest.fixture(scope="module")
def dicom_volume(volume_paths) -> Volume:
    return read_volume(volume_paths["ct_series_dicom"])


def _dicom_files(volume_paths) -> list[Path]:
    return sorted(p for p in volume_paths["ct_series_dicom"].iterdir() if p.is_file())


# ------------------------------------------------------------------------------------------------
# Real volumes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXPECTED))
def test_read_shared_volumes(name, volume_paths, dicom_volume):
    shape, dtype, spacing, (lo, hi) = EXPECTED[name]
    vol = dicom_volume if name == "ct_series_dicom" else read_volume(volume_paths[name])
    assert vol.shape == shape
    assert vol.dtype == np.dtype(dtype)
    np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-4)
    assert float(vol.data.min()) == pytest.approx(lo, abs=0.01)
    assert float(vol.data.max()) == pytest.approx(hi, abs=0.01)
    assert vol.affine.shape == (4, 4) and np.isfinite(vol.affine).all()
    # spacing agrees with the affine's column norms for all of these
    np.testing.assert_allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), vol.spacing, rtol=1e-4)
    assert vol.meta["source"] == str(volume_paths[name])
    assert vol.meta["format"] == ("dicom" if name == "ct_series_dicom" else "nifti")
    vol.validate()


@pytest.mark.parametrize("name", ["ct_chest.nii.gz", "mr_brain_gd.nii.gz"])
def test_nifti_read_in_c_order_with_nibabels_values(name, volume_paths):
    # NIfTI is stored x fastest (Fortran order); the codec's slabs along axis 0 want C order
    vol = read_volume(volume_paths[name])
    assert vol.data.flags.c_contiguous
    np.testing.assert_allclose(vol.data, nib.load(volume_paths[name]).get_fdata(), rtol=1e-6, atol=1e-4)


def test_npy_in_fortran_order_read_in_c_order(tmp_path):
    raw = np.asfortranarray(np.arange(60, dtype=">i2").reshape(3, 4, 5))
    np.save(tmp_path / "f.npy", raw)
    vol = read_volume(tmp_path / "f.npy")
    assert vol.data.flags.c_contiguous and vol.data.dtype == np.dtype("int16") and vol.data.dtype.isnative
    np.testing.assert_array_equal(vol.data, raw)


def test_mr_slope_applied(volume_paths):
    img = nib.load(volume_paths["mr_brain_gd.nii.gz"])
    vol = read_volume(volume_paths["mr_brain_gd.nii.gz"])
    np.testing.assert_allclose(vol.data, img.get_fdata(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("stored, slope, inter, expected", [
    (np.uint16, 1, -1024, np.int16),  # CT stored unsigned with an intercept
    (np.int16, 2, 0, np.int16),
    (np.int16, 1, 40000, np.int32),  # beyond int16
    (np.uint8, 1, 10, np.uint8),  # still fits the stored dtype
    (np.int16, 0.5, 0, np.float32),  # fractional values
    (np.int16, 1, 0.5, np.float32),
    (np.int16, 1, 1e30, np.float32),  # beyond every integer dtype
    (np.uint32, 70000, 0, np.uint32),  # still fits the stored dtype
    (np.int16, 2**30, 0, np.float32),  # the product beyond int32
])
def test_nifti_integer_scaling_keeps_integers(tmp_path, stored, slope, inter, expected):
    raw = np.random.default_rng(0).integers(0, 200, (6, 5, 4)).astype(stored)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_data_dtype(stored)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, tmp_path / "s.nii.gz")
    vol = read_volume(tmp_path / "s.nii.gz")
    assert vol.dtype == expected
    np.testing.assert_array_equal(vol.data, (raw.astype(np.float64) * slope + inter).astype(expected))


@pytest.mark.parametrize("codes", [(4, 4), (0, 2), (2, 3), (4, 0), (5, 5), (0, 0)])
def test_nifti_space_codes_survive_a_round_trip_through_ftz(tmp_path, codes):
    from fedtensor.codec import compress, decompress

    data = np.random.default_rng(1).integers(0, 500, (12, 10, 8)).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0]))
    img.set_qform(img.affine, code=codes[0])
    img.set_sform(img.affine, code=codes[1])
    nib.save(img, tmp_path / "in.nii.gz")
    vol = read_volume(tmp_path / "in.nii.gz")
    write_volume(decompress(compress(vol, psnr=40)), tmp_path / "out.nii.gz")
    header = nib.load(tmp_path / "out.nii.gz").header
    # the sform always carries the affine: a code 0 (none) on either side takes the other's space; both
    # 0 (an affine made from the zooms) stay 0, so readers make the same affine from them again
    assert (int(header["qform_code"]), int(header["sform_code"])) == (codes[0] or codes[1], codes[1] or codes[0])
    np.testing.assert_allclose(nib.load(tmp_path / "out.nii.gz").affine, nib.load(tmp_path / "in.nii.gz").affine)


def test_nifti_qform_units_and_a_broken_sform_survive_a_round_trip_through_ftz(tmp_path):
    """A scanner qform beside a template sform that is no rotation (sheared), and micron units, come back
    as they were; a NaN sform beside a good qform reads in the qform's space, with a warning."""
    from fedtensor.codec import compress, decompress

    data = np.random.default_rng(2).integers(0, 500, (12, 10, 8)).astype(np.int16)
    qform = np.array([[0, -0.8, 0, 10], [0.8, 0, 0, -5], [0, 0, 2.0, 3], [0, 0, 0, 1]])
    sform = np.array([[0.9, 0.1, 0, -90], [0, 0.85, 0.2, -120], [0, 0, 1.9, -70], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, None)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=4)
    img.header.set_xyzt_units(xyz="micron")
    nib.save(img, tmp_path / "in.nii.gz")
    write_volume(decompress(compress(read_volume(tmp_path / "in.nii.gz"), psnr=40)), tmp_path / "out.nii.gz")
    out = nib.load(tmp_path / "out.nii.gz").header
    assert (int(out["qform_code"]), int(out["sform_code"])) == (1, 4)
    np.testing.assert_allclose(out.get_qform(), qform, atol=1e-5)
    np.testing.assert_allclose(out.get_sform(), sform, atol=1e-5)
    assert out.get_xyzt_units()[0] == "micron"
    np.testing.assert_allclose(out.get_zooms(), img.header.get_zooms(), rtol=1e-6)

    hdr = img.header.copy()
    hdr["srow_x"] = [np.nan] * 4
    nib.Nifti1Image(data, None, header=hdr).to_filename(tmp_path / "nan.nii")
    assert nib.load(tmp_path / "nan.nii").header["sform_code"] == 4
    with pytest.warns(UserWarning, match="sform is unusable.*qform is used"):
        vol = read_volume(tmp_path / "nan.nii")
    np.testing.assert_allclose(vol.affine, qform, atol=1e-5)
    write_volume(vol, tmp_path / "nan_back.nii")  # the qform's matrix in the sform: in the qform's space
    back = nib.load(tmp_path / "nan_back.nii").header
    assert (int(back["qform_code"]), int(back["sform_code"])) == (1, 1)


def test_nifti_with_a_near_unit_quaternion_or_odd_unit_codes_still_reads(tmp_path):
    """nibabel loads these (its affine is the sform), so must we: a quaternion a float32 ulp past unit
    length (in public data sets) and unit bytes off the NIfTI table read as the sform and mm."""
    sform = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.zeros((6, 7, 8), np.int16), sform)
    img.set_qform(sform, code=1)
    img.set_sform(sform, code=1)
    for name, field, value in (("quat", "quatern_d", np.float32(1.00000024)), ("units", "xyzt_units", 0x3A)):
        hdr = img.header.copy()
        hdr[field] = value
        nib.Nifti1Image(np.zeros((6, 7, 8), np.int16), None, header=hdr).to_filename(tmp_path / f"{name}.nii")
        vol = read_volume(tmp_path / f"{name}.nii")
        np.testing.assert_allclose(vol.affine, sform)
        assert "nifti_units" not in vol.meta


def test_dicom_meta_and_geometry(volume_paths, dicom_volume):
    vol = dicom_volume
    assert vol.meta["Modality"] == "CT"
    assert "SeriesInstanceUID" in vol.meta
    # Every file: the voxel (0, 0, k) of its slice is its ImagePositionPatient, in RAS; its pixels
    # (rescaled, transposed to x=column, y=row) are data[:, :, k].
    for f in _dicom_files(volume_paths)[::6]:
        ds = pydicom.dcmread(f)
        lps = np.array([float(v) for v in ds.ImagePositionPatient])
        ras = lps * [-1, -1, 1]
        k = (ras[2] - vol.affine[2, 3]) / vol.affine[2, 2]
        assert k == pytest.approx(round(k)) and 0 <= round(k) < 20
        k = int(round(k))
        np.testing.assert_allclose(vol.affine @ [0, 0, k, 1], [*ras, 1], atol=1e-6)
        expected = ds.pixel_array.T.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.data[:, :, k], expected)
    # slices ascend along the normal (here +z: superior)
    assert vol.affine[2, 2] > 0


def test_dicom_shuffled_renamed_with_junk(volume_paths, dicom_volume, tmp_path):
    files = _dicom_files(volume_paths)
    rng = random.Random(1234)
    shuffled = files[:]
    rng.shuffle(shuffled)
    for i, f in enumerate(shuffled):
        shutil.copy(f, tmp_path / f"img_{rng.randrange(10**9):09d}_{i}")
    (tmp_path / "README.txt").write_text("not a DICOM file\n")
    (tmp_path / ".DS_Store").write_bytes(os.urandom(300))
    _write_non_image_dicom(tmp_path / "zz_report.dcm", series_uid="")
    (tmp_path / "subdir").mkdir()
    vol = read_volume(tmp_path)
    np.testing.assert_array_equal(vol.data, dicom_volume.data)
    np.testing.assert_array_equal(vol.affine, dicom_volume.affine)
    assert vol.spacing == dicom_volume.spacing


def test_dicom_mixed_series(volume_paths, tmp_path):
    files = _dicom_files(volume_paths)
    for f in files[:4]:
        shutil.copy(f, tmp_path / f.name)
    for f in files[4:8]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.save_as(tmp_path / f"other_{f.name}")
    with pytest.raises(VolumeError, match=r"directory holds 2 DICOM series; pass one series directory"):
        read_volume(tmp_path)


def test_dicom_missing_middle_slice(volume_paths, tmp_path):
    files = _dicom_files(volume_paths)
    for f in files[:9] + files[10:]:
        shutil.copy(f, tmp_path / f.name)
    with pytest.raises(VolumeError, match=r"uneven slice spacing.*gap between sorted slices \d+ and \d+.*4 mm, expected 2 mm") as ei:
        read_volume(tmp_path)
    assert "\n" not in str(ei.value)


def test_dicom_duplicate_position(volume_paths, tmp_path):
    files = _dicom_files(volume_paths)[:5]
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(files[2], tmp_path / "copy_of_slice")
    with pytest.raises(VolumeError, match="duplicate slice position"):
        read_volume(tmp_path)


def test_dicom_truncated_file(volume_paths, tmp_path):
    files = _dicom_files(volume_paths)[:5]
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    target = tmp_path / files[-1].name  # an end slice: must not be silently dropped
    target.write_bytes(target.read_bytes()[:20000])
    with pytest.raises(VolumeError, match="truncated or corrupt") as ei:
        read_volume(tmp_path)
    assert "\n" not in str(ei.value)


def test_dicom_empty_and_junk_dirs(tmp_path):
    with pytest.raises(VolumeError, match="no DICOM image files"):
        read_volume(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeError, match="no DICOM image files"):
        read_volume(tmp_path)


# ------------------------------------------------------------------------------------------------
# Synthetic DICOM series (non-square, oblique, rescale variants)
# ------------------------------------------------------------------------------------------------


def _ds_str(v: float) -> str:
    return f"{v:.10g}"[:16]


def _base_dataset(path: Path, series_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    return ds


def _write_non_image_dicom(path: Path, series_uid: str) -> None:
    ds = _base_dataset(path, series_uid)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "SR"
    ds.save_as(path, enforce_file_format=True)


def _write_slice(path, pixels, ipp, iop, pixel_spacing, *, slope=None, inter=None, series_uid="1.2.3.4"):
    pixels = np.asarray(pixels)
    ds = _base_dataset(path, series_uid)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit = ds.BitsAllocated - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.ImagePositionPatient = [_ds_str(v) for v in ipp]
    ds.ImageOrientationPatient = [_ds_str(v) for v in iop]
    ds.PixelSpacing = [_ds_str(v) for v in pixel_spacing]
    if slope is not None:
        ds.RescaleSlope = _ds_str(slope)
    if inter is not None:
        ds.RescaleIntercept = _ds_str(inter)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.save_as(path, enforce_file_format=True)


# oblique: row direction r, column direction c, normal n = r x c
R_DIR = np.array([0.6, 0.8, 0.0])
C_DIR = np.array([0.0, 0.0, -1.0])
N_DIR = np.cross(R_DIR, C_DIR)
P0 = np.array([10.0, -20.0, 30.0])


def _synthetic_series(tmp_path, *, n=5, rows=6, cols=8, gap=1.5, ps=(0.5, 0.7), dtype=np.int16,
                      slopes=None, inters=None, skip=(), order_seed=0, pixels_fn=None):
    """Write slices in shuffled order with random names; return the pixel arrays in slice order."""
    rng = np.random.default_rng(order_seed)
    stack = []
    for k in range(n):
        if pixels_fn is None:
            px = (np.arange(rows)[:, None] * 100 + np.arange(cols)[None, :] + 1000 * k).astype(dtype)
        else:
            px = pixels_fn(k, rows, cols)
        stack.append(px)
    for k in rng.permutation(n):
        if k in skip:
            continue
        ipp = P0 + k * gap * N_DIR
        _write_slice(
            tmp_path / f"x{rng.integers(10**8)}_{k}.dcm", stack[k], ipp, [*R_DIR, *C_DIR], ps,
            slope=None if slopes is None else slopes[k], inter=None if inters is None else inters[k],
        )
    return stack


def test_synthetic_oblique_nonsquare(tmp_path):
    stack = _synthetic_series(tmp_path, rows=6, cols=8, ps=(0.5, 0.7), gap=1.5)
    vol = read_volume(tmp_path)
    assert vol.shape == (8, 6, 5)  # (columns, rows, slices)
    assert vol.dtype == np.int16
    np.testing.assert_allclose(vol.spacing, (0.7, 0.5, 1.5))
    for k, px in enumerate(stack):
        np.testing.assert_array_equal(vol.data[:, :, k], px.T)
    # voxel (i, j, k) -> LPS = P0 + i*0.7*r + j*0.5*c + k*1.5*n  -> RAS = LPS * (-1, -1, 1)
    for i, j, k in [(0, 0, 0), (7, 0, 0), (0, 5, 0), (3, 2, 4), (7, 5, 4)]:
        lps = P0 + i * 0.7 * R_DIR + j * 0.5 * C_DIR + k * 1.5 * N_DIR
        np.testing.assert_allclose(vol.affine @ [i, j, k, 1], [*(lps * [-1, -1, 1]), 1], atol=1e-6)
    assert vol.meta["SeriesInstanceUID"] == "1.2.3.4" and vol.meta["format"] == "dicom"


def test_synthetic_rescale_int16(tmp_path):
    stack = _synthetic_series(tmp_path, dtype=np.uint16, inters=[-1024] * 5, slopes=[1] * 5)
    vol = read_volume(tmp_path)
    assert vol.dtype == np.int16
    np.testing.assert_array_equal(vol.data[:, :, 3], stack[3].T.astype(np.int32) - 1024)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(slopes=[0.5] * 5, inters=[0] * 5),  # non-unit slope
        dict(slopes=[1] * 5, inters=[0.5] * 5),  # fractional intercept
        dict(slopes=[1, 1, 2, 1, 1], inters=[0] * 5),  # per-slice slope
    ],
)
def test_synthetic_rescale_float32(tmp_path, kwargs):
    stack = _synthetic_series(tmp_path, **kwargs)
    vol = read_volume(tmp_path)
    assert vol.dtype == np.float32
    slopes = kwargs.get("slopes") or [1] * 5
    inters = kwargs.get("inters") or [0] * 5
    for k, px in enumerate(stack):
        np.testing.assert_array_equal(vol.data[:, :, k], (px.T.astype(np.float64) * slopes[k] + inters[k]).astype(np.float32))


@pytest.mark.parametrize("dtype, value, inter, want", [
    (np.uint16, 60000, 0, np.uint16),  # beyond int16: the stored dtype holds it
    (np.uint16, 60000, -1024, np.uint16),
    (np.int32, 16777217, 0, np.int32),  # beyond float32's integers: exact, not rounded
    (np.uint16, 65535, 70000, np.int32),  # beyond the stored dtype too
])
def test_synthetic_integers_beyond_int16_stay_exact(tmp_path, dtype, value, inter, want):
    stack = _synthetic_series(tmp_path, dtype=dtype, inters=[inter] * 5,
                              pixels_fn=lambda k, r, c: np.full((r, c), value - k, dtype))
    vol = read_volume(tmp_path)
    assert vol.dtype == want
    for k, px in enumerate(stack):
        np.testing.assert_array_equal(vol.data[:, :, k], px.T.astype(np.int64) + inter)


def test_synthetic_32_bit_values_with_a_slope_are_float64(tmp_path):
    stack = _synthetic_series(tmp_path, dtype=np.int32, slopes=[0.5] * 5,
                              pixels_fn=lambda k, r, c: np.full((r, c), 16777219 + 2 * k, np.int32))
    vol = read_volume(tmp_path)
    assert vol.dtype == np.float64
    np.testing.assert_array_equal(vol.data[:, :, 2], stack[2].T * 0.5)
    from fedtensor.io.dicom import _rescaled  # float32 pixel data (Float Pixel Data) stays float32

    assert _rescaled(np.ones((2, 2, 3), np.float32), np.full(3, 0.5), np.zeros(3)).dtype == np.float32


def test_synthetic_zero_slope_is_refused(tmp_path):
    _synthetic_series(tmp_path, slopes=[1, 1, 0, 1, 1])
    with pytest.raises(VolumeError, match="RescaleSlope 0"):
        read_volume(tmp_path)


def test_synthetic_slice_without_preamble_is_read(tmp_path):
    """A slice written without the Part 10 preamble and DICM magic (older tools) is part of the series,
    not a stray file: dropping it silently lost a slice, or blamed a "missing slice"."""
    import pydicom

    stack = _synthetic_series(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    middle = next(p for p in tmp_path.iterdir() if p.name.endswith("_2.dcm"))
    ds = pydicom.dcmread(middle)
    del ds.file_meta
    ds.preamble = None
    ds.save_as(middle, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert middle.read_bytes()[128:132] != b"DICM"
    vol = read_volume(tmp_path)
    assert vol.shape == (8, 6, 5)
    np.testing.assert_array_equal(vol.data[:, :, 2], stack[2].T)
    # Only a data set's first group is forced open: a stray file of zeros took minutes to parse, and
    # file meta without a preamble could name a deflated syntax that pydicom inflates whole.
    (tmp_path / "zeros.raw").write_bytes(bytes(1 << 20))
    meta_first = pydicom.dcmread(middle, force=True)
    meta_first.file_meta = pydicom.dataset.FileMetaDataset()
    meta_first.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    meta_first.save_as(tmp_path / "meta_first.dcm", implicit_vr=False, little_endian=True, enforce_file_format=False)
    assert (tmp_path / "meta_first.dcm").read_bytes()[:2] == b"\x02\x00"
    from fedtensor.io import dicom

    assert dicom._headerless_slice(tmp_path / "zeros.raw") is None
    assert dicom._headerless_slice(tmp_path / "meta_first.dcm") is None
    assert read_volume(tmp_path).shape == (8, 6, 5)


def test_synthetic_missing_slice_and_inconsistent_size(tmp_path):
    d1 = tmp_path / "a"
    d1.mkdir()
    _synthetic_series(d1, n=6, skip=(3,))
    with pytest.raises(VolumeError, match="uneven slice spacing.*slices 2 and 3"):
        read_volume(d1)
    d2 = tmp_path / "b"
    d2.mkdir()
    _synthetic_series(d2, n=4)
    _write_slice(d2 / "odd.dcm", np.zeros((5, 8), np.int16), P0 + 4 * 1.5 * N_DIR, [*R_DIR, *C_DIR], (0.5, 0.7))
    with pytest.raises(VolumeError, match="inconsistent image size"):
        read_volume(d2)


def test_single_slice_series(tmp_path):
    _synthetic_series(tmp_path, n=1)
    with pytest.raises(VolumeError, match="single slice"):
        read_volume(tmp_path)


# ------------------------------------------------------------------------------------------------
# NIfTI / npy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXPECTED))
def test_nifti_round_trip_real(name, volume_paths, dicom_volume, tmp_path):
    vol = dicom_volume if name == "ct_series_dicom" else read_volume(volume_paths[name])
    suffix = ".nii.gz" if name in ("ct_head_uint8.nii.gz", "ct_abdomen.nii.gz") else ".nii"
    out = tmp_path / f"out{suffix}"
    assert write_volume(vol, out) == out
    back = read_volume(out)
    assert back.dtype == vol.dtype
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_array_equal(back.affine, vol.affine)
    assert back.spacing == vol.spacing
    codes = vol.meta.get("nifti_codes")  # the space codes are kept (a missing qform takes the sform's)
    kept = {} if codes is None else {"nifti_codes": {"qform_code": codes["qform_code"] or codes["sform_code"],
                                                     "sform_code": codes["sform_code"]}}
    if "nifti_header" in vol.meta:  # description, display window, time unit: kept
        kept["nifti_header"] = vol.meta["nifti_header"]
    if "nifti_scaling" in vol.meta:  # the MR's uint8 × 6.48: written back as those integers, so read as them
        kept["nifti_scaling"] = vol.meta["nifti_scaling"]
        assert nib.load(out).get_data_dtype() == np.uint8
    assert back.meta == {"source": str(out), "format": "nifti", **kept}
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(SUPPORTED_DTYPES),
    shape=st.tuples(*[st.integers(1, 6)] * 3),
    suffix=st.sampled_from([".nii", ".nii.gz", ".npy"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_all_dtypes(tmp_path, dtype, shape, suffix, seed):
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        data = (rng.standard_normal(shape) * 1e3).astype(dtype)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    affine = np.diag([0.5, 0.75, 2.0, 1.0])
    affine[:3, 3] = [-10.25, 3.5, 7.0]
    vol = Volume(data, spacing=(0.5, 0.75, 2.0), affine=affine)
    out = tmp_path / f"rt_{seed}{suffix}"
    write_volume(vol, out)
    back = read_volume(out)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back.data, data)
    if suffix == ".npy":
        assert back.spacing == (1.0, 1.0, 1.0)
        np.testing.assert_array_equal(back.affine, np.eye(4))
        assert back.meta["format"] == "npy"
    else:
        np.testing.assert_array_equal(back.affine, affine)
        assert back.spacing == (0.5, 0.75, 2.0)
    out.unlink()


def test_nifti_arbitrary_affine_float32_precision(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.eye(4)
    affine[:3, :] = rng.standard_normal((3, 4)) * 3
    vol = Volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4), spacing=(1.0, 1.0, 1.0), affine=affine)
    write_volume(vol, tmp_path / "a.nii")
    back = read_volume(tmp_path / "a.nii")
    np.testing.assert_allclose(back.affine, affine, rtol=1e-6, atol=1e-6)  # sform is float32
    assert back.spacing == (1.0, 1.0, 1.0)


def test_nifti_scaled_and_big_endian(tmp_path):
    raw = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, tmp_path / "scaled.nii")
    vol = read_volume(tmp_path / "scaled.nii")
    assert vol.dtype == np.int16  # integer slope and intercept: integers stay integers
    np.testing.assert_array_equal(vol.data, raw.astype(np.float32) * 2 + 10)
    img.header.set_slope_inter(2.5, 10.0)
    nib.save(img, tmp_path / "scaled.nii")
    vol = read_volume(tmp_path / "scaled.nii")
    assert vol.dtype == np.float32
    np.testing.assert_array_equal(vol.data, raw.astype(np.float32) * 2.5 + 10)

    hdr = nib.Nifti1Header(endianness=">")
    hdr.set_data_dtype(">i2")
    img = nib.Nifti1Image(raw.astype(">i2"), np.eye(4), header=hdr)
    nib.save(img, tmp_path / "be.nii")
    assert nib.load(tmp_path / "be.nii").get_data_dtype() == np.dtype(">i2")
    vol = read_volume(tmp_path / "be.nii")
    assert vol.dtype == np.dtype("int16") and vol.data.dtype.isnative
    np.testing.assert_array_equal(vol.data, raw)


def test_nifti_4d_singleton_squeezed(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4, 1)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "s.nii.gz")
    vol = read_volume(tmp_path / "s.nii.gz")
    assert vol.shape == (2, 3, 4)
    np.testing.assert_array_equal(vol.data, data[..., 0])


@pytest.mark.parametrize(
    "data, pattern",
    [
        (np.zeros((2, 3, 4, 5), np.int16), r"4D image of shape \(2, 3, 4, 5\).*a 3D volume is needed"),
        (np.zeros((5, 6), np.int16), r"2D image of shape \(5, 6\).*a 3D volume is needed"),
        (np.array([[[0.0, np.nan]]], np.float32), "NaN or Inf"),
        (np.array([[[0.0, np.inf]]], np.float64), "NaN or Inf"),
        (np.zeros((0, 3, 4), np.int16), "empty"),
        (np.zeros((2, 3, 4), np.complex64), "unsupported dtype complex64"),
        (np.full((2, 3, 4), 2**40, np.int64), "unsupported dtype int64"),  # (int32-sized ones are narrowed)
    ],
)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".npy"])
def test_bad_arrays_rejected(tmp_path, data, pattern, suffix):
    path = tmp_path / f"bad{suffix}"
    if suffix == ".npy":
        np.save(path, data)
    else:
        nib.save(nib.Nifti1Image(data, np.eye(4), dtype=data.dtype), path)
    with pytest.raises(VolumeError, match=pattern) as ei:
        read_volume(path)
    assert "\n" not in str(ei.value) and str(path) in str(ei.value)


def test_npy_bool_pickle_and_npz_rejected(tmp_path):
    np.save(tmp_path / "b.npy", np.zeros((2, 3, 4), bool))
    with pytest.raises(VolumeError, match="unsupported dtype bool"):
        read_volume(tmp_path / "b.npy")
    np.save(tmp_path / "o.npy", np.empty((2, 2, 2), dtype=object), allow_pickle=True)
    with pytest.raises(VolumeError, match="cannot read .npy file"):
        read_volume(tmp_path / "o.npy")
    np.savez(tmp_path / "z.npz", a=np.zeros(3))
    os.rename(tmp_path / "z.npz", tmp_path / "z.npy")
    with pytest.raises(VolumeError, match="cannot read .npy file"):
        read_volume(tmp_path / "z.npy")


def test_missing_corrupt_and_unsupported_inputs(tmp_path, volume_paths):
    with pytest.raises(VolumeError, match="no such file or directory: .*nope.nii.gz"):
        read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "text.nii").write_text("definitely not nifti\n" * 30)
    (tmp_path / "garbage.nii.gz").write_bytes(os.urandom(5000))
    good = volume_paths["ct_head_uint8.nii.gz"].read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "trunc.npy").write_bytes(np.lib.format.magic(1, 0) + b"\x10\x00{'descr': '<i2'")
    for name in ("text.nii", "garbage.nii.gz", "trunc.nii.gz", "trunc.npy"):
        with pytest.raises(VolumeError, match=r"cannot read (NIfTI|\.npy) file") as ei:
            read_volume(tmp_path / name)
        assert "\n" not in str(ei.value)
    (tmp_path / "scan.mha").write_bytes(b"x")
    with pytest.raises(VolumeError, match=r"unsupported input file type: scan.mha; supported: \.nii, \.nii\.gz, \.npy"):
        read_volume(tmp_path / "scan.mha")
    vol = Volume(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(VolumeError, match=r"unsupported output file type: out.mha; supported: \.nii, \.nii\.gz, \.npy"):
        write_volume(vol, tmp_path / "out.mha")
    with pytest.raises(VolumeError, match="NaN"):
        write_volume(Volume(np.full((2, 2, 2), np.nan, np.float32)), tmp_path / "nan.nii")
    assert not (tmp_path / "nan.nii").exists()


# ------------------------------------------------------------------------------------------------
# Atomic output
# ------------------------------------------------------------------------------------------------


def test_atomic_write_bytes_and_overwrite(tmp_path):
    p = tmp_path / "out.ftz"
    atomic_write_bytes(p, b"first")
    assert p.read_bytes() == b"first"
    with pytest.raises(FedtensorError, match=r"output exists: .*out.ftz \(use --force to overwrite\)"):
        atomic_write_bytes(p, b"second")
    assert p.read_bytes() == b"first"
    atomic_write_bytes(p, b"second", force=True)
    assert p.read_bytes() == b"second"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.ftz"]
    mode = p.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


@pytest.mark.parametrize("name", ["v" * 248 + ".ftz", "v" * 248 + ".nii.gz"])
def test_atomic_write_of_a_name_near_the_length_limit(tmp_path, name):
    """The temporary name (a dot, a random tag, .tmp) must fit where the final name (≤ 255 bytes) does."""
    atomic_write_bytes(tmp_path / name, b"data")
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "vol.nii.gz"
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            seen.append(tmp)
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp != target
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not seen[0].exists() and not target.exists()
    assert list(tmp_path.iterdir()) == []
    # an existing output survives a failed forced overwrite untouched
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, force=True) as tmp:
            tmp.write_bytes(b"new, partial")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["vol.nii.gz"]


def test_write_volume_failure_and_refusal(tmp_path, monkeypatch):
    vol = Volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    out = tmp_path / "v.nii.gz"

    def failing_save(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(FedtensorError, match="cannot write .*v.nii.gz: No space left on device"):
        write_volume(vol, out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    write_volume(vol, out)
    before = out.read_bytes()
    with pytest.raises(FedtensorError, match="output exists"):
        write_volume(Volume(np.zeros((2, 3, 4), np.int16)), out)
    assert out.read_bytes() == before
    write_volume(Volume(np.zeros((2, 3, 4), np.int16)), out, force=True)
    assert not read_volume(out).data.any()
    np.save(tmp_path / "a.npy", np.zeros(1))
    with pytest.raises(FedtensorError, match="output exists"):
        write_volume(vol, tmp_path / "a.npy")


def test_atomic_bad_destinations(tmp_path):
    with pytest.raises(FedtensorError, match="output directory does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "x.bin", b"")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FedtensorError, match="output directory is not a directory"):
        atomic_write_bytes(tmp_path / "file" / "x.bin", b"")
    (tmp_path / "adir").mkdir()
    with pytest.raises(FedtensorError, match="output path is a directory"):
        atomic_write_bytes(tmp_path / "adir", b"", force=True)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_atomic_unwritable_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(FedtensorError, match="permission denied"):
            atomic_write_bytes(ro / "x.bin", b"data")
    finally:
        ro.chmod(0o700)


def test_atomic_permission_denied_simulated(tmp_path, monkeypatch):
    """Same check as above for CI runners that run as root: os.open refusing the temp file."""
    real_open = os.open

    def deny(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(FedtensorError, match=r"cannot write to .*: permission denied"):
        atomic_write_bytes(tmp_path / "x.bin", b"data")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def _raw_is_abc(ds):  # an IS element holding text, as a damaged file would (pydicom will not write one)
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 4, b"abc ", 0, False, True)


@pytest.mark.parametrize("damage, message", [
    (_raw_is_abc, "invalid NumberOfFrames: 'abc'"),
    (lambda ds: ds.add_new(0x00280010, "US", None), "inconsistent image size in DICOM series: .* is 0x8"),
])
def test_malformed_dicom_integers_are_volume_errors(tmp_path, damage, message):
    """A value that is no int (or is empty) is a one-line VolumeError, not a ValueError or TypeError
    from ``int()``."""
    _synthetic_series(tmp_path, n=4)
    victim = sorted(tmp_path.iterdir())[1]
    ds = pydicom.dcmread(victim)
    damage(ds)
    ds.save_as(victim, enforce_file_format=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid IS value as it reads it
        with pytest.raises(VolumeError, match=message):
            read_volume(tmp_path)


@pytest.mark.parametrize("srow", [[0.0, 0, 0, 0], [np.nan, 0, 0, 0]])
def test_nifti_with_an_unusable_affine_reads_on_the_voxel_grid(tmp_path, srow):
    """An all-zero or NaN sform: the voxels are kept, the affine becomes diag(spacing), and the volume
    writes back as NIfTI (a singular affine used to fail there, a NaN one in the codec)."""
    x = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(x.shape)
    hdr.set_data_dtype(x.dtype)
    hdr.set_zooms((0.5, 0.75, 2.0))
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = srow, [0, 0, 0, 0], [0, 0, 0, 0]
    nib.Nifti1Image(x, None, header=hdr).to_filename(tmp_path / "bad.nii")
    vol = read_volume(tmp_path / "bad.nii")
    assert np.array_equal(vol.data, x) and vol.spacing == (0.5, 0.75, 2.0)
    assert np.array_equal(vol.affine, np.diag([0.5, 0.75, 2.0, 1.0])) and "unusable" in vol.meta["affine"]
    write_volume(vol, tmp_path / "back.nii.gz")
    assert np.array_equal(read_volume(tmp_path / "back.nii.gz").data, x)


def test_singular_affine_writes_its_sform_only(tmp_path):
    affine = np.diag([1.0, 1.0, 0.0, 1.0])
    write_volume(Volume(np.ones((3, 4, 5), np.uint8), (1, 1, 1), affine), tmp_path / "s.nii")
    img = nib.load(tmp_path / "s.nii")
    assert np.array_equal(img.get_sform(), affine) and int(img.header["qform_code"]) == 0
    with pytest.raises(VolumeError, match="finite 4x4"):
        Volume(np.ones((3, 4, 5), np.uint8), (1, 1, 1), np.full((4, 4), np.nan)).validate()


def test_text_file_named_npy_is_not_offered_as_a_pickle(tmp_path):
    (tmp_path / "t.npy").write_text("hello")
    with pytest.raises(VolumeError, match="not a NumPy array file$"):
        read_volume(tmp_path / "t.npy")


def test_int64_arrays_are_narrowed_when_every_value_fits(tmp_path):
    small = np.arange(-110, 130, dtype=np.int64).reshape(4, 6, 10)
    np.save(tmp_path / "small.npy", small)
    with pytest.warns(UserWarning, match="int64 voxels read as int32"):
        vol = read_volume(tmp_path / "small.npy")
    assert vol.dtype == np.int32 and np.array_equal(vol.data, small)
    np.save(tmp_path / "big.npy", small * 2**40)
    with pytest.raises(VolumeError, match="unsupported dtype int64"):
        read_volume(tmp_path / "big.npy")


@pytest.mark.parametrize("keep", [200, 0.7, 0.95])  # into the file meta; past it; into the pixel data
def test_a_truncated_slice_is_named_not_skipped(tmp_path, keep):
    _synthetic_series(tmp_path, n=5)
    victim = sorted(tmp_path.iterdir())[2]
    data = victim.read_bytes()
    victim.write_bytes(data[:keep if isinstance(keep, int) else int(keep * len(data))])
    victim.rename(victim := victim.with_suffix(""))  # found by its DICM magic, not by its name
    with pytest.raises(VolumeError, match=f"(cannot read|cannot decode pixel data of) DICOM .*file {victim.name}"):
        read_volume(tmp_path)


def test_stray_files_named_dcm_are_skipped(tmp_path):
    stack = _synthetic_series(tmp_path, n=4)
    (tmp_path / "._x1.dcm").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # a macOS AppleDouble file
    (tmp_path / "notes.dcm").write_text("not an image")
    vol = read_volume(tmp_path)
    assert vol.shape[2] == 4 and np.array_equal(vol.data[:, :, 0], stack[0].T)


def test_locked_excludes_other_processes_and_can_give_up(tmp_path):
    """The one lock helper behind the model store, the token file and a training run's directory."""
    import subprocess
    import sys

    from fedtensor.io.atomic import locked

    probe = ("import sys; from fedtensor.io.atomic import locked\n"
             "with locked(sys.argv[1], wait=False) as mine: print(mine)")
    for target in (tmp_path / "file.lock", tmp_path):  # a lock file (created), or a directory itself
        with locked(target) as mine:
            assert mine
            other = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True)
            assert other.stdout.strip() == "False", other.stderr
        other = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True)
        assert other.stdout.strip() == "True", other.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.lock"]  # nothing left for the directory


def _gz_member(tmp_path, shape=(20, 24, 16)):
    """A small .nii.gz written by nibabel, and its bytes."""
    path = tmp_path / "v.nii.gz"
    data = np.arange(np.prod(shape), dtype=np.int16).reshape(shape) % 997
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path, bytearray(path.read_bytes())


def test_a_corrupted_nii_gz_is_refused_not_read(tmp_path):
    """nibabel reads only the bytes it needs: a .nii.gz whose deflate data or CRC was damaged read as
    wrong voxels. The whole gzip stream is checked."""
    path, raw = _gz_member(tmp_path)
    assert read_volume(path).shape == (20, 24, 16)
    crc = bytearray(raw)
    crc[-6] ^= 1  # the CRC field (the last 8 bytes: CRC32, then the length)
    (tmp_path / "crc.nii.gz").write_bytes(crc)
    with pytest.raises(VolumeError, match="crc.nii.gz.*CRC check failed"):
        read_volume(tmp_path / "crc.nii.gz")
    refused = 0
    for at in range(60, len(raw) - 8, max(1, (len(raw) - 68) // 25)):  # bits of the deflate data
        bad = bytearray(raw)
        bad[at] ^= 0x40
        (tmp_path / "bad.nii.gz").write_bytes(bad)
        try:
            vol = read_volume(tmp_path / "bad.nii.gz")
        except VolumeError:
            refused += 1
            continue
        assert np.array_equal(vol.data, read_volume(path).data)  # a flip deflate cannot see changed nothing
    assert refused >= 20


def test_a_nii_gz_with_a_huge_tail_after_its_voxels_is_refused_quickly(tmp_path):
    """The gzip stream is read to its end for its CRC: a small file whose stream inflates to gigabytes
    after the declared voxels (a web upload of 8 MB took 19 s of CPU) is refused after 1 MiB of it; a
    small tail (a writer's padding) is read past."""
    import gzip

    from fedtensor.io import nifti

    img = nib.Nifti1Image(np.arange(20 * 24 * 16, dtype=np.int16).reshape(20, 24, 16), np.eye(4))
    nib.save(img, tmp_path / "plain.nii")
    raw = (tmp_path / "plain.nii").read_bytes()
    for name, tail, ok in (("pad.nii.gz", 4096, True), ("bomb.nii.gz", 64 << 20, False)):
        with gzip.open(tmp_path / name, "wb", compresslevel=1) as f:
            f.write(raw)
            for _ in range(tail // (1 << 20)):
                f.write(bytes(1 << 20))
            f.write(bytes(tail % (1 << 20)))
        if ok:
            assert np.array_equal(read_volume(tmp_path / name).data, np.asarray(img.dataobj))
        else:
            with pytest.raises(VolumeError, match=f"{name}: over 1 MiB of data after the voxels"):
                read_volume(tmp_path / name)
    assert nifti.MAX_GZ_TAIL == 1 << 20


def test_a_header_declaring_more_voxels_than_the_file_holds_fails_early(tmp_path):
    """The declared size is not allocated and zeroed before the file runs out (nibabel's read did that:
    a 73-byte .nii.gz declaring 1000×1000×200 float32 took ~1 GB)."""
    from fedtensor.bench.memory import measure_peak_rss

    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header.set_data_shape((1000, 1000, 200))
    for name in ("big.nii.gz", "big.nii"):
        raw = img.header.binaryblock + b"\0" * 4 + np.zeros(64, np.float32).tobytes()
        (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
        m = measure_peak_rss(lambda: _refused(tmp_path / name))
        assert m.extra_bytes < 100e6, (name, m.extra_bytes)  # 800 MB declared


def _refused(path):
    with pytest.raises(VolumeError, match="truncated"):
        read_volume(path)


# ------------------------------------------------------------------------------------------------
# Thirty-first session's review: suffix case, scaling precision, NIfTI-2 output, DICOM and .npy messages
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Scan.Nii.gz", "b.Nii", "c.nIi.gz", "d.NII.GZ", "e.NPY"])
def test_outputs_with_mixed_case_suffixes_hold_the_volume(tmp_path, name):
    # nibabel renamed "x.tmp.Nii.gz" to "x.tmp.nii.gz" on save: the empty temp file became the output
    vol = Volume(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    write_volume(vol, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    np.testing.assert_array_equal(read_volume(tmp_path / name).data, vol.data)


def test_a_mixed_case_nifti_name_reads_that_file_not_its_lower_case_twin(tmp_path):
    a, b = np.zeros((3, 4, 5), np.int16), np.ones((3, 4, 5), np.int16)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "scan.nii")
    shutil.copy(tmp_path / "scan.nii", tmp_path / "Scan.Nii")
    nib.save(nib.Nifti1Image(b, np.eye(4)), tmp_path / "scan.nii")  # the twin nib.load read the header of
    np.testing.assert_array_equal(read_volume(tmp_path / "Scan.Nii").data, a)
    (tmp_path / "only.Nii.gz").write_bytes(gzip.compress((tmp_path / "Scan.Nii").read_bytes()))
    np.testing.assert_array_equal(read_volume(tmp_path / "only.Nii.gz").data, a)


def test_atomic_path_refuses_to_commit_an_empty_file(tmp_path):
    with pytest.raises(FedtensorError, match="nothing was written"):
        with atomic_path(tmp_path / "out.nii"):
            pass  # the temp file exists, empty
    assert list(tmp_path.iterdir()) == []
    atomic_write_bytes(tmp_path / "empty", b"")  # what the caller asked for
    assert (tmp_path / "empty").read_bytes() == b""


def test_nifti_scaling_of_wide_stored_values_keeps_their_precision(tmp_path):
    raw = np.random.default_rng(0).integers(0, 2**30, (8, 7, 6)).astype(np.int32)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(1.0, 0.5)
    nib.save(img, tmp_path / "s.nii.gz")
    got = read_volume(tmp_path / "s.nii.gz").data
    assert got.dtype == np.float64  # float32 was off by up to 32
    np.testing.assert_array_equal(got, raw.astype(np.float64) + 0.5)
    big = nib.Nifti1Image(np.full((4, 4, 4), 30000, np.int16), np.eye(4))
    big.header.set_slope_inter(1e37, 0.0)  # finite, beyond float32: was refused as "NaN or Inf"
    nib.save(big, tmp_path / "big.nii")
    assert read_volume(tmp_path / "big.nii").data.max() == pytest.approx(3e41)


def test_an_axis_beyond_nifti1s_int16_is_written_as_nifti2(tmp_path):
    data = np.arange(40000 * 2 * 2, dtype=np.int32).reshape(40000, 2, 2) % 251
    nib.save(nib.Nifti2Image(data.astype(np.uint8), np.eye(4)), tmp_path / "in.nii")
    vol = read_volume(tmp_path / "in.nii")
    write_volume(vol, tmp_path / "out.nii")
    assert isinstance(nib.load(tmp_path / "out.nii"), nib.Nifti2Image)
    np.testing.assert_array_equal(read_volume(tmp_path / "out.nii").data, vol.data)


def test_dicom_float_pixel_data_is_named_unsupported(tmp_path):
    _synthetic_series(tmp_path, n=3)
    first = sorted(tmp_path.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    del ds.PixelData
    ds.FloatPixelData = np.zeros(ds.Rows * ds.Columns, np.float32).tobytes()
    ds.save_as(first, enforce_file_format=True)
    with pytest.raises(VolumeError, match="float pixel data .* not supported"):
        read_volume(tmp_path)


def test_dicom_orientation_must_be_unit_and_orthogonal(tmp_path):
    for k in range(3):  # |r × c| = 1, but r is twice a unit and c half of one
        _write_slice(tmp_path / f"s{k}.dcm", np.zeros((4, 5), np.int16), [0, 0, k], [2, 0, 0, 0, 0.5, 0], (0.7, 0.5))
    with pytest.raises(VolumeError, match="invalid ImageOrientationPatient"):
        read_volume(tmp_path)


def test_a_missing_pixel_decoder_is_reported_with_its_remedy(tmp_path, monkeypatch):
    _synthetic_series(tmp_path, n=3)
    message = ("Unable to decompress 'JPEG-LS Lossless' pixel data because all plugins are missing dependencies:\n"
               "    gdcm - requires gdcm>=3.0.10\n    pylibjpeg - requires pylibjpeg>=2.0")

    def fail(self):
        raise RuntimeError(message)

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(fail))
    with pytest.raises(VolumeError, match="pylibjpeg - requires pylibjpeg>=2.0") as ei:
        read_volume(tmp_path)
    assert "\n" not in str(ei.value)


def test_npy_object_and_truncated_arrays_are_named(tmp_path):
    np.save(tmp_path / "o.npy", np.array([[[1, None]]], dtype=object), allow_pickle=True)
    with pytest.raises(VolumeError, match="it holds Python objects"):
        read_volume(tmp_path / "o.npy")
    np.save(tmp_path / "t.npy", np.zeros((10, 10, 10)))
    (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:500])
    with pytest.raises(VolumeError, match="t.npy: truncated"):
        read_volume(tmp_path / "t.npy")


@pytest.mark.parametrize("spacing, affine", [((1e300, 1, 1), None), ((1e-320, 1, 1), None),
                                             ((1, 1, 1), np.diag([1e300, 1, 1, 1]))])
def test_nifti_refuses_geometry_its_float32_header_cannot_hold(tmp_path, spacing, affine):
    vol = Volume(np.zeros((2, 3, 4), np.int16), spacing=spacing, affine=np.eye(4) if affine is None else affine)
    with pytest.raises(VolumeError, match="beyond float32"):
        write_volume(vol, tmp_path / "g.nii")  # was written with an infinite (or zero) pixdim / sform
    assert list(tmp_path.iterdir()) == []
    write_volume(vol, tmp_path / "g.npy")  # .npy keeps no geometry


def test_nifti_description_intent_window_and_time_fields_survive_a_round_trip_through_ftz(tmp_path):
    # they were dropped: a label map lost its intent, the sample MR its description and display window
    from fedtensor.codec import compress, decompress

    img = nib.Nifti1Image(np.arange(120, dtype=np.int16).reshape(4, 5, 6) % 7, np.eye(4))
    img.header.set_intent("label", name="organs")
    img.header["descrip"] = b"TotalSegmentator v2"
    img.header["cal_min"], img.header["cal_max"] = 0.0, 6.0
    img.header.set_xyzt_units(xyz="mm", t="msec")
    img.header["toffset"], img.header["dim_info"] = 2.5, 57
    nib.save(img, tmp_path / "lab.nii.gz")
    vol = read_volume(tmp_path / "lab.nii.gz")
    assert vol.meta["nifti_header"] == {"descrip": "TotalSegmentator v2", "intent": [1002, 0.0, 0.0, 0.0, "organs"],
                                        "cal": [0.0, 6.0], "time_units": 16, "toffset": 2.5, "dim_info": 57}
    write_volume(decompress(compress(vol, lossless=True)), tmp_path / "back.nii.gz")
    h = nib.load(tmp_path / "back.nii.gz").header
    assert h.get_intent() == ("label", (), "organs") and h["descrip"].item() == b"TotalSegmentator v2"
    assert (float(h["cal_min"]), float(h["cal_max"]), float(h["toffset"]), int(h["dim_info"])) == (0.0, 6.0, 2.5, 57)
    assert h.get_xyzt_units() == ("mm", "msec")


@pytest.mark.parametrize("extras", [{"descrip": "x" * 81}, {"intent": [1002, 0, 0, 0]}, {"intent": [True, 0, 0, 0, ""]},
                                    {"cal": [0, float("nan")]}, {"time_units": 3}, {"dim_info": 300}, {"descrip": 5},
                                    "text", [1]])
def test_forged_nifti_header_fields_are_dropped(extras):
    from fedtensor.io.nifti import nifti_extras

    assert nifti_extras({"nifti_header": extras}) == {}
