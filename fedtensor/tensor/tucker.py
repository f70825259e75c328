"""Truncated Tucker decompositions in pure, jitted JAX (float32).

``hosvd`` takes each factor from the leading left singular vectors of a mode's unfolding, through the
small R of a QR of its transpose (never the wide SVD, and never the Gram matrix, whose float32 rounding
would lose the singular values below ~3e-4 of the largest); ``hooi`` refines an HOSVD start by
higher-order orthogonal iteration to the optimal multilinear subspaces (OMLSVD).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fedtensor.tensor.precision import FP32

def mode_dot(x: jax.Array, matrix: jax.Array, mode: int) -> jax.Array:
    """Contract ``x`` along ``mode`` with ``matrix`` of shape (new, old): result[..., new, ...]."""
    return jnp.moveaxis(jnp.tensordot(matrix, x, axes=(1, mode), precision=FP32), 0, mode)


def multi_mode_dot(x: jax.Array, matrices, *, transpose: bool = False) -> jax.Array:
    """Apply one matrix per mode; ``transpose`` contracts with ``m.T`` (projection onto a basis)."""
    for mode, m in enumerate(matrices):
        x = mode_dot(x, m.T if transpose else m, mode)
    return x


def _leading_eigvecs(gram: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Top-``rank`` eigenvectors of a symmetric PSD matrix, by descending eigenvalue, sign-fixed."""
    w, v = jnp.linalg.eigh(gram)
    w, v = w[::-1][:rank], v[:, ::-1][:, :rank]
    return _sign_fixed(v), jnp.maximum(w, 0.0)


def _sign_fixed(v: jax.Array) -> jax.Array:
    """Columns with their largest-magnitude entry positive: a deterministic sign makes bases
    reproducible across runs."""
    idx = jnp.argmax(jnp.abs(v), axis=0)
    return v * jnp.sign(v[idx, jnp.arange(v.shape[1])])


def _unfolding_r(x: jax.Array, mode: int) -> jax.Array:
    """The R of a QR of the (tall) transposed mode-``mode`` unfolding: X_(m)ᵀ = Q R, so X_(m) = Rᵀ Qᵀ has
    R's singular values, and R's right singular vectors are X_(m)'s left ones."""
    n = x.shape[mode]
    return jnp.linalg.qr(jnp.moveaxis(x, mode, -1).reshape(-1, n), mode="r")


def _mode_basis(x: jax.Array, mode: int, rank: int) -> jax.Array:
    """The leading ``rank`` left singular vectors of the mode-``mode`` unfolding, sign-fixed as
    :func:`_leading_eigvecs`. From the R of a QR of the (tall) transposed unfolding and an SVD of R, not
    from the Gram matrix: a float32 Gram squares the condition number and loses every singular value
    below ~3e-4 of the largest."""
    r = _unfolding_r(x, mode)
    # R is k × n, k = min(n, other sides' product): the thin SVD holds k right vectors, enough unless the
    # rank asks for more; the full one is n × n (1 GB for a 1×2×16384 tensor).
    return _sign_fixed(jnp.linalg.svd(r, full_matrices=rank > r.shape[0])[2][:rank].T)


def leading_eigvecs_host(gram, rank: int) -> np.ndarray:
    """:func:`_leading_eigvecs` in float64 numpy, as float32: for the few small Gram matrices a host
    program meets outside ``jit`` (eager JAX would compile a dozen tiny programs for them)."""
    w, v = np.linalg.eigh(np.asarray(gram, np.float64))
    v = v[:, ::-1][:, :rank]
    v = v * np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])])
    return v.astype(np.float32)


def _check_ranks(shape, ranks) -> None:
    """At trace time: one rank per mode, each in [1, n_m] (a rank beyond n_m has no basis to give)."""
    if len(ranks) != len(shape) or not all(isinstance(r, (int, np.integer)) and 1 <= r <= n
                                           for r, n in zip(ranks, shape)):
        raise ValueError(f"ranks must give one integer in [1, n] per mode of the {tuple(shape)} tensor, got {ranks}")


@partial(jax.jit, static_argnames="ranks")
def hosvd(x: jax.Array, ranks: tuple[int, ...]) -> tuple[jax.Array, list[jax.Array]]:
    """Truncated HOSVD: returns ``(core, factors)`` with orthonormal ``factors[m]`` of shape (n_m, r_m)."""
    x = jnp.asarray(x, jnp.float32)
    _check_ranks(x.shape, ranks)
    xs = unit_scaled(x)
    factors = [_mode_basis(xs, m, r) for m, r in enumerate(ranks)]
    return multi_mode_dot(x, factors, transpose=True), factors


def unit_scaled(x: jax.Array) -> jax.Array:
    """``x / max|x|`` (``x`` if all zero): the bases do not depend on the scale, but float32 Gram
    matrices overflow beyond ~1e19 and underflow below ~1e-19."""
    peak = jnp.max(jnp.abs(x))
    return x / jnp.where(peak > 0, peak, 1.0)


@partial(jax.jit, static_argnames=("ranks", "n_iter"))
def hooi(x: jax.Array, ranks: tuple[int, ...], n_iter: int = 10) -> tuple[jax.Array, list[jax.Array]]:
    """OMLSVD: HOSVD start refined by ``n_iter`` sweeps of higher-order orthogonal iteration."""
    x = jnp.asarray(x, jnp.float32)
    _, factors = hosvd(x, ranks)
    xs = unit_scaled(x)

    def sweep(factors, _):
        factors = list(factors)
        for m, r in enumerate(ranks):
            y = xs  # projected on every mode but m (not through an n × n identity: 256 MB for n = 8192)
            for k, f in enumerate(factors):
                if k != m:
                    y = mode_dot(y, f.T, k)
            factors[m] = _mode_basis(y, m, r)
        return tuple(factors), None

    factors, _ = jax.lax.scan(sweep, tuple(factors), None, length=n_iter)
    factors = list(factors)
    return multi_mode_dot(x, factors, transpose=True), factors


@jax.jit
def tucker_to_tensor(core: jax.Array, factors) -> jax.Array:
    """Reconstruct ``core ×_1 U_1 ×_2 U_2 ...``."""
    return multi_mode_dot(core, factors)


@jax.jit
def mode_spectra(x: jax.Array) -> list[jax.Array]:
    """Squared singular values of every mode's unfolding, descending (as :func:`_mode_basis`, from the R
    of a QR: a float32 Gram's eigenvalues are off by ~1e-7 of the largest, negative ones included)."""
    x = jnp.asarray(x, jnp.float32)
    out = []
    for m in range(x.ndim):
        s = jnp.linalg.svd(_unfolding_r(x, m), compute_uv=False)
        short = x.shape[m] - s.shape[0]  # an unfolding with fewer columns than rows has fewer values
        out.append(jnp.concatenate([jnp.square(s), jnp.zeros(short, s.dtype)]))
    return out
