"""The Gram matrices the codec fits its bases from, against a plain float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from fedtensor.codec import blocktucker, stream
from fedtensor.codec.normalize import device_map, normalization


def _block_grams(x: np.ndarray, b) -> list[np.ndarray]:
    """Mode Grams of the stack of ``b``-blocks of ``x`` (sides divisible by ``b``), in float64."""
    (bx, by, bz), (n0, n1, n2) = b, x.shape
    k = x.astype(np.float64).reshape(n0 // bx, bx, n1 // by, by, n2 // bz, bz)
    return [np.einsum("aibjck,aIbjck->iI", k, k), np.einsum("aibjck,aibJck->jJ", k, k),
            np.einsum("aibjck,aibjcK->kK", k, k)]


@pytest.mark.parametrize("b", [(4, 4, 4), (4, 4, 8), (8, 8, 16), (16, 16, 8)])
def test_tile_grams_fold_to_every_block_shape(b):
    """One pass of whole-fibre Grams gives each block shape's Grams (sums of diagonal blocks)."""
    rng = np.random.default_rng(1)
    tiles = rng.integers(-1000, 3000, size=(5, 16, 16, 16)).astype(np.int16)
    offset, scale = normalization(tiles)
    grams = blocktucker.fiber_grams(*blocktucker._prepared(tiles, offset, scale))
    unit = (tiles.astype(np.float64) - offset) / scale
    want = [sum(g) for g in zip(*(_block_grams(t, b) for t in unit))]
    for g, n, w in zip(grams, b, want):
        np.testing.assert_allclose(blocktucker._pieces_gram(np.asarray(g, np.float64), n), w, rtol=2e-5, atol=1e-4)
    bases = blocktucker.tile_bases(grams, b)
    for u, w in zip(bases, want):  # the bases diagonalise the reference Grams, largest variance first
        d = np.asarray(u, np.float64).T @ w @ np.asarray(u, np.float64)
        assert np.abs(d - np.diag(np.diag(d))).max() < 1e-3 * np.abs(d).max()
        assert np.all(np.diff(np.diag(d)) <= 1e-3 * np.abs(d).max())


@pytest.mark.parametrize("b", [(4, 4, 4), (8, 8, 16)])
def test_slab_grams_match_the_block_stack(b):
    """A slab's Grams: its real block rows only, the plane edge-padded to whole blocks."""
    rng = np.random.default_rng(2)
    shape = (13, 21, 30)  # no side a multiple of the blocks
    x = rng.normal(100, 30, size=shape).astype(np.float32)
    offset, scale = normalization(x)
    slabs = stream.Slabs(shape, b, stream.slab_depth(shape, b, 1 << 20))
    m = device_map(x.dtype, offset, scale)
    slab = slabs.slab(x, 0, m, offset, scale)
    rows = slabs.grid(0)[0] * b[0]
    got = stream._slab_grams(slab, m, rows, b)
    unit = (x.astype(np.float64) - offset) / scale
    padded = np.pad(unit, [(0, 0)] + [(0, -(-n // k) * k - n) for n, k in zip(shape[1:], b[1:])], mode="edge")
    padded = np.concatenate([padded, np.repeat(padded[-1:], rows - shape[0], axis=0)])  # the slab's edge rows
    want = _block_grams(padded, b)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=1e-3)
