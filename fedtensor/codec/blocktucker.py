"""Block-Tucker helpers for choosing a block shape: sampled superblocks, their coefficients, a rate proxy.

The codec itself (bases, transform, quantisation, coding in slabs) is :mod:`fedtensor.codec.stream`.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fedtensor.codec.quantize import ROUNDING
from fedtensor.tensor.block import block_shape, project
from fedtensor.tensor.precision import FP32
from fedtensor.tensor.tucker import _leading_eigvecs


def tile_coefficients(tiles: np.ndarray, b, offset: float = 0.0, scale: float = 1.0) -> jax.Array:
    """Block-Tucker coefficients ``(n_blocks, n_bands)`` of the normalised ``(tiles - offset) / scale``,
    ``tiles`` ``(T, X, Y, Z)`` in any dtype.

    Sides must be divisible by the block shape; the bases are fitted to all the tiles' blocks. Tiles are
    normalised and transformed one at a time, so the working set is the input and the output only.
    """
    return _tile_coefficients(jnp.asarray(tiles), jnp.float32(offset), jnp.float32(scale), block_shape(b))


@partial(jax.jit, static_argnames="b")
def _tile_coefficients(tiles: jax.Array, offset, scale, b: tuple[int, int, int]) -> jax.Array:
    (bx, by, bz) = b
    gx, gy, gz = (n // m for n, m in zip(tiles.shape[1:], b))

    def blocks(tile):  # one tile as a (gx, gy, gz, bx, by, bz) block stack, normalised
        t = (tile.astype(jnp.float32) - offset) / scale
        return t.reshape(gx, bx, gy, by, gz, bz).transpose(0, 2, 4, 1, 3, 5)

    def grams(tile):
        k = blocks(tile)
        return tuple(jnp.einsum(spec, k, k, precision=FP32) for spec in
                     ("xyzijk,xyzljk->il", "xyzijk,xyzilk->jl", "xyzijk,xyzijl->kl"))

    g = [a.sum(axis=0) for a in jax.lax.map(grams, tiles)]
    bases = [_leading_eigvecs(m, n)[0] for m, n in zip(g, b)]
    coef = jax.lax.map(lambda tile: project(blocks(tile), bases).reshape(-1, bx * by * bz), tiles)
    return coef.reshape(-1, bx * by * bz)


def gather_blocks(x: np.ndarray, b, flat_index: np.ndarray) -> np.ndarray:
    """Blocks ``(n, bx, by, bz)`` of the edge-padded ``x`` at flat block-grid indices, without padding ``x``.

    Equal to ``to_blocks(x, b).reshape(-1, *b)[flat_index]``: edge padding is index clamping.
    """
    b = block_shape(b)
    grid = [-(-n // m) for n, m in zip(x.shape, b)]
    corners = np.unravel_index(np.asarray(flat_index, np.int64), grid)
    axes = [np.minimum(c[:, None] * m + np.arange(m), n - 1) for c, m, n in zip(corners, b, x.shape)]
    return x[axes[0][:, :, None, None], axes[1][:, None, :, None], axes[2][:, None, None, :]]


def sample_superblocks(x: np.ndarray, side: int, count: int) -> np.ndarray:
    """Up to ``count`` aligned ``side³`` superblocks of the edge-padded ``x``, evenly spread, as tiles."""
    total = math.prod(-(-n // side) for n in x.shape)
    return gather_blocks(x, side, np.unique(np.linspace(0, total - 1, min(count, total)).astype(int)))


def zeroth_order_bits(coef: np.ndarray, step: float, clip: int = 64) -> float:
    """Sum over bands of the empirical entropy of quantised ``coef`` ``(n_blocks, n_bands)``.

    A cheap, compile-free rate proxy (numpy only) used to rank block shapes.
    """
    coef = np.asarray(coef)
    nb, width = coef.shape[1], 2 * clip + 1
    counts = np.zeros(nb * width, np.int64)
    band = np.arange(nb) * width
    rows = max(1, (1 << 16) // nb)  # ~64 K coefficients (a few MB of temporaries) at a time
    for lo in range(0, len(coef), rows):
        c = coef[lo:lo + rows]
        q = np.clip(np.sign(c) * np.floor(np.abs(c) / step + ROUNDING), -clip, clip).astype(np.int64) + clip
        counts += np.bincount((band + q).ravel(), minlength=nb * width)
    counts = counts.reshape(nb, width)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(-np.sum(np.where(counts > 0, counts * np.log2(counts / totals), 0.0)))
