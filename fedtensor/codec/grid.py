"""Coding of integer coefficient grids with spatial and spectral contexts.

A *grid* is an int array of shape ``(gx, gy, gz, nb)``: ``nb`` bands sampled on a 3D lattice (for the
block transform, band = coefficient position inside a block and the lattice = the block grid). Each
grid is coded in two checkerboard passes: the *anchors* ((x+y+z) even) with the context of their
already-coded parent bands and of their neighbours' parents, then the remaining sites with the context
of their parents and of their six anchor neighbours in the same band. Everything is vectorised over
the whole grid; the decoder runs exactly the same code.
"""

from __future__ import annotations

import numpy as np

from fedtensor.codec.entropy import BinaryStream, SignedCoder

_BIN_EDGES = np.array([1, 2, 3, 5, 9, 17, 33])
N_BINS = len(_BIN_EDGES) + 1
N_CLASSES = 16  # spectral classes (e.g. the degree i+j+k of a band), capped


def activity_bin(x: np.ndarray) -> np.ndarray:
    """Log-spaced bins of a non-negative activity measure (sums of |coefficients|)."""
    return np.searchsorted(_BIN_EDGES, x, side="right")


def face_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the six face neighbours on the lattice (zero outside), band axis untouched."""
    p = np.pad(a, ((1, 1), (1, 1), (1, 1), (0, 0)))
    return (
        p[2:, 1:-1, 1:-1] + p[:-2, 1:-1, 1:-1] + p[1:-1, 2:, 1:-1]
        + p[1:-1, :-2, 1:-1] + p[1:-1, 1:-1, 2:] + p[1:-1, 1:-1, :-2]
    )


def checkerboard(shape: tuple[int, int, int]) -> np.ndarray:
    x, y, z = np.indices(shape, sparse=True)
    return (x + y + z) % 2 == 0


class GridCoder:
    """Adaptive context state shared by all grids of one stream."""

    def __init__(self):
        self.coder = SignedCoder(2 * N_BINS**3 * N_CLASSES, 2 * 2 * N_BINS * N_CLASSES, N_CLASSES)

    def code(
        self, s: BinaryStream, shape: tuple[int, int, int, int], parent: np.ndarray, cls: int,
        values: np.ndarray | None = None, extra: np.ndarray | None = None, mask: np.ndarray | None = None,
        dtype=np.int64,
    ) -> np.ndarray:
        """Code one grid of ``shape`` given ``parent`` activity (same shape, from decoded data).

        ``extra`` is an optional further activity measure broadcastable to ``shape`` (e.g. the total
        magnitude already coded in each block); ``mask`` (broadcastable) limits coding to the sites
        both sides know may be non-zero — the others are zero by construction.
        """
        cls = min(cls, N_CLASSES - 1)
        out = np.zeros(shape, dtype) if values is None else np.asarray(values, dtype)
        anchors = np.broadcast_to(checkerboard(shape[:3])[..., None], shape)
        live = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
        pbin = activity_bin(parent)
        ebin = np.broadcast_to(activity_bin(extra) if extra is not None else np.zeros((), np.int64), shape)
        for pass_id, sites, neighbour in (
            (0, anchors & live, face_sum(parent) // 2),
            (1, ~anchors & live, None),
        ):
            if neighbour is None:
                neighbour = face_sum(np.abs(out))
            nbin = activity_bin(neighbour[sites])
            pb = pbin[sites]
            ctx = (((pass_id * N_BINS + pb) * N_BINS + nbin) * N_BINS + ebin[sites]) * N_CLASSES + cls
            mctx = (pass_id * 2 * N_BINS + np.minimum(pb + nbin, 2 * N_BINS - 1)) * N_CLASSES + cls
            decoded = self.coder.code(s, ctx, mctx, None if s.decoding else out[sites])
            if s.decoding:
                out[sites] = decoded
        return out
