"""The entropy coder: exact round trips (random and real coefficient grids), its compression against
a static per-band model, determinism, and damaged payloads."""

from __future__ import annotations

import hashlib

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedtensor.codec import compress, decompress, entropy
from fedtensor.codec.blockcoef import BlockCoders, code_block_coefficients
from fedtensor.codec.container import unpack
from fedtensor.codec.entropy import BinaryStream, SignedCoder
from fedtensor.codec.grid import _MAG_OF, GridCoder, SiteBatch
from fedtensor.errors import FormatError
from fedtensor.tensor.block import block_bases, block_grid, project, to_blocks

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # garbage decodes overflow casts


def _blocks_roundtrip(q: np.ndarray, grid, b) -> bytes:
    s = BinaryStream()
    code_block_coefficients(s, grid, b, q)
    payload = s.finish()
    out = code_block_coefficients(BinaryStream(np.frombuffer(payload, np.uint32)), grid, b)
    assert out.shape == q.shape
    np.testing.assert_array_equal(out, q)
    return payload


def _grid_roundtrip(values: np.ndarray, parent: np.ndarray, cls: int, extra=None, mask=None) -> None:
    s = BinaryStream()
    GridCoder().code(s, values.shape, parent, cls, values, extra=extra, mask=mask)
    payload = s.finish()
    nothing_coded = mask is not None and not np.any(mask)  # an all-masked grid codes no symbol at all
    out = GridCoder().code(BinaryStream(np.frombuffer(payload, np.uint32), allow_empty=nothing_coded),
                           values.shape, parent, cls, extra=extra, mask=mask)
    np.testing.assert_array_equal(out, values)


def _laplacian(rng, shape, scale, sparsity):
    v = np.round(rng.laplace(0, scale, shape)).astype(np.int64)
    return np.where(rng.random(shape) < sparsity, 0, v)


@settings(max_examples=25, deadline=None)
@given(gx=st.integers(1, 7), gy=st.integers(1, 7), gz=st.integers(1, 5),
       b=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
       scale=st.sampled_from([0.3, 2.0, 40.0]), seed=st.integers(0, 2**16))
def test_block_coefficients_roundtrip_random(gx, gy, gz, b, scale, seed):
    rng = np.random.default_rng(seed)
    grid = (gx, gy, gz)
    q = _laplacian(rng, (*grid, *b), scale, 0.6)
    # Decaying with frequency, like real spectra, so that end-of-block varies between blocks.
    d = np.add.outer(np.add.outer(np.arange(b[0]), np.arange(b[1])), np.arange(b[2]))
    q = (q * (rng.random((*grid, 1, 1, 1)) * 6 > d)).astype(np.int32)
    _blocks_roundtrip(q, grid, b)


def test_block_coefficients_roundtrip_extremes():
    rng = np.random.default_rng(3)
    grid, b = (3, 4, 2), (4, 4, 4)
    q = np.zeros((*grid, *b), np.int32)
    _blocks_roundtrip(q, grid, b)  # all zero: only end-of-block and DC
    q = rng.integers(-(2**31) + 1, 2**31 - 1, (*grid, *b), dtype=np.int64).astype(np.int32)  # all escapes
    _blocks_roundtrip(q, grid, b)
    q[...] = 0
    q[1, 2, 1, 3, 3, 3] = -7  # a single non-zero in the last band
    _blocks_roundtrip(q, grid, b)


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9), st.integers(1, 3)),
       cls=st.integers(0, 20), scale=st.sampled_from([0.2, 3.0, 1e6]), masked=st.booleans(),
       seed=st.integers(0, 2**16))
@example(shape=(1, 1, 1, 1), cls=0, scale=0.2, masked=True, seed=0)  # every site masked: nothing coded
def test_grid_roundtrip_random(shape, cls, scale, masked, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(shape[:3] + (1,)) < 0.5 if masked else None
    values = _laplacian(rng, shape, scale, 0.3)
    if masked:
        values = values * mask
    parent = np.abs(_laplacian(rng, shape, 4.0, 0.5))
    extra = np.abs(_laplacian(rng, shape[:3] + (1,), 8.0, 0.5))
    _grid_roundtrip(values, parent, cls, extra=extra, mask=mask)


def test_largest_magnitudes_roundtrip_and_beyond_raise():
    limit = (1 << 40) + 14  # the Exp-Golomb suffix holds up to 40 bits above the unary prefix
    values = np.array([limit - 1, -(limit - 1), 15, -16, 14, 0, 1 << 39], np.int64).reshape(7, 1, 1, 1)
    _grid_roundtrip(values, np.zeros_like(values), 0)
    with pytest.raises(FormatError, match="too large"):
        GridCoder().code(BinaryStream(), (1, 1, 1, 1), np.zeros((1, 1, 1, 1), np.int64), 0,
                         np.full((1, 1, 1, 1), limit, np.int64))


@pytest.fixture(scope="module")
def real_coefficients(load_volume):
    """Dead-zone quantised block-Tucker coefficients of ct_chest and ct_head (crops) near 45 dB."""
    out = {}
    for name, b in (("ct_chest.nii.gz", (4, 4, 4)), ("ct_head_uint8.nii.gz", (16, 16, 8))):
        x = load_volume(name).data[:, :, :48].astype(np.float32)
        x = (x - x.mean()) / (x.max() - x.min())  # unit range: a step of √12·10^(−45/20) ≈ 45 dB
        blocks = to_blocks(jnp.asarray(x), b)
        c = np.asarray(project(blocks, block_bases(blocks, b)))
        step = 12**0.5 * 10 ** (-45 / 20)
        q = (np.sign(c) * np.floor(np.abs(c) / step + 0.4)).astype(np.int32)
        out[name] = (q, block_grid(x.shape, b), b)
    return out


def _static_band_bits(q: np.ndarray, b) -> float:
    """Bits of an ideal static model: one empirical distribution per band (no side information)."""
    flat = q.reshape(-1, int(np.prod(b)))
    bits = 0.0
    for band in flat.T:
        _, counts = np.unique(band, return_counts=True)
        bits -= float(np.sum(counts * np.log2(counts / len(band))))
    return bits


@pytest.mark.parametrize("name", ["ct_chest.nii.gz", "ct_head_uint8.nii.gz"])
def test_real_coefficients_roundtrip_and_beat_static_model(real_coefficients, name):
    q, grid, b = real_coefficients[name]
    payload = _blocks_roundtrip(q, grid, b)
    # The context models must pay off: clearly fewer bits than the per-band zeroth-order entropy,
    # which ignores spatial context, end-of-block and the DC prediction (and is free of side info).
    assert 8 * len(payload) < 0.96 * _static_band_bits(q, b)  # measured: 0.93 (chest), 0.83 (head)


def test_encoding_is_deterministic(real_coefficients):
    q, grid, b = real_coefficients["ct_head_uint8.nii.gz"]
    payloads = []
    for _ in range(2):
        s = BinaryStream()
        code_block_coefficients(s, grid, b, q)
        payloads.append(s.finish())
    assert payloads[0] == payloads[1]


@pytest.fixture(scope="module")
def crop_stream(ct_crop):
    return compress(ct_crop, psnr=45, block=4), ct_crop


def test_truncated_and_flipped_streams_raise_format_error(crop_stream):
    blob, _ = crop_stream
    _, sections = unpack(blob)
    start = len(blob) - 32 - len(sections[-1])  # the coefficient section
    for cut in (start + 4, start + len(sections[-1]) // 2, len(blob) - 33, len(blob) - 1):
        with pytest.raises(FormatError):
            decompress(blob[:cut])
    for pos in range(start, len(blob) - 32, max(1, len(sections[-1]) // 16)):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x10
        with pytest.raises(FormatError):
            decompress(bytes(damaged))


def test_resigned_garbage_payload_decodes_to_shape_or_format_error(crop_stream):
    """With a valid checksum, garbage coefficients must give a FormatError or a volume, quickly."""
    blob, vol = crop_stream
    _, sections = unpack(blob)
    start, end = len(blob) - 32 - len(sections[-1]), len(blob) - 32
    rng = np.random.default_rng(0)
    for trial in range(6):
        body = bytearray(blob[:-32])
        if trial < 3:  # random words
            body[start:end] = rng.integers(0, 256, end - start, dtype=np.uint8).tobytes()
        else:  # a few flips
            for pos in rng.integers(start, end, 3):
                body[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            out = decompress(bytes(body) + hashlib.sha256(bytes(body)).digest())
        except FormatError:
            continue
        assert out.data.shape == vol.shape and out.data.dtype == vol.data.dtype


def test_truncated_coefficient_payload_is_format_error_or_garbage():
    """The range decoder reading past the end of its words must not crash or hang."""
    rng = np.random.default_rng(1)
    grid, b = (4, 4, 4), (4, 4, 4)
    q = _laplacian(rng, (*grid, *b), 3.0, 0.5).astype(np.int32)
    s = BinaryStream()
    code_block_coefficients(s, grid, b, q)
    words = np.frombuffer(s.finish(), np.uint32)
    for keep in (0, 1, len(words) // 2):
        try:
            out = code_block_coefficients(BinaryStream(words[:keep].copy()), grid, b)
        except FormatError:
            continue
        assert out.shape == q.shape


def test_fixed_models_code_as_the_per_symbol_ones():
    """Raw bits and Exp-Golomb lengths go through one fixed model per call: the stream is byte for byte
    the one the per-symbol models (all rows alike) write, so streams written before still decode."""
    import constriction

    rng = np.random.default_rng(7)
    dist = np.concatenate([[0.5, 0.3, 0.1], np.full(37, 0.1 / 37)])
    dist[10:] = 0.0  # zero tails happen (underflowing products of small probabilities)
    dist /= dist.sum()
    bits = (rng.random(500) < 0.5).astype(np.int32)
    lengths = rng.choice(40, size=300, p=dist).astype(np.int32)
    new, old = BinaryStream(), constriction.stream.queue.RangeEncoder()
    new.even_bits(bits, len(bits))
    new.categorical_alike(dist, lengths, len(lengths))
    old.encode(bits, constriction.stream.model.Bernoulli(perfect=False), np.full(len(bits), 0.5))
    old.encode(lengths, constriction.stream.model.Categorical(perfect=False),
               np.tile(dist.astype(np.float32), (len(lengths), 1)))
    data = new.finish()
    assert data == old.get_compressed().tobytes()
    back = BinaryStream(np.frombuffer(data, np.uint32))
    assert np.array_equal(back.even_bits(None, len(bits)), bits)
    assert np.array_equal(back.categorical_alike(dist, None, len(lengths)), lengths)
    back.check_consumed()


def test_laplace_symbols_round_trip_near_their_entropy():
    """Signed integers under per-symbol quantised Laplace models, out to ±LAPLACE_LIMIT; their code is
    within a few bits of the model's information content."""
    from scipy import stats

    from fedtensor.codec.entropy import LAPLACE_LIMIT

    rng = np.random.default_rng(11)
    scales = rng.choice([0.3, 4.0, 200.0], 3000)
    values = np.clip(np.round(rng.laplace(0, scales)), -LAPLACE_LIMIT, LAPLACE_LIMIT).astype(np.int32)
    values[:2] = [LAPLACE_LIMIT, -LAPLACE_LIMIT]
    s = BinaryStream()
    s.laplace(scales, values)
    data = s.finish()
    back = BinaryStream(np.frombuffer(data, np.uint32))
    assert np.array_equal(back.laplace(scales, None), values)
    back.check_consumed()
    p = stats.laplace.cdf(values[2:] + 0.5, scale=scales[2:]) - stats.laplace.cdf(values[2:] - 0.5, scale=scales[2:])
    assert 8 * len(data) < -np.log2(p).sum() * 1.01 + 2 * 24 + 64


def _one_by_one_and_batched(runs, n_classes=16):
    """Code ``runs`` (lists of calls) with :meth:`SignedCoder.code` call by call and with
    :meth:`SignedCoder.encode_calls` run by run; assert the same bytes and final tables."""
    one_by_one, batched = SignedCoder(1024, 32, n_classes), SignedCoder(1024, 32, n_classes)
    s1, s2 = BinaryStream(), BinaryStream()
    for calls in runs:
        for cls, local, key0, mkey0, values in calls:
            one_by_one.code(s1, cls, local, key0, mkey0, _MAG_OF, values)
        batched.encode_calls(s2, _MAG_OF, calls)
    assert s1.finish() == s2.finish()
    for name in ("zero", "zero_pooled", "mag", "mag_pooled", "eg"):
        assert np.array_equal(getattr(one_by_one, name), getattr(batched, name)), name


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n_calls=st.integers(1, 10), trained=st.booleans())
def test_batched_encoder_writes_the_calls_bytes_and_tables(seed, n_calls, trained):
    """The encoder's batched path (many chunks' models at once) is the chunk-by-chunk coder exactly:
    the same bytes — so the unchanged decoder reads them — and the same tables after."""
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(n_calls):
        n = int(rng.choice([0, 1, 63, 65, 300, 5000, 21000]))  # chunk edges at 64, 320, 1344, …
        v = np.round(rng.laplace(0, rng.choice([0.2, 2.0, 30.0, 1e5]), n)) * (rng.random(n) < 0.6)
        calls.append((int(rng.integers(0, 16)), rng.integers(0, 512, n).astype(np.uint16),
                      int(rng.integers(0, 2)) * 512, int(rng.integers(0, 2)) * 16, v.astype(np.int32)))
    _one_by_one_and_batched([calls] * (2 if trained else 1))  # a second run starts from trained tables


@pytest.mark.parametrize("first", [4095, 4096, 4097])
def test_batched_encoder_sizes_chunks_as_the_coder(first):
    """A class's chunks start small until it has seen 4096 symbols, then at full size: a call right at
    that edge is chunked alike both ways (the edge only shows in the bytes if it is exact)."""
    rng = np.random.default_rng(first)

    def call(n, cls=0):
        return cls, rng.integers(0, 512, n).astype(np.uint16), 0, 0, rng.integers(-3, 4, n).astype(np.int64)

    _one_by_one_and_batched([[call(first), call(200), call(5000, cls=1), call(9000)]])


def test_batched_encoder_codes_the_largest_magnitudes_and_refuses_larger():
    largest = 2**40 + 13  # Exp-Golomb remainder 2**40 − 1
    values = np.array([largest, -largest, 2**40 - 1, 15, 14, -1, 0] * 9, np.int64)
    local = np.arange(len(values), dtype=np.uint16) % 512
    _one_by_one_and_batched([[(3, local, 512, 16, values)]])
    for too_large in (np.array([0, 2**40 + 14], np.int64), np.array([1, -(2**31)], np.int32)):
        for code in (lambda c, s: c.code(s, 0, np.zeros(2, np.uint16), 0, 0, _MAG_OF, too_large),
                     lambda c, s: c.encode_calls(s, _MAG_OF, [(0, np.zeros(2, np.uint16), 0, 0, too_large)])):
            with pytest.raises(FormatError, match="too large"):
                code(SignedCoder(1024, 32, 16), BinaryStream())
    with pytest.raises(ValueError, match="one dtype"):  # int32 −2**31 promoted would pass unchecked
        SignedCoder(1024, 32, 16).encode_calls(BinaryStream(), _MAG_OF, [
            (0, np.zeros(1, np.uint16), 0, 0, np.array([-(2**31)], np.int32)),
            (0, np.zeros(1, np.uint16), 0, 0, np.array([1], np.int64))])


@pytest.mark.parametrize("budget, max_calls", [(1, 256), (300, 2), (1 << 14, 256)])
def test_site_batches_code_as_the_passes_one_by_one(budget, max_calls):
    """However a batch is flushed, the stream is the one :meth:`GridCoder.code_sites` writes."""
    rng = np.random.default_rng(budget)
    passes = []
    for degree in range(1, 12):
        for pass_id in (0, 1):
            n = int(rng.integers(0, 700))
            bins = [rng.integers(0, 8, n).astype(np.uint8) for _ in range(3)]
            passes.append((pass_id, degree, *bins, rng.integers(-40, 41, n).astype(np.int32)))
    one_by_one, batched = GridCoder(), GridCoder()
    s1, s2 = BinaryStream(), BinaryStream()
    batch = SiteBatch(s2, batched.coder, budget, max_calls)
    for p in passes:
        one_by_one.code_sites(s1, *p)
        batch.add(batched.sites(*p))
    batch.flush()
    assert s1.finish() == s2.finish()


# The compiled context modelling (fedtensor/codec/_contexts.c) against the numpy code it replaces: the
# same bytes, bit for bit, and the same decoded coefficients.

def test_compiled_context_coder_is_built():
    """setup.py builds it wherever a C compiler is found (as here, and in CI): without it the encoder
    silently falls back to numpy, 1.5–2× slower."""
    assert entropy._contexts is not None


def test_compiled_range_coder_is_built():
    """setup.py builds it wherever a C compiler is found (as here, and in CI): without it constriction
    codes the same streams, holding the GIL, compress 1.1–1.2× and decompress 1.3–1.6× slower on the
    sample CTs. (Not in tests/test_range.py, which is skipped as a whole where it is not built.)"""
    assert entropy._range is not None


@pytest.fixture(params=["compiled", "numpy"])
def encoder(request, monkeypatch):
    """Run a test with the encoder's compiled context modelling, then with the numpy one."""
    if request.param == "numpy":
        monkeypatch.setattr(entropy, "_contexts", None)
    return request.param


def _encoded_both_ways(code) -> tuple[bytes, bytes]:
    native = entropy._contexts
    try:
        entropy._contexts = None
        reference = code()
    finally:
        entropy._contexts = native
    return code(), reference


@settings(max_examples=40, deadline=None)
@given(gx=st.integers(1, 6), gy=st.integers(1, 6), gz=st.integers(1, 5),
       b=st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8)),
       scale=st.sampled_from([0.3, 2.0, 40.0, 3e4]), seed=st.integers(0, 2**16))
def test_compiled_block_contexts_write_the_numpy_bytes(gx, gy, gz, b, scale, seed):
    rng = np.random.default_rng(seed)
    grid = (gx, gy, gz)
    d = np.add.outer(np.add.outer(np.arange(b[0]), np.arange(b[1])), np.arange(b[2]))
    q = _laplacian(rng, (*grid, *b), scale, 0.6) * (rng.random((*grid, 1, 1, 1)) * 8 > d)
    q = q.astype(rng.choice([np.int16, np.int32]) if scale < 1e4 else np.int32)

    def code():
        coders, out = BlockCoders(), BinaryStream()
        for _ in range(2):  # a second grid starts from the first one's statistics
            code_block_coefficients(out, grid, b, q, coders)
        return out.finish()

    compiled, reference = _encoded_both_ways(code)
    assert compiled == reference

    def decode():  # both grids back, by the compiled decoder's passes or by numpy's
        coders, s = BlockCoders(), BinaryStream(np.frombuffer(compiled, np.uint32))
        grids = [code_block_coefficients(s, grid, b, None, coders) for _ in range(2)]
        s.check_consumed()
        return grids

    by_compiled, by_numpy = _encoded_both_ways(decode)
    for back in (*by_compiled, *by_numpy):
        np.testing.assert_array_equal(back, q)


@pytest.mark.parametrize("name", ["ct_chest.nii.gz", "ct_head_uint8.nii.gz", "ct_series_dicom"])
def test_compiled_coder_writes_and_reads_as_numpy(load_volume, name):
    """The same stream from both encoders, and the same volume from both decoders (whose models and
    counts are the compiled ones or numpy's)."""
    vol = load_volume(name)
    compiled, reference = _encoded_both_ways(lambda: compress(vol, psnr=45.0))
    assert compiled == reference
    native = entropy._contexts
    try:
        entropy._contexts = None
        by_numpy = decompress(compiled).data
    finally:
        entropy._contexts = native
    by_compiled = decompress(compiled).data
    assert by_compiled.dtype == vol.data.dtype and np.array_equal(by_compiled, by_numpy)


def test_batched_encoder_tables_both_ways(encoder):
    """The batched encoder, compiled or numpy, is the chunk-by-chunk coder (see above) on a run whose
    calls share classes and keys, from trained tables."""
    rng = np.random.default_rng(7)
    calls = [(int(c), rng.integers(0, 512, n).astype(np.uint16), k * 512, k * 16,
              (np.round(rng.laplace(0, 5.0, n)) * (rng.random(n) < 0.5)).astype(np.int32))
             for c, n, k in [(3, 5000, 0), (3, 70, 1), (15, 20000, 0), (3, 4096, 0)]]
    _one_by_one_and_batched([calls, calls])
    # Calls whose key ranges overlap (a context's counts then reach another call's range): the chunk sizes
    # still follow each key's counts.
    overlapping = [(3, local, key0 // 2, mkey0, values) for _, local, key0, mkey0, values in calls]
    _one_by_one_and_batched([overlapping, overlapping])


def test_compiled_functions_refuse_bad_arguments():
    """Indices out of range or arrays of the wrong size raise, never read or write out of bounds."""
    native = entropy._contexts
    coder = SignedCoder(1024, 32, 16)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731

    u16 = lambda *v: np.array(v, np.uint16)  # noqa: E731

    def chunk_models(local=u16(0, 1), nz=i64(1), sym_nz=i64(2), bounds=i64(0, 2), key0=i64(0), cls=i64(0)):
        native.chunk_models(cls, key0, i64(0), bounds, local, nz, sym_nz, i64(0), i64(), i64(), _MAG_OF.astype(np.int64),
                            coder.zero, coder.zero_pooled, coder.mag, coder.mag_pooled, coder.eg,
                            np.empty((1, 512, 16), np.float32), np.empty(int(_MAG_OF.max()) + 1 + 40), 1024, 32, 16, 3)

    chunk_models()
    for bad in (dict(local=u16(0, 512)), dict(local=i64(0, 1)), dict(nz=i64(2)), dict(sym_nz=i64(16)),
                dict(bounds=i64(0, 3)), dict(key0=i64(600)), dict(cls=i64(16))):
        with pytest.raises(ValueError):
            chunk_models(**bad)
    with pytest.raises(ValueError):  # a mode other than models (1), counts (2) or both (3)
        native.chunk_models(i64(0), i64(0), i64(0), i64(0, 0), u16(), i64(), i64(), i64(), i64(), i64(),
                            _MAG_OF.astype(np.int64), coder.zero, coder.zero_pooled, coder.mag, coder.mag_pooled,
                            coder.eg, np.empty((1, 512, 16), np.float32), np.empty(56), 1024, 32, 16, 0)
    with pytest.raises(ValueError):  # a table of the wrong size
        native.chunk_models(i64(0), i64(0), i64(0), i64(0, 0), u16(), i64(), i64(), i64(), i64(), i64(),
                            _MAG_OF.astype(np.int64), coder.zero[:8], coder.zero_pooled, coder.mag,
                            coder.mag_pooled, coder.eg, np.empty((1, 512, 16), np.float32), np.empty(56), 1024, 32, 16, 3)

    from fedtensor.codec.blockcoef import _SITE_LUT, _anchor_order, _layout
    lay, (perm, nbr) = _layout((2, 2, 2)), _anchor_order((2, 1, 1))
    coef, eob = np.ones((2, 8), np.int32), np.full(2, 3, np.int64)

    def block_sites(perm=perm, nbr=nbr, capacity=14, coef=coef, lut=_SITE_LUT, cap=66):
        return native.block_sites(coef, eob, perm, nbr, lay.bounds, lay.order, lay.parents_flat, lut,
                                  np.empty(capacity, np.uint16), np.empty(capacity, np.int32),
                                  np.empty((6, 4), np.int64), 1, 8, cap)

    def pass_sites(degree=1, pass_id=0, capacity=3, perm=perm, work=3 * 3 * 4):
        return native.pass_sites(coef, eob, perm, nbr, lay.bounds, lay.order, lay.parents_flat, _SITE_LUT,
                                 np.empty(capacity, np.uint16), np.empty(capacity, np.int64), np.empty(work, np.uint8),
                                 degree, pass_id, 1, 8, 66)

    assert block_sites() == (14, 6)
    for bad in (dict(perm=i64(0, 2)), dict(nbr=np.full_like(nbr, 3)), dict(capacity=13), dict(coef=coef[:1]),
                dict(lut=np.full(2048, 8, np.uint8)), dict(lut=_SITE_LUT[:100]), dict(cap=100)):
        with pytest.raises(ValueError):
            block_sites(**bad)
    assert pass_sites() == 3
    for bad in (dict(degree=0), dict(degree=4), dict(pass_id=2), dict(capacity=2), dict(perm=i64(0, 2)),
                dict(work=3 * 3 * 4 - 1)):
        with pytest.raises(ValueError):
            pass_sites(**bad)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_compiled_binarise_is_numpy_binarise_in_outputs_of_the_counted_size(dtype):
    """binarise_counts counts the non-zeros and escapes, and binarise fills outputs of exactly that size
    with numpy's decisions (plus the magnitude keys and bit lengths); outputs without room for them,
    or of unequal lengths, raise, and so does the one value whose magnitude overflows."""
    rng = np.random.default_rng(8)
    values = (np.round(rng.laplace(0, 20.0, 5000)) * (rng.random(5000) < 0.3)).astype(dtype)
    local, mag = rng.integers(0, 512, 5000).astype(np.uint16), _MAG_OF.astype(np.int64)
    sym, nz, sym_nz, neg, mnz, esc, rest, nbits = entropy._binarise_native(values, local, mag)
    want_sym, want_nz, want_neg, want_esc, want_rest = entropy._binarise(values)
    assert entropy._contexts.binarise_counts(values) == (len(want_nz), len(want_esc))
    assert (sym == want_sym).all() and (nz == want_nz).all() and (neg == want_neg).all() and (sym_nz == sym[nz]).all()
    assert (esc == want_esc).all() and (rest == want_rest).all() and (nbits == entropy._bit_lengths(want_rest)).all()
    assert (mnz == mag[local[nz]]).all() and len(esc) > 0

    k, e = len(nz), len(esc)
    for shapes in (((4, k - 1), (3, e)), ((4, k), (3, e - 1))):
        with pytest.raises(ValueError, match="room"):
            entropy._contexts.binarise(values, local, mag, np.empty(5000, np.int32), *np.empty(shapes[0], np.int64),
                                       *np.empty(shapes[1], np.int64))
    with pytest.raises(ValueError, match="differ"):
        entropy._contexts.binarise(values, local, mag, np.empty(5000, np.int32), *np.empty((3, k), np.int64),
                                   np.empty(k + 1, np.int64), *np.empty((3, e), np.int64))
    with pytest.raises(FormatError):
        entropy._binarise_native(np.array([0, np.iinfo(dtype).min], dtype), local[:2], mag)


def test_chunk_symbols_lays_out_signs_lengths_and_bits_per_chunk():
    """The compiled per-chunk coder inputs equal the numpy expressions the chunk loop used: each
    non-zero's P(negative) from its chunk's row, its sign, each escape's length and its raw bits
    (``_raw_bits``), and where each chunk starts in each; bad arguments raise."""
    rng = np.random.default_rng(3)
    values = (np.round(rng.laplace(0, 30.0, 3000)) * (rng.random(3000) < 0.6)).astype(np.int64)
    local = rng.integers(0, 512, 3000).astype(np.uint16)
    mag = _MAG_OF.astype(np.int64)
    sym, nz, sym_nz, neg, mnz, esc, rest, nbits = entropy._binarise_native(values, local, mag)
    bounds = np.array([0, 64, 320, 1344, 3000], np.int64)
    p_neg = rng.random((4, int(mag.max()) + 1))
    psign, sign = np.empty(len(nz)), np.empty(len(nz), np.int32)
    length, bits = np.empty(len(esc), np.int32), np.empty(int(nbits.sum()), np.int32)
    marks = np.empty((3, 5), np.int64)
    assert entropy._contexts.chunk_symbols(bounds, nz, mnz, neg, esc, rest, nbits, p_neg, psign, sign, length, bits,
                                           marks) == len(bits)
    nz_at, esc_at = np.searchsorted(nz, bounds), np.searchsorted(esc, bounds)
    assert (marks[0] == nz_at).all() and (marks[1] == esc_at).all()
    owner, shift = entropy._raw_bits(nbits)
    assert (bits == (rest[owner] >> shift) & 1).all() and (sign == neg).all() and (length == nbits).all()
    assert (marks[2] == np.searchsorted(owner, esc_at, side="left")).all()
    chunk = np.searchsorted(bounds, nz, side="right") - 1
    assert (psign == p_neg[chunk, mnz]).all()

    def call(bounds=bounds, mnz=mnz, nbits=nbits, rest=rest, p_neg=p_neg, bits=bits, marks=marks):
        entropy._contexts.chunk_symbols(bounds, nz, mnz, neg, esc, rest, nbits, p_neg, psign, sign, length, bits,
                                        marks)

    for bad in (dict(bounds=bounds[::-1].copy()), dict(mnz=mnz + 100), dict(nbits=nbits + 40), dict(rest=rest * 2),
                dict(p_neg=p_neg[:3]), dict(bits=bits[:-1]), dict(marks=marks[:, :4].copy())):
        with pytest.raises(ValueError):
            call(**bad)


def test_eg_values_read_back_the_raw_bits_chunk_symbols_lays_out():
    """The decoder's compiled Exp-Golomb values are the escapes' remainders the encoder laid out as
    lengths and raw bits (the numpy fallback is checked against it by decoding whole streams, in
    test_compiled_coder_writes_and_reads_as_numpy); lengths and bits that do not match raise."""
    rng = np.random.default_rng(5)
    rest = np.concatenate([[1, 2, 3, (1 << 40) - 1], rng.integers(1, 1 << 20, 500)]).astype(np.int64)
    nbits = entropy._bit_lengths(rest).astype(np.int64)
    owner, shift = entropy._raw_bits(nbits)
    bits = ((rest[owner] >> shift) & 1).astype(np.int32)
    out = np.empty(len(rest), np.int64)
    entropy._contexts.eg_values(nbits, bits, out)
    assert (out == rest).all()
    for bad_nbits, bad_bits in ((nbits, bits[:-1]), (nbits + 40, bits), (nbits - 1, bits)):
        with pytest.raises(ValueError):
            entropy._contexts.eg_values(bad_nbits, bad_bits, out)


def test_chunk_nonzeros_and_values_rebuild_a_chunk_as_numpy_does():
    """The decoder's compiled per-chunk steps: the non-zeros of decoded symbols, their sign models and
    escapes (chunk_nonzeros), then the signed values written at the chunk's place (chunk_values), as the
    numpy decoder makes them; symbols, contexts, escape values and outputs out of range raise."""
    rng = np.random.default_rng(11)
    n, n_mag = 3000, int(_MAG_OF.max()) + 1
    sym = np.where(rng.random(n) < 0.7, 0, rng.integers(1, entropy.UNARY_CAP + 2, n)).astype(np.int32)
    local = rng.integers(0, len(_MAG_OF), n).astype(np.uint16)
    mag_of, p_neg = _MAG_OF.astype(np.int64), rng.random(n_mag)
    nz, sym_nz, esc, neg64 = np.empty((4, n), np.int64)
    psign = np.empty(n)
    k, e = entropy._contexts.chunk_nonzeros(sym, local, mag_of, p_neg, nz, sym_nz, psign, esc)
    idx = np.flatnonzero(sym)
    assert (k, e) == (len(idx), int((sym > entropy.UNARY_CAP).sum()))
    assert (nz[:k] == idx).all() and (sym_nz[:k] == sym[idx]).all()
    assert (psign[:k] == p_neg[mag_of[local[idx]]]).all() and (esc[:e] == idx[sym[idx] > entropy.UNARY_CAP]).all()

    neg = rng.integers(0, 2, k).astype(np.int32)
    escaped = rng.integers(entropy.UNARY_CAP + 1, 1 << 40, e).astype(np.int64)
    out, start = np.full(n + 5, 7, np.int64), 5
    entropy._contexts.chunk_values(nz[:k], sym_nz[:k], neg, escaped, start, out, neg64[:k], None)
    mag = sym[idx].astype(np.int64)
    mag[mag > entropy.UNARY_CAP] = escaped
    want = np.where(neg == 1, -mag, mag)
    assert (out[start + idx] == want).all() and (neg64[:k] == neg).all()
    assert (np.delete(out, start + idx) == 7).all()  # the zeros' places are the caller's (it zeroed them)
    # in place: into int32 coefficients at given positions (values within int32 here)
    small = np.minimum(escaped, 1 << 20)
    at, coef = rng.permutation(2 * n + 5).astype(np.int64), np.zeros(2 * n + 5, np.int32)
    entropy._contexts.chunk_values(nz[:k], sym_nz[:k], neg, small, start, coef, neg64[:k], at)
    mag[sym[idx] > entropy.UNARY_CAP] = small
    assert (coef[at[start + idx]] == np.where(neg == 1, -mag, mag)).all() and np.count_nonzero(coef) == k
    with pytest.raises(OverflowError):
        entropy._contexts.chunk_values(nz[:k], sym_nz[:k], neg, small + (1 << 31), start, coef, neg64[:k], at)

    for bad in (dict(sym=np.where(sym == 0, 0, entropy.UNARY_CAP + 2).astype(np.int32)),
                dict(local=np.full(n, len(_MAG_OF), np.uint16)), dict(p_neg=p_neg[:3]), dict(nz=nz[:10])):
        with pytest.raises(ValueError):
            entropy._contexts.chunk_nonzeros(*(bad.get(name, value) for name, value in (
                ("sym", sym), ("local", local), ("mag_of", mag_of), ("p_neg", p_neg), ("nz", nz),
                ("sym_nz", sym_nz), ("psign", psign), ("esc", esc))))
    for bad in (dict(escaped=escaped[:-1]), dict(escaped=np.append(escaped, 99)), dict(start=n),
                dict(out=out[:10]), dict(out=coef, at=at[:n], escaped=small),
                dict(out=coef, at=at + 2 * n, escaped=small), dict(out=out, at=at, escaped=small)):
        with pytest.raises(ValueError):
            entropy._contexts.chunk_values(nz[:k], sym_nz[:k], neg, bad.get("escaped", escaped),
                                           bad.get("start", start), bad.get("out", out), neg64[:k], bad.get("at"))


@settings(max_examples=25, deadline=None)
@given(gx=st.integers(1, 5), gy=st.integers(1, 5), gz=st.integers(1, 5),
       b=st.sampled_from([(2, 2, 2), (4, 4, 4), (4, 2, 8), (1, 1, 4)]), seed=st.integers(0, 2**16))
def test_decoder_pass_sites_are_the_encoder_sites(gx, gy, gz, b, seed):
    """pass_sites, pass by pass as a decoder calls it (every pass of every degree up to the last end of
    block, in order, each from the coefficients decoded before it), finds the sites, contexts and order
    block_sites finds at once for the encoder."""
    from fedtensor.codec.blockcoef import _ABS_CAP, _SITE_LUT, _anchor_order, _layout
    from fedtensor.codec.grid import N_BINS, checkerboard
    rng = np.random.default_rng(seed)
    grid, lay = (gx, gy, gz), _layout(b)
    n, width = gx * gy * gz, int(np.diff(lay.bounds).max())
    perm, nbr = _anchor_order(grid)
    n_anchor = int(checkerboard(grid).sum())
    degree = np.add.outer(np.add.outer(np.arange(b[0]), np.arange(b[1])), np.arange(b[2])).ravel()
    coef = (np.round(rng.laplace(0, rng.choice([0.3, 3.0, 80.0]), (n, degree.size))) * (rng.random((n, 1)) < 0.8))
    coef = coef.astype(np.int32)
    eob = np.max((coef != 0) * degree, axis=1)[perm].astype(np.int64)  # anchors-first, as the coder holds it
    capacity = n * degree.size
    local, values = np.empty(capacity, np.uint16), np.empty(capacity, np.int32)
    calls = np.empty((2 * (len(lay.bounds) - 2), 4), np.int64)
    sites, n_calls = entropy._contexts.block_sites(coef, eob, perm, nbr, lay.bounds, lay.order, lay.parents_flat,
                                                   _SITE_LUT, local, values, calls, n_anchor, N_BINS, _ABS_CAP)
    decoded = np.zeros_like(coef)
    decoded[:, 0] = coef[:, 0]  # the DC comes first
    work = np.full(3 * (n + 1) * (width + 1), 255, np.uint8)  # the first call must not read what it holds
    found_local, found_at, expected = [], [], iter(calls[:n_calls].tolist())
    for d in range(1, min(int(eob.max()), len(lay.bounds) - 2) + 1):
        for pass_id in (0, 1):
            got_local, got_at = np.empty(n * width, np.uint16), np.empty(n * width, np.int64)
            k = entropy._contexts.pass_sites(decoded, eob, perm, nbr, lay.bounds, lay.order, lay.parents_flat,
                                             _SITE_LUT, got_local, got_at, work, d, pass_id, n_anchor, N_BINS, _ABS_CAP)
            if k:  # block_sites lists the passes that have sites
                assert next(expected) == [d, pass_id, sum(len(a) for a in found_at), sum(len(a) for a in found_at) + k]
            decoded.ravel()[got_at[:k]] = coef.ravel()[got_at[:k]]
            found_local.append(got_local[:k])
            found_at.append(got_at[:k])
    assert next(expected, None) is None
    np.testing.assert_array_equal(np.concatenate(found_local or [np.zeros(0, np.uint16)]), local[:sites])
    np.testing.assert_array_equal(coef.ravel()[np.concatenate(found_at or [np.zeros(0, np.int64)])], values[:sites])


def test_categorical_rows_codes_in_pieces_as_one_call():
    """Gathering the probability rows a piece at a time writes the bytes of one call over all rows,
    and decodes them back."""
    rng = np.random.default_rng(3)
    table = rng.random((40, entropy.UNARY_CAP + 2)).astype(np.float32)
    rows = rng.integers(0, 40, 3 * entropy._ROWS_AT_ONCE + 17)
    values = rng.integers(0, table.shape[1], len(rows)).astype(np.int32)
    whole, pieces = BinaryStream(), BinaryStream()
    whole.categorical(table[rows], values)
    pieces.categorical_rows(table, rows, values)
    data = pieces.finish()
    assert data == whole.finish()
    back = BinaryStream(np.frombuffer(data, np.uint32))
    np.testing.assert_array_equal(back.categorical_rows(table, rows, None), values)
    back.check_consumed()


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.uint32, np.int32, np.int64])
def test_batched_encoder_codes_every_integer_type_alike(encoder, dtype):
    """The compiled binarisation reads 32- and 64-bit signed values; narrower or unsigned ones are
    widened first, so every type codes as numpy codes it (the chunk-by-chunk coder)."""
    rng = np.random.default_rng(11)
    top = min(np.iinfo(dtype).max, 3_000_000_000)
    v = rng.integers(0 if np.iinfo(dtype).min == 0 else -min(top, 2**31 - 1), top, 3000, dtype=np.int64)
    v[rng.random(3000) < 0.5] = 0
    local = rng.integers(0, 512, 3000).astype(np.uint16)
    _one_by_one_and_batched([[(2, local, 0, 16, v.astype(dtype))]])


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("at,value", [((0, 1, 1, 0, 0, 1), 2**33), ((1, 0, 1, 0, 1, 0), -2**31 - 5),
                                      ((1, 1, 1, 0, 0, 0), 2**31 + 20)])
def test_a_forged_coefficient_beyond_int32_is_refused_not_wrapped(monkeypatch, native, at, value):
    """No encoder writes one, but a stream can claim one (the last case is a DC, rebuilt from its
    Lorenzo residual); stored in the int32 grid it would wrap to another value silently."""
    from fedtensor.codec.parallel import decode_group, encode_group

    grid, b = (2, 2, 2), (4, 4, 4)
    q = np.random.default_rng(3).integers(-3, 4, (*grid, *b)).astype(np.int64)
    q[at] = value
    with monkeypatch.context() as m:
        m.setattr(entropy, "_contexts", None)  # the numpy encoder codes int64 values as they are
        sections = encode_group([grid], b, [q])
    if not native:
        monkeypatch.setattr(entropy, "_contexts", None)
    with pytest.raises(FormatError, match="a coefficient beyond int32"):
        decode_group([grid], b, sections)
    q[at] = 1
    with monkeypatch.context() as m:
        m.setattr(entropy, "_contexts", None)
        sections = encode_group([grid], b, [q])
    np.testing.assert_array_equal(decode_group([grid], b, sections)[0], q)


@pytest.mark.skipif(entropy._contexts is None, reason="the compiled context coder is not built")
@pytest.mark.parametrize("case", ["n_classes", "key0", "mag_of"])
def test_compiled_chunk_models_refuses_sizes_whose_products_would_wrap(case):
    """A private entry point, but its promise is that a bad call raises and never writes out of bounds:
    sizes near 2^63 used to wrap past the length checks (found under AddressSanitizer)."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    empty = np.zeros(0, np.int64)
    n_classes = 2**62 if case == "n_classes" else 1
    key0 = 2**63 - 1 if case == "key0" else 0
    mag_of = i64(2**63 - 1) if case == "mag_of" else i64(0)
    zero = np.zeros(0 if case == "n_classes" else 8)
    mag = np.zeros(0 if case == "n_classes" else 30)
    with pytest.raises(ValueError, match="chunk_models: .* out of range"):
        entropy._contexts.chunk_models(
            i64(1 if case == "n_classes" else 0), i64(key0), i64(0), i64(0, 4), np.zeros(4, np.uint16), empty,
            empty, empty, empty, empty, mag_of, zero, np.zeros(8), mag, np.zeros(30), np.zeros(80),
            np.zeros((1, 1, 16), np.float32), np.zeros(41), 4, 1, n_classes, 3)


def _golden_slabs():
    """Four seeded slabs of quantised coefficients, with DCs and magnitudes past the unary prefix (up
    to 2¹⁵), coded as the encoder codes them: two groups of two slabs, the second group starting from
    the state the first slab left."""
    from fedtensor.codec import parallel

    rng = np.random.default_rng(20261128)
    grid, b = (2, 5, 3), (4, 4, 8)
    qs = []
    for i in range(4):
        q = np.round(rng.laplace(0, 2.0 + 3 * i, (*grid, *b)) * (rng.random((*grid, *b)) < 0.35)).astype(np.int32)
        q[0, 0, 0, 0, 0, 0] = 40 + 1000 * i
        q[1, 4, 2, 1, 2, 3] = -(1 << 15) if i == 3 else 17 * (i + 1)
        qs.append(q)
    states = parallel.slab_coders(2, 4)
    sections = [parallel.encode_group([grid], b, [q], next(states))[0] for q in qs]
    return sections, qs, grid, b


def test_the_entropy_coded_format_is_frozen():
    """The context coder's bytes for fixed integer input, pinned. The layer is integer arithmetic
    (counts held exactly in float64), so the bytes are the same on every machine; a change to a
    context, a bin edge or the DC prediction that still round-trips would make every stored .ftz
    unreadable, and only this test sees it. Change the hash only with a format version bump."""
    import hashlib

    from fedtensor.codec import parallel

    sections, qs, grid, b = _golden_slabs()
    digest = hashlib.sha256(b"".join(len(s).to_bytes(4, "little") + s for s in sections)).hexdigest()
    assert [len(s) for s in sections] == [1056, 1404, 1556, 1624]
    assert digest == "fd7256273c6e00d183be7e9cbe4407749d3cd6f3977acdd81d9d5484d46b8630"
    states = parallel.slab_coders(2, 4)
    for section, q in zip(sections, qs):
        np.testing.assert_array_equal(parallel.decode_group([grid], b, [section], next(states))[0], q)
