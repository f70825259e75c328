"""The ``.ftz`` container: layout, round trip, and every validation ``unpack`` promises."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtensor.codec.container import FORMAT_VERSION, MAGIC, MAX_HEADER_BYTES, pack, unpack
from fedtensor.errors import FedtensorError, FormatError

PREFIX = struct.Struct("<4sHI")
HASH = 32

HEADER = {"shape": [3, 4, 5], "dtype": "<i2", "codec": "lossless", "params": {"axes": [0, 1], "offset": -7}}
SECTIONS = [b"\x00\x01\x02\x03", b"", b"payload bytes" * 7]


def _sign(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def _build(header_bytes: bytes, payload: bytes = b"", *, version: int = FORMAT_VERSION,
           magic: bytes = MAGIC, header_len: int | None = None) -> bytes:
    """A hand-made container with a *valid* SHA-256 trailer (so only the checks after it can fail)."""
    n = len(header_bytes) if header_len is None else header_len
    return _sign(PREFIX.pack(magic, version, n) + header_bytes + payload)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.fixture(scope="module")
def blob() -> bytes:
    return pack(HEADER, SECTIONS)


# ------------------------------------------------------------------------------------------------
# Layout and round trip
# ------------------------------------------------------------------------------------------------


def test_layout_matches_the_documented_format(blob):
    magic, version, header_len = PREFIX.unpack_from(blob)
    assert magic == MAGIC == b"FTZ1"
    assert version == 2 and FORMAT_VERSION == 3  # 3 only for a header with "scaling"
    assert PREFIX.unpack_from(pack({**HEADER, "scaling": {}}, SECTIONS))[1] == 3
    header = json.loads(blob[PREFIX.size:PREFIX.size + header_len].decode("utf-8"))
    assert header["sections"] == [len(s) for s in SECTIONS]
    payload = blob[PREFIX.size + header_len:-HASH]
    assert payload == b"".join(SECTIONS)
    assert blob[-HASH:] == hashlib.sha256(blob[:-HASH]).digest()


def test_round_trip(blob):
    header, sections = unpack(blob)
    assert sections == SECTIONS
    assert {k: v for k, v in header.items() if k != "sections"} == HEADER
    assert header["sections"] == [4, 0, len(SECTIONS[2])]


def test_pack_does_not_mutate_header_and_is_deterministic():
    h = {"b": 1, "a": [1, 2]}
    first = pack(h, [b"x"])
    assert h == {"b": 1, "a": [1, 2]}
    assert pack(dict(reversed(list(h.items()))), [b"x"]) == first


def test_no_sections_and_bytes_like_inputs(blob):
    header, sections = unpack(pack({"k": "v"}, []))
    assert sections == [] and header["k"] == "v"
    assert unpack(bytearray(blob))[1] == SECTIONS
    assert unpack(memoryview(blob))[1] == SECTIONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(
    header=st.dictionaries(st.text(max_size=6).filter(lambda k: k != "sections"), json_values, max_size=5),
    sections=st.lists(st.binary(max_size=64), max_size=5),
)
def test_round_trip_property(header, sections):
    h, s = unpack(pack(header, sections))
    assert s == sections
    assert {k: v for k, v in h.items() if k != "sections"} == header


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("magic", [b"FTZ0", b"ftz1", b"\x00\x00\x00\x00", b"PK\x03\x04", b"\x89HDF"])
def test_bad_magic(blob, magic):
    with pytest.raises(FormatError, match="magic"):
        unpack(magic + blob[4:])


def test_not_a_ftz_file_at_all():
    for data in (b"", b"F", b"FTZ", b"hello world, definitely not a container", bytes(100)):
        with pytest.raises(FormatError):
            unpack(data)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 7, 0xFFFF])
def test_future_version_asks_for_an_upgrade(blob, version):
    """A file written by a newer fedtensor (its checksum vouches for the version) asks for an upgrade; a
    version field the checksum does not vouch for may be the damage itself, and the message says both."""
    future = blob[:4] + struct.pack("<H", version) + blob[6:]
    with pytest.raises(FormatError, match="upgrade") as err:
        unpack(_sign(future[:-HASH]))
    assert str(version) in str(err.value)
    with pytest.raises(FormatError, match=f"corrupted .*or written by a newer fedtensor \\(format version {version}\\)"):
        unpack(future)


def test_a_truncated_start_of_a_file_is_truncated_not_foreign(blob):
    for n in range(1, 42):
        with pytest.raises(FormatError, match="truncated"):
            unpack(blob[:n])


def test_version_zero_is_rejected(blob):
    with pytest.raises(FormatError):
        unpack(_sign(blob[:4] + struct.pack("<H", 0) + blob[6:-HASH]))


def test_every_truncation_raises_format_error(blob):
    assert len(blob) < 600  # keep this exhaustive
    for n in range(len(blob)):
        with pytest.raises(FormatError):
            unpack(blob[:n])


def test_appended_garbage_raises_format_error(blob):
    for extra in (b"\x00", b"junk", blob[-HASH:]):
        with pytest.raises(FormatError):
            unpack(blob + extra)


@pytest.mark.parametrize("where", ["hash", "payload", "header", "length"])
def test_bad_hash(blob, where):
    pos = {"hash": len(blob) - 1, "payload": len(blob) - HASH - 3, "header": PREFIX.size + 2, "length": 6}[where]
    bad = bytearray(blob)
    bad[pos] ^= 0x10
    with pytest.raises(FormatError):
        unpack(bytes(bad))
    if where in ("hash", "payload", "header"):
        with pytest.raises(FormatError, match="checksum"):
            unpack(bytes(bad))


def test_zeroed_hash(blob):
    with pytest.raises(FormatError, match="checksum"):
        unpack(blob[:-HASH] + bytes(HASH))


@pytest.mark.parametrize("delta", [-5, -1, 1, 13])
def test_section_length_mismatch(delta):
    header = _json({"sections": [10, 20]})
    payload = bytes(30 + delta) if delta > -30 else b""
    with pytest.raises(FormatError, match="section"):
        unpack(_build(header, payload))


def test_consistent_section_table_with_valid_hash_is_accepted():
    header, sections = unpack(_build(_json({"sections": [3, 0, 2]}), b"abcde"))
    assert sections == [b"abc", b"", b"de"]


@pytest.mark.parametrize("table", [None, 3, "3", [-1, 4], [1.5], ["1"], [None], {"a": 1}])
def test_bad_section_table(table):
    obj = {} if table is None else {"sections": table}
    with pytest.raises(FormatError, match="section"):
        unpack(_build(_json(obj), b"abc"))


@pytest.mark.parametrize("header_len", [10**6, 2**32 - 1, MAX_HEADER_BYTES + 1])
def test_header_length_beyond_the_file(header_len):
    with pytest.raises(FormatError):
        unpack(_build(_json({"sections": []}), header_len=header_len))


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00", b"{not json", b"", b"{\"sections\": [1, 2",
                                 b"{\"sections\": [], \"x\": " + b"9" * 5000 + b"}"])  # int() refuses > 4300 digits
def test_header_not_utf8_json(raw):
    with pytest.raises(FormatError, match="header"):
        unpack(_build(raw))


@pytest.mark.parametrize("obj", [[1, 2], "text", 3, None])
def test_header_not_an_object(obj):
    with pytest.raises(FormatError):
        unpack(_build(_json(obj)))


def test_header_length_shorter_than_the_json():
    raw = _json({"sections": []})
    with pytest.raises(FormatError):
        unpack(_build(raw, header_len=len(raw) - 3))


def test_deeply_nested_header_raises_format_error():
    raw = b'{"sections": [], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(FormatError):
        unpack(_build(raw))


def test_errors_are_fedtensor_errors_with_one_line_messages(blob):
    for bad in (b"", b"XXXX" + blob[4:], blob[:-1], blob[:4] + b"\x09\x00" + blob[6:]):
        with pytest.raises(FedtensorError) as err:
            unpack(bad)
        assert "\n" not in str(err.value) and str(err.value)


def test_header_is_strict_json_and_non_finite_stats_round_trip():
    """An exact stream's PSNR is infinite: written as the string "inf" (JSON has no Infinity), read back as
    the float; headers written before that (with Python's Infinity extension) still read."""
    import math

    header = {**HEADER, "stats": {"psnr": math.inf, "max_abs_error": 0.0, "other": math.nan}}
    data = pack(header, SECTIONS)
    raw = data[PREFIX.size:PREFIX.size + PREFIX.unpack_from(data)[2]].decode()

    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    assert json.loads(raw, parse_constant=refuse)["stats"]["psnr"] == "inf"  # what a strict parser sees
    stats = unpack(data)[0]["stats"]
    assert stats["psnr"] == math.inf and stats["max_abs_error"] == 0.0 and math.isnan(stats["other"])
    old = json.dumps({**header, "sections": [len(s) for s in SECTIONS]}, sort_keys=True).encode()
    assert "Infinity" in old.decode()
    assert unpack(_build(old, b"".join(SECTIONS)))[0]["stats"]["psnr"] == math.inf


def test_a_header_string_that_is_no_text_is_refused():
    # "\ud800" (a lone surrogate) is valid JSON; `fedtensor info` failed printing it
    with pytest.raises(FormatError, match="corrupted .ftz header"):
        unpack(_build(b'{"sections": [], "modality": "\\ud800"}'))
