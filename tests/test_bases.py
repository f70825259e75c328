"""The Gram matrices the codec fits its bases from, against a plain float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from fedtensor.codec import blocktucker, stream
from fedtensor.codec.normalize import device_map, normalization
from fedtensor.codec.quantize import ROUNDING
from fedtensor.tensor.block import to_blocks


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
    grams = blocktucker.fiber_grams(tiles, offset, scale)
    unit = (tiles.astype(np.float64) - offset) / scale
    want = [sum(g) for g in zip(*(_block_grams(t, b) for t in unit))]
    for g, n, w in zip(grams, b, want):
        np.testing.assert_allclose(blocktucker._pieces_gram(np.asarray(g, np.float64), n), w, rtol=2e-5, atol=1e-4)
    bases = blocktucker.tile_bases(grams, b)
    for u, w in zip(bases, want):  # the bases diagonalise the reference Grams, largest variance first
        d = np.asarray(u, np.float64).T @ w @ np.asarray(u, np.float64)
        assert np.abs(d - np.diag(np.diag(d))).max() < 1e-3 * np.abs(d).max()
        assert np.all(np.diff(np.diag(d)) <= 1e-3 * np.abs(d).max())


@pytest.mark.parametrize("n_tiles", [64, 70])
def test_block_choice_proxy_over_many_tiles(n_tiles):
    """Grams, coefficients and the rate proxy over many tiles, as the block choice samples them, against
    a float64 numpy reference: every tile counts exactly once."""
    rng = np.random.default_rng(3)
    tiles = rng.integers(-1000, 3000, size=(n_tiles, 16, 16, 16)).astype(np.int16)
    offset, scale = normalization(tiles)
    unit = (tiles.astype(np.float64) - offset) / scale
    grams = blocktucker.fiber_grams(tiles, offset, scale)
    for g, spec in zip(grams, ("tayz,tbyz->ab", "txaz,txbz->ab", "txya,txyb->ab")):
        np.testing.assert_allclose(np.asarray(g, np.float64), np.einsum(spec, unit, unit), rtol=2e-5, atol=1e-2)
    b, step, clip = (4, 4, 8), 0.05, 64
    bases = [np.asarray(u, np.float64) for u in blocktucker.tile_bases(grams, b)]
    blocks = unit.reshape(n_tiles, 4, 4, 4, 4, 2, 8).transpose(0, 1, 3, 5, 2, 4, 6).reshape(-1, *b)
    coef = np.einsum("nijk,ia,jb,kc->nabc", blocks, *bases).reshape(len(blocks), -1)
    q = np.clip(np.sign(coef) * np.floor(np.abs(coef) / step + ROUNDING), -clip, clip)
    want = 0.0
    for band in q.T:
        _, counts = np.unique(band, return_counts=True)
        want -= float(np.sum(counts * np.log2(counts / len(band))))
    got = blocktucker.histogram_bits(blocktucker.tile_histograms(tiles, b, offset, scale, step, clip, grams))
    assert got == pytest.approx(want, rel=2e-3)
    coef_dev = np.asarray(blocktucker.tile_coefficients(tiles, b, offset, scale), np.float64)
    assert coef_dev.shape == coef.shape
    np.testing.assert_allclose(coef_dev, coef, atol=1e-3)


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


def test_last_slab_grams_count_only_its_block_rows():
    """The last slab of a volume is edge-padded to the slab depth: its Grams take its real block rows
    only (those past them are no blocks of the volume)."""
    rng = np.random.default_rng(3)
    shape, b = (37, 12, 9), (4, 4, 4)
    x = rng.normal(0, 1, size=shape).astype(np.float32)
    offset, scale = normalization(x)
    slabs = stream.Slabs(shape, b, 16)
    start = slabs.starts[-1]  # rows 32..36: 5 real rows, two block rows, in a 16-deep slab
    m = device_map(x.dtype, offset, scale)
    rows = slabs.grid(start)[0] * b[0]
    assert rows < slabs.depth
    got = stream._slab_grams(slabs.slab(x, start, m, offset, scale), m, rows, b)
    unit = (x[start:].astype(np.float64) - offset) / scale
    unit = np.concatenate([unit, np.repeat(unit[-1:], rows - unit.shape[0], axis=0)])
    padded = np.pad(unit, [(0, 0), (0, 0), (0, 3)], mode="edge")
    for g, w in zip(got, _block_grams(padded, b)):
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_sample_decoded_error_matches_a_reference(dtype):
    """The first guess's decoded error of sampled blocks: chunked (the last chunk overlapping the one
    before), edge-padded voxels left out, integers rounded as the decoder rounds them."""
    import jax.numpy as jnp

    from fedtensor.codec.blocktucker import gather_blocks

    rng = np.random.default_rng(4)
    shape, b = (37, 45, 29), (8, 8, 8)
    x = np.clip(rng.normal(120, 40, size=shape), 0, 255).astype(dtype)
    offset, scale = normalization(x)
    grid = [-(-n // k) for n, k in zip(shape, b)]
    idx = np.arange(int(np.prod(grid)))  # every block: 120, not a multiple of the chunk (64)
    raw = gather_blocks(x, b, idx)
    m = device_map(x.dtype, offset, scale)
    bases = [np.linalg.qr(rng.normal(size=(k, k)))[0].astype(np.float32) for k in b]
    u = tuple(jnp.asarray(a) for a in bases)
    coef = stream._sample_coefficients(jnp.asarray(raw), u, m)
    step = np.float32(0.02)
    corners = (np.stack(np.unravel_index(idx, grid), axis=1) * np.asarray(b)).astype(np.int32)
    got = float(stream._sample_decoded_mse(jnp.asarray(raw), jnp.asarray(corners), coef, u, step, m, shape,
                                           np.dtype(dtype).name))
    q = np.asarray(stream.dequantize(stream.quantize(coef, step, stream.band_rounding(b)), step, stream.RECON_OFFSET),
                   np.float64)
    rec = np.einsum("nabc,ia,jb,kc->nijk", q, *[a.astype(np.float64) for a in bases]) * scale + offset
    if np.dtype(dtype).kind == "u":
        rec = np.clip(np.rint(rec), 0, 255)
    d = (raw.astype(np.float64) - rec) / scale
    inside = np.ones(raw.shape, bool)
    for axis, (c, k, n) in enumerate(zip(corners.T, b, shape)):
        view = [None, None, None, None]
        view[0], view[axis + 1] = slice(None), slice(None)
        inside &= ((c[:, None] + np.arange(k)) < n)[tuple(view)]
    assert got == pytest.approx(float(np.mean(d[inside] ** 2)), rel=1e-4)


def test_tile_histograms_of_parts_add_up_to_the_whole():
    """Under the same bases, the proxy's histograms of two sets of tiles add up to those of their union
    (the block choice's second stage adds the rest of the superblocks' to the quarter's)."""
    rng = np.random.default_rng(4)
    tiles = rng.integers(-1000, 3000, size=(21, 16, 16, 16)).astype(np.int16)
    offset, scale = normalization(tiles)
    b, step = (4, 4, 8), 0.02
    bases = blocktucker.tile_bases(blocktucker.fiber_grams(tiles, offset, scale), b)
    whole = np.asarray(blocktucker.tile_histograms(tiles, b, offset, scale, step, bases=bases))
    parts = sum(np.asarray(blocktucker.tile_histograms(t, b, offset, scale, step, bases=bases))
                for t in (tiles[::4], tiles[np.arange(21) % 4 != 0]))
    assert whole.sum() == tiles.size and np.array_equal(parts, whole)


@pytest.mark.parametrize("name", ["ct_head_uint8.nii.gz", "ct_chest.nii.gz"])
def test_block_choice_in_two_stages_is_the_choice_over_all_superblocks(load_volume, monkeypatch, name):
    """Costing every shape on a quarter of the superblocks, then the close ones on all, picks the shape
    that costing every shape on all of them picks."""
    from fedtensor.codec import api

    x = load_volume(name).data
    offset, scale = normalization(x)
    mse = (float(np.ptp(x)) / scale / 10 ** (45 / 20)) ** 2
    seen = []
    original = api._proxy_histograms

    def spy(tiles, candidates, bases, *args):
        seen.append((tiles, candidates, bases, args))
        return original(tiles, candidates, bases, *args)

    monkeypatch.setattr(api, "_proxy_histograms", spy)
    chosen = api._pick_block(x, offset, scale, mse)
    _, candidates, bases, args = seen[0]
    everything = blocktucker.gather_blocks(x, 16, blocktucker.superblock_index(x.shape, 16, api._PICK_SUPERBLOCKS))
    full = [api._proxy_cost(h, b) for h, b in zip(original(everything, candidates, bases, *args), candidates)]
    assert chosen == candidates[int(np.argmin(full))]
    if name == "ct_head_uint8.nii.gz":
        assert len(seen) == 1  # 16×16×8 stands out on the quarter: the other shapes are not costed again


@pytest.mark.parametrize("layout", ["C", "F", "sliced", "flipped", "many"])
def test_gather_blocks_is_indexing_the_edge_padded_block_grid(layout):
    """``gather_blocks`` (a flat take over the array's memory; the 3-index gather for negative strides)
    returns exactly the blocks ``to_blocks`` makes, for any memory layout, edge blocks included."""
    rng = np.random.default_rng(7)
    base = rng.integers(-30000, 30000, size=(41, 38, 27)).astype(np.int16)
    x = {"C": base, "F": np.asfortranarray(base), "sliced": base[3::2, :, 1:-1], "flipped": base[::-1],
         "many": np.tile(base, (4, 1, 1))}[layout]
    b = (8, 16, 4)
    grid = [-(-n // k) for n, k in zip(x.shape, b)]
    idx = np.unique(rng.integers(0, int(np.prod(grid)), size=600 if layout == "many" else 40))
    want = np.asarray(to_blocks(x, b)).reshape(-1, *b)[idx]
    got = blocktucker.gather_blocks(x, b, idx)
    assert got.dtype == x.dtype and np.array_equal(got, want)
