"""Metrics against skimage / float64 numpy references."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fedtensor.errors import VolumeError
from fedtensor.io import read_volume
from fedtensor.metrics import (
    bits_per_voxel,
    compression_ratio,
    max_abs_error,
    psnr,
    ssim3d,
    win_size_for,
)


def _sk_ssim(a, b, data_range, win_size=None):
    return structural_similarity(
        np.asarray(a, np.float64), np.asarray(b, np.float64), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=data_range, win_size=win_size,
    )


def _noisy(vol, rel_sigma, seed):
    a = vol.data
    rng = np.random.default_rng(seed)
    r = float(a.max()) - float(a.min())
    b = a.astype(np.float64) + rng.normal(0.0, rel_sigma * r, a.shape)
    if a.dtype.kind in "iu":  # a plausible decoded volume: same dtype, clipped
        info = np.iinfo(a.dtype)
        b = np.clip(np.rint(b), info.min, info.max).astype(a.dtype)
    else:
        b = b.astype(a.dtype)
    return a, b, r


@pytest.fixture(scope="module")
def real_pairs(volume_paths):
    out = {}
    for name, rel, seed in [("ct_head_uint8.nii.gz", 0.02, 1), ("ct_abdomen.nii.gz", 0.01, 2), ("mr_brain_gd.nii.gz", 0.03, 3)]:
        out[name] = _noisy(read_volume(volume_paths[name]), rel, seed)
    return out


@pytest.mark.parametrize("name", ["ct_head_uint8.nii.gz", "ct_abdomen.nii.gz", "mr_brain_gd.nii.gz"])
def test_psnr_vs_skimage_real(real_pairs, name):
    a, b, r = real_pairs[name]
    ours = psnr(a, b)
    ref = peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=r)
    assert abs(ours - ref) < 1e-4
    # float64 definition, independently
    rmse = math.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    assert ours == pytest.approx(20 * math.log10(r / rmse), abs=1e-9)


@pytest.mark.parametrize("name", ["ct_head_uint8.nii.gz", "ct_abdomen.nii.gz"])
def test_ssim3d_vs_skimage_real(real_pairs, name):
    a, b, r = real_pairs[name]
    ours = ssim3d(a, b)
    ref = _sk_ssim(a, b, r)
    assert abs(ours - ref) < 1e-4, (ours, ref)
    assert 0.0 < ours < 1.0


def test_ssim3d_identical_and_data_range(real_pairs):
    a, b, r = real_pairs["ct_abdomen.nii.gz"]
    assert ssim3d(a, a) == pytest.approx(1.0, abs=1e-6)
    assert psnr(a, a) == math.inf
    # explicit data_range is honoured (and matches skimage with the same range)
    assert abs(ssim3d(a, b, data_range=2 * r) - _sk_ssim(a, b, 2 * r)) < 1e-4
    # jax inputs are accepted
    assert ssim3d(jnp.asarray(a), jnp.asarray(b)) == pytest.approx(ssim3d(a, b), abs=1e-7)


@settings(max_examples=15, deadline=None)
@given(
    shape=st.tuples(*[st.integers(7, 14)] * 3),
    seed=st.integers(0, 2**32 - 1),
    noise=st.floats(0.0, 0.5),
    offset=st.sampled_from([0.0, -1000.0, 1e4]),
    scale=st.sampled_from([1.0, 255.0, 3000.0]),
)
def test_ssim3d_hypothesis_vs_skimage(shape, seed, noise, offset, scale):
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.standard_normal(shape), axis=0)  # some structure, not just white noise
    a = (offset + scale * (smooth - smooth.min()) / (np.ptp(smooth) + 1e-9)).astype(np.float32)
    b = (a + noise * scale * rng.standard_normal(shape)).astype(np.float32)
    r = float(a.max()) - float(a.min())
    win = win_size_for(shape)
    assert win == 11 if min(shape) >= 11 else win in (7, 9)
    ours = ssim3d(a, b)
    ref = _sk_ssim(a, b, r if r > 0 else 1.0, win_size=win)
    assert abs(ours - ref) < 1e-4, (ours, ref)


@pytest.mark.parametrize("shape", [(1, 5, 12), (3, 3, 3), (2, 11, 6), (12, 12, 11)])
def test_ssim3d_small_shapes_vs_skimage(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.uniform(0, 100, shape)
    b = a + rng.normal(0, 5, shape)
    ours = ssim3d(a, b)
    ref = _sk_ssim(a, b, float(np.ptp(a)), win_size=win_size_for(shape))
    assert abs(ours - ref) < 1e-4


@settings(max_examples=30, deadline=None)
@given(
    a=arrays(np.int16, (4, 5, 6), elements=st.integers(-2000, 3000)),
    b=arrays(np.int16, (4, 5, 6), elements=st.integers(-2000, 3000)),
)
def test_psnr_and_max_abs_error_exact(a, b):
    d = a.astype(np.float64) - b.astype(np.float64)
    assert max_abs_error(a, b) == float(np.abs(d).max())
    r = float(a.max()) - float(a.min())
    p = psnr(a, b)
    if not d.any():
        assert p == math.inf
    elif r == 0:
        assert p == -math.inf
    else:
        assert p == pytest.approx(peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=r), abs=1e-9)


def test_size_metrics_and_errors():
    assert bits_per_voxel(1000, (10, 10, 10)) == 8.0
    assert bits_per_voxel(125, (10, 10, 10)) == 1.0
    assert compression_ratio(2_000_000, 100_000) == 20.0
    with pytest.raises(ValueError):
        bits_per_voxel(10, (0, 4, 4))
    with pytest.raises(ValueError):
        compression_ratio(100, 0)
    with pytest.raises(VolumeError, match="shape mismatch"):
        psnr(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(VolumeError, match="shape mismatch"):
        ssim3d(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)))
    with pytest.raises(VolumeError, match="3D"):
        ssim3d(np.zeros((8, 8)), np.zeros((8, 8)))
    assert ssim3d(np.full((8, 8, 8), 5.0), np.full((8, 8, 8), 5.0)) == pytest.approx(1.0)


def test_ssim3d_keeps_small_differences_on_a_large_offset():
    """float64 volumes far from zero: normalised in float64 (in float32 a 1e6 offset ate the noise the
    SSIM measures, 0.99977 against 0.99995). The reference computes skimage's formula with the
    (shift-invariant) variances taken about the offset, where float64 itself stays exact."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    a = 1e6 + rng.normal(size=(16, 16, 16))
    b = a + 0.01 * rng.normal(size=a.shape)
    dr, s = float(a.max() - a.min()), 1e6
    f = lambda v: gaussian_filter(v, sigma=1.5, truncate=3.5)  # noqa: E731
    x, y = a - s, b - s
    mx, my = f(x), f(y)
    vx, vy, vxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    ux, uy = mx + s, my + s
    c1, c2 = (0.01 * dr) ** 2, (0.03 * dr) ** 2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    assert ssim3d(a, b) == pytest.approx(ssim_map[5:-5, 5:-5, 5:-5].mean(), abs=1e-7)


def test_ssim_near_float32s_limit_matches_scikit_image():
    # v − shift overflowed float32 (SSIM came out NaN: null in `evaluate --json`), and 1/range was subnormal
    from skimage.metrics import structural_similarity

    f = (np.random.default_rng(0).random((16, 16, 16)) * 3e38).astype(np.float32)
    g = f + np.float32(1e37) * np.random.default_rng(1).random(f.shape).astype(np.float32)
    for a, b in ((f, -f), (f, g)):
        want = structural_similarity(a.astype(np.float64), b.astype(np.float64), gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=float(f.max()) - float(f.min()))
        assert ssim3d(a, b) == pytest.approx(want, abs=1e-6)
