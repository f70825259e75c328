"""The ``.ftz`` container.

Layout: ``b"FTZ1"`` · u16 format version · u32 header length · UTF-8 JSON header (strict JSON: a
non-finite figure in ``"stats"``, e.g. an exact stream's PSNR, is the string ``"inf"``) · payload sections
(lengths listed in the header's ``"sections"``) · 32-byte SHA-256 of everything before it. All integers
are little-endian. Readers check magic, version, lengths and hash before any decoding.
"""

from __future__ import annotations

import hashlib
import json
import struct

from fedtensor.errors import FormatError
from fedtensor.jsonable import jsonable

MAGIC = b"FTZ1"
FORMAT_VERSION = 2  # 2: block-tucker coded in slabs along axis 0, categorical chunk coding
#: Version 1 (pre-release builds) coded coefficients with another entropy coder: not readable.
MIN_READABLE_VERSION = 2
_PREFIX = struct.Struct("<4sHI")
_HASH_BYTES = 32
MAX_HEADER_BYTES = 16 << 20


def pack(header: dict, sections: list[bytes]) -> bytes:
    """Serialise ``header`` (JSON-able) and payload ``sections`` into one ``.ftz`` byte string."""
    # strict JSON: Python's Infinity is an extension strict parsers refuse
    header = {**jsonable(header), "sections": [len(s) for s in sections]}
    blob = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    body = b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(blob)), blob, *sections])
    return body + hashlib.sha256(body).digest()


def unpack(data: bytes) -> tuple[dict, list[bytes]]:
    """Validate and split a ``.ftz`` byte string; raises :class:`FormatError` with a one-line reason."""
    data = bytes(data)
    if len(data) < _PREFIX.size or data[:4] != MAGIC:
        raise FormatError("not a .ftz file (bad magic number)")
    if len(data) < _PREFIX.size + _HASH_BYTES:
        raise FormatError("truncated .ftz file")
    _, version, header_len = _PREFIX.unpack_from(data)
    if version > FORMAT_VERSION:
        raise FormatError(f"file uses .ftz format version {version}; this fedtensor reads up to {FORMAT_VERSION}, please upgrade")
    if version < 1:
        raise FormatError(f"invalid .ftz format version {version}")
    if version < MIN_READABLE_VERSION:
        raise FormatError(f"file uses .ftz format version {version} of a pre-release fedtensor, which this "
                          "version cannot read; compress the original again")
    if hashlib.sha256(data[:-_HASH_BYTES]).digest() != data[-_HASH_BYTES:]:
        if header_len > len(data) - _PREFIX.size - _HASH_BYTES:
            raise FormatError("truncated .ftz file")
        raise FormatError("checksum mismatch: the .ftz file is corrupted or truncated")
    end = _PREFIX.size + header_len
    if header_len > MAX_HEADER_BYTES or end > len(data) - _HASH_BYTES:
        raise FormatError("corrupted .ftz header length")
    try:
        header = json.loads(data[_PREFIX.size:end].decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FormatError(f"corrupted .ftz header: {err.__class__.__name__}") from None
    lengths = header.get("sections") if isinstance(header, dict) else None
    if not isinstance(lengths, list) or not all(isinstance(n, int) and n >= 0 for n in lengths):
        raise FormatError("corrupted .ftz header: bad section table")
    if end + sum(lengths) != len(data) - _HASH_BYTES:
        raise FormatError("corrupted .ftz file: section lengths do not match the file size")
    stats = header.get("stats")
    if isinstance(stats, dict):  # its non-finite figures (an exact stream's PSNR) are written as strings
        header["stats"] = {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in stats.items()}
    sections, pos = [], end
    for n in lengths:
        sections.append(data[pos:pos + n])
        pos += n
    return header, sections
