"""The compiled range encoder (fedtensor/codec/_range.c): constriction's stream, word for word, for every
model fedtensor codes with; refusals of what it cannot code; coding in threads."""

from __future__ import annotations

import threading

import constriction
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtensor.codec import entropy
from fedtensor.codec.blockcoef import code_block_coefficients
from fedtensor.codec.entropy import BinaryStream
from fedtensor.errors import FormatError
from fedtensor.tensor.block import block_bases, block_grid, project, to_blocks

_range = pytest.importorskip("fedtensor.codec._range")
_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)
_BERNOULLI = constriction.stream.model.Bernoulli(perfect=False)


def _table(rng, rows: int, k: int) -> np.ndarray:
    """Probability rows as the coder makes them: skewed, some with tiny or zero entries, unnormalised."""
    t = rng.random((rows, k)) ** rng.choice([1, 8, 40])
    t[rng.random((rows, k)) < 0.1] = 0.0
    t[:, rng.integers(k)] += 1e-3
    return t.astype(np.float32)


def _symbols(rng, table: np.ndarray, rows: np.ndarray) -> np.ndarray:
    cum = np.cumsum(table[rows], axis=1, dtype=np.float64)
    u = rng.random(len(rows)) * cum[:, -1]
    return np.minimum((cum <= u[:, None]).sum(axis=1), table.shape[1] - 1).astype(np.int32)


def _ops(seed: int, n_ops: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    ops = []
    for _ in range(n_ops):
        kind, n = int(rng.integers(5)), int(rng.integers(1, 400))
        if kind == 0:
            table = _table(rng, int(rng.integers(1, 60)), int(rng.choice([2, 16, 40])))
            rows = rng.integers(0, len(table), n).astype(np.uint16)
            ops.append(("rows", table, rows, _symbols(rng, table, rows)))
        elif kind == 1:
            table = _table(rng, n, int(rng.choice([2, 16])))
            ops.append(("categorical", table, _symbols(rng, table, np.arange(n))))
        elif kind == 2:
            p = np.clip(rng.random(n) ** rng.choice([1, 12]), 1e-5, 1 - 1e-5)
            p = p if rng.random() < 0.5 else 1 - p
            ops.append(("bernoulli", p, (rng.random(n) < p).astype(np.int32)))
        elif kind == 3:
            ops.append(("even", rng.integers(0, 2, n).astype(np.int32)))
        else:
            row = _table(rng, 1, 40)[0]
            ops.append(("alike", row, _symbols(rng, row[None], np.zeros(n, int))))
    return ops


def _with_constriction(ops) -> bytes:
    enc = constriction.stream.queue.RangeEncoder()
    for op in ops:
        if op[0] == "rows":
            enc.encode(op[3], _CATEGORICAL, op[1][op[2]])
        elif op[0] == "categorical":
            enc.encode(op[2], _CATEGORICAL, op[1])
        elif op[0] == "bernoulli":
            enc.encode(op[2], _BERNOULLI, op[1])
        elif op[0] == "even":
            enc.encode(op[1], constriction.stream.model.Bernoulli(0.5, perfect=False))
        else:
            enc.encode(op[2], constriction.stream.model.Categorical(op[1], perfect=False))
    return enc.get_compressed().tobytes()


def _with_stream(ops, s: BinaryStream) -> bytes:
    for op in ops:
        if op[0] == "rows":
            s.categorical_rows(op[1], op[2], op[3])
        elif op[0] == "categorical":
            s.categorical(op[1], op[2])
        elif op[0] == "bernoulli":
            s.bernoulli(op[1], op[2])
        elif op[0] == "even":
            s.even_bits(op[1], len(op[1]))
        else:
            s.categorical_alike(op[1], op[2], len(op[2]))
    return s.finish()


def _decoded(ops, data: bytes) -> None:
    s = BinaryStream(np.frombuffer(data, np.uint32))
    for op in ops:
        if op[0] == "rows":
            got = s.categorical_rows(op[1], op[2], None)
        elif op[0] == "categorical":
            got = s.categorical(op[1], None)
        elif op[0] == "bernoulli":
            got = s.bernoulli(op[1], None)
        elif op[0] == "even":
            got = s.even_bits(None, len(op[1]))
        else:
            got = s.categorical_alike(op[1], None, len(op[2]))
        np.testing.assert_array_equal(got, op[-1])
    s.check_consumed()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_ops=st.integers(1, 12))
def test_native_stream_is_constrictions_word_for_word(seed, n_ops):
    """Every model, in any order, over streams long enough to carry through held-back words (a carry
    reaches them every few hundred symbols): the same words, which constriction decodes."""
    ops = _ops(seed, n_ops)
    s = BinaryStream()
    assert s.native is not None
    data = _with_stream(ops, s)
    assert data == _with_constriction(ops)
    _decoded(ops, data)


def test_an_empty_stream_is_empty():
    assert BinaryStream().finish() == b"" == constriction.stream.queue.RangeEncoder().get_compressed().tobytes()


def test_finish_can_be_called_again_and_coding_goes_on():
    """constriction's get_compressed seals a copy; so does finish: coding may go on after it."""
    ops = _ops(3, 6)
    s = BinaryStream()
    _with_stream(ops[:3], s)
    assert s.finish() == _with_constriction(ops[:3])
    assert _with_stream(ops[3:], s) == _with_constriction(ops)


@pytest.mark.parametrize("name, b", [("ct_head_uint8.nii.gz", (16, 16, 8)), ("ct_chest.nii.gz", (4, 4, 4))])
def test_block_coefficients_code_alike_natively_and_with_constriction(load_volume, monkeypatch, name, b):
    """The coder's chunk runs (one compiled call each) against the same calls made one by one through
    constriction, on a real CT's block-Tucker coefficients near 45 dB."""
    x = load_volume(name).data[:, :, :32].astype(np.float32)
    x = (x - x.mean()) / (x.max() - x.min())
    blocks = to_blocks(jnp.asarray(x), b)
    c = np.asarray(project(blocks, block_bases(blocks, b)))
    step = 12**0.5 * 10 ** (-45 / 20)
    q = (np.sign(c) * np.floor(np.abs(c) / step + 0.4)).astype(np.int32)
    grid = block_grid(x.shape, b)

    def coded() -> bytes:
        s = BinaryStream()
        code_block_coefficients(s, grid, b, q)
        return s.finish()

    native = coded()
    monkeypatch.setattr(entropy, "_range", None)
    assert BinaryStream().native is None
    assert native == coded()


def test_a_failed_call_codes_nothing():
    """Every call is all or nothing: a symbol outside its model (or a model constriction refuses) raises,
    and the stream is as it was before the call, not half a call longer."""
    table = np.full((2, 16), 1.0, np.float32)
    before = np.array([3, 5, 7], np.int32)
    for call, args in [("categorical_rows", (table, np.zeros(300, np.uint16), np.r_[np.ones(299), 16].astype(np.int32))),
                       ("bernoulli", (np.full(2, 0.5), np.array([1, 2], np.int32))),
                       ("bernoulli", (np.array([np.nan]), np.array([1], np.int32))),
                       ("bernoulli", (None, np.array([-1], np.int32))),
                       ("categorical_alike", (np.zeros(16, np.float32), np.array([0], np.int32))),
                       ("categorical_rows", (np.full((1, 4), np.nan, np.float32), None, np.array([0], np.int32)))]:
        enc = _range.Encoder()
        enc.categorical_rows(table, None, before[:2])
        expected = enc.finish()
        with pytest.raises(ValueError):
            getattr(enc, call)(*args)
        assert enc.finish() == expected, call
        enc.bernoulli(None, np.ones(3, np.int32))  # and it codes on
        ref = constriction.stream.queue.RangeEncoder()
        ref.encode(before[:2], _CATEGORICAL, table)
        ref.encode(np.ones(3, np.int32), constriction.stream.model.Bernoulli(0.5, perfect=False))
        assert enc.finish() == ref.get_compressed().tobytes()


def test_bad_arguments_are_refused_before_coding():
    enc = _range.Encoder()
    table = np.full((3, 16), 1.0, np.float32)
    with pytest.raises(IndexError):
        enc.categorical_rows(table, np.array([3], np.uint16), np.array([0], np.int32))
    with pytest.raises(TypeError):
        enc.categorical_rows(table.astype(np.float64), None, np.zeros(3, np.int32))
    with pytest.raises(TypeError):
        enc.bernoulli(np.array([0.5], np.float32), np.zeros(1, np.int32))
    with pytest.raises(ValueError):
        enc.categorical_rows(table, None, np.zeros(2, np.int32))
    with pytest.raises(ValueError):
        enc.categorical_rows(np.full((3, 1025), 1.0, np.float32), None, np.zeros(3, np.int32))
    with pytest.raises(TypeError):
        _range.Encoder(size=3)
    assert enc.finish() == b""  # nothing was coded: the refusals came first
    for rows in (np.array([65539]), np.array([-1])):  # no silent wrap to uint16, no numpy negative index
        with pytest.raises(IndexError):
            BinaryStream().categorical_rows(np.ones((10, 16), np.float32), rows, np.zeros(1, np.int32))


def test_coders_made_without_init_are_empty_not_broken():
    """``__new__`` alone: an empty stream both ways (it divided by a zero range before)."""
    enc = _range.Encoder.__new__(_range.Encoder)
    assert enc.finish() == b""
    enc.bernoulli(None, np.array([1, 0, 1], np.int32))
    assert enc.finish() == _with_constriction([("even", np.array([1, 0, 1], np.int32))])
    dec = _range.Decoder.__new__(_range.Decoder)
    out = np.empty(2, np.int32)
    dec.bernoulli(None, out)  # an empty stream decodes as constriction's does: to something, no crash
    assert dec.maybe_exhausted()


def test_an_output_overlapping_the_row_numbers_is_safe():
    """Decoded symbols written over the row numbers still to be read: each is read once and checked
    (this read a row 60 000 long past the table before)."""
    n = 50_000
    buf = np.zeros(2 * n, np.uint16)
    rows, out = buf[:n], buf.view(np.int32)
    words = np.random.default_rng(0).integers(0, 2**32, 30_000, dtype=np.uint32)
    with pytest.raises(IndexError):  # a decoded symbol (1 … 15) read back as a row number of a 1-row table
        _range.Decoder(words).categorical_rows(np.ones((1, 16), np.float32), rows, out)


@pytest.mark.parametrize("row", [[1e-33, 1e-33, 1e-33], [3e-39, 3e-39, 1e-38, 2e-39], [3.4e38, 1.9e34],
                                 [1.0, 0.0, 0.0, 1e-45], [2.0, 1e-30, 5.0]])
def test_extreme_rows_code_and_decode_as_constriction(row):
    """Row sums near the float32 limits (the scale overflows to inf below ~5e-32), subnormal and zero
    entries: constriction's saturating float-to-int conversions, word for word, both ways."""
    table = np.array([row], np.float32)
    for v in range(len(row)):
        ops = [("categorical", table, np.array([v], np.int32)), ("rows", table, np.zeros(3, np.uint16),
                                                                np.full(3, v, np.int32))]
        try:
            expected = _with_constriction(ops)
        except BaseException:  # constriction refuses (or panics on) this symbol: so must we
            with pytest.raises(ValueError):
                _with_stream(ops, BinaryStream())
            continue
        assert _with_stream(ops, BinaryStream()) == expected, (row, v)
        _decoded(ops, expected)


@pytest.mark.parametrize("p", [1 + 2**-52, 1.5, -1e-17, 0.0, 1.0, 5e-324, 1 - 2**-53])
def test_bernoulli_probabilities_at_and_past_the_edges_as_constriction(p):
    for v in (0, 1):
        ops = [("bernoulli", np.array([p, p]), np.array([v, 1 - v], np.int32))]
        try:
            expected = _with_constriction(ops)
        except BaseException:
            with pytest.raises(ValueError):
                _with_stream(ops, BinaryStream())
            continue
        assert _with_stream(ops, BinaryStream()) == expected, (p, v)
        _decoded(ops, expected)


def test_laplace_takes_over_a_stream_not_begun_and_is_refused_after():
    s = BinaryStream()
    s.laplace(np.full(3, 2.0), np.array([1, -2, 0]))
    assert s.native is None
    back = BinaryStream(np.frombuffer(s.finish(), np.uint32))
    np.testing.assert_array_equal(back.laplace(np.full(3, 2.0), None), [1, -2, 0])
    begun = BinaryStream()
    begun.even_bits(np.ones(4, np.int32), 4)
    with pytest.raises(ValueError, match="Laplace"):
        begun.laplace(np.full(1, 2.0), np.array([0]))
    chunked = BinaryStream()  # a chunk run begins it too (a laplace after it silently dropped the run)
    rng = np.random.default_rng(1)
    entropy.SignedCoder(8, 8).encode_calls(chunked, np.arange(4), [(0, rng.integers(0, 4, 400).astype(np.uint16), 0, 0,
                                                                   rng.integers(-3, 4, 400))])
    with pytest.raises(ValueError, match="Laplace"):
        chunked.laplace(np.full(1, 2.0), np.array([0]))


def test_streams_coded_in_threads_are_those_coded_one_after_another():
    """The GIL is released while coding: streams coded at once in threads must still be each its own."""
    runs = [_ops(seed, 10) for seed in range(4)]
    expected = [_with_constriction(ops) for ops in runs]
    got = [None] * len(runs)

    def code(i):
        got[i] = _with_stream(runs[i], BinaryStream())

    threads = [threading.Thread(target=code, args=(i,)) for i in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def _decode_all(ops, words: np.ndarray, native: bool) -> tuple:
    """Every op's symbols decoded from ``words`` (the compiled decoder or constriction's), the first
    FormatError's position, and whether the data was used up."""
    with pytest.MonkeyPatch.context() as m:
        if not native:
            m.setattr(entropy, "_range", None)
        s = BinaryStream(words, allow_empty=True)
        assert (s.native is not None) == native
        got = []
        try:
            for op in ops:
                if op[0] == "rows":
                    got.append(s.categorical_rows(op[1], op[2], None))
                elif op[0] == "categorical":
                    got.append(s.categorical(op[1], None))
                elif op[0] == "bernoulli":
                    got.append(s.bernoulli(op[1], None))
                elif op[0] == "even":
                    got.append(s.even_bits(None, len(op[1])))
                else:
                    got.append(s.categorical_alike(op[1], None, len(op[2])))
        except FormatError:
            return [g.tolist() for g in got], len(got), None
        return [g.tolist() for g in got], None, s.native.maybe_exhausted() if native else s._coder.maybe_exhausted()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_ops=st.integers(1, 8), damage=st.sampled_from(["none", "flip", "cut", "extra",
                                                                                          "random"]))
def test_native_decoder_reads_as_constriction_valid_or_not(seed, n_ops, damage):
    """Valid, bit-flipped, truncated, extended and random streams: the compiled decoder gives the symbols
    constriction gives, fails where it fails, and judges the data used up as it does (what
    check_consumed decides on)."""
    ops = _ops(seed, n_ops)
    words = np.frombuffer(_with_constriction(ops), np.uint32).copy()
    rng = np.random.default_rng(seed)
    if damage == "flip" and len(words):
        words[rng.integers(len(words))] ^= np.uint32(1 << int(rng.integers(32)))
    elif damage == "cut":
        words = words[:int(rng.integers(len(words) + 1))]
    elif damage == "extra":
        words = np.concatenate([words, rng.integers(0, 2**32, int(rng.integers(1, 4)), dtype=np.uint32)])
    elif damage == "random":
        words = rng.integers(0, 2**32, int(rng.integers(0, 200)), dtype=np.uint32)
    assert _decode_all(ops, words, True) == _decode_all(ops, words, False)


def test_decoder_refuses_a_quantile_no_encoder_writes():
    """All ones: the first quantile is 2^24, past every model (constriction: InvalidData)."""
    s = BinaryStream(np.full(4, 0xFFFFFFFF, np.uint32))
    with pytest.raises(FormatError, match="corrupted"):
        s.even_bits(None, 1)
