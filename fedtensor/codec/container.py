"""The ``.ftz`` container.

Layout: ``b"FTZ1"`` · u16 format version · u32 header length · UTF-8 JSON header (strict JSON: a
non-finite figure in ``"stats"``, e.g. an exact stream's PSNR, is the string ``"inf"``) · payload sections
(lengths listed in the header's ``"sections"``) · 32-byte SHA-256 of everything before it. All integers
are little-endian. Readers check magic, version, lengths and hash before any decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

from fedtensor.errors import FormatError
from fedtensor.jsonable import jsonable

MAGIC = b"FTZ1"
#: The newest version this writes and reads. 2: block-tucker coded in slabs along axis 0, categorical
#: chunk coding; 3: the same, with scaled integers (a header ``"scaling"``). A stream carries the lowest
#: version that decodes it right: a reader of version 2 would return the integers unscaled.
FORMAT_VERSION = 3
_SCALING_VERSION = 3
#: Version 1 (pre-release builds) coded coefficients with another entropy coder: not readable.
MIN_READABLE_VERSION = 2
_PREFIX = struct.Struct("<4sHI")
_HASH_BYTES = 32
MAX_HEADER_BYTES = 16 << 20


#: Nesting a header may have: fedtensor writes a few levels; a forged one hundreds deep would exhaust
#: the stack of whatever walks it next (a table of it, a copy).
MAX_HEADER_DEPTH = 32


def _depth(value) -> int:
    """Nesting depth of parsed JSON (a scalar: 0), without recursion."""
    deepest, level = 0, [(value, 0)]
    while level:
        v, d = level.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d + 1)
            level.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def pack(header: dict, sections: list[bytes]) -> bytes:
    """Serialise ``header`` (JSON-able) and payload ``sections`` into one ``.ftz`` byte string."""
    # strict JSON: Python's Infinity is an extension strict parsers refuse
    header = {**jsonable(header), "sections": [len(s) for s in sections]}
    blob = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    version = _SCALING_VERSION if "scaling" in header else MIN_READABLE_VERSION
    body = b"".join([_PREFIX.pack(MAGIC, version, len(blob)), blob, *sections])
    return body + hashlib.sha256(body).digest()


def unpack(data: bytes) -> tuple[dict, list[bytes]]:
    """Validate and split a ``.ftz`` byte string; raises :class:`FormatError` with a one-line reason."""
    if isinstance(data, (str, os.PathLike)):
        raise FormatError(f"expected the .ftz file's bytes, got a path ({data!s}): read it with Path(…).read_bytes()")
    try:
        data = bytes(memoryview(data))
    except TypeError:
        raise FormatError(f"expected the .ftz file's bytes, got {type(data).__name__}") from None
    if not data or data[:4] != MAGIC[:len(data)]:
        raise FormatError("not a .ftz file (bad magic number)")
    if len(data) < _PREFIX.size + _HASH_BYTES:
        raise FormatError("truncated .ftz file")
    _, version, header_len = _PREFIX.unpack_from(data)
    intact = hashlib.sha256(data[:-_HASH_BYTES]).digest() == data[-_HASH_BYTES:]
    # A version the checksum vouches for is the writer's; else the version field may be the damage.
    if version > FORMAT_VERSION and intact:
        raise FormatError(f"file uses .ftz format version {version}; this fedtensor reads up to {FORMAT_VERSION}, please upgrade")
    if not intact:
        newer = f", or written by a newer fedtensor (format version {version})" if version > FORMAT_VERSION else ""
        if header_len > len(data) - _PREFIX.size - _HASH_BYTES:
            raise FormatError(f"truncated or corrupted .ftz file{newer}")
        raise FormatError(f"checksum mismatch: the .ftz file is corrupted or truncated{newer}")
    if version < 1:
        raise FormatError(f"invalid .ftz format version {version}")
    if version < MIN_READABLE_VERSION:
        raise FormatError(f"file uses .ftz format version {version} of a pre-release fedtensor, which this "
                          "version cannot read; compress the original again")
    end = _PREFIX.size + header_len
    if header_len > MAX_HEADER_BYTES or end > len(data) - _HASH_BYTES:
        raise FormatError("corrupted .ftz header length")
    try:
        header = json.loads(data[_PREFIX.size:end].decode())  # (Infinity too: early streams' stats hold it)
        # "\ud800" is valid JSON but no text: printing it (fedtensor info) failed in the middle
        json.dumps(header, ensure_ascii=False).encode()
    except (UnicodeError, ValueError, RecursionError) as err:  # ValueError: JSON, or an int of > 4300 digits
        raise FormatError(f"corrupted .ftz header: {err.__class__.__name__}") from None
    lengths = header.get("sections") if isinstance(header, dict) else None
    if not isinstance(lengths, list) or not all(isinstance(n, int) and n >= 0 for n in lengths):
        raise FormatError("corrupted .ftz header: bad section table")
    if end + sum(lengths) != len(data) - _HASH_BYTES:
        raise FormatError("corrupted .ftz file: section lengths do not match the file size")
    if "scaling" in header and version < _SCALING_VERSION:
        raise FormatError("corrupted .ftz header: scaling in a version 2 stream")
    if _depth(header) > MAX_HEADER_DEPTH:
        raise FormatError("corrupted .ftz header: nested too deeply")
    stats = header.get("stats", {})
    if not isinstance(stats, dict):
        raise FormatError("corrupted .ftz header: bad stats")
    if "stats" in header:  # its non-finite figures (an exact stream's PSNR) are written as strings
        header["stats"] = {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in stats.items()}
    sections, pos = [], end
    for n in lengths:
        sections.append(data[pos:pos + n])
        pos += n
    return header, sections
