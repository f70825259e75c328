"""Rival codecs (``fedtensor.baselines``): every codec's round trip on a small crop of a real CT, the
target check, lossless exactness, availability / applicability reporting and the stream container."""

from __future__ import annotations

import numpy as np
import pytest

from fedtensor.baselines import (
    BASELINES,
    LOSSLESS,
    LOSSY,
    NAMES,
    NotApplicableError,
    UnavailableError,
    availability,
    get_baseline,
)
from fedtensor.baselines.base import pack, unpack
from fedtensor.baselines.dwt import band_shapes, forward, inverse, level_plan
from fedtensor.baselines.slicewise import UnsignedMap
from fedtensor.errors import FormatError
from fedtensor.io import Volume, read_volume
from fedtensor.metrics import psnr

TARGET = 40.0


@pytest.fixture(scope="module")
def ct_crop(data_dir) -> Volume:
    """32×32×16 of the abdomen CT (int32 HU): bone, soft tissue and air in one small block."""
    v = read_volume(data_dir / "ct_abdomen.nii.gz")
    return Volume(np.ascontiguousarray(v.data[45:77, 40:72, 48:64]), v.spacing, v.affine)


@pytest.fixture(scope="module")
def float_crop(data_dir) -> Volume:
    """A non-integer float volume (MR crop scaled by 1/7): exercises the 16-bit scaling path."""
    v = read_volume(data_dir / "mr_brain_gd.nii.gz")
    return Volume(np.ascontiguousarray(v.data[70:102, 70:102, 64:80]).astype(np.float32) / 7.0)


def _skip_unavailable(name: str) -> None:
    reason = BASELINES[name].unavailable_reason()
    if reason:
        pytest.skip(f"{name} unavailable here: {reason}")


def test_registry_lists_every_codec():
    assert NAMES[0] == "fedtensor"
    assert {"jpeg2000", "htj2k", "jpegxl", "dwt", "pca", "sz3", "zfp", "sperr", "omlsvd-global"} <= set(LOSSY)
    assert set(LOSSLESS) == {"fedtensor-lossless", "jpeg2000-lossless", "zstd"}
    assert set(availability()) == set(NAMES)
    with pytest.raises(KeyError, match="unknown codec"):
        get_baseline("jpeg3000")


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_round_trip_reaches_target(name, ct_crop):
    _skip_unavailable(name)
    codec = get_baseline(name)
    blob = codec.encode(ct_crop, psnr=TARGET)
    assert isinstance(blob, bytes) and 0 < len(blob) < ct_crop.nbytes
    decoded = get_baseline(name).decode(blob)  # a fresh instance: the stream is self-describing
    assert decoded.shape == ct_crop.shape and decoded.dtype == ct_crop.dtype
    p = psnr(ct_crop.data, decoded)
    assert p >= TARGET
    if name != "zfp":  # ZFP's accuracy mode moves in ~6 dB jumps; the others land on the target
        assert p < TARGET + 1.0, f"{name} overshot: {p:.2f} dB"


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_round_trip_is_exact(name, ct_crop):
    _skip_unavailable(name)
    codec = get_baseline(name)
    blob = codec.encode(ct_crop, lossless=True)
    decoded = codec.decode(blob)
    assert decoded.dtype == ct_crop.dtype
    np.testing.assert_array_equal(decoded, ct_crop.data)


@pytest.mark.parametrize("name", ["jpeg2000", "jpegxl", "sz3", "dwt"])
def test_non_integer_float_volume(name, float_crop):
    _skip_unavailable(name)
    codec = get_baseline(name)
    decoded = codec.decode(codec.encode(float_crop, psnr=TARGET))
    assert decoded.dtype == np.float32
    assert psnr(float_crop.data, decoded) >= TARGET


@pytest.mark.parametrize("name", ["jpeg2000-lossless", "fedtensor-lossless"])
def test_integer_coder_refuses_non_integer_floats(name, float_crop):
    _skip_unavailable(name)
    codec = get_baseline(name)
    assert codec.not_applicable_reason(float_crop)
    with pytest.raises(NotApplicableError):
        codec.encode(float_crop, lossless=True)


def test_missing_codec_is_reported_not_raised(monkeypatch, ct_crop):
    import imagecodecs

    monkeypatch.setattr(imagecodecs.SZ3, "available", False, raising=False)
    codec = get_baseline("sz3")
    assert "SZ3" in codec.unavailable_reason()
    assert availability()["sz3"] is not None
    with pytest.raises(UnavailableError):
        codec.encode(ct_crop, psnr=TARGET)
    monkeypatch.setattr(BASELINES["dwt"], "module_needs", ("no_such_module_xyz",))
    assert "no_such_module_xyz" in get_baseline("dwt").unavailable_reason()


def test_lossy_codec_needs_a_target(ct_crop):
    with pytest.raises(Exception, match="psnr"):
        get_baseline("sz3").encode(ct_crop)


def test_container_round_trip_and_corruption():
    blob = pack({"codec": "x", "shape": [1, 2, 3]}, [b"abc", b"", b"\x00" * 5])
    h, sections = unpack(blob)
    assert h["codec"] == "x" and sections == [b"abc", b"", b"\x00" * 5]
    with pytest.raises(FormatError):
        unpack(b"JUNK" + blob[4:])
    with pytest.raises(FormatError):
        unpack(blob[:-3])
    with pytest.raises(FormatError):
        get_baseline("zstd").decode(pack({"codec": "sz3", "shape": [1, 1, 1], "dtype": "<i2"}, [b""]))


def test_unsigned_map():
    ints = np.array([[-1024, 0], [3071, 5]], np.int16)
    m = UnsignedMap.for_data(ints)
    assert m.exact and m.bits == 12 and m.store == "u2" and m.offset == -1024
    np.testing.assert_array_equal(m.inverse(m.forward(ints)), ints)
    m8 = UnsignedMap.for_data(np.array([3, 200], np.uint8))
    assert m8.store == "u1" and m8.bits == 8
    f = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    mf = UnsignedMap.for_data(f)
    assert not mf.exact and mf.bits == 16
    assert np.max(np.abs(mf.inverse(mf.forward(f)) - f)) <= 0.5 / 0xFFFF + 1e-12


def test_dwt_plan_and_perfect_reconstruction():
    assert level_plan((512, 512, 20)) == [(0, 1, 2), (0, 1), (0, 1), (0, 1), (0, 1)]
    assert level_plan((8, 8, 8)) == []
    rng = np.random.default_rng(0)
    x = rng.normal(size=(33, 17, 20))
    plan = level_plan(x.shape)
    inputs, approx_shape = band_shapes(x.shape, plan)
    a, details = forward(x, plan)
    assert a.shape == approx_shape
    np.testing.assert_allclose(inverse(a, details, plan, inputs), x, atol=1e-9)


def test_pca_high_rate_is_near_lossless(ct_crop):
    codec = get_baseline("pca")
    decoded = codec.decode(codec.encode(ct_crop, psnr=70))
    assert psnr(ct_crop.data, decoded) >= 70


@pytest.mark.parametrize("name", ["pca", "dwt"])
def test_step_baselines_round_trip_a_constant_volume(name):
    """A constant volume keeps no PCA component (rank 0: an empty coefficient section) — it must still
    decode, to the constant."""
    codec = get_baseline(name)
    vol = Volume(np.full((12, 10, 6), 37, np.int16))
    for step in (1.0, 1e3):
        out = codec.decode(codec.encode_param(vol, step))
        np.testing.assert_array_equal(out, vol.data)


def test_jpeg2k_slicewise_compat(ct_crop):
    _skip_unavailable("jpeg2000")
    from fedtensor.baselines.jpeg2000 import Jpeg2kSlicewise

    c = Jpeg2kSlicewise(ct_crop.data)
    streams = c.compress(ct_crop.data, 60.0)
    assert len(streams) == ct_crop.shape[2]
    out = c.decompress(streams)
    assert out.dtype == ct_crop.dtype and psnr(ct_crop.data, out) > 30
    assert sum(map(len, c.compress(ct_crop.data, 60.0, codecformat="JP2"))) > sum(map(len, streams))


def test_jpeg2k_slicewise_takes_a_level_per_slice(ct_crop):
    """(benchmarks/codec.py --j2k-allocation per-slice): slice k coded at levels[k], alone."""
    _skip_unavailable("jpeg2000")
    from fedtensor.baselines.jpeg2000 import Jpeg2kSlicewise

    c = Jpeg2kSlicewise(ct_crop.data)
    levels = np.linspace(40.0, 70.0, ct_crop.shape[2])
    streams = c.compress(ct_crop.data, levels)
    assert streams == [c.compress_slice(ct_crop.data[:, :, k], v) for k, v in enumerate(levels)]
    assert streams[0] == c.compress(ct_crop.data, 40.0)[0] and len(streams[-1]) > len(streams[0])
    out = c.decompress(streams)
    np.testing.assert_array_equal(out[:, :, 3], c.decompress_slice(streams[3]))


def test_jpeg2k_one_codestream_of_slice_components(ct_crop):
    """Components = slices, no inter-component transform: each slice still coded in 2D; one header."""
    _skip_unavailable("jpeg2000")
    from fedtensor.baselines.jpeg2000 import Jpeg2kSlicewise

    per_slice = Jpeg2kSlicewise(ct_crop.data)
    one = Jpeg2kSlicewise(ct_crop.data, packing="components")
    streams = one.compress(ct_crop.data, 60.0)
    assert len(streams) == 1
    out = one.decompress(streams)
    assert out.shape == ct_crop.shape and out.dtype == ct_crop.dtype and psnr(ct_crop.data, out) > 30
    assert len(streams[0]) < sum(map(len, per_slice.compress(ct_crop.data, 60.0)))
    with pytest.raises(ValueError, match="packing"):
        Jpeg2kSlicewise(ct_crop.data, packing="volume")


def test_jpeg2k_components_of_a_single_slice(ct_crop):
    _skip_unavailable("jpeg2000")
    from fedtensor.baselines.jpeg2000 import Jpeg2kSlicewise

    one_slice = np.ascontiguousarray(ct_crop.data[:, :, :1])
    c = Jpeg2kSlicewise(one_slice, packing="components")
    out = c.decompress(c.compress(one_slice, 60.0))
    assert out.shape == one_slice.shape and psnr(one_slice, out) > 30


@pytest.mark.parametrize("shape", [(1, 27, 9), (1, 9, 1), (1, 1, 9), (27, 1, 9), (9, 1, 1)])
def test_sperr_codes_volumes_with_a_first_axis_of_one(shape):
    """SPERR itself aborts the process (std::length_error) when the first axis is 1; singleton axes are
    moved last for it. Run in a child process so a regression fails this test, not the whole run."""
    import subprocess
    import sys

    _skip_unavailable("sperr")
    code = f"""
import numpy as np
from fedtensor.baselines import get_baseline
from fedtensor.io import Volume
from fedtensor.metrics import psnr
x = (np.random.default_rng(0).normal(size={shape}) * 100).astype(np.int16)
c = get_baseline("sperr")
y = c.decode(c.encode(Volume(x), psnr=45))
assert y.shape == x.shape and y.dtype == x.dtype and psnr(x, y) >= 45, (y.shape, psnr(x, y))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    with pytest.raises(NotApplicableError, match="a single voxel"):
        get_baseline("sperr").encode(Volume(np.ones((1, 1, 1), np.int16)), psnr=45)


def test_the_papers_global_omlsvd_cell_is_its_own_stream_never_the_exact_coder(data_dir):
    """At 50 dB the exact stream of the 8-bit head CT is smaller than the global OMLSVD's, and compress
    swaps it in; the benchmark's "global OMLSVD (paper)" cell must stay the paper's method."""
    from fedtensor.codec import compress, read_info

    v = read_volume(data_dir / "ct_head_uint8.nii.gz")
    assert read_info(compress(v, psnr=50, codec="omlsvd-global"))["codec"] == "lossless"
    blob = get_baseline("omlsvd-global").encode(v, psnr=50)
    assert read_info(blob)["codec"] == "omlsvd-global"
    assert psnr(v.data, get_baseline("omlsvd-global").decode(blob)) >= 50


@pytest.mark.parametrize("name", ["sz3", "zfp"])
def test_error_bounded_rivals_keep_float64_volumes_in_float64(float_crop, name):
    """At an offset of 10⁶ a float32 copy already errs by ~0.03 of a 0–1 signal: 45 dB was out of reach
    for the wrapper, not for the codec."""
    _skip_unavailable(name)
    data = np.asarray(float_crop.data, np.float64)
    x = (data - data.min()) / (data.max() - data.min()) + 1e6
    c = get_baseline(name)
    y = c.decode(c.encode(Volume(x), psnr=45))
    assert y.dtype == np.float64 and psnr(x, y) >= 45


def test_a_negative_zero_makes_a_float_volume_not_integer_valued_for_every_codec():
    """An integer coder gives −0.0 back as +0.0: the fedtensor lossless cell said it could code such a
    volume and then failed, and JPEG2000-lossless was scored exact though not bit-exact."""
    d = np.random.default_rng(0).integers(-50, 50, size=(16, 12, 4)).astype(np.float32)
    d[0, 0, 0] = -0.0
    for name in ("fedtensor-lossless", "jpeg2000-lossless"):
        _skip_unavailable(name)
        assert "integer-valued" in get_baseline(name).not_applicable_reason(Volume(d))
    d[0, 0, 0] = 0.0
    assert get_baseline("fedtensor-lossless").not_applicable_reason(Volume(d)) is None


def test_jpeg2000_goes_past_its_8_bit_ceiling_from_16_bit_samples(data_dir):
    """With bitspersample = 8 OpenJPEG stops near 57 dB on the 8-bit head CT; its finer variant (16-bit
    samples, slower) is used only for targets beyond, so 45 dB streams stay what they were."""
    _skip_unavailable("jpeg2000")
    v = read_volume(data_dir / "ct_head_uint8.nii.gz")
    crop = Volume(np.ascontiguousarray(v.data[60:124, 80:144, 20:36]))
    j2k = get_baseline("jpeg2000")
    high = j2k.encode(crop, psnr=60)
    assert unpack(high)[0]["map"]["bits"] == 16 and psnr(crop.data, j2k.decode(high)) >= 60
    assert unpack(j2k.encode(crop, psnr=45))[0]["map"]["bits"] == 8
