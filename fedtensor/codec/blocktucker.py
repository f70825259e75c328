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
from fedtensor.tensor.block import block_bases, block_shape, project


def tile_coefficients(tiles: np.ndarray, b) -> np.ndarray:
    """Block-Tucker coefficients ``(n_blocks, n_bands)`` of ``tiles`` ``(T, X, Y, Z)``.

    Sides must be divisible by the block shape; the bases are fitted to all the tiles' blocks.
    """
    return np.asarray(_tile_coefficients(jnp.asarray(tiles), block_shape(b)))


@partial(jax.jit, static_argnames="b")
def _tile_coefficients(tiles: jax.Array, b: tuple[int, int, int]) -> jax.Array:
    t, (bx, by, bz) = tiles.shape[0], b
    gx, gy, gz = (n // m for n, m in zip(tiles.shape[1:], b))
    blocks = tiles.reshape(t * gx, bx, gy, by, gz, bz).transpose(0, 2, 4, 1, 3, 5).reshape(-1, 1, 1, bx, by, bz)
    bases = block_bases(blocks, b)
    return project(blocks, bases).reshape(blocks.shape[0], -1)


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
    q = np.clip(np.sign(coef) * np.floor(np.abs(coef) / step + ROUNDING), -clip, clip).astype(np.int64) + clip
    nb, width = coef.shape[1], 2 * clip + 1
    counts = np.bincount((np.arange(nb) * width + q).ravel(), minlength=nb * width).reshape(nb, width)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(-np.sum(np.where(counts > 0, counts * np.log2(counts / totals), 0.0)))
