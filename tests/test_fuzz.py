"""Robustness of the decoder on damaged and hostile ``.ftz`` streams.

Streams come from a 32×32×16 crop of a real CT, one per codec / mode. A damaged stream must raise
:class:`FormatError` — never another exception type, never hang. When an attacker (or a bug) re-signs
a modified stream so that its SHA-256 trailer is valid, the decoder may return garbage, but only a
volume of the declared shape and dtype, or a FormatError.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtensor.codec import compress, decompress, read_info
from fedtensor.codec.container import FORMAT_VERSION, pack, unpack
from fedtensor.errors import FormatError
from fedtensor.io import Volume

PREFIX = struct.Struct("<4sHI")
HASH = 32
DECODE_SECONDS = 5.0  # a 32×32×16 stream decodes in ~0.05 s; anything near this is a hang

pytestmark = [
    pytest.mark.timeout(300, method="thread"),  # last-resort guard for a whole test
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # garbage decodes overflow casts, by design
]


class Hang(BaseException):
    """Raised by the alarm guard; a BaseException so that no ``except Exception`` can swallow it."""


@contextmanager
def time_limit(seconds: float = DECODE_SECONDS):
    def on_alarm(signum, frame):
        raise Hang(f"decode took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def resign(body: bytes) -> bytes:
    """Append a valid SHA-256 trailer to a (modified) body."""
    return bytes(body) + hashlib.sha256(bytes(body)).digest()


def header_span(blob: bytes) -> tuple[int, int]:
    _, _, n = PREFIX.unpack_from(blob)
    return PREFIX.size, PREFIX.size + n


def flip(blob: bytes, positions, bits) -> bytes:
    b = bytearray(blob)
    for p, bit in zip(positions, bits):
        b[p] ^= 1 << bit
    return bytes(b)


def outcome(blob: bytes, shape, dtype) -> str:
    """Decode under the time guard; classify as 'ok', 'FormatError' or the foreign exception's name."""
    try:
        with time_limit():
            out = decompress(blob)
    except FormatError:
        return "FormatError"
    except Hang:
        return "Hang"
    except Exception as err:  # noqa: BLE001 - the point is to catch everything else
        return f"{type(err).__name__}: {str(err)[:60]}"
    if out.shape != tuple(shape) or out.data.dtype != dtype or out.data.shape != tuple(shape):
        return f"wrong shape/dtype {out.data.shape} {out.data.dtype}"
    return "ok"


# ------------------------------------------------------------------------------------------------
# Streams
# ------------------------------------------------------------------------------------------------

MODES = {
    "block-tucker-psnr40": dict(psnr=40),
    "block-tucker-b4-psnr45": dict(psnr=45, block=4),
    "omlsvd-global-psnr40": dict(psnr=40, codec="omlsvd-global"),
    "bpv2": dict(bpv=2.0),
    "lossless": dict(lossless=True),
    "max-error3": dict(max_error=3),
    "float-max-error": dict(max_error=0.75),  # float grid path
}


@pytest.fixture(scope="module")
def streams(ct_crop) -> dict[str, tuple[bytes, Volume]]:
    assert ct_crop.shape == (32, 32, 16)
    float_vol = Volume((ct_crop.data * 0.37).astype(np.float32), ct_crop.spacing, ct_crop.affine)
    out = {}
    for name, kw in MODES.items():
        vol = float_vol if name.startswith("float") else ct_crop
        out[name] = (compress(vol, **kw), vol)
    return out


def test_streams_decode_cleanly(streams):
    for name, (blob, vol) in streams.items():
        assert outcome(blob, vol.shape, vol.data.dtype) == "ok", name


@pytest.mark.parametrize("forgery", ["empty", "extra words"])
def test_forged_sections_with_a_valid_checksum_are_rejected(streams, forgery):
    """Whoever alters a file can re-compute its checksum: a section emptied, or lengthened by words its
    coder never reads, must still be refused (not decoded into garbage)."""
    for name, (blob, vol) in streams.items():
        header, sections = unpack(blob)
        for i, section in enumerate(sections):
            forged = list(sections)
            forged[i] = b"" if forgery == "empty" else section + section[:16].ljust(16, b"\x01")
            with pytest.raises(FormatError), time_limit():
                decompress(pack(header, forged))


# ------------------------------------------------------------------------------------------------
# (a) truncation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODES))
def test_every_truncation_raises_format_error(streams, name):
    blob, _ = streams[name]
    lengths = range(len(blob)) if len(blob) <= 8000 else sorted({*range(0, 600), *range(600, len(blob), 3),
                                                                 *range(len(blob) - 100, len(blob))})
    bad = []
    for n in lengths:
        for fn in (decompress, read_info):
            try:
                with time_limit():
                    fn(blob[:n])
                bad.append((n, fn.__name__, "no error"))
            except FormatError:
                pass
            except Exception as err:  # noqa: BLE001
                bad.append((n, fn.__name__, type(err).__name__))
    assert not bad, bad[:10]


# ------------------------------------------------------------------------------------------------
# (b) bit flips (checksum left as is)
# ------------------------------------------------------------------------------------------------


def test_seeded_random_bit_flips_raise_format_error(streams):
    rng = np.random.default_rng(20240601)
    names = list(streams)
    bad, n_cases = [], 0
    for i in range(350):
        name = names[i % len(names)]
        blob, vol = streams[name]
        k = int(rng.choice([1, 1, 2, 3, 8]))
        positions = rng.integers(0, len(blob), k)
        bits = rng.integers(0, 8, k)
        damaged = flip(blob, positions, bits)
        if damaged == blob:  # the same bit flipped twice
            continue
        n_cases += 1
        r = outcome(damaged, vol.shape, vol.data.dtype)
        if r != "FormatError":
            bad.append((name, positions.tolist(), bits.tolist(), r))
    assert n_cases >= 300
    assert not bad, bad[:10]


@pytest.mark.parametrize("region", ["prefix", "header", "trailer"])
def test_every_bit_of_prefix_and_trailer_and_a_header_sample(streams, region):
    blob, vol = streams["block-tucker-psnr40"]
    h0, h1 = header_span(blob)
    positions = {"prefix": range(0, PREFIX.size), "header": range(h0, h1, max(1, (h1 - h0) // 40)),
                 "trailer": range(len(blob) - HASH, len(blob))}[region]
    for p in positions:
        for bit in range(8):
            assert outcome(flip(blob, [p], [bit]), vol.shape, vol.data.dtype) == "FormatError", (p, bit)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_bit_flips_property(streams, data):
    name = data.draw(st.sampled_from(sorted(streams)), label="stream")
    blob, vol = streams[name]
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 7)), min_size=1, max_size=6),
                      label="flips")
    damaged = flip(blob, [p for p, _ in flips], [b for _, b in flips])
    if damaged != blob:
        assert outcome(damaged, vol.shape, vol.data.dtype) == "FormatError"


def test_version_flip_says_corrupted_or_newer(streams):
    """A flipped version field: the checksum fails, so the file is corrupted or from a newer fedtensor."""
    blob, _ = streams["lossless"]
    with pytest.raises(FormatError, match=f"corrupted .* or written by a newer fedtensor .format version {FORMAT_VERSION + 1}"):
        decompress(blob[:4] + struct.pack("<H", FORMAT_VERSION + 1) + blob[6:])


# ------------------------------------------------------------------------------------------------
# (c) flips with the checksum recomputed: garbage is allowed, crashes and hangs are not
# ------------------------------------------------------------------------------------------------


def _resigned_flip_outcomes(streams, region: str, n: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    names = list(streams)
    results = []
    for i in range(n):
        name = names[i % len(names)]
        blob, vol = streams[name]
        h0, h1 = header_span(blob)
        lo, hi = (h1, len(blob) - HASH) if region == "payload" else (h0, h1)
        k = int(rng.choice([1, 1, 2, 4]))
        positions, bits = rng.integers(lo, hi, k), rng.integers(0, 8, k)
        damaged = resign(flip(blob, positions, bits)[:-HASH])
        t = time.perf_counter()
        r = outcome(damaged, vol.shape, vol.data.dtype)
        results.append((name, positions.tolist(), bits.tolist(), r, time.perf_counter() - t))
    return results


@pytest.fixture(scope="module")
def resigned_payload(streams):
    return _resigned_flip_outcomes(streams, "payload", 120, seed=7)


@pytest.fixture(scope="module")
def resigned_header(streams):
    return _resigned_flip_outcomes(streams, "header", 80, seed=11)


def _decode_expecting_format_error_or_volume(blob: bytes, vol: Volume, shape=None) -> None:
    """Decode under the time guard, letting any foreign exception propagate."""
    try:
        with time_limit():
            out = decompress(blob)
    except FormatError:
        return
    assert out.data.shape == tuple(shape or vol.shape) and out.data.dtype == vol.data.dtype


def _foreign(results, *allowed):
    return [r for r in results if r[3] not in ("ok", "FormatError", *allowed)]


@pytest.mark.parametrize("which", ["resigned_payload", "resigned_header"])
def test_resigned_flips_never_hang_and_keep_shape(request, which):
    results = request.getfixturevalue(which)
    assert len(results) >= 80
    assert not [r for r in results if r[3] == "Hang"], "decoder hung"
    assert not [r for r in results if r[3].startswith("wrong shape")]
    assert max(r[4] for r in results) < DECODE_SECONDS
    # Any exception at all is at least a plain Exception (no SystemExit/KeyboardInterrupt-like escapes,
    # no MemoryError from absurd allocations).
    assert not [r for r in results if r[3].startswith("MemoryError")]


def test_resigned_payload_flips_raise_only_format_error(resigned_payload):
    assert not _foreign(resigned_payload), _foreign(resigned_payload)[:5]


@pytest.mark.parametrize("which", ["resigned_payload", "resigned_header"])
def test_resigned_flips_leak_no_foreign_exception(request, which):
    """Only FormatError or a volume of the right shape and dtype."""
    leaks = _foreign(request.getfixturevalue(which))
    assert not leaks, leaks[:5]


@pytest.mark.parametrize("name", [
    n
    for n in ("block-tucker-psnr40", "lossless", "max-error3")
])
def test_resigned_single_payload_flip_is_format_error_or_volume(streams, name):
    blob, vol = streams[name]
    _, sections = unpack(blob)
    mid = len(blob) - HASH - len(sections[-1]) // 2  # the middle of the entropy-coded section
    for i in range(8):
        _decode_expecting_format_error_or_volume(resign(flip(blob, [mid + i], [i % 8])[:-HASH]), vol)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_resigned_payload_flips_property_no_hang(streams, data):
    name = data.draw(st.sampled_from(sorted(streams)), label="stream")
    blob, vol = streams[name]
    _, h1 = header_span(blob)
    flips = data.draw(st.lists(st.tuples(st.integers(h1, len(blob) - HASH - 1), st.integers(0, 7)),
                               min_size=1, max_size=4), label="flips")
    r = outcome(resign(flip(blob, [p for p, _ in flips], [b for _, b in flips])[:-HASH]), vol.shape, vol.data.dtype)
    assert r != "Hang" and not r.startswith("wrong shape") and not r.startswith("MemoryError"), r


@pytest.mark.parametrize("name", list(MODES))
def test_resigned_section_surgery(streams, name):
    """Sections cut, emptied, swapped or extended — with a consistent table and a valid hash."""
    blob, vol = streams[name]
    header, sections = unpack(blob)
    variants = {
        "extra section": [*sections, b"\0\0\0\0"],
        "missing section": sections[:-1],
        "odd length": [*sections[:-1], sections[-1] + b"\x01"],
        "reversed": sections[::-1],
    }
    for label, secs in variants.items():
        r = outcome(pack(header, secs), vol.shape, vol.data.dtype)
        assert r in ("ok", "FormatError"), (label, r)
    if name.startswith("block-tucker"):  # one section per slab: a stray one is a forgery, not ignored
        assert outcome(pack(header, [*sections, b"\0\0\0\0"]), vol.shape, vol.data.dtype) == "FormatError"


@pytest.mark.parametrize("name", [
    "block-tucker-psnr40", "omlsvd-global-psnr40",
    "lossless",
])
def test_resigned_truncated_last_section(streams, name):
    blob, vol = streams[name]
    header, sections = unpack(blob)
    cut = [*sections[:-1], sections[-1][: len(sections[-1]) // 2 // 4 * 4]]
    _decode_expecting_format_error_or_volume(pack(header, cut), vol)


# ------------------------------------------------------------------------------------------------
# (d) hostile headers (re-signed)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["block-tucker-psnr40", "omlsvd-global-psnr40", "lossless", "float-max-error"])
@pytest.mark.parametrize("shape", [
    [10**6, 10**6, 10**6], [2**31, 1, 1], [2**16, 2**16, 2**16], [2**40, 2**40, 2**40], [-32, 32, 16],
    [0, 32, 16], [32, 32], [32, 32, 16, 1], "32x32x16", None, [32, None, 16], [32, "x", 16],
])
def test_hostile_shape_raises_format_error(streams, name, shape):
    blob, vol = streams[name]
    header, sections = unpack(blob)
    hostile = pack({**header, "shape": shape}, sections)
    with time_limit():
        with pytest.raises(FormatError):
            decompress(hostile)
        with pytest.raises(FormatError):
            read_info(hostile)


def test_infinite_shape_raises_format_error(streams):
    blob, _ = streams["lossless"]
    header, sections = unpack(blob)
    with pytest.raises(FormatError):
        decompress(pack({**header, "shape": [math.inf, 32, 16]}, sections))


@pytest.mark.parametrize("name", [
    "block-tucker-psnr40", "omlsvd-global-psnr40",
    "lossless",
])
def test_inflated_shape_raises_format_error(streams, name):
    blob, vol = streams[name]
    header, sections = unpack(blob)
    _decode_expecting_format_error_or_volume(pack({**header, "shape": [64, 64, 32]}, sections), vol, (64, 64, 32))


@pytest.mark.parametrize("field,value", [
    ("dtype", "<c8"), ("dtype", "zz"), ("dtype", {"a": 1}), ("dtype", "<i8"), ("dtype", "|b1"),
    ("affine", "abc"), ("affine", [[1, 0], [0, 1]]), ("affine", None), ("spacing", [1, 1]),
    ("codec", "zzz"), ("codec", None), ("params", []), ("params", None), ("params", "x"),
])
def test_hostile_header_fields(streams, field, value):
    blob, vol = streams["block-tucker-psnr40"]
    header, sections = unpack(blob)
    with time_limit(), pytest.raises(FormatError):
        decompress(pack({**header, field: value}, sections))


_HOSTILE_PARAMS = {
    "step": ["x", None], "offset": ["x", [1]], "block": [0, 1000, [8, 8], "8", [8, 8, 0]],
    "ranks": [[0, 1, 1], [10**9, 1, 1], "x"], "axes": [[5], "x", None],
}
_PARAMS_OF = {
    "block-tucker-psnr40": ("step", "offset", "block"), "block-tucker-b4-psnr45": ("block",),
    "bpv2": ("step",), "omlsvd-global-psnr40": ("step", "offset", "ranks"),
    "lossless": ("step", "offset", "axes"), "max-error3": ("axes",), "float-max-error": ("step", "offset"),
}


@pytest.mark.parametrize("name,param,value", [
    (name, param, value) for name, params in _PARAMS_OF.items() for param in params
    for value in _HOSTILE_PARAMS[param]
])
def test_hostile_params(streams, name, param, value):
    blob, vol = streams[name]
    header, sections = unpack(blob)
    assert param in header["params"], f"{name} no longer has {param!r}: update _PARAMS_OF"
    r = outcome(pack({**header, "params": {**header["params"], param: value}}, sections), vol.shape, vol.data.dtype)
    assert r in ("ok", "FormatError"), r


@pytest.mark.parametrize("name", ["block-tucker-psnr40", "lossless", "float-max-error"])
@pytest.mark.parametrize("param,value", [("step", math.nan), ("step", math.inf), ("step", 0), ("step", -1e300),
                                         ("offset", math.nan), ("offset", 1e308), ("offset", 10**30)])
def test_hostile_numeric_params_do_not_crash(streams, name, param, value):
    blob, vol = streams[name]
    header, sections = unpack(blob)
    r = outcome(pack({**header, "params": {**header["params"], param: value}}, sections), vol.shape, vol.data.dtype)
    assert r in ("ok", "FormatError"), r


@pytest.mark.parametrize("spacing", [["a", 1, 1], [None, 1, 1], [[1], 1, 1]])
def test_non_numeric_spacing_raises_format_error(streams, spacing):
    blob, _ = streams["lossless"]
    header, sections = unpack(blob)
    with pytest.raises(FormatError):
        decompress(pack({**header, "spacing": spacing}, sections))


@pytest.mark.parametrize("spacing", [[0, 1, 1], [-1.5, 1, 1]])
def test_invalid_spacing_raises_format_error(streams, spacing):
    blob, _ = streams["lossless"]
    header, sections = unpack(blob)
    with pytest.raises(FormatError):
        decompress(pack({**header, "spacing": spacing}, sections))


_BOMB = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from fedtensor.codec import compress, decompress
    from fedtensor.codec.container import pack, unpack
    from fedtensor.errors import FormatError
    from fedtensor.io import Volume
    blob = compress(Volume(np.zeros((32, 32, 16), np.int16)), {kw})
    header, sections = unpack(blob)
    hostile = pack({{**header, "shape": [1024, 1024, 1024]}}, sections)
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    try:
        decompress(hostile)
        print("decoded")
    except FormatError:
        print("FormatError")
    except BaseException as err:
        print(type(err).__name__)
""")


@pytest.mark.parametrize("kw", [pytest.param("psnr=40", marks=pytest.mark.slow), "lossless=True"])
def test_huge_claimed_shape_within_limit_is_rejected_cheaply(kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _BOMB.format(kw=kw)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout.strip().splitlines()[-1:] == ["FormatError"], (proc.stdout[-300:], proc.stderr[-300:])


def test_not_bytes_at_all():
    for junk in (b"", b"FTZ1", b"FTZ1" + bytes(40), os.urandom(64), b"\x89PNG\r\n\x1a\n" + bytes(100)):
        with pytest.raises(FormatError):
            decompress(junk)


def test_header_only_json_edit_is_caught_by_checksum(streams):
    """Editing the JSON without re-signing is always a FormatError (the checksum covers the header)."""
    blob, _ = streams["block-tucker-psnr40"]
    h0, h1 = header_span(blob)
    text = blob[h0:h1].decode()
    edited = text.replace('"shape":[32,32,16]', '"shape":[16,32,32]')
    assert edited != text
    with pytest.raises(FormatError, match="checksum"):
        decompress(blob[:h0] + edited.encode() + blob[h1:])
    json.loads(edited)  # still valid JSON: only the checksum catches it


@pytest.mark.parametrize("param, value", [
    ("step", math.nan), ("step", 0.0), ("step", -1.0), ("step", "1"), ("scale", math.inf), ("scale", 0),
    ("offset", math.nan), ("offset", None), ("step", None),
])
def test_forged_codec_parameters_are_rejected(streams, param, value):
    """Parameters no encoder writes, in a re-signed file, are refused (a NaN step decoded to a constant)."""
    for name in ("block-tucker-psnr40", "omlsvd-global-psnr40", "lossless", "max-error3", "float-max-error"):
        header, sections = unpack(streams[name][0])
        if param not in header["params"]:
            continue
        params = {**header["params"], param: value}
        if value is None:
            del params[param]
        with pytest.raises(FormatError, match="bad .* parameters"):
            decompress(pack({**header, "params": params}, sections))


@pytest.mark.parametrize("param, value", [("step", 1e300), ("step", 2e6), ("offset", 1e40), ("scale", 1e40)])
def test_forged_transform_parameters_beyond_any_encoder_are_rejected(streams, param, value):
    """A huge step (float32 inf on the device: NaN voxels) or an offset or scale outside the volume's
    dtype are refused before decoding."""
    for name in ("block-tucker-psnr40", "omlsvd-global-psnr40"):
        header, sections = unpack(streams[name][0])
        with pytest.raises(FormatError, match="bad .* parameters"):
            decompress(pack({**header, "params": {**header["params"], param: value}}, sections))
        with pytest.raises(FormatError, match="bad .* parameters"):
            read_info(pack({**header, "params": {**header["params"], param: value}}, sections))


@pytest.mark.parametrize("codec", ["block-tucker", "omlsvd-global"])
def test_a_target_below_the_all_zero_stream_writes_a_step_its_readers_accept(ct_crop, codec):
    """At a target every coefficient meets as zero, the search's step may run far beyond any useful one:
    the encoders write at most the decoders' bound (the same, all-zero, stream)."""
    from fedtensor.codec.header import MAX_TRANSFORM_STEP

    blob = compress(ct_crop, psnr=1.0, codec=codec)
    header = read_info(blob)
    assert header["params"]["step"] <= MAX_TRANSFORM_STEP and header["stats"]["psnr"] >= 1.0
    assert decompress(blob).data.shape == ct_crop.shape


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e30, -2.0])
def test_forged_bases_are_refused(streams, value):
    """Bases are orthonormal columns: a re-signed file whose bases hold NaN, inf or entries beyond ±1
    decoded to an all-NaN volume (float) or a constant (integer)."""
    for name in ("block-tucker-psnr40", "omlsvd-global-psnr40"):
        header, sections = unpack(streams[name][0])
        bases = np.frombuffer(sections[0], "<f4").copy()
        bases[len(bases) // 2] = value
        with pytest.raises(FormatError, match="bases are not orthonormal"):
            decompress(pack(header, [bases.astype("<f4").tobytes(), *sections[1:]]))


def test_an_unknown_codec_or_stats_that_are_no_object_are_refused_by_every_reader(streams):
    header, sections = unpack(streams["block-tucker-psnr40"][0])
    for forged, why in (({**header, "codec": "zzz"}, "unknown codec 'zzz'"), ({**header, "stats": "x"}, "bad stats"),
                        ({**header, "stats": [1, 2]}, "bad stats"), ({**header, "extra": _nested(500)}, "too deeply")):
        blob = _signed(forged, sections)
        for reader in (decompress, read_info):
            with pytest.raises(FormatError, match=why):
                reader(blob)


def _signed(header: dict, sections: list[bytes]) -> bytes:
    """A re-signed file of ``header`` as given (:func:`pack` would recurse into a deep one)."""
    raw = json.dumps({**header, "sections": [len(x) for x in sections]}).encode()
    body = struct.pack("<4sHI", b"FTZ1", FORMAT_VERSION, len(raw)) + raw + b"".join(sections)
    return body + hashlib.sha256(body).digest()


def _nested(depth: int):
    x = 0
    for _ in range(depth):
        x = [x]
    return x


@pytest.mark.parametrize("dtype, value", [("<i2", 40000), ("|u1", -1), ("|u1", 1.5), ("<f4", math.inf),
                                          ("<i2", "3"), ("<i2", [1])])
def test_forged_constant_that_its_dtype_cannot_hold_is_rejected(dtype, value):
    blob = compress(Volume(np.full((4, 5, 6), 7, np.dtype(dtype)), (1, 1, 1), np.eye(4)))
    header, sections = unpack(blob)
    assert header["codec"] == "constant"
    with pytest.raises(FormatError, match="bad constant parameters"):
        decompress(pack({**header, "params": {"value": value}}, sections))


def test_a_forged_block_that_pads_a_thin_volume_many_fold_is_refused_before_decoding():
    # a 64-side on a 1-voxel axis: a 49 KB stream of a 1×2048×2048 volume took 4.6 GB to decode
    from fedtensor.bench.memory import measure_peak_rss
    from fedtensor.codec.parallel import encode_group

    n, b = 512, (64, 64, 64)
    grid = (1, n // 64, n // 64)
    sections = [np.concatenate([np.eye(64, dtype="<f4").ravel()] * 3).tobytes(),
                *encode_group([grid], b, [np.zeros((*grid, *b), np.int32)])]
    header = {"codec": "block-tucker", "dtype": "|u1", "shape": [1, n, n], "spacing": [1, 1, 1],
              "affine": np.eye(4).tolist(), "params": {"block": list(b), "slab": 64, "offset": 0.0, "scale": 6.0,
                                                         "step": 0.4}}
    blob = pack(header, sections)

    def refused():
        with pytest.raises(FormatError, match="block shape"):
            decompress(blob)

    assert measure_peak_rss(refused).extra_bytes < 20e6  # 64 × 256 KB padded: ~190 MB decoded
