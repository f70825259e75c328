"""Coding of integer coefficient grids with spatial and spectral contexts.

A *grid* is an int array of shape ``(gx, gy, gz, nb)``: ``nb`` bands sampled on a 3D lattice (for the
block transform, band = coefficient position inside a block and the lattice = the block grid). Each
grid is coded in two checkerboard passes: the *anchors* ((x+y+z) even) with the context of their
already-coded parent bands and of their neighbours' parents, then the remaining sites with the context
of their parents and of their six anchor neighbours in the same band. Everything is vectorised over
the whole grid; the decoder runs exactly the same code.

A site's context is three activity bins — parent, neighbours and an extra measure — plus the pass and
a spectral class; :meth:`GridCoder.code_sites` (or, for an encoder, :meth:`GridCoder.sites` queued in a
:class:`SiteBatch`) takes the bins of a list of sites directly, so callers that know which sites are
live (see :mod:`fedtensor.codec.blockcoef`) never touch the rest.
"""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=64)
def checkerboard(shape: tuple[int, int, int]) -> np.ndarray:
    """The anchor sites ((x + y + z) even) of a lattice of ``shape`` (read-only: shared between calls)."""
    x, y, z = np.indices(shape, sparse=True)
    board = (x + y + z) % 2 == 0
    board.flags.writeable = False
    return board


def _magnitude_keys() -> np.ndarray:
    """Magnitude key (within a pass) of each local id ``(pb * N_BINS + nb) * N_BINS + eb``."""
    local = np.arange(_N_LOCAL)
    return np.minimum(local // (N_BINS * N_BINS) + local // N_BINS % N_BINS, 2 * N_BINS - 1)


_MAG_OF = _magnitude_keys()
_MAG_OF.flags.writeable = False  # shared by every coder (the decoder keeps what it derives from it)


class GridCoder:
    """Adaptive context state shared by all grids of one stream."""

    def __init__(self, n_classes: int = N_CLASSES):
        """``n_classes`` spectral classes (at most N_CLASSES); higher classes share the last one."""
        if not 1 <= n_classes <= N_CLASSES:
            raise ValueError(f"n_classes must be in 1…{N_CLASSES}")
        # Zero-flag keys: (pass, local id); magnitude keys: (pass, parent bin + neighbour bin).
        self.coder = SignedCoder(2 * _N_LOCAL, 2 * 2 * N_BINS, n_classes)
        self.last_class = n_classes - 1

    def sites(
        self, pass_id: int, cls: int, pbin: np.ndarray, nbin: np.ndarray, ebin: np.ndarray, values: np.ndarray | None,
    ) -> tuple[int, np.ndarray, int, int, np.ndarray | None]:
        """One pass's sites (in C order of the broadcast bins), from their parent, neighbour and extra
        bins, as a call ``(class, local contexts, key0, mkey0, values)`` of the context coder."""
        local = (pbin.astype(np.uint16) * N_BINS + nbin) * N_BINS + ebin  # broadcast, < 2**9
        return (min(cls, self.last_class), local.ravel(), pass_id * _N_LOCAL, pass_id * 2 * N_BINS,
                None if values is None else values.ravel())

    def code_sites(
        self, s: BinaryStream, pass_id: int, cls: int, pbin: np.ndarray, nbin: np.ndarray, ebin: np.ndarray,
        values: np.ndarray | None,
    ) -> np.ndarray:
        """Code one pass's sites (see :meth:`sites`) now."""
        c, local, key0, mkey0, values = self.sites(pass_id, cls, pbin, nbin, ebin, values)
        return self.coder.code(s, c, local, key0, mkey0, _MAG_OF, values)

    def decode_local_into(self, s: BinaryStream, pass_id: int, cls: int, local: np.ndarray, coef: np.ndarray,
                          at: np.ndarray) -> None:
        """Decode one pass's sites given their local contexts (as :meth:`sites` makes them), in compiled
        code, into ``coef`` at flat positions ``at`` (see :meth:`SignedCoder.decode_into`)."""
        self.coder.decode_into(s, min(cls, self.last_class), local, pass_id * _N_LOCAL, pass_id * 2 * N_BINS, _MAG_OF,
                               coef, at)

    def encode_passes(self, s: BinaryStream, passes: np.ndarray, local: np.ndarray, values: np.ndarray,
                      budget: int = 1 << 14) -> None:
        """Encode passes given as rows ``(class, pass, start, stop)`` into ``local`` (local contexts, as
        :meth:`sites` makes them) and ``values``, one after the other: the bytes of queuing each pass
        in a :class:`SiteBatch`, coded ``budget`` symbols or more at a time."""
        run, first = [], 0
        for k, (cls, pass_id, start, stop) in enumerate(passes.tolist()):
            run.append((min(cls, self.last_class), pass_id * _N_LOCAL, pass_id * 2 * N_BINS, stop - start))
            if stop - first >= budget or k == len(passes) - 1:
                self.coder.encode_run(s, _MAG_OF, run, local[first:stop], values[first:stop])
                run, first = [], stop

    def batch(self, s: BinaryStream) -> SiteBatch:
        """An encoder's queue of passes for this coder (see :class:`SiteBatch`)."""
        return SiteBatch(s, self.coder)

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
        if values is not None and extra is None and mask is None and not parent.any():
            self._encode_quiet(s, cls, out)
            return out
        anchors = np.broadcast_to(checkerboard(shape[:3])[..., None], shape)
        live = np.ones(shape, bool) if mask is None else np.broadcast_to(mask, shape)
        pbin = activity_bin(parent)
        ebin = np.broadcast_to(activity_bin(extra) if extra is not None else np.zeros((), np.uint8), shape)
        batch = None if s.decoding else self.batch(s)
        # A grid without parent activity (the end-of-block and DC grids) has none around its sites either.
        quiet = not parent.any()
        for pass_id, sites, neighbour in (
            (0, anchors & live, np.zeros(shape, np.uint8) if quiet else face_sum(parent) // 2),
            (1, ~anchors & live, None),
        ):
            if neighbour is None:
                # Saturated terms keep every bin exact (a sum holding one is in the top bin anyway) and
                # let the sums be uint16.
                neighbour = face_sum(np.clip(np.abs(out), 0, 2 * BIN_SATURATION).astype(np.uint16))
            bins = (pbin[sites], activity_bin(neighbour[sites]), ebin[sites])
            if batch is None:
                out[sites] = self.code_sites(s, pass_id, cls, *bins, None)
            else:
                batch.add(self.sites(pass_id, cls, *bins, out[sites]))
        if batch is not None:
            batch.flush()
        return out

    def _encode_quiet(self, s: BinaryStream, cls: int, values: np.ndarray) -> None:
        """:meth:`code` for an encoder, on a grid without parent activity, extra measure or mask (the
        end-of-block and DC grids): the same sites, contexts and bytes in a few numpy calls. The anchors'
        contexts are all zero; the others' only bin is that of their anchor neighbours' sum."""
        anchors = np.broadcast_to(checkerboard(values.shape[:3])[..., None], values.shape)
        saturated = np.minimum(np.abs(values), 2 * BIN_SATURATION).astype(np.uint16)
        second = ~anchors
        local = activity_bin(face_sum(saturated)[second]).astype(np.uint16) * np.uint16(N_BINS)
        first = values[anchors]
        c = min(cls, self.last_class)
        self.coder.encode_calls(s, _MAG_OF, [(c, np.zeros(len(first), np.uint16), 0, 0, first),
                                             (c, local, _N_LOCAL, 2 * N_BINS, values[second])])


class SiteBatch:
    """Passes queued by an encoder and coded together — the same bytes as coding each when queued,
    with far fewer numpy calls (the range coder is called as often; see :meth:`SignedCoder.encode_calls`).
    Flushed every ``budget`` symbols or ``max_calls`` passes, whichever comes first: its memory goes
    with both (a single pass larger than the budget is coded whole)."""

    def __init__(self, s: BinaryStream, coder: SignedCoder, budget: int = 1 << 14, max_calls: int = 256):
        self.s, self.coder, self.budget, self.max_calls = s, coder, budget, max_calls
        self.calls, self.queued = [], 0

    def add(self, call: tuple) -> None:
        self.calls.append(call)
        self.queued += len(call[1])
        if self.queued >= self.budget or len(self.calls) >= self.max_calls:
            self.flush()

    def flush(self) -> None:
        self.coder.encode_calls(self.s, _MAG_OF, self.calls)
        self.calls, self.queued = [], 0
