"""Block-Tucker helpers for choosing a block shape: sampled superblocks, their coefficients, a rate proxy.

The codec itself (bases, transform, quantisation, coding in slabs) is :mod:`fedtensor.codec.stream`.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fedtensor.codec.normalize import DeviceMap, device_map, normalize, to_unit
from fedtensor.codec.quantize import ROUNDING
from fedtensor.tensor.block import block_shape, project
from fedtensor.tensor.precision import FP32
from fedtensor.tensor.tucker import leading_eigvecs_host


_TILES_AT_ONCE = 16  # tiles :func:`tile_histograms` transforms in one step


def tile_coefficients(tiles: np.ndarray, b, offset: float = 0.0, scale: float = 1.0, grams=None) -> jax.Array:
    """Block-Tucker coefficients ``(n_blocks, n_bands)`` of the normalised ``(tiles - offset) / scale``,
    ``tiles`` ``(T, X, Y, Z)`` in any dtype.

    Sides must be divisible by the block shape; the bases are fitted to all the tiles' blocks (``grams``:
    their :func:`fiber_grams`, when already made). Tiles are normalised and transformed one at a time, so
    the working set is the input and the output only.
    """
    tiles, m = _prepared(tiles, offset, scale)
    b = block_shape(b)
    return _tile_coefficients(tiles, m, tile_bases(grams if grams is not None else _fiber_grams(tiles, m), b), b)


def fiber_grams(tiles, offset: float, scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per axis, the Gram matrix of the normalised tiles' whole fibers along it (side × side): what
    :func:`tile_bases` fits the bases of every block shape dividing the sides from."""
    return _fiber_grams(*_prepared(tiles, offset, scale))


def tile_bases(grams, b) -> list[jax.Array]:
    """Per-mode bases of the tiles' blocks of shape ``b`` (HOSVD of their stack) from
    :func:`fiber_grams`: a block's fibers are pieces of the tile's, so the Gram of the pieces is the sum
    of the diagonal blocks of the whole fibers' Gram."""
    return [jax.device_put(leading_eigvecs_host(_pieces_gram(np.asarray(g, np.float64), n), n))
            for g, n in zip(grams, block_shape(b))]


def tile_histograms(tiles, b, offset: float, scale: float, step: float, clip: int = 64, grams=None,
                    bases=None) -> jax.Array:
    """Per-band histograms ``(n_bands, 2·clip + 1)`` of the quantised :func:`tile_coefficients` (a cheap
    rate proxy to rank block shapes: :func:`histogram_bits` of them), made
    without ever holding the coefficients: each tile's are quantised into them as they are made
    (magnitudes beyond ``clip`` share a bin). ``bases``: the :func:`tile_bases` to transform with, else
    those of ``grams`` (:func:`fiber_grams`; default: these tiles'); histograms of several sets of tiles
    under the same bases add up to that of their union."""
    tiles, m = _prepared(tiles, offset, scale)
    b = block_shape(b)
    if bases is None:
        bases = tile_bases(grams if grams is not None else _fiber_grams(tiles, m), b)
    return _tile_histograms(tiles, m, bases, np.float32(step), b, clip)


def histogram_bits(hist) -> float:
    """Sum over bands (rows) of ``hist``'s zeroth-order entropy, in bits: count × −log2(frequency),
    i.e. Σ total·log2(total) over the rows less Σ count·log2(count) over the bins.

    On the host, over the non-empty bins only: a jitted version was one more XLA program per block
    shape, which a fresh process traces and lowers (~17 ms each, five shapes a compress)."""
    h = np.asarray(hist)
    totals = h.sum(axis=1, dtype=np.int64)
    totals = totals[totals > 0].astype(np.float64)
    counts = h[h > 0].astype(np.float64)
    return float((totals * np.log2(totals)).sum() - (counts * np.log2(counts)).sum())


def _prepared(tiles, offset: float, scale: float) -> tuple[jax.Array, DeviceMap | None]:
    """The tiles (numpy or already on the device) as the jitted helpers take them: raw with the codec's
    own device map, or normalised on the host where float32 is not enough (see
    :mod:`fedtensor.codec.normalize`)."""
    m = device_map(tiles.dtype, offset, scale)
    if m is None:
        return jax.device_put(normalize(np.asarray(tiles), offset, scale)), None
    return jax.device_put(tiles), m


def _tile_blocks(tile, m, b):
    """One tile as a ``(gx, gy, gz, bx, by, bz)`` stack of normalised blocks."""
    (bx, by, bz), (gx, gy, gz) = b, (n // k for n, k in zip(tile.shape, b))
    return to_unit(tile, m).reshape(gx, bx, gy, by, gz, bz).transpose(0, 2, 4, 1, 3, 5)


@jax.jit
def _fiber_grams(tiles, m):
    def add(acc, tile):
        u = to_unit(tile, m)
        return tuple(a + jnp.einsum(spec, u, u, precision=FP32)
                     for a, spec in zip(acc, ("ayz,byz->ab", "xaz,xbz->ab", "xya,xyb->ab"))), None

    return jax.lax.scan(add, tuple(jnp.zeros((n, n), jnp.float32) for n in tiles.shape[1:]), tiles)[0]


def _pieces_gram(g: np.ndarray, n: int) -> np.ndarray:
    k = g.shape[0] // n
    return np.einsum("aiaj->ij", g.reshape(k, n, k, n))


@partial(jax.jit, static_argnames="b")
def _tile_coefficients(tiles: jax.Array, m, bases, b: tuple[int, int, int]) -> jax.Array:
    width = math.prod(b)
    coef = jax.lax.map(lambda tile: project(_tile_blocks(tile, m, b), bases).reshape(-1, width), tiles)
    return coef.reshape(-1, width)


@partial(jax.jit, static_argnames=("b", "clip"))
def _tile_histograms(tiles: jax.Array, m, bases, step, b: tuple[int, int, int], clip: int) -> jax.Array:
    nb, width = math.prod(b), 2 * clip + 1
    band = jnp.arange(nb, dtype=jnp.int32) * width
    # _TILES_AT_ONCE tiles a step (padded with tiles that count nothing): one tile a step was many small
    # operations, 12-20 % slower.
    n, k = tiles.shape[0], min(_TILES_AT_ONCE, tiles.shape[0])
    steps = -(-n // k)
    tiles = jnp.pad(tiles, ((0, steps * k - n),) + ((0, 0),) * 3).reshape(steps, k, *tiles.shape[1:])
    counted = (jnp.arange(steps * k) < n).astype(jnp.int32).reshape(steps, k, 1, 1)

    def count(hist, batch):
        some, weight = batch
        c = jax.vmap(lambda tile: project(_tile_blocks(tile, m, b), bases).reshape(-1, nb))(some)
        q = jnp.clip(jnp.sign(c) * jnp.floor(jnp.abs(c) / step + ROUNDING), -clip, clip).astype(jnp.int32)
        return hist.at[(band + q + clip).ravel()].add(jnp.broadcast_to(weight, q.shape).ravel()), None

    return jax.lax.scan(count, jnp.zeros(nb * width, jnp.int32), (tiles, counted))[0].reshape(nb, width)


def gather_blocks(x: np.ndarray, b, flat_index: np.ndarray) -> np.ndarray:
    """Blocks ``(n, bx, by, bz)`` of the edge-padded ``x`` at flat block-grid indices, without padding ``x``.

    Equal to ``to_blocks(x, b).reshape(-1, *b)[flat_index]``: edge padding is index clamping.
    """
    b = block_shape(b)
    grid = [-(-n // m) for n, m in zip(x.shape, b)]
    corners = np.unravel_index(np.asarray(flat_index, np.int64), grid)
    axes = [np.minimum(c[:, None] * m + np.arange(m), n - 1) for c, m, n in zip(corners, b, x.shape)]
    steps = [s // x.itemsize for s in x.strides]
    if x.size == 0 or any(s < 0 or s % x.itemsize for s in x.strides):
        return x[axes[0][:, :, None, None], axes[1][:, None, :, None], axes[2][:, None, None, :]]
    # ``x``'s memory as one flat view and a take of element offsets: 1.8× faster than the 3-index
    # gather above (the uint8 head CT's 256 blocks of 16×16×8: 2.0 against 3.6 ms). A few blocks at
    # a time, so the int64 offsets stay small next to the blocks.
    flat = np.lib.stride_tricks.as_strided(x, (sum((n - 1) * s for n, s in zip(x.shape, steps)) + 1,), (x.itemsize,))
    out = np.empty((len(axes[0]), *b), x.dtype)
    chunk = max(1, (1 << 16) // math.prod(b))
    for i in range(0, len(out), chunk):
        a0, a1, a2 = (a[i:i + chunk] * s for a, s in zip(axes, steps))
        np.take(flat, a0[:, :, None, None] + a1[:, None, :, None] + a2[:, None, None, :], out=out[i:i + chunk])
    return out


def superblock_index(shape, side: int, count: int) -> np.ndarray:
    """Flat grid indices of up to ``count`` aligned ``side³`` superblocks of a volume of ``shape``, evenly
    spread (ascending)."""
    total = math.prod(-(-n // side) for n in shape)
    return np.unique(np.linspace(0, total - 1, min(count, total)).astype(int))
