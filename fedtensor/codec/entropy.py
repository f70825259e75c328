"""Context-adaptive binary arithmetic coding of integer coefficient arrays (constriction range coder).

Every signed integer is binarised as CABAC does — a zero flag, a sign, a unary magnitude prefix of up
to ``UNARY_CAP`` steps and an Exp-Golomb suffix — and every binary decision is coded with a probability
taken from adaptive counts in a context table. Encoder and decoder run the *same* traversal code
(:class:`BinaryStream` in encode or decode mode), so they can never drift apart; tables are updated
after each vectorised batch, which keeps the work in numpy and the constriction calls few.
"""

from __future__ import annotations

import constriction
import numpy as np

from fedtensor.errors import FormatError

UNARY_CAP = 14
_EG_CAP = 40  # Exp-Golomb prefix length bound: magnitudes < 2**40


class ContextTable:
    """Adaptive probabilities of a binary event for ``n`` contexts.

    Counts start from a pseudo-count ``weight`` pulled towards a coarser ``backoff`` table (context
    ``ctx`` backs off to ``ctx // backoff_div``), so a context seen for the first time inherits what its
    coarser parent has learnt instead of starting at 1/2.
    """

    def __init__(self, n: int, backoff: "ContextTable | None" = None, backoff_div: int = 1, weight: float = 2.0):
        self.ones = np.zeros(n)
        self.total = np.zeros(n)
        self.backoff, self.div, self.weight = backoff, backoff_div, weight

    def p1(self, ctx: np.ndarray) -> np.ndarray:
        prior = 0.5 if self.backoff is None else self.backoff.p1(ctx // self.div)
        return (self.ones[ctx] + self.weight * prior) / (self.total[ctx] + self.weight)

    def update(self, ctx: np.ndarray, bits: np.ndarray) -> None:
        n = len(self.total)
        self.total += np.bincount(ctx, minlength=n)
        self.ones += np.bincount(ctx, weights=bits, minlength=n)
        if self.backoff is not None:
            self.backoff.update(ctx // self.div, bits)


class BinaryStream:
    """A range coder over binary decisions; one class for both directions.

    In encode mode ``bits(...)`` takes the values and returns them; in decode mode it takes ``None``
    and returns the decoded values. Probabilities are clipped away from 0/1 so every event stays codable.
    """

    _model = constriction.stream.model.Bernoulli(perfect=False)

    def __init__(self, compressed: np.ndarray | None = None):
        self.decoding = compressed is not None
        if self.decoding:
            self._coder = constriction.stream.queue.RangeDecoder(compressed)
        else:
            self._coder = constriction.stream.queue.RangeEncoder()

    def coded(self, p1: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        p1 = np.clip(np.asarray(p1, np.float64), 1e-5, 1 - 1e-5)
        if self.decoding:
            return self._coder.decode(self._model, p1).astype(np.int32)
        values = np.asarray(values, np.int32)
        self._coder.encode(values, self._model, p1)
        return values

    def bits(self, table: ContextTable, ctx: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        if len(ctx) == 0:
            return np.zeros(0, np.int32)
        out = self.coded(table.p1(ctx), values)
        table.update(ctx, out)
        return out

    def raw(self, n: int, values: np.ndarray | None) -> np.ndarray:
        return self.coded(np.full(n, 0.5), values) if n else np.zeros(0, np.int32)

    def finish(self) -> bytes:
        return self._coder.get_compressed().tobytes()


def _chunks(n: int, first: int = 64, growth: int = 4):
    """Geometrically growing chunks: early symbols of a batch still teach the tables quickly."""
    lo, size = 0, first
    while lo < n:
        yield slice(lo, min(n, lo + size))
        lo, size = lo + size, size * growth


class SignedCoder:
    """Codes vectors of signed integers under context ids.

    ``ctx`` in ``[0, n_ctx)`` selects the zero-flag model and ``mag_ctx`` in ``[0, n_mag_ctx)`` the sign
    and magnitude models. Both are laid out as ``coarse * n_classes + class``: a fine context that has
    not been seen yet backs off to its coarse context pooled over classes.
    """

    def __init__(self, n_ctx: int, n_mag_ctx: int, n_classes: int = 1):
        nc = n_classes
        self.nc = nc
        self.zero = ContextTable(n_ctx, ContextTable(n_ctx // nc), nc)
        self.sign = ContextTable(n_mag_ctx, ContextTable(n_mag_ctx // nc), nc)
        self.mag = ContextTable(n_mag_ctx * UNARY_CAP, ContextTable(n_mag_ctx // nc * UNARY_CAP), nc)
        self.eg = ContextTable(_EG_CAP + 1)

    def code(self, s: BinaryStream, ctx: np.ndarray, mag_ctx: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        out = np.zeros(len(ctx), np.int64)
        for sl in _chunks(len(ctx)):
            out[sl] = self._code(s, ctx[sl], mag_ctx[sl], None if values is None else values[sl])
        return out

    def _code(self, s: BinaryStream, ctx: np.ndarray, mag_ctx: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        n = len(ctx)
        enc = not s.decoding
        if enc:
            values = np.asarray(values, np.int64)
            absval = np.abs(values)
        nz = s.bits(self.zero, ctx, (absval != 0) if enc else None).astype(bool)
        idx = np.flatnonzero(nz)
        mctx = mag_ctx[idx]
        neg = s.bits(self.sign, mctx, (values[idx] < 0) if enc else None).astype(bool)
        mag = np.ones(len(idx), np.int64)
        active = np.arange(len(idx))
        mcoarse, mcls = mctx // self.nc * UNARY_CAP, mctx % self.nc
        for level in range(UNARY_CAP):
            if len(active) == 0:
                break
            mc = (mcoarse[active] + level) * self.nc + mcls[active]
            more = s.bits(self.mag, mc, (absval[idx[active]] > level + 1) if enc else None).astype(bool)
            active = active[more]
            mag[active] += 1
        if len(active):  # Exp-Golomb suffix: rest = magnitude - UNARY_CAP >= 1
            rest = absval[idx[active]] - UNARY_CAP if enc else None
            nbits = np.zeros(len(active), np.int64)
            live = np.arange(len(active))
            for k in range(_EG_CAP):
                longer = s.bits(self.eg, np.full(len(live), k), (rest[live] >= (2 << k)) if enc else None).astype(bool)
                live = live[longer]
                nbits[live] += 1
                if len(live) == 0:
                    break
            else:
                raise FormatError("corrupted stream: magnitude code too long")
            value = np.ones(len(active), np.int64)
            for k in range(int(nbits.max(initial=0)) - 1, -1, -1):
                sel = np.flatnonzero(nbits > k)
                bit = s.raw(len(sel), ((rest[sel] >> k) & 1) if enc else None)
                value[sel] = (value[sel] << 1) | bit
            mag[active] = value + UNARY_CAP
        out = np.zeros(n, np.int64)
        out[idx] = np.where(neg, -mag, mag)
        return out
