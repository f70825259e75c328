"""Entropy coding of quantised block-transform coefficients ``Q[gx, gy, gz, b, b, b]``.

Bands are coded in order of their degree ``i + j + k`` (low frequencies first; the bases are sorted by
energy, so this is also decreasing variance). All bands of one degree form one grid, whose parent
activity is the sum of |Q| at the (up to three) bands of degree − 1 adjacent to each band in the same
block. The DC band is decorrelated first by a 3D Lorenzo predictor (exactly invertible by cumulative
sums), since neighbouring block means are strongly correlated.
"""

from __future__ import annotations

import numpy as np

from fedtensor.codec.entropy import BinaryStream
from fedtensor.codec.grid import GridCoder


def lorenzo(a: np.ndarray) -> np.ndarray:
    """3D Lorenzo prediction residual of an integer grid (zero outside)."""
    for ax in range(3):
        a = np.diff(a, axis=ax, prepend=0)
    return a


def inverse_lorenzo(r: np.ndarray) -> np.ndarray:
    for ax in range(3):
        r = np.cumsum(r, axis=ax)
    return r


def _degrees(b: tuple[int, int, int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    i, j, k = np.indices(b).reshape(3, -1)
    d = i + j + k
    return [(i[d == n], j[d == n], k[d == n]) for n in range(int(d.max()) + 1)]


def code_block_coefficients(
    s: BinaryStream, grid: tuple[int, int, int], b: tuple[int, int, int], q: np.ndarray | None = None
) -> np.ndarray:
    """Encode ``q`` (or decode, when ``s`` is decoding) and return the coefficients.

    Each block first sends its *end of block*: the highest degree holding a non-zero AC coefficient
    (0 when none), so the (mostly empty) high-frequency bands of quiet blocks cost neither bits nor time.
    """
    degrees = _degrees(b)
    eob_values = None
    if q is not None:
        d = np.add.outer(np.add.outer(np.arange(b[0]), np.arange(b[1])), np.arange(b[2]))
        nonzero_degree = np.where(q != 0, d.astype(np.int16), np.int16(0))
        eob_values = nonzero_degree.reshape(*grid, -1).max(axis=-1, keepdims=True)
    shape1 = (*grid, 1)
    eob = GridCoder().code(s, shape1, np.zeros(shape1, np.int64), 0, eob_values)
    coder = GridCoder()
    # |coefficients| with a leading zero slot per axis, so "no parent" is just index 0.
    absq = np.zeros((*grid, *(n + 1 for n in b)), np.int32)
    out = np.zeros((*grid, *b), np.int32) if s.decoding else q
    for degree, (i, j, k) in enumerate(degrees):
        shape = (*grid, len(i))
        if degree == 0:
            values = None if q is None else lorenzo(q[..., :1, 0, 0].astype(np.int64))
            parent = np.zeros(shape, np.int64)
            dc = coder.code(s, shape, parent, 0, values)
            band = inverse_lorenzo(dc).astype(np.int32) if s.decoding else q[..., :1, 0, 0]
        else:
            parent = absq[..., i, j + 1, k + 1] + absq[..., i + 1, j, k + 1] + absq[..., i + 1, j + 1, k]
            values = None if q is None else q[..., i, j, k]
            band = coder.code(s, shape, parent, degree, values, extra=np.maximum(eob - degree, 0), mask=eob >= degree,
                              dtype=np.int32)
        if s.decoding:
            out[..., i, j, k] = band
        absq[..., i + 1, j + 1, k + 1] = np.abs(band)
    return out
