"""Floats made from scaled NIfTI integers (``scl_slope``/``scl_inter``): coded as those integers, decoded
and written back as the same floats and the same stored integers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from fedtensor.codec import compress, decompress
from fedtensor.codec.container import pack, unpack
from fedtensor.errors import FormatError, RateError
from fedtensor.io import Volume, read_volume, write_volume
from fedtensor.metrics import psnr


@pytest.fixture(scope="module")
def mr_crop(volume_paths, tmp_path_factory) -> Volume:
    """A 64×64×48 crop of the sample MR (uint8 × 6.48 on disk), read back from its own NIfTI file."""
    img = nib.load(volume_paths["mr_brain_gd.nii.gz"])
    raw = np.asarray(img.dataobj.get_unscaled())[56:120, 62:126, 48:96]
    crop = nib.Nifti1Image(np.ascontiguousarray(raw), img.affine)
    crop.header.set_data_dtype(raw.dtype)
    crop.header.set_slope_inter(img.dataobj.slope, img.dataobj.inter)
    path = tmp_path_factory.mktemp("mr") / "crop.nii.gz"
    nib.save(crop, path)
    return read_volume(path)


def _synthetic(tmp_path, slope=0.37, inter=-12.1, dtype=np.uint16) -> Volume:
    z, y, x = np.mgrid[:24, :28, :20]
    raw = (900 + 400 * np.sin(x / 5.0) * np.cos(y / 7.0) + 30 * z
           + np.random.default_rng(1).normal(0, 6, z.shape)).clip(0, 4000).astype(dtype)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_data_dtype(dtype)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, tmp_path / "syn.nii")
    return read_volume(tmp_path / "syn.nii")


def test_the_sample_mr_is_read_with_its_stored_integers(mr_crop):
    assert mr_crop.dtype == np.float32
    assert mr_crop.meta["nifti_scaling"] == {"slope": pytest.approx(6.48235273), "inter": 0.0, "stored": "|u1"}


def test_lossless_on_scaled_integers_is_bit_exact_and_written_back_as_them(mr_crop, tmp_path):
    # it was refused ("exact coding needs integer-valued voxels"), and decoded files came back float32
    blob = compress(mr_crop, lossless=True)
    assert int.from_bytes(blob[4:6], "little") == 3
    out = decompress(blob)
    assert out.dtype == np.float32 and out.data.tobytes() == mr_crop.data.tobytes()
    write_volume(out, tmp_path / "back.nii.gz")
    img = nib.load(tmp_path / "back.nii.gz")
    assert img.get_data_dtype() == np.uint8 and img.dataobj.slope == pytest.approx(6.48235273)
    assert read_volume(tmp_path / "back.nii.gz").data.tobytes() == mr_crop.data.tobytes()


@pytest.mark.parametrize("target", [40.0, 45.0, 50.0])
def test_psnr_floor_holds_on_the_floats(mr_crop, target):
    blob = compress(mr_crop, psnr=target)
    out = decompress(blob)
    reached = psnr(mr_crop.data, out.data)
    assert reached >= target
    assert unpack(blob)[0]["stats"]["psnr"] == pytest.approx(reached, rel=1e-12)


@pytest.mark.parametrize("bound", [0.2, 0.5, 1.3, 4.0, 25.0])
def test_max_error_holds_on_the_floats(tmp_path, bound):
    vol = _synthetic(tmp_path)
    assert "nifti_scaling" in vol.meta
    blob = compress(vol, max_error=bound)
    out = decompress(blob).data
    err = np.abs(out.astype(np.float64) - vol.data)
    assert err.max() <= bound
    assert unpack(blob)[0]["stats"]["max_abs_error"] == err.max()  # measured on the floats


def test_a_bits_budget_counts_the_scaling_in_the_header(tmp_path):
    vol = _synthetic(tmp_path)
    for bpv in (0.6, 1.5, 3.0):
        blob = compress(vol, bpv=bpv)
        assert 8 * len(blob) <= bpv * vol.data.size
        assert "scaling" in unpack(blob)[0]


def test_changed_voxels_are_coded_as_floats(mr_crop):
    changed = Volume(mr_crop.data + np.float32(0.25), mr_crop.spacing, mr_crop.affine, mr_crop.meta)
    blob = compress(changed, psnr=45)
    assert int.from_bytes(blob[4:6], "little") == 2 and "scaling" not in unpack(blob)[0]
    assert "nifti_scaling" not in decompress(blob).meta


def test_the_integers_beat_the_floats_they_make_on_the_whole_mr(volume_paths):
    # 0.2585 vs 0.2691 bpv at 40 dB, 0.4999 vs 0.5116 at 45 (on a small crop they can lose ~1 %:
    # the decoded integers' rounding takes a share of the error budget that floats do not pay)
    mr = read_volume(volume_paths["mr_brain_gd.nii.gz"])
    as_floats = Volume(mr.data, mr.spacing, mr.affine, {})
    for target in (40, 45):
        assert len(compress(mr, psnr=target)) < 0.99 * len(compress(as_floats, psnr=target))


@pytest.mark.parametrize("scaling", [{"slope": 0.0, "inter": 0.0, "dtype": "<f4"},
                                     {"slope": float("nan"), "inter": 0.0, "dtype": "<f4"},
                                     {"slope": 1e37, "inter": 0.0, "dtype": "<f4"},  # 255 × 1e37: beyond float32
                                     {"slope": 2.0, "inter": 0.0, "dtype": "<i2"},
                                     {"slope": 2.0, "inter": 0.0},
                                     [2.0, 0.0]])
def test_forged_scalings_are_refused(mr_crop, scaling):
    header, sections = unpack(compress(mr_crop, lossless=True))
    header.pop("sections")
    with pytest.raises(FormatError, match="scaling"):
        decompress(pack({**header, "scaling": scaling}, sections))


def test_a_scaling_in_a_version_2_stream_is_refused(mr_crop):
    blob = compress(mr_crop, lossless=True)
    body = blob[:4] + (2).to_bytes(2, "little") + blob[6:-32]
    import hashlib

    with pytest.raises(FormatError, match="version 2"):
        decompress(body + hashlib.sha256(body).digest())


def _nii(tmp_path, raw, slope, inter, name="v.nii") -> Volume:
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_data_dtype(raw.dtype)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, tmp_path / name)
    return read_volume(tmp_path / name)


def test_an_error_bound_across_a_power_of_two_still_holds(tmp_path):
    # a decoded integer past the original's largest crosses 8.0, where the floats' rounding doubles
    vol = _nii(tmp_path, np.array([160, 193] * 4, np.int16).reshape(2, 2, 2), 0.0598098449409008, -3.565866708755493)
    bound = 1.9139155149459839
    assert np.abs(decompress(compress(vol, max_error=bound)).data.astype(np.float64) - vol.data).max() <= bound


@pytest.mark.parametrize("target", [6.0, 10.0, 15.0])
def test_a_psnr_floor_holds_on_floats_of_a_few_levels(tmp_path, target):
    # 1.0 and 1.0000001 only: the integers' errors round to whole float steps (6 dB gave 3.6)
    raw = (np.random.default_rng(0).random((24, 24, 24)) * 11).astype(np.uint8)
    vol = _nii(tmp_path, raw, float(np.float32(1e-8)), 1.0)
    assert psnr(vol.data, decompress(compress(vol, psnr=target)).data) >= target


def test_a_scaling_near_floats_limit_is_coded_and_decoded(tmp_path):
    # 99 × 2e36 is a float32, 255 × 2e36 is not: such a stream was refused by its own decoder
    vol = _nii(tmp_path, np.full((4, 4, 4), 99, np.uint8), 2e36, 0.0)
    assert decompress(compress(vol, lossless=True)).data.tobytes() == vol.data.tobytes()


def test_a_psnr_beyond_the_transforms_is_met_by_the_integers_exactly(mr_crop):
    out = decompress(compress(mr_crop, psnr=300))  # was "--psnr must be a positive number of dB, got 457.57"
    assert out.data.tobytes() == mr_crop.data.tobytes()


def test_a_budget_too_small_suggests_one_that_is_met():
    z, y, x = np.mgrid[:16, :16, :16]
    raw = np.rint(600 + 300 * np.sin(x / 4) * np.cos(y / 5) + 10 * z
                  + np.random.default_rng(0).normal(0, 5, z.shape)).astype(np.uint16)
    slope, inter = float(np.float32(0.37)), float(np.float32(-12.1))
    vol = Volume((raw * slope + inter).astype(np.float32), (1, 1, 1), np.eye(4),
                 {"nifti_scaling": {"slope": slope, "inter": inter, "stored": "<u2"}})
    with pytest.raises(RateError, match="ask for at least") as err:
        compress(vol, bpv=0.05)
    suggested = float(str(err.value).rsplit(" ", 1)[1])
    blob = compress(vol, bpv=suggested)  # the suggestion was short of the header's growth, again and again
    assert 8 * len(blob) <= suggested * vol.data.size


def test_a_negative_zero_set_after_reading_is_not_coded_as_integers(tmp_path):
    vol = _nii(tmp_path, np.arange(8, dtype=np.uint8).reshape(2, 2, 2), -0.5, 0.0)
    data = vol.data.copy()
    data[0, 0, 0] = -0.0  # (it was +0.0: lossless decoded +0.0)
    changed = Volume(data, vol.spacing, vol.affine, vol.meta)
    with pytest.raises(RateError, match="integer-valued"):
        compress(changed, lossless=True)


def test_forged_numbers_in_a_scaling_are_format_errors(mr_crop):
    header, sections = unpack(compress(mr_crop, lossless=True))
    header.pop("sections")
    for scaling in ({"slope": 10**400, "inter": 0.0, "dtype": "<f4"}, {"slope": 2.0, "inter": 0.0, "dtype": "f4,("},
                    {"slope": 2.0, "inter": 0.0, "dtype": None}, {"slope": True, "inter": 0.0, "dtype": "<f4"}):
        with pytest.raises(FormatError, match="scaling"):
            decompress(pack({**header, "scaling": scaling}, sections))


def test_restoration_reads_the_step_in_the_floats_units(mr_crop):
    # the scaled stream's params are the integers': the net was conditioned on a 6.5× finer step
    from fedtensor.codec import read_info
    from fedtensor.nn.normalize import normaliser_for, operating_point

    floats = Volume(mr_crop.data, mr_crop.spacing, mr_crop.affine, {})
    points = []
    for vol in (mr_crop, floats):
        blob = compress(vol, psnr=40, block=8)
        info = read_info(blob)
        points.append(operating_point(info["codec"], info["params"], normaliser_for(decompress(blob).data))[0])
    assert points[0] == pytest.approx(points[1], rel=0.05)


def test_a_scaling_float32_cannot_hold_is_written_as_floats(tmp_path):
    # NIfTI-1 stores scl_slope in float32: a NIfTI-2 source's 0.1 came back as 0.100000001, every voxel off
    raw = (np.arange(336) % 200).astype(np.int16).reshape(6, 7, 8)
    img = nib.Nifti2Image(raw, np.eye(4))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(0.1, 1e-3)
    nib.save(img, tmp_path / "n2.nii")
    vol = read_volume(tmp_path / "n2.nii")
    out = decompress(compress(vol, lossless=True))
    write_volume(out, tmp_path / "o.nii")
    assert read_volume(tmp_path / "o.nii").data.tobytes() == out.data.tobytes() == vol.data.tobytes()


def test_a_budget_the_integers_miss_is_met_by_the_floats(volume_paths):
    mr = read_volume(volume_paths["mr_brain_gd.nii.gz"])  # was "the smallest stream takes 0.0023"
    blob = compress(mr, bpv=0.002)
    assert 8 * len(blob) <= 0.002 * mr.data.size


@pytest.mark.parametrize("target, version", [(45.0, 3), (55.0, 2)])
def test_errors_finer_than_an_integer_step_are_coded_as_floats(mr_crop, target, version):
    # at 55 dB the decoded integers' rounding took a large share of the error: 2.6 % more bits, 4× the time
    blob = compress(mr_crop, psnr=target)
    assert int.from_bytes(blob[4:6], "little") == version
    assert psnr(mr_crop.data, decompress(blob).data) >= target


def test_squared_errors_beyond_float64_fall_back_to_the_floats():
    z, y, x = np.mgrid[:16, :16, :16]
    raw = (1000 + 500 * np.sin(x / 3.0) * np.cos(y / 4.0) + 20 * z).astype(np.int16)
    vol = Volume(raw * np.float64(1e300), (1, 1, 1), np.eye(4),
                 {"nifti_scaling": {"slope": 1e300, "inter": 0.0, "stored": "<i2"}})
    try:
        blob = compress(vol, psnr=30)
    except RateError:
        return  # the floats' own answer (errors beyond float64)
    assert unpack(blob)[0]["stats"]["psnr"] >= 30  # was NaN, and the stream unverified
