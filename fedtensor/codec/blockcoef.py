"""Entropy coding of quantised block-transform coefficients ``Q[gx, gy, gz, b, b, b]``.

Bands are coded in order of their degree ``i + j + k`` (low frequencies first; the bases are sorted by
energy, so this is also decreasing variance). All bands of one degree form one grid, whose parent
activity is the sum of |Q| at the (up to three) bands of degree − 1 adjacent to each band in the same
block. The DC band is decorrelated first by a 3D Lorenzo predictor (exactly invertible by cumulative
sums), since neighbouring block means are strongly correlated.

After the DC, each degree is coded on its *live* blocks only (end of block ≥ degree): contexts come
from per-degree tables of saturated |Q| (uint8) gathered through a face-neighbour index, so the work
follows the number of coded coefficients, not the size of the block grid.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fedtensor.codec import entropy
from fedtensor.codec.entropy import BinaryStream
from fedtensor.errors import FormatError
from fedtensor.codec.grid import _BIN_LUT, BIN_SATURATION, N_BINS, GridCoder, activity_bin, checkerboard

_ABS_CAP = 2 * BIN_SATURATION
_SITE_LUT = np.ascontiguousarray(_BIN_LUT[:2048])  # the compiled site functions' bins (their sums stay below)


def lorenzo(a: np.ndarray, before: np.ndarray | None = None) -> np.ndarray:
    """3D Lorenzo prediction residual of an integer grid (zero outside; ``before``: the plane preceding
    it along axis 0, e.g. the previous slab's last one)."""
    a = np.diff(a, axis=0, prepend=0 if before is None else before[None])
    for ax in (1, 2):
        a = np.diff(a, axis=ax, prepend=0)
    return a


def _as_int32(vals: np.ndarray) -> np.ndarray:
    """Decoded coefficients, refused when a forged stream puts one beyond int32 (stored, it would wrap)."""
    if vals.size and (vals.min() < -(1 << 31) or vals.max() >= 1 << 31):
        raise FormatError("corrupted stream: a coefficient beyond int32")
    return vals


def inverse_lorenzo(r: np.ndarray, before: np.ndarray | None = None) -> np.ndarray:
    for ax in (2, 1):
        r = np.cumsum(r, axis=ax)
    r = np.cumsum(r, axis=0)
    return r if before is None else r + before[None]


class BlockCoders:
    """Entropy-coder state carried from one block grid to the next (slab after slab, in stream order):
    the adaptive tables of the end-of-block and coefficient coders, and the last DC plane (the next
    grid's DC is Lorenzo-predicted across the seam). Encoder and decoder must carry it alike."""

    def __init__(self):
        self.eob, self.coef = GridCoder(n_classes=1), GridCoder()  # end-of-block grids are all of class 0
        self.dc_plane: np.ndarray | None = None


class _Layout:
    """Bands of block shape ``b`` grouped by degree ``i + j + k``, and each band's parents.

    ``order`` lists the band positions (C order in the block) degree after degree, ``bounds`` where
    each degree starts in it; ``parents[d]`` is ``(3, n_d)``: the column in degree ``d − 1`` of the band
    one step lower along each axis, or ``n_{d−1}`` (an all-zero column) when there is none.
    """

    def __init__(self, b: tuple[int, int, int]):
        i, j, k = np.indices(b).reshape(3, -1)
        d = i + j + k
        self.order = np.argsort(d, kind="stable")
        self.bounds = np.searchsorted(d[self.order], np.arange(int(d.max()) + 2))
        column = np.empty(len(d), np.intp)  # position → column within its degree
        column[self.order] = np.arange(len(d)) - self.bounds[d[self.order]]
        self.parents = [None]
        for n in range(1, len(self.bounds) - 1):
            pos = self.order[self.bounds[n]:self.bounds[n + 1]]
            cols = []
            for ax, stride in enumerate((b[1] * b[2], b[2], 1)):
                has = (i, j, k)[ax][pos] > 0
                cols.append(np.where(has, column[np.where(has, pos - stride, 0)], self.bounds[n] - self.bounds[n - 1]))
            self.parents.append(np.stack(cols))

        # The same, flat and degree after degree, for the compiled encoder (``_contexts.block_sites``).
        self.parents_flat = np.concatenate([np.zeros(0, np.int64), *(p.ravel() for p in self.parents[1:])])

    def width(self, degree: int) -> int:
        return int(self.bounds[degree + 1] - self.bounds[degree])


@functools.lru_cache(maxsize=16)
def _layout(b: tuple[int, int, int]) -> _Layout:
    return _Layout(b)


@functools.lru_cache(maxsize=16)
def _anchor_order(grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Blocks renumbered anchors first: ``perm`` (new → lattice index) and ``(6, n_blocks)`` face
    neighbours in the new numbering, ``n_blocks`` standing for outside the lattice."""
    n = math.prod(grid)
    perm = np.argsort(~checkerboard(grid).ravel(), kind="stable")
    new = np.empty(n + 1, np.intp)
    new[perm], new[n] = np.arange(n), n
    idx = np.pad(np.arange(n).reshape(grid), 1, constant_values=n)
    core = (slice(1, -1),) * 3
    nbr = np.stack([idx[core[:ax] + (step,) + core[ax + 1:]].ravel()
                    for ax in range(3) for step in (slice(2, None), slice(None, -2))])
    return perm, np.ascontiguousarray(new[nbr[:, perm]])


def _rows(idx: np.ndarray, lo: int, hi: int):
    """``idx`` (sorted, distinct, within ``[lo, hi)``) as a slice when it is the whole range."""
    return slice(lo, hi) if len(idx) == hi - lo else idx


def _neighbour_sum(a: np.ndarray, nbr: np.ndarray) -> np.ndarray:
    """Sum of the rows ``a[nbr[0]] + … + a[nbr[5]]`` as uint16."""
    total = a[nbr[0]].astype(np.uint16)
    for rows in nbr[1:]:
        total += a[rows]
    return total


def code_block_coefficients(
    s: BinaryStream, grid: tuple[int, int, int], b: tuple[int, int, int], q: np.ndarray | None = None,
    coders: BlockCoders | None = None,
) -> np.ndarray:
    """Encode ``q`` (or decode, when ``s`` is decoding) and return the coefficients.

    ``coders`` carries the context statistics from a previously coded grid (and is updated for the
    next); a grid coded with fresh coders is self-contained.

    Each block first sends its *end of block*: the highest degree holding a non-zero AC coefficient
    (0 when none), so the (mostly empty) high-frequency bands of quiet blocks cost neither bits nor time:
    every band after the DC is coded, and its contexts computed, on its live blocks only.
    """
    grid, b = tuple(int(n) for n in grid), tuple(int(n) for n in b)
    n, lay = math.prod(grid), _layout(b)
    eob_values, shape1 = None, (*grid, 1)
    if q is not None:
        d = np.add.outer(np.add.outer(np.arange(b[0]), np.arange(b[1])), np.arange(b[2])).astype(np.uint8)
        eob_values = np.max((q != 0).reshape(n, -1) * d.ravel(), axis=1).reshape(shape1)  # bytes: a fast max
    coders = coders or BlockCoders()
    eob = coders.eob.code(s, shape1, np.zeros(shape1, np.int64), 0, eob_values).reshape(n)
    coder = coders.coef
    before = coders.dc_plane if coders.dc_plane is not None and coders.dc_plane.shape == grid[1:] else None
    values = None if q is None else lorenzo(q[..., 0, 0, 0].astype(np.int64), before)[..., None]
    dc = coder.code(s, shape1, np.zeros(shape1, np.int64), 0, values)

    # Contexts are held with the blocks renumbered anchors first (each parity in lattice order, the
    # coding order), so that a pass over all blocks of one parity is a slice.
    perm, nbr = _anchor_order(grid)
    n_anchor = int(checkerboard(grid).sum())
    eob = eob[perm]
    if s.decoding:
        coef = np.zeros((n, len(lay.order)), np.int32)  # lattice order, bands in C order
        coef[:, 0] = _as_int32(inverse_lorenzo(dc[..., 0], before).reshape(n))
    else:
        coef = q.reshape(n, -1)
    # Per degree, saturated |coefficients|: an extra all-zero row ("outside the lattice") and column
    # ("no parent"). Saturating at twice the top bin edge keeps every context bin exact: any sum that
    # holds a saturated term (or half a sum of such sums) is in the top bin anyway.
    coders.dc_plane = coef[:, 0].reshape(grid)[-1].astype(np.int64)
    if entropy._contexts is not None and coef.dtype.itemsize <= 4:
        if not s.decoding:
            _encode_ac_native(s, coder, coef, eob, perm, nbr, n_anchor, lay)
            return q
        _decode_ac_native(s, coder, coef, eob, perm, nbr, n_anchor, lay)
        return coef.reshape(*grid, *b)
    prev_abs = np.zeros((n + 1, 2), np.uint8)
    prev_abs[:n, 0] = np.minimum(np.abs(coef[perm, 0]), _ABS_CAP)
    prev_live = slice(0, n)  # blocks whose previous degree may hold non-zeros (the DC: all)
    batch = None if s.decoding else coder.batch(s)
    for degree in range(1, len(lay.bounds) - 1):
        live = np.flatnonzero(eob >= degree)
        if len(live) == 0:
            break  # eob >= degree is monotone in degree
        lo, width = lay.bounds[degree], lay.width(degree)
        rows = prev_abs[prev_live]
        parent = np.zeros((n + 1, width), np.uint8)  # zero in blocks whose previous degree is empty
        parent[prev_live] = sum(rows[:, p] for p in lay.parents[degree])
        absd = np.zeros((n + 1, width + 1), np.uint8)
        ebin = activity_bin(eob - degree)
        split = int(np.searchsorted(live, n_anchor))
        for pass_id, blocks in ((0, _rows(live[:split], 0, n_anchor)), (1, _rows(live[split:], n_anchor, n))):
            if isinstance(blocks, np.ndarray) and len(blocks) == 0:
                continue
            if pass_id == 0:  # neighbours' parents
                neighbour = _neighbour_sum(parent, nbr[:, blocks]) // 2
            else:  # the same band at the (anchor) neighbours, coded in pass 0
                neighbour = _neighbour_sum(absd[:, :width], nbr[:, blocks])
            at = (perm[blocks, None], lay.order[None, lo:lo + width])  # in the lattice-ordered coefficients
            bins = (activity_bin(parent[blocks]), activity_bin(neighbour), ebin[blocks, None])
            if batch is None:
                vals = coder.code_sites(s, pass_id, degree, *bins, None).reshape(-1, width)
                coef[at] = _as_int32(vals)
            else:
                vals = coef[at]
                batch.add(coder.sites(pass_id, degree, *bins, vals))
            absd[blocks, :width] = np.minimum(np.abs(vals), _ABS_CAP)
        prev_abs, prev_live = absd, _rows(live, 0, n)
    if batch is not None:
        batch.flush()
    return q if q is not None else coef.reshape(*grid, *b)


def _decode_ac_native(s: BinaryStream, coder: GridCoder, coef: np.ndarray, eob: np.ndarray, perm: np.ndarray,
                      nbr: np.ndarray, n_anchor: int, lay: _Layout) -> None:
    """The degree loop of :func:`code_block_coefficients` for a decoder, its sites and contexts found in
    compiled code pass by pass (each reads the passes decoded before it): the same sites and contexts.
    ``eob`` is in the anchors-first numbering; ``coef`` (int32, lattice order) receives the values."""
    eob = np.ascontiguousarray(eob, np.int64)
    width = int(np.diff(lay.bounds).max())
    local, at = np.empty(len(eob) * width, np.uint16), np.empty(len(eob) * width, np.int64)  # all live, widest
    work = np.empty(3 * (len(eob) + 1) * (width + 1), np.uint8)  # what the passes share (see pass_sites)
    for degree in range(1, min(int(eob.max(initial=0)), len(lay.bounds) - 2) + 1):  # eob >= degree: monotone
        for pass_id in (0, 1):
            k = entropy._contexts.pass_sites(coef, eob, perm, nbr, lay.bounds, lay.order, lay.parents_flat, _SITE_LUT,
                                             local, at, work, degree, pass_id, n_anchor, N_BINS, _ABS_CAP)
            if k:
                coder.decode_local_into(s, pass_id, degree, local[:k], coef, at[:k])


def _encode_ac_native(s: BinaryStream, coder: GridCoder, coef: np.ndarray, eob: np.ndarray, perm: np.ndarray,
                      nbr: np.ndarray, n_anchor: int, lay: _Layout) -> None:
    """The degree loop of :func:`code_block_coefficients` for an encoder, in compiled code: the same
    sites, contexts and bytes. ``eob`` is in the anchors-first numbering, ``coef`` in lattice order."""
    degrees = len(lay.bounds) - 2
    capacity = int((lay.bounds[np.minimum(eob, degrees) + 1] - 1).sum())  # every band of each live degree
    local, values = np.empty(capacity, np.uint16), np.empty(capacity, np.int32)  # 6 bytes a site
    passes = np.empty((2 * degrees, 4), np.int64)
    _, n_passes = entropy._contexts.block_sites(
        np.ascontiguousarray(coef, np.int32), np.ascontiguousarray(eob, np.int64), perm, nbr, lay.bounds, lay.order,
        lay.parents_flat, _SITE_LUT, local, values, passes, n_anchor, N_BINS, _ABS_CAP)
    coder.encode_passes(s, passes[:n_passes], local, values)
