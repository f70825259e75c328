"""Quality and size metrics for decoded volumes (pure functions; accept numpy or JAX arrays).

* :func:`psnr` and :func:`max_abs_error` are computed in float64 numpy, so the reported figures are
  exact (they agree with a float64 reference to well under 1e-4 dB).
* :func:`ssim3d` is a jitted JAX port of ``skimage.metrics.structural_similarity(a, b,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=R)`` extended to 3D:
  separable Gaussian filter (σ = 1.5, truncated at 3.5σ → 11 taps, scipy 'reflect' boundary), K1 =
  0.01, K2 = 0.03, mean of the SSIM map after cropping (win_size - 1) // 2 voxels from every border.
  It runs in float32; inputs are shifted to the centre of the original's range and scaled by R
  before filtering so the variance terms do not lose precision to cancellation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedtensor.errors import VolumeError

K1 = 0.01
K2 = 0.03
TRUNCATE = 3.5


def _pair(original, decoded) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(original), np.asarray(decoded)
    if a.shape != b.shape:
        raise VolumeError(f"shape mismatch: original {a.shape} vs decoded {b.shape}")
    if a.size == 0:
        raise VolumeError(f"cannot compare empty volumes (shape {a.shape})")
    return a, b


def max_abs_error(a, b) -> float:
    """max |a - b| (float64)."""
    a, b = _pair(a, b)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def psnr(original, decoded, *, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB: ``20·log10(R / RMSE)``, R = max − min of ``original``.

    Returns ``inf`` when the volumes are identical. With a constant original (R = 0) and a different
    decoded volume the ratio is 0 and the result is ``-inf``.
    """
    a, b = _pair(original, decoded)
    a64 = a.astype(np.float64)
    if data_range is None:
        data_range = float(a64.max() - a64.min())
    diff = a64 - b.astype(np.float64)
    mse = float(np.mean(np.square(diff)))
    if mse == 0.0:
        return math.inf
    if data_range <= 0:
        return -math.inf
    return 20.0 * math.log10(float(data_range)) - 10.0 * math.log10(mse)


def psnr_from_sse(sse: float, n: int, data_range: float) -> float:
    """:func:`psnr` from the sum of squared errors over ``n`` voxels: ``inf`` for no error, ``nan`` for an
    overflowed (non-finite) sum, ``-inf`` when ``data_range`` ≤ 0."""
    if sse == 0:
        return math.inf
    if not math.isfinite(sse):  # squared errors of values near float64's limit overflow: unknown
        return math.nan
    return 20 * math.log10(data_range / math.sqrt(sse / n)) if data_range > 0 else -math.inf


def bits_per_voxel(n_bytes: int, shape) -> float:
    """8 · ``n_bytes`` / number of voxels in ``shape``."""
    n_vox = int(np.prod(shape, dtype=np.int64))
    if n_vox <= 0:
        raise ValueError(f"shape {tuple(shape)} has no voxels")
    return 8.0 * float(n_bytes) / n_vox


def compression_ratio(original_nbytes: int, n_bytes: int) -> float:
    """``original_nbytes / n_bytes`` (e.g. 10.0 means the stream is ten times smaller)."""
    if n_bytes <= 0:
        raise ValueError(f"compressed size must be positive, got {n_bytes}")
    return float(original_nbytes) / float(n_bytes)


# ------------------------------------------------------------------------------------------------
# SSIM
# ------------------------------------------------------------------------------------------------


def _gaussian_kernel(sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
    """Exactly scipy.ndimage's 1D Gaussian kernel (radius = int(truncate·σ + 0.5))."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * x**2)
    return phi / phi.sum()


def _reflect_indices(n: int, radius: int) -> np.ndarray:
    """Source indices of a length-n axis padded by ``radius`` in scipy's 'reflect' mode (d c b a | a b c d | d c b a)."""
    i = np.arange(-radius, n + radius)
    i = np.mod(i, 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def win_size_for(shape, sigma: float = 1.5) -> int:
    """Window size used for the border crop: skimage's ``2·int(3.5σ + 0.5) + 1`` (11 for σ = 1.5),
    reduced to the largest odd number ≤ the smallest side for volumes smaller than that (where
    skimage would refuse); ``ssim3d`` then equals skimage called with ``win_size=`` this value."""
    w = 2 * int(TRUNCATE * float(sigma) + 0.5) + 1
    m = int(min(shape))
    if m < w:
        w = m if m % 2 == 1 else m - 1
    return max(w, 1)


def _filter(x: jnp.ndarray, weights: np.ndarray, spatial_axes: tuple[int, ...]) -> jnp.ndarray:
    r = (len(weights) - 1) // 2
    for ax in spatial_axes:
        n = x.shape[ax]
        xp = jnp.take(x, jnp.asarray(_reflect_indices(n, r)), axis=ax)
        acc = None
        for k, w in enumerate(weights):
            term = jax.lax.slice_in_dim(xp, k, k + n, axis=ax) * np.float32(w)
            acc = term if acc is None else acc + term
        x = acc
    return x


@functools.partial(jax.jit, static_argnames=("sigma", "pad", "normalised"))
def _ssim_partial_sums(x, y, shift, scale, c, sigma: float, pad: int, normalised: bool = False):
    """Per-(i, j) sums over the last axis of the cropped SSIM map (float32); ``normalised``: ``x`` and
    ``y`` are already ``(v - shift) * scale``; ``c``: ``shift * scale`` (made in float64)."""
    weights = _gaussian_kernel(sigma)
    # normalised: range of the original ≈ [-0.5, 0.5]
    xs, ys = (x, y) if normalised else ((x - shift) * scale, (y - shift) * scale)
    stack = jnp.stack([xs, ys, xs * xs, ys * ys, xs * ys])
    f = _filter(stack, weights, (1, 2, 3))
    mx, my, mxx, myy, mxy = f[0], f[1], f[2], f[3], f[4]
    vx = mxx - mx * mx
    vy = myy - my * my
    vxy = mxy - mx * my
    # Luminance needs the un-shifted means (in units of the data range).
    ux, uy = mx + c, my + c
    c1, c2 = np.float32(K1**2), np.float32(K2**2)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    if pad:
        s = s[pad:-pad, pad:-pad, pad:-pad]
    return jnp.sum(s, axis=-1)


_EXACT_IN_F32 = frozenset(np.dtype(t) for t in (np.float32, np.float16, np.uint8, np.int8, np.uint16, np.int16, bool))


def _normalised(v: np.ndarray, shift: float, scale: float) -> np.ndarray:
    """``(v - shift) * scale`` computed in float64, stored as float32 (a few planes at a time)."""
    out = np.empty(v.shape, np.float32)
    step = max(1, (1 << 22) // max(1, v[:1].size))
    for i in range(0, v.shape[0], step):
        part = np.subtract(v[i:i + step], shift, dtype=np.float64)
        np.multiply(part, scale, out=out[i:i + step], casting="same_kind")
    return out


def ssim3d(original, decoded, *, data_range: float | None = None, sigma: float = 1.5) -> float:
    """Mean 3D structural similarity (Wang et al. 2004, Gaussian window), in JAX.

    Matches ``skimage.metrics.structural_similarity(original, decoded, gaussian_weights=True,
    sigma=sigma, use_sample_covariance=False, data_range=data_range)`` (to ~1e-5 on real volumes);
    ``data_range`` defaults to max − min of ``original`` (1 if the original is constant). Volumes with
    a side shorter than the 11-voxel window are accepted and cropped by ``(win_size_for(shape) - 1)
    // 2`` instead (see :func:`win_size_for`).
    """
    a, b = _pair(original, decoded)
    if a.ndim != 3:
        raise VolumeError(f"ssim3d needs 3D volumes, got shape {a.shape}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    lo, hi = float(np.min(a)), float(np.max(a))
    if data_range is None:
        data_range = hi - lo
    data_range = float(data_range)
    if not np.isfinite(data_range) or data_range < 0:
        raise ValueError(f"invalid data_range {data_range}")
    if data_range == 0:
        data_range = 1.0
    pad = (win_size_for(a.shape, sigma) - 1) // 2
    shift, scale = 0.5 * (lo + hi), 1.0 / data_range
    # Values float32 cannot hold exactly (float64, large integers) are normalised here, in float64: in
    # float32 a 1e6 offset ate the differences SSIM measures.
    exact = all(v.dtype in _EXACT_IN_F32 for v in (a, b))
    if exact and a.dtype.kind == "f":  # near float32's limit v − shift overflowed (SSIM was NaN), and 1/range
        top = max(abs(lo), abs(hi), float(np.max(np.abs(b))))  # was subnormal: normalised in float64 there
        exact = top + abs(shift) < 1e30
    x, y = (jnp.asarray(v, jnp.float32) if exact else _normalised(v, shift, scale) for v in (a, b))
    partial = _ssim_partial_sums(x, y, np.float32(shift), np.float32(scale), np.float32(shift * scale),
                                 sigma=float(sigma), pad=pad,
                                 normalised=not exact)
    count = 1
    for n in a.shape:
        count *= n - 2 * pad
    return float(np.asarray(partial, dtype=np.float64).sum() / count)
