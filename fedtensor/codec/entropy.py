"""Context-adaptive arithmetic coding of signed integer vectors (constriction range coder).

The probability model is CABAC's binarisation — a zero flag, a sign, a unary magnitude prefix of up
to ``UNARY_CAP`` steps and an Exp-Golomb suffix, every binary decision with an adaptive probability
from a context table that backs off to a class-pooled table — but the decisions are not coded one by
one. Tables adapt per *chunk* of symbols (geometrically growing chunks), and within a chunk every
decision of one kind and level has its own context, so the model of a whole chunk is fixed before it
is coded: the zero flag and the unary prefix of each symbol collapse into one categorical symbol over
``{0, 1, …, UNARY_CAP, escape}`` whose probabilities are the products of the binary ones. A chunk is
then one vectorised constriction call for those symbols, one for the signs of the non-zeros and, only
when some magnitude exceeds ``UNARY_CAP``, two for the Exp-Golomb suffixes — a few calls per chunk
instead of one per decision and level. Counts are integers (held exactly in float64) and every
probability is computed by the same numpy expressions on both sides, so encoder and decoder agree.

The decoder must go chunk by chunk (a chunk's model depends on the symbols decoded before it). An
encoder knows them all: :meth:`SignedCoder.encode_calls` computes the models of many chunks at once
from the counts of the chunks before each, and writes byte for byte what chunk-by-chunk coding would.
"""

from __future__ import annotations

import constriction
import numpy as np

from fedtensor.errors import FormatError

try:  # compiled context modelling (setup.py builds it where a C compiler is found)
    from fedtensor.codec import _contexts
except ImportError:  # the numpy code below computes the same models, only slower
    _contexts = None
try:  # a range coder writing and reading constriction's streams word for word, without holding the GIL
    from fedtensor.codec import _range
except ImportError:  # constriction codes
    _range = None

UNARY_CAP = 14
_EG_CAP = 40  # Exp-Golomb prefix length bound: magnitudes < 2**40 + UNARY_CAP
_WEIGHT = 2.0  # pseudo-count pulling a context towards its backoff (or 1/2 at the top)
_CLIP = 1e-5  # every binary decision keeps at least this probability either way
_TRAINED = 4096  # symbols a context class must have seen before its chunks start large
_CHUNKS_AT_ONCE = 16  # chunks whose models the batched encoder computes together
_ROWS_AT_ONCE = 8192  # symbols whose probability rows are gathered together (512 KB)
#: Magnitude bound of :meth:`BinaryStream.laplace`'s symbols (its model gives each of the 2·LIMIT + 1
#: values a probability of at least 2⁻²⁴, which costs the likely ones under 0.01 bit).
LAPLACE_LIMIT = 1 << 15


class BinaryStream:
    """A range coder over vectors of categorical and binary symbols; one class for both directions
    (the name dates from the binary coder it replaced).

    In encode mode the coding methods take the values and return them; in decode mode they take
    ``None`` and return the decoded values.

    The stream is constriction's ``queue.RangeEncoder`` stream (32-bit words). Where the compiled
    :mod:`fedtensor.codec._range` is built, it codes both ways instead, word for word the same: it reads
    the model rows in place (constriction takes a gathered copy per symbol) and releases the GIL. Only
    :meth:`laplace` has no compiled model: a stream that starts with it is constriction's throughout.
    """

    _categorical = constriction.stream.model.Categorical(perfect=False)
    _bernoulli = constriction.stream.model.Bernoulli(perfect=False)
    # Codes exactly as ``_bernoulli`` with every probability 1/2, but builds no model per bit (7× faster).
    _even = constriction.stream.model.Bernoulli(0.5, perfect=False)
    _laplace = constriction.stream.model.QuantizedLaplace(-LAPLACE_LIMIT, LAPLACE_LIMIT)

    def __init__(self, compressed: np.ndarray | None = None, allow_empty: bool = False):
        """Encode, or (given ``compressed``) decode. A section to decode must not be empty unless
        ``allow_empty``: every section fedtensor's codecs write codes at least one symbol."""
        self.decoding = compressed is not None
        self._native, self._coder, self._begun = None, None, False
        if self.decoding:
            if len(compressed) == 0 and not allow_empty:
                raise FormatError("corrupted stream: empty entropy-coded section")
            self._words = np.ascontiguousarray(compressed, np.uint32)
            if _range is not None:
                self._native = _range.Decoder(self._words)
            else:
                self._coder = constriction.stream.queue.RangeDecoder(self._words)
        elif _range is not None:
            self._native = _range.Encoder()
        else:
            self._coder = constriction.stream.queue.RangeEncoder()

    @property
    def native(self):
        """The compiled coder (:mod:`fedtensor.codec._range`) of this stream, or None."""
        return self._native

    def _compiled(self):
        """The compiled coder, now that a symbol is coded with it (None: constriction codes)."""
        self._begun = True
        return self._native

    def categorical(self, probs: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        """Code ``len(probs)`` symbols, symbol ``i`` in ``[0, probs.shape[1])`` with row ``i`` (as
        float32: both coders quantise that)."""
        if len(probs) == 0:
            return np.zeros(0, np.int32)
        probs = np.asarray(probs, np.float32)
        if (native := self._compiled()) is not None:
            return self._native_code(native.categorical_rows, (np.ascontiguousarray(probs), None), values, len(probs))
        if self.decoding:
            return self._decode(self._categorical, probs)
        values = np.asarray(values, np.int32)
        self._coder.encode(values, self._categorical, probs)
        return values

    def categorical_rows(self, table: np.ndarray, rows: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        """:meth:`categorical` with the probabilities ``table[rows]``. constriction's are gathered
        :data:`_ROWS_AT_ONCE` symbols at a time: the same code (a range coder's symbols may be split
        between calls), and the rows, 64 bytes a symbol, stay small and in cache instead of taking
        megabytes per chunk. The compiled coder reads them in place. Row numbers outside the table
        raise IndexError (negative ones too)."""
        table = np.asarray(table, np.float32)
        if rows.dtype != np.uint16 and len(rows) and (rows.min() < 0 or rows.max() >= len(table)):
            raise IndexError("categorical_rows: a row number outside the table")
        if len(rows) and len(table) <= 1 << 16 and (native := self._compiled()) is not None:
            return self._native_code(native.categorical_rows,
                                     (np.ascontiguousarray(table), np.ascontiguousarray(rows, np.uint16)), values,
                                     len(rows))
        if len(rows) <= _ROWS_AT_ONCE:
            return self.categorical(table.take(rows, axis=0), values)
        pieces = [self.categorical(table.take(rows[i:i + _ROWS_AT_ONCE], axis=0),
                                   None if values is None else values[i:i + _ROWS_AT_ONCE])
                  for i in range(0, len(rows), _ROWS_AT_ONCE)]
        return np.concatenate(pieces) if self.decoding else values

    def _native_code(self, method, model: tuple, values: np.ndarray | None, n: int) -> np.ndarray:
        """One call of the compiled coder's ``method(*model, symbols)``: ``n`` symbols decoded into a new
        int32 array, or ``values`` encoded (and returned)."""
        if self.decoding:
            out = np.empty(n, np.int32)
            try:
                method(*model, out)
            except _range.InvalidData:  # data no encoder could have produced, as constriction rejects it
                raise FormatError("corrupted entropy-coded stream (invalid data)") from None
            return out
        values = np.ascontiguousarray(values, np.int32)
        method(*model, values)
        return values

    def bernoulli(self, p1: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        if len(p1) == 0:
            return np.zeros(0, np.int32)
        if (native := self._compiled()) is not None:
            return self._native_code(native.bernoulli, (np.ascontiguousarray(p1, np.float64),), values, len(p1))
        if self.decoding:
            return self._decode(self._bernoulli, p1)
        values = np.asarray(values, np.int32)
        self._coder.encode(values, self._bernoulli, p1)
        return values

    def laplace(self, scales: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        """Code ``len(scales)`` signed integers in ``[−LAPLACE_LIMIT, LAPLACE_LIMIT]``, integer ``i`` under
        a zero-mean Laplace distribution of scale ``scales[i]`` (> 0) quantised to the integers."""
        scales = np.asarray(scales, np.float64)
        if len(scales) == 0:
            return np.zeros(0, np.int32)
        if self._native is not None:  # only constriction has this model: it takes over a stream not begun
            if self._begun:
                raise ValueError("laplace: this stream is coded by the compiled coder, which has no Laplace model")
            self._native = None
            self._coder = (constriction.stream.queue.RangeDecoder(self._words) if self.decoding
                           else constriction.stream.queue.RangeEncoder())
        self._begun = True
        if self.decoding:
            return self._decode(self._laplace, np.zeros(len(scales)), scales)
        values = np.asarray(values, np.int32)
        self._coder.encode(values, self._laplace, np.zeros(len(scales)), scales)
        return values

    def categorical_alike(self, probs: np.ndarray, values: np.ndarray | None, n: int) -> np.ndarray:
        """Code ``n`` symbols all under the one distribution ``probs`` (the same code as
        :meth:`categorical` with ``probs`` on every row, without building a model per symbol)."""
        probs = np.ascontiguousarray(probs, np.float32)
        if n and (native := self._compiled()) is not None:
            return self._native_code(native.categorical_alike, (probs,), values, n)
        return self._fixed(constriction.stream.model.Categorical(probs, perfect=False), values, n)

    def even_bits(self, values: np.ndarray | None, n: int) -> np.ndarray:
        """Code ``n`` bits, each a one with probability 1/2 (raw bits)."""
        if n and (native := self._compiled()) is not None:
            return self._native_code(native.bernoulli, (None,), values, n)
        return self._fixed(self._even, values, n)

    def _fixed(self, model, values: np.ndarray | None, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, np.int32)
        if self.decoding:
            return self._decode(model, n)
        values = np.asarray(values, np.int32)
        self._coder.encode(values, model)
        return values

    def _decode(self, model, *params) -> np.ndarray:
        try:
            return np.asarray(self._coder.decode(model, *params), np.int32)
        except Exception as err:  # constriction rejects data that no encoder could have produced
            raise FormatError(f"corrupted entropy-coded stream ({err.__class__.__name__})") from None

    def finish(self) -> bytes:
        if self._native is not None:
            return self._native.finish()
        return self._coder.get_compressed().tobytes()

    def check_consumed(self) -> None:
        """After decoding a section: its data must be used up (words left over mean a forged or spliced
        section; a checksum re-computed by whoever altered the file does not hide that)."""
        coder = self._native if self._native is not None else self._coder
        if not coder.maybe_exhausted():
            raise FormatError("corrupted stream: entropy-coded section longer than its content")


def _chunks(n: int, first: int = 64, growth: int = 4):
    """Geometrically growing chunks: early symbols of a batch still teach the tables quickly."""
    lo, size = 0, first
    while lo < n:
        yield slice(lo, min(n, lo + size))
        lo, size = lo + size, size * growth


_NONE = np.zeros(0, np.int64)
_NONE.flags.writeable = False


def _first_chunk(seen: float) -> int:
    """Size of a call's first chunk for a context class that has coded ``seen`` symbols (of the call's
    keys). Small first chunks teach fresh tables quickly; tables that have already seen many symbols (a
    later slab, carried contexts) barely move within a chunk, so they start at full size — far fewer
    model builds when a volume is cut into many thin slabs."""
    return 64 if seen < _TRAINED else _TRAINED


def _p1(ones, total, prior):
    """Adaptive probability of a one: counts plus ``_WEIGHT`` pseudo-counts at ``prior``, clipped."""
    p = (ones + _WEIGHT * prior) / (total + _WEIGHT)
    return np.minimum(np.maximum(p, _CLIP, out=p), 1 - _CLIP, out=p)


# The model's arithmetic, shared by the chunk-by-chunk coder and the batched encoder (leading axes are
# chunks there): both must compute every probability with the same float operations.


def _p_nonzero(z, zc):
    """P(v ≠ 0) per zero-flag key from the class ``z`` and pooled ``zc`` ``(ones, total)`` counts."""
    return _p1(z[0], z[1], (zc[0] + _WEIGHT * 0.5) / (zc[1] + _WEIGHT))


def _p_levels(m, mc):
    """Per magnitude key, P(one) of each unary level and, last, of a negative sign."""
    return _p1(m[0], m[1], (mc[0] + _WEIGHT * 0.5) / (mc[1] + _WEIGHT))


def _reach(pm):
    """P(|v| = m | v ≠ 0), m = 1…UNARY_CAP, and last P(escape), from the unary levels' probabilities."""
    reach = np.ones(pm.shape)
    np.cumprod(pm[..., :UNARY_CAP], axis=-1, out=reach[..., 1:])
    reach[..., :UNARY_CAP] *= 1 - pm[..., :UNARY_CAP]
    return reach


def _symbol_table(pnz, reach, mag_of):
    """P(symbol) over ``{0, 1…UNARY_CAP, escape}`` per local context (float32, as coded)."""
    table = np.empty((*pnz.shape, UNARY_CAP + 2), np.float32)
    table[..., 0] = 1 - pnz
    np.multiply(np.take(reach, mag_of, axis=-2), pnz[..., None], out=table[..., 1:])
    return table


def _counts(local, lnz, mnz, sym_nz, neg, n_local, n_mag):
    """A chunk's decisions counted as increments of the ``(ones, total)`` tables: zero flags per local
    context ``(2, n_local)``; per magnitude key ``(2, n_mag, UNARY_CAP + 1)``, the unary levels (level
    l is coded for |v| > l and is a one for |v| > l + 1) and, last, the sign."""
    width = UNARY_CAP + 2
    zero = np.stack([np.bincount(lnz, minlength=n_local), np.bincount(local, minlength=n_local)])
    hist = np.bincount(mnz * width + sym_nz, minlength=n_mag * width).reshape(n_mag, width)
    tail = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # tail[:, k] = #(|v| >= k), k >= 1
    mag = np.empty((2, n_mag, UNARY_CAP + 1))
    mag[0, :, :UNARY_CAP], mag[1, :, :UNARY_CAP] = tail[:, 2:], tail[:, 1:UNARY_CAP + 1]
    mag[0, :, UNARY_CAP] = np.bincount(mnz, weights=neg, minlength=n_mag)
    mag[1, :, UNARY_CAP] = tail[:, 1]
    return zero, mag


def _length_counts(nbits):
    """Increments ``(ones, total)`` of the Exp-Golomb length decisions (decision k is coded for
    ``nbits >= k``, a one if ``> k``) from a histogram of ``nbits`` (last axis)."""
    reached = np.cumsum(nbits[..., ::-1], axis=-1)[..., ::-1]
    return reached - nbits, reached


def _length_dist(eg):
    """P(bit length − 1 = k), k < _EG_CAP, from the Exp-Golomb length tables; longer is not representable."""
    pe = _p1(eg[0], eg[1], 0.5)
    dist = np.ones(pe.shape)
    np.cumprod(pe[..., :-1], axis=-1, out=dist[..., 1:])
    dist *= 1 - pe
    return dist


def _raw_bits(nbits):
    """``(owner, shift)`` of the raw bits below the leading one of Exp-Golomb codes of ``nbits`` bits
    each, most significant first, symbol after symbol."""
    nbits = nbits.astype(np.int64)
    owner = np.repeat(np.arange(len(nbits)), nbits)
    first = np.cumsum(nbits) - nbits
    return owner, nbits[owner] - 1 - (np.arange(len(owner)) - first[owner])


class SignedCoder:
    """Codes vectors of signed integers under adaptive contexts.

    A context is a ``(class, key)`` pair; each backs off to its key pooled over all classes (a fine
    context not seen yet inherits what its key has learnt in other classes). Zero flags have keys in
    ``[0, n_keys)``, signs and magnitudes in ``[0, n_mag_keys)``. One call codes one class: symbol ``i``
    has the local context ``local[i]`` in ``[0, L)``, whose zero-flag key is ``key0 + local[i]`` and whose
    magnitude key is ``mkey0 + mag_of[local[i]]``. The model is built once per chunk for the ``L``
    local contexts (slices of the count tables, no gathers), then gathered per symbol.
    """

    def __init__(self, n_keys: int, n_mag_keys: int, n_classes: int = 1):
        # (ones, total) counts of the binary decisions, per class and pooled over classes. The magnitude
        # tables hold the UNARY_CAP unary levels and, as a last column, the sign.
        self.zero, self.zero_pooled = np.zeros((n_classes, 2, n_keys)), np.zeros((2, n_keys))
        self.mag = np.zeros((n_classes, 2, n_mag_keys, UNARY_CAP + 1))
        self.mag_pooled = np.zeros((2, n_mag_keys, UNARY_CAP + 1))
        self.eg = np.zeros((2, _EG_CAP))
        self._buffers = None  # the decoder's, kept between calls (see _decode_buffers)

    def __getstate__(self) -> dict:
        """The tables only: a copy (a group's starting state, a worker's task) needs no decoder buffers."""
        return {**self.__dict__, "_buffers": None}

    def code(self, s: BinaryStream, cls: int, local: np.ndarray, key0: int, mkey0: int, mag_of: np.ndarray,
             values: np.ndarray | None) -> np.ndarray:
        """Encode ``values`` (returned as given) or decode ``len(local)`` values (returned as int64)."""
        out = np.zeros(len(local), np.int64) if s.decoding else values
        if len(local) == 0:
            return out
        first = _first_chunk(self._seen(cls, key0, len(mag_of)))
        if s.decoding and _contexts is not None:
            self._decode_native(s, cls, key0, mkey0, mag_of, local, first, out)
            return out
        zs, ms = slice(key0, key0 + len(mag_of)), slice(mkey0, mkey0 + int(mag_of.max()) + 1)
        tables = (self.zero[cls, :, zs], self.zero_pooled[:, zs], self.mag[cls, :, ms], self.mag_pooled[:, ms], mag_of)
        for sl in _chunks(len(local), first):
            if s.decoding:
                out[sl] = self._code(s, local[sl], tables, None)
            else:
                self._code(s, local[sl], tables, values[sl])
        return out

    def _seen(self, cls: int, key0: int, n_local: int) -> float:
        """Symbols class ``cls`` has coded under the zero-flag keys ``key0 … key0 + n_local`` (what sizes a
        call's first chunk: :func:`_first_chunk`)."""
        return self.zero[cls, 1, key0:key0 + n_local].sum()

    def decode_into(self, s: BinaryStream, cls: int, local: np.ndarray, key0: int, mkey0: int, mag_of: np.ndarray,
                    coef: np.ndarray, at: np.ndarray) -> None:
        """:meth:`code` for a compiled decoder (``_contexts``) that writes the ``len(local)`` values straight
        into the int32 array ``coef`` (C-contiguous), value ``i`` at flat position ``at[i]``; the zeros'
        positions are left as they are. A value beyond int32 raises :class:`FormatError`."""
        if len(local) == 0:
            return
        first = _first_chunk(self._seen(cls, key0, len(mag_of)))
        try:
            self._decode_native(s, cls, key0, mkey0, mag_of, local, first, coef.reshape(-1), at)
        except OverflowError:
            raise FormatError("corrupted stream: a coefficient beyond int32") from None

    @staticmethod
    def _model(tables) -> tuple[np.ndarray, np.ndarray]:
        """Per local context: P(symbol) over ``{0, 1…UNARY_CAP, escape}``; per magnitude key: P(v < 0)."""
        z, zc, m, mc, mag_of = tables
        pnz, pm = _p_nonzero(z, zc), _p_levels(m, mc)
        return _symbol_table(pnz, _reach(pm), mag_of), pm[..., UNARY_CAP]

    def encode_calls(self, s: BinaryStream, mag_of: np.ndarray, calls) -> None:
        """Encode a run of calls ``(cls, local, key0, mkey0, values)`` of :meth:`code` (all with
        ``mag_of``): the same bytes, and the same tables after, as making the calls one by one.

        An encoder knows every symbol in advance, so the tables at the start of each chunk are those
        before the run plus the (integer, so exactly summed) counts of the chunks before it: the models
        of many chunks are computed at once, and only the coder calls remain per chunk. Memory goes with
        the symbols (about 80 bytes each) and ``_CHUNKS_AT_ONCE``. After a :class:`FormatError` (a value
        too large to code) the stream and the tables must be discarded, as after one from :meth:`code`.
        """
        calls = [c for c in calls if len(c[1])]
        if not calls:
            return
        if len({c[4].dtype for c in calls}) > 1:  # (a promoted int32 -2**31 would escape the overflow check)
            raise ValueError("encode_calls: the calls' values must share one dtype")
        self.encode_run(s, mag_of, [(c[0], c[2], c[3], len(c[1])) for c in calls],
                        np.concatenate([c[1] for c in calls]), np.concatenate([c[4] for c in calls]))

    def encode_run(self, s: BinaryStream, mag_of: np.ndarray, calls, local: np.ndarray, values: np.ndarray) -> None:
        """:meth:`encode_calls` for calls given as ``(cls, key0, mkey0, length)``, their local contexts
        and values one after the other in ``local`` and ``values``."""
        n_local = len(mag_of)
        # The chunks, sized as code() sizes them from the class table's total at each call's start: the
        # total before the run plus the lengths of the calls before it with the same keys (where calls'
        # key ranges are the same or apart; where they overlap, counted per key).
        starts = sorted({k0 for _, k0, _, _ in calls})
        apart = all(b - a >= n_local for a, b in zip(starts, starts[1:]))
        seen = {} if apart else self.zero[:, 1].copy()
        bounds, cls, key0, mkey0 = [0], [], [], []
        for c, k0, m0, length in calls:
            if apart:
                if (c, k0) not in seen:
                    seen[c, k0] = self._seen(c, k0, n_local)
                first = _first_chunk(seen[c, k0])
                seen[c, k0] += length
            else:
                first = _first_chunk(seen[c, k0:k0 + n_local].sum())
                seen[c, k0:k0 + n_local] += np.bincount(local[bounds[-1]:bounds[-1] + length], minlength=n_local)
            for sl in _chunks(length, first):
                bounds.append(bounds[-1] + sl.stop - sl.start)
                cls.append(c)
                key0.append(k0)
                mkey0.append(m0)
        if bounds[-1] != len(local) or len(values) != len(local):
            raise ValueError("encode_run: the calls' lengths do not add up to the symbols given")
        cls, key0, mkey0, bounds = np.array(cls), np.array(key0), np.array(mkey0), np.array(bounds)
        for c0 in range(0, len(cls), _CHUNKS_AT_ONCE):  # bounded memory: (chunks, contexts) arrays
            at = slice(c0, c0 + _CHUNKS_AT_ONCE)
            edges = bounds[c0:c0 + _CHUNKS_AT_ONCE + 1]
            symbols = slice(edges[0], edges[-1])
            self._encode_chunks(s, mag_of, cls[at], key0[at], mkey0[at], edges - edges[0], local[symbols],
                                values[symbols])

    def _encode_chunks(self, s, mag_of, cls, key0, mkey0, bounds, local, values) -> None:
        """:meth:`encode_calls` for consecutive chunks (``bounds`` into ``local`` and ``values``)."""
        if _contexts is not None:
            local = _narrow_local(local, mag_of)
            sym, idx, sym_nz, neg, mnz, esc, rest, nbits = _binarise_native(values, local, mag_of)
            table, p_neg, dist = self._chunk_models_native(mag_of, cls, key0, mkey0, bounds, local, sym_nz, idx, mnz,
                                                           neg, esc, nbits)
            _code_chunks_native(s, np.ascontiguousarray(bounds, np.int64), local, sym, table, p_neg, dist, idx, mnz,
                                neg, esc, rest, nbits)
            return
        sym, idx, neg, esc, rest = _binarise(values)
        mnz = mag_of[local[idx]]
        nbits = _bit_lengths(rest)
        table, p_neg, dist = self._chunk_models(mag_of, cls, key0, mkey0, bounds, local, sym[idx], idx, mnz, neg,
                                                esc, nbits)
        nz_bounds, esc_bounds = np.searchsorted(idx, bounds), np.searchsorted(esc, bounds)
        for c in range(len(cls)):
            a, b = bounds[c], bounds[c + 1]
            s.categorical_rows(table(c), local[a:b], sym[a:b])
            a, b = nz_bounds[c], nz_bounds[c + 1]
            s.bernoulli(p_neg[c, mnz[a:b]], neg[a:b])
            a, b = esc_bounds[c], esc_bounds[c + 1]
            if b > a:
                s.categorical_alike(dist[c], nbits[a:b], b - a)
                owner, shift = _raw_bits(nbits[a:b])
                s.even_bits((rest[a:b][owner] >> shift) & 1, len(owner))

    def _chunk_models(self, mag_of, cls, key0, mkey0, bounds, local, sym_nz, idx, mnz, neg, esc, nbits):
        """Every chunk's model from the tables at its start, the chunks' counts added to the tables:
        ``(table(c), P(v < 0) per chunk and magnitude key, Exp-Golomb length distribution per chunk)``,
        ``table(c)`` P(symbol) per local context (:func:`_symbol_table`)."""
        n_chunks, n_local, n_mag = len(cls), len(mag_of), int(mag_of.max()) + 1
        # Keys of every chunk's own counts: (chunk, local context) flattened, and of its non-zeros.
        keys = np.repeat(np.arange(n_chunks) * n_local, np.diff(bounds)) + local
        keys_nz = keys[idx]
        chunk_nz, chunk_esc = keys_nz // n_local, keys[esc] // n_local

        # Every chunk's counts, added to the tables chunk after chunk; the tables each chunk starts from
        # are kept, and its model is computed from them with all the others'.
        zero, mag = _counts(keys, keys_nz, chunk_nz * n_mag + mnz, sym_nz, neg, n_chunks * n_local, n_chunks * n_mag)
        del keys, keys_nz
        zero = zero.reshape(2, n_chunks, n_local)
        mag = mag.reshape(2, n_chunks, n_mag, UNARY_CAP + 1)
        lengths = np.zeros((n_chunks, _EG_CAP), np.int64)
        np.add.at(lengths, (chunk_esc, nbits), 1)
        eg_ones, eg_total = _length_counts(lengths)
        z, zc = np.empty((2, n_chunks, n_local)), np.empty((2, n_chunks, n_local))
        m, mc = np.empty((2, n_chunks, n_mag, UNARY_CAP + 1)), np.empty((2, n_chunks, n_mag, UNARY_CAP + 1))
        eg = np.empty((2, n_chunks, _EG_CAP))
        for c, (k, zs, ms) in enumerate(zip(cls.tolist(), key0.tolist(), mkey0.tolist())):
            zs, ms = slice(zs, zs + n_local), slice(ms, ms + n_mag)
            for before, table, inc in ((z, self.zero[k, :, zs], zero), (zc, self.zero_pooled[:, zs], zero),
                                       (m, self.mag[k, :, ms], mag), (mc, self.mag_pooled[:, ms], mag)):
                before[:, c] = table
                table += inc[:, c]
            eg[:, c] = self.eg
            self.eg[0] += eg_ones[c]
            self.eg[1] += eg_total[c]
        del zero, mag
        pnz, pm = _p_nonzero(z, zc), _p_levels(m, mc)
        del z, zc, m, mc
        reach = _reach(pm)
        # Symbol tables are made chunk by chunk: all (chunks, contexts, 16) at once would be large.
        return (lambda c: _symbol_table(pnz[c], reach[c], mag_of)), pm[..., UNARY_CAP], _length_dist(eg)

    def _chunk_models_native(self, mag_of, cls, key0, mkey0, bounds, local, sym_nz, idx, mnz, neg, esc, nbits):
        """:meth:`_chunk_models` in compiled code (``fedtensor/codec/_contexts.c``): the same models,
        bit for bit, and the same tables after. ``local``: as :func:`_narrow_local` gives it. The symbol
        tables come as one array (chunks, local contexts, symbols); chunk ``c``'s holds only the rows of
        the local contexts the chunk holds (computing all of them took most of the time); the others are
        not set."""
        n_chunks, n_local, n_mag = len(cls), len(mag_of), int(mag_of.max()) + 1
        tables = np.empty((n_chunks, n_local, UNARY_CAP + 2), np.float32)
        signs_and_lengths = np.empty(n_chunks * (n_mag + _EG_CAP))
        i64 = [np.ascontiguousarray(a, np.int64) for a in (cls, key0, mkey0, bounds, idx, sym_nz, neg, esc, nbits,
                                                            mag_of)]
        _contexts.chunk_models(*i64[:4], local, *i64[4:], self.zero, self.zero_pooled, self.mag, self.mag_pooled,
                               self.eg, tables, signs_and_lengths, self.zero.shape[2], self.mag.shape[2],
                               self.zero.shape[0], 3)
        p_neg = signs_and_lengths[:n_chunks * n_mag].reshape(n_chunks, n_mag)
        return tables, p_neg, signs_and_lengths[n_chunks * n_mag:].reshape(n_chunks, _EG_CAP)

    def _code(self, s: BinaryStream, local: np.ndarray, tables, values: np.ndarray | None):
        mag_of = tables[4]
        table, pneg = self._model(tables)
        if values is not None:  # encoding
            sym, idx, neg, esc, rest = _binarise(values)
            s.categorical_rows(table, local, sym)
            lnz = np.take(local, idx)
            mnz = np.take(mag_of, lnz)
            s.bernoulli(np.take(pneg, mnz), neg)
            if len(esc):
                self._suffix(s, rest, len(esc))
            self._update(tables, local, lnz, mnz, np.take(sym, idx), neg)
            return None
        out, idx, sym_nz, neg = self._decode_symbols(s, table, local, mag_of, pneg)
        lnz = np.take(local, idx)
        self._update(tables, local, lnz, np.take(mag_of, lnz), sym_nz, neg)
        return out

    def _decode_symbols(self, s: BinaryStream, table: np.ndarray, local: np.ndarray, mag_of: np.ndarray,
                        pneg: np.ndarray):
        """A chunk's values decoded under its model (P(symbol) per local context, P(v < 0) per magnitude
        key), and for its counts the non-zeros' positions, symbols and signs."""
        sym = s.categorical_rows(table, local, None)
        idx = np.flatnonzero(sym)
        neg = s.bernoulli(np.take(pneg, np.take(mag_of, np.take(local, idx))), None)
        sym_nz = np.take(sym, idx)
        mag = sym_nz.astype(np.int64)
        esc = np.flatnonzero(sym_nz > UNARY_CAP)
        if len(esc):
            mag[esc] = self._suffix(s, None, len(esc)) + UNARY_CAP
        out = np.zeros(len(local), np.int64)
        out[idx] = np.where(neg.astype(bool), -mag, mag)
        return out, idx, sym_nz, neg

    def _decode_native(self, s: BinaryStream, cls: int, key0: int, mkey0: int, mag_of: np.ndarray,
                       local: np.ndarray, first: int, out: np.ndarray, at: np.ndarray | None = None) -> None:
        """:meth:`code`'s chunks for a decoder (into int64 ``out``, or at ``out[at]`` in int32 ``out``: see
        :meth:`decode_into`), each chunk's model and counts computed by
        the compiled ``chunk_models``: the model first (of the rows its local contexts need, and the
        escapes' length distribution), then, once decoded, the chunk's counts, its escapes' lengths
        included. The same values and tables as :meth:`_decode_symbols` and :meth:`_suffix`. A call's
        keys are made once for its chunks, and its buffers are kept from call to call
        (:meth:`_decode_buffers`), as a thin slab's many small passes are mostly such overhead. Between
        the coder calls, a chunk's non-zeros, sign models and escapes (``chunk_nonzeros``) and its signed
        values (``chunk_values``) are compiled too: they were a dozen numpy calls a chunk, 7–12 % of a
        CT's decode time."""
        local, mag_of64 = _narrow_local(local, mag_of), np.asarray(mag_of, np.int64)
        chunks = list(_chunks(len(local), first))
        room = max(sl.stop - sl.start for sl in chunks)
        n_mag, table, signs, nz, sym_nz, esc, neg, psign = self._decode_buffers(mag_of64, room)
        args = (self.zero, self.zero_pooled, self.mag, self.mag_pooled, self.eg, table, signs,
                self.zero.shape[2], self.mag.shape[2], self.zero.shape[0])
        keys = np.array([cls, key0, mkey0], np.int64)
        keys = (keys[0:1], keys[1:2], keys[2:3])
        p_neg, none, bounds = signs[:n_mag], _NONE, np.zeros(2, np.int64)
        for sl in chunks:
            part, bounds[1] = local[sl], sl.stop - sl.start
            _contexts.chunk_models(*keys, bounds, part, none, none, none, none, none, mag_of64, *args, 1)
            k, e = _contexts.chunk_nonzeros(s.categorical_rows(table[0], part, None), part, mag_of64, p_neg, nz,
                                            sym_nz, psign, esc)
            signed = s.bernoulli(psign[:k], None)
            escaped, nbits = none, none
            if e:  # :meth:`_suffix`, its length model the chunk's and its counts chunk_models'
                nbits = s.categorical_alike(signs[n_mag:], None, e).astype(np.int64)
                escaped = _exp_golomb_values(s, nbits) + UNARY_CAP
            _contexts.chunk_values(nz[:k], sym_nz[:k], signed, escaped, sl.start, out, neg[:k], at)
            _contexts.chunk_models(*keys, bounds, part, nz[:k], sym_nz[:k], neg[:k], esc[:e], nbits, mag_of64, *args, 2)

    def _decode_buffers(self, mag_of: np.ndarray, room: int):
        """:meth:`_decode_native`'s buffers, kept between its calls (a thin slab's passes make hundreds of
        small calls): the number of magnitude keys of ``mag_of``, the model and sign / length buffers
        ``chunk_models`` fills, and room for ``room`` non-zeros' positions, symbols, escapes, signs (int64)
        and sign models (float64). Valid until the next call."""
        kept = self._buffers
        if kept is None or kept[0] is not mag_of:
            n_mag = int(mag_of.max()) + 1
            kept = (mag_of, n_mag, np.empty((1, len(mag_of), UNARY_CAP + 2), np.float32), np.empty(n_mag + _EG_CAP),
                    np.empty((4, 0), np.int64), np.empty(0))
        if kept[5].size < room:
            room_kept = max(room, 2 * kept[5].size)
            kept = (*kept[:4], np.empty((4, room_kept), np.int64), np.empty(room_kept))
        self._buffers = kept
        return (*kept[1:4], *kept[4][:, :room], kept[5][:room])

    @staticmethod
    def _update(tables, local, lnz, mnz, sym_nz, neg) -> None:
        """Add a chunk's counts (see :func:`_counts`) to its class and pooled tables."""
        z, zc, m, mc, _ = tables
        zero, mag = _counts(local, lnz, mnz, sym_nz, neg, z.shape[1], m.shape[1])
        z += zero
        zc += zero
        m += mag
        mc += mag

    def _suffix(self, s: BinaryStream, rest: np.ndarray | None, n: int) -> np.ndarray:
        """Exp-Golomb code of ``rest >= 1``: its bit length (adaptive, categorical) then raw bits."""
        dist = _length_dist(self.eg)
        nbits = s.categorical_alike(dist, None if rest is None else _bit_lengths(rest), n)
        ones, total = _length_counts(np.bincount(nbits, minlength=_EG_CAP))
        self.eg[0] += ones
        self.eg[1] += total
        if rest is None:
            return _exp_golomb_values(s, nbits)
        owner, shift = _raw_bits(nbits)
        s.even_bits((rest[owner] >> shift) & 1, len(owner))
        return rest


def _exp_golomb_values(s: BinaryStream, nbits: np.ndarray) -> np.ndarray:
    """Decode the raw bits of Exp-Golomb codes whose bit length symbols are ``nbits``: the values."""
    if _contexts is not None:
        nbits = np.ascontiguousarray(nbits, np.int64)
        out = np.empty(len(nbits), np.int64)
        _contexts.eg_values(nbits, np.ascontiguousarray(s.even_bits(None, int(nbits.sum())), np.int32), out)
        return out
    owner, shift = _raw_bits(nbits)
    bits = s.even_bits(None, len(owner))
    low = np.bincount(owner, weights=bits.astype(np.int64) << shift, minlength=len(nbits))  # exact: < 2**40
    return (np.int64(1) << nbits.astype(np.int64)) + low.astype(np.int64)


def _binarise(values: np.ndarray):
    """An encoder's decisions for ``values``: the symbols ``min(|v|, UNARY_CAP + 1)``, the positions of
    the non-zeros and their signs (1: negative), the positions of the escapes and their Exp-Golomb
    remainders ``|v| − UNARY_CAP``."""
    absval = np.abs(values)
    if absval.min() < 0:  # |most negative integer| overflows
        raise FormatError("value too large for the entropy coder")
    sym = np.minimum(absval, UNARY_CAP + 1)
    nz = np.flatnonzero(sym)
    esc = nz[sym[nz] > UNARY_CAP]
    rest = absval[esc].astype(np.int64) - UNARY_CAP
    if len(rest) and rest.max() >= 1 << _EG_CAP:
        raise FormatError("value too large for the entropy coder (|v| ≥ 2**40)")
    return sym, nz, (values[nz] < 0).astype(np.int32), esc, rest


def _narrow_local(local: np.ndarray, mag_of: np.ndarray) -> np.ndarray:
    """Local contexts as the compiled functions take them: uint16, the sites' own type (< 2**9); others
    are checked before they are narrowed."""
    if local.dtype != np.uint16:
        if len(local) and (local.min() < 0 or local.max() >= len(mag_of)):
            raise IndexError("local context out of range")
        local = local.astype(np.uint16)
    return np.ascontiguousarray(local)


def _binarise_native(values: np.ndarray, local: np.ndarray, mag_of: np.ndarray):
    """:func:`_binarise` in compiled code, with the non-zeros' symbols and magnitude keys
    (``mag_of[local]``) and the escapes' :func:`_bit_lengths`: ``(sym, nz, sym_nz, neg, mnz, esc, rest,
    nbits)``, all int64 but ``sym`` (int32)."""
    if values.dtype not in (np.int32, np.int64):  # the C code reads signed 32- or 64-bit integers
        values = values.astype(np.int64)
    values = np.ascontiguousarray(values)
    # Outputs of the size they need, counted first: room for every symbol took 56 bytes a symbol, the
    # largest share of the encoder's working set (about a quarter of the symbols are non-zero).
    k, e = _contexts.binarise_counts(values)
    sym, nonzeros, escapes = np.empty(len(values), np.int32), np.empty((4, k), np.int64), np.empty((3, e), np.int64)
    try:
        _contexts.binarise(values, np.ascontiguousarray(local), np.ascontiguousarray(mag_of, np.int64), sym, *nonzeros,
                           *escapes)
    except OverflowError:
        raise FormatError("value too large for the entropy coder") from None
    return (sym, *nonzeros, *escapes)


def _code_chunks_native(s: BinaryStream, bounds, local, sym, tables, p_neg, dist, nz, mnz, neg, esc, rest,
                        nbits) -> None:
    """The coder calls of :meth:`SignedCoder._encode_chunks` for a run of chunks (``bounds`` into
    ``local`` and ``sym``), their sign probabilities, signs, Exp-Golomb lengths and raw bits laid out per
    chunk by the compiled ``chunk_symbols`` (one pass, not a dozen numpy calls a chunk)."""
    n_chunks = len(bounds) - 1
    psign, sign = np.empty(len(nz)), np.empty(len(nz), np.int32)
    length, bits = np.empty(len(esc), np.int32), np.empty(int(nbits.sum()), np.int32)
    marks = np.empty((3, n_chunks + 1), np.int64)
    _contexts.chunk_symbols(bounds, nz, mnz, neg, esc, rest, nbits, p_neg, psign, sign, length, bits, marks)
    if (native := s._compiled()) is not None:  # the whole run in one call, the rows read in place, no GIL
        native.chunks(bounds, local, sym, tables, psign, sign, np.ascontiguousarray(dist), length, bits, marks)
        return
    edges = np.vstack([bounds, marks]).T.tolist()  # per chunk start: symbols, non-zeros, escapes, bits
    for c, ((a, na, ea, ba), (b, nb, eb, bb)) in enumerate(zip(edges[:-1], edges[1:])):
        s.categorical_rows(tables[c], local[a:b], sym[a:b])
        s.bernoulli(psign[na:nb], sign[na:nb])
        if eb > ea:
            s.categorical_alike(dist[c], length[ea:eb], eb - ea)
            s.even_bits(bits[ba:bb], bb - ba)


def _bit_lengths(rest: np.ndarray) -> np.ndarray:
    """Bit length − 1 of each ``rest >= 1`` (the Exp-Golomb length symbol)."""
    return np.frexp(rest.astype(np.float64))[1] - 1  # exact below 2**53
