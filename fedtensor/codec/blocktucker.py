"""The block-Tucker transform codec: shared per-mode bases, dead-zone quantisation, context coding."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fedtensor.codec.blockcoef import code_block_coefficients
from fedtensor.codec.entropy import BinaryStream
from fedtensor.codec.quantize import ROUNDING, dequantize, largest_step_within, quantize
from fedtensor.errors import FormatError
from fedtensor.tensor.block import block_bases, block_grid, block_shape, expand, from_blocks, project, to_blocks


class BlockTucker:
    """One volume's transform: its bases and coefficients, ready to be quantised at any step.

    ``x`` is the normalised volume (centred, unit value range: see :mod:`fedtensor.codec.normalize`),
    so steps and errors here are in those units.
    """

    def __init__(self, x: np.ndarray, b=8, n_iter: int = 0):
        self.shape, self.b = tuple(x.shape), block_shape(b)
        blocks = to_blocks(jnp.asarray(x, jnp.float32), b)
        # Bases travel as float32 in the stream; encode with exactly those values.
        self.bases = [jnp.asarray(np.asarray(u, np.float32)) for u in block_bases(blocks, self.b, n_iter)]
        self.coef = _project(blocks, self.bases)
        self.padding_ratio = float(np.prod(self.shape) / self.coef.size)

    def step_for_sse(self, max_sse: float) -> float:
        """Largest quantiser step whose (coefficient-domain) error fits ``max_sse`` over the real voxels."""
        hi = 4 * float(np.prod(self.b)) ** 0.5
        # Quantisation indices are int32: never let a tiny step push them near overflow.
        floor = float(jnp.max(jnp.abs(self.coef))) / 2**30
        return max(floor, largest_step_within(self.coef, max_sse / self.padding_ratio, max(hi * 1e-9, floor), hi))

    def quantize(self, step: float) -> jax.Array:
        return quantize(self.coef, jnp.float32(step))

    def reconstruct(self, q: jax.Array, step: float) -> np.ndarray:
        return reconstruct(q, step, self.bases, self.shape)

    def encode(self, q: jax.Array, step: float) -> tuple[dict, list[bytes]]:
        s = BinaryStream()
        code_block_coefficients(s, block_grid(self.shape, self.b), self.b, np.asarray(q, np.int32))
        params = {"block": list(self.b), "step": step}
        return params, [np.concatenate([np.asarray(u).ravel() for u in self.bases]).astype("<f4").tobytes(), s.finish()]


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


def sample_superblocks(x: np.ndarray, side: int, count: int) -> np.ndarray:
    """Up to ``count`` aligned ``side³`` superblocks of the edge-padded ``x``, evenly spread, as tiles."""
    blocks = np.asarray(to_blocks(jnp.asarray(x), side)).reshape(-1, side, side, side)
    return blocks[np.unique(np.linspace(0, len(blocks) - 1, min(count, len(blocks))).astype(int))]


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


@jax.jit
def _project(blocks, bases):
    return project(blocks, bases)


@jax.jit
def _expand(core, bases):
    return expand(core, bases)


def reconstruct(q, step: float, bases, shape) -> np.ndarray:
    """The normalised volume from quantisation indices."""
    return np.asarray(from_blocks(_expand(dequantize(jnp.asarray(q), jnp.float32(step)), bases), tuple(shape)))


def decode(params: dict, sections: list[bytes], shape: tuple[int, int, int]) -> np.ndarray:
    b = params.get("block")
    if (not isinstance(b, list) or len(b) != 3 or not all(isinstance(n, int) and 1 <= n <= 64 for n in b)
            or len(sections) != 2):
        raise FormatError("corrupted block-tucker parameters")
    if len(sections[0]) != 4 * sum(n * n for n in b) or len(sections[1]) % 4:
        raise FormatError("corrupted block-tucker payload")
    flat = np.frombuffer(sections[0], "<f4")
    bounds = np.cumsum([0] + [n * n for n in b])
    bases = [jnp.asarray(flat[lo:hi].reshape(n, n)) for lo, hi, n in zip(bounds[:-1], bounds[1:], b)]
    b = tuple(b)
    s = BinaryStream(np.frombuffer(sections[1], np.uint32))
    q = code_block_coefficients(s, block_grid(shape, b), b)
    return reconstruct(q, float(params["step"]), bases, shape)
