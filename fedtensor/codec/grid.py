"""Coding of integer coefficient grids with spatial and spectral contexts.

A *grid* is an int array of shape ``(gx, gy, gz, nb)``: ``nb`` bands sampled on a 3D lattice (for the
block transform, band = coefficient position inside a block and the lattice = the block grid). Each
grid is coded in two checkerboard passes: the *anchors* ((x+y+z) even) with the context of their
already-coded parent bands and of their neighbours' parents, then the remaining sites with the context
of their parents and of their six anchor neighbours in the same band. Everything is vectorised over
the whole grid; the decoder runs exactly the same code.

A site's context is three activity bins — parent, neighbours and an extra measure — plus the pass and
a spectral class; :meth:`GridCoder.code_sites` takes the bins of a list of sites directly, so callers
that know which sites are live (see :mod:`fedtensor.codec.blockcoef`) never touch the rest.
"""

from __future__ import annotations

import numpy as np

from fedtensor.codec.entropy import BinaryStream, SignedCoder

_BIN_EDGES = np.array([1, 2, 3, 5, 9, 17, 33])
N_BINS = len(_BIN_EDGES) + 1
N_CLASSES = 16  # spectral classes (e.g. the degree i+j+k of a band), capped
BIN_SATURATION = int(_BIN_EDGES[-1])  # every activity at or above this falls in the top bin
_BIN_LUT = np.searchsorted(_BIN_EDGES, np.arange(1 << 16), side="right").astype(np.uint8)
_N_LOCAL = N_BINS**3  # (parent, neighbour, extra) bins of one pass and class


def activity_bin(x: np.ndarray) -> np.ndarray:
    """Log-spaced bins of a non-negative activity measure (sums of |coefficients|), as uint8."""
    x = np.asarray(x)
    if x.dtype not in (np.uint8, np.uint16):
        x = np.clip(x, 0, BIN_SATURATION)
    return _BIN_LUT[x]


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


def _magnitude_keys() -> np.ndarray:
    """Magnitude key (within a pass) of each local id ``(pb * N_BINS + nb) * N_BINS + eb``."""
    local = np.arange(_N_LOCAL)
    return np.minimum(local // (N_BINS * N_BINS) + local // N_BINS % N_BINS, 2 * N_BINS - 1)


_MAG_OF = _magnitude_keys()


class GridCoder:
    """Adaptive context state shared by all grids of one stream."""

    def __init__(self):
        # Zero-flag keys: (pass, local id); magnitude keys: (pass, parent bin + neighbour bin).
        self.coder = SignedCoder(2 * _N_LOCAL, 2 * 2 * N_BINS, N_CLASSES)

    def code_sites(
        self, s: BinaryStream, pass_id: int, cls: int, pbin: np.ndarray, nbin: np.ndarray, ebin: np.ndarray,
        values: np.ndarray | None,
    ) -> np.ndarray:
        """Code one pass's sites (in C order of the broadcast bins) from their parent, neighbour and
        extra bins."""
        local = (pbin.astype(np.uint16) * N_BINS + nbin) * N_BINS + ebin  # broadcast, < 2**9
        return self.coder.code(s, min(cls, N_CLASSES - 1), local.ravel(), pass_id * _N_LOCAL, pass_id * 2 * N_BINS,
                               _MAG_OF, None if values is None else values.ravel())

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
        out = np.zeros(shape, dtype) if values is None else np.asarray(values, dtype)
        anchors = np.broadcast_to(checkerboard(shape[:3])[..., None], shape)
        live = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
        pbin = activity_bin(parent)
        ebin = np.broadcast_to(activity_bin(extra) if extra is not None else np.zeros((), np.uint8), shape)
        for pass_id, sites, neighbour in (
            (0, anchors & live, face_sum(parent) // 2),
            (1, ~anchors & live, None),
        ):
            if neighbour is None:
                neighbour = face_sum(np.abs(out))
            decoded = self.code_sites(s, pass_id, cls, pbin[sites], activity_bin(neighbour[sites]), ebin[sites],
                                      None if s.decoding else out[sites])
            if s.decoding:
                out[sites] = decoded
        return out
