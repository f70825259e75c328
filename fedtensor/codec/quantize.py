"""Dead-zone uniform scalar quantisation (jitted JAX).

``q = sign(c) · floor(|c| / step + rounding)`` with ``rounding < 1/2`` widens the zero bin, which pays
for itself in rate on Laplacian coefficients; reconstruction ``sign(q) · (|q| + offset) · step`` with a
small negative ``offset`` moves each value toward the centroid of its bin.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

ROUNDING = 0.4
RECON_OFFSET = 0.0


@jax.jit
def quantize(c: jax.Array, step, rounding=ROUNDING) -> jax.Array:
    return (jnp.sign(c) * jnp.floor(jnp.abs(c) / step + rounding)).astype(jnp.int32)


@jax.jit
def dequantize(q: jax.Array, step, offset=RECON_OFFSET) -> jax.Array:
    qf = q.astype(jnp.float32)
    return jnp.sign(qf) * (jnp.abs(qf) + offset) * step


@jax.jit
def quantization_sse(c: jax.Array, step) -> jax.Array:
    """Squared error of quantising ``c`` at ``step`` (equals the voxel error for orthonormal transforms)."""
    return jnp.sum(jnp.square(c - dequantize(quantize(c, step), step)))


@partial(jax.jit, static_argnames="iterations")
def _bisect_step(c: jax.Array, max_sse, lo, hi, iterations: int) -> tuple[jax.Array, jax.Array]:
    def body(_, bounds):
        lo, hi = bounds
        mid = jnp.sqrt(lo * hi)
        ok = quantization_sse(c, mid) <= max_sse
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, iterations, body, (jnp.float32(lo), jnp.float32(hi)))


_SUBSAMPLE = 1 << 16  # coefficients of the strided subsample that narrows the bracket (zero-padded)


@partial(jax.jit, static_argnames="stride")
def _subsample(c: jax.Array, stride: int) -> jax.Array:
    """Every ``stride``-th coefficient, zero-padded to :data:`_SUBSAMPLE` (zeros add no error at any
    step): the bisection on subsamples compiles once, whatever the array's size."""
    sub = c.reshape(-1)[::stride]
    return jnp.pad(sub, (0, _SUBSAMPLE - sub.size))


def largest_step_within(c: jax.Array, max_sse: float, lo: float, hi: float) -> float:
    """Largest step in ``[lo, hi]`` whose quantisation SSE on ``c`` stays ≤ ``max_sse`` (log bisection).

    A strided subsample narrows the bracket cheaply; a few passes over all coefficients then settle it.
    """
    size = c.size
    stride = -(-size // _SUBSAMPLE) | 1  # odd: visits every position of a power-of-two block
    if stride > 1:
        taken = min(_SUBSAMPLE, -(-size // stride))
        lo_s, hi_s = _bisect_step(_subsample(c, stride), max_sse * taken / size, lo, hi, iterations=24)
        narrow = (max(lo, float(lo_s) / 1.25), min(hi, float(hi_s) * 1.25))
        step, top = (float(v) for v in _bisect_step(c, max_sse, *narrow, iterations=12))
        if narrow[0] < step and top < narrow[1]:  # the answer is inside the narrowed bracket
            return step
    return float(_bisect_step(c, max_sse, lo, hi, iterations=40)[0])
