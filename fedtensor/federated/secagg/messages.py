"""The protocol messages: frozen dataclasses of ints, bytes and tuples, plus a canonical byte encoding
(:func:`encode` / :func:`decode`) for any transport (Flower ``bytes`` config entries, gRPC, files).

Client → server: :class:`AdvertiseKeys` (round 0), :class:`ShareKeys` (round 1), :class:`MaskedInput`
(round 2), :class:`UnmaskResponse` (round 3).
Server → client: :class:`KeyBroadcast` (after round 0), :class:`ShareForward` (after round 1, one per
client), :class:`UnmaskRequest` (after round 2).

Every message carries the ``round_id``; every client message its ``sender``. The encoding is
``b"FSA2" | type tag | fields``: ints as 8-byte little-endian, bytes and tuples length-prefixed (4 bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

from fedtensor.federated.secagg.errors import SecAggMessageError


@dataclass(frozen=True)
class AdvertiseKeys:
    """Round 0, client → server: the client's two fresh X25519 public keys."""

    round_id: int
    sender: int
    c_public: bytes  # for the share-encryption channel
    s_public: bytes  # for the pairwise-mask agreement


@dataclass(frozen=True)
class KeyBroadcast:
    """After round 0, server → all: the public keys of every client in U1 (sorted by id)."""

    round_id: int
    threshold: int
    clients: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True)
class EncryptedShare:
    """AES-GCM encryption, from ``sender`` to ``recipient``, of the sender's shares of (b, s-key).

    The header fields are in clear for routing and clear error messages; they are also authenticated,
    because the recipient decrypts with associated data built from *its own* expectations."""

    round_id: int
    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes


@dataclass(frozen=True)
class ShareKeys:
    """Round 1, client → server: a commitment to b_u (so that corrupted b-shares cannot pass unnoticed when
    only t clients answer the unmasking) and one encrypted share pair for every other client of U1."""

    round_id: int
    sender: int
    b_commitment: bytes
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class ShareForward:
    """After round 1, server → one client: U2 and the share ciphertexts addressed to it."""

    round_id: int
    recipient: int
    participants: tuple[int, ...]  # U2, sorted
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class MaskedInput:
    """Round 2, client → server: y_u = x_u + PRG(b_u) + Σ_v ±PRG(s_uv) as little-endian uint32."""

    round_id: int
    sender: int
    data: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """After round 2, server → U3: who survived (reveal b-shares) and who dropped (reveal s-key shares)."""

    round_id: int
    survivors: tuple[int, ...]  # U3
    dropped: tuple[int, ...]  # U2 \ U3


@dataclass(frozen=True)
class RevealedShare:
    """A decrypted Shamir share of ``owner``'s secret, held by the responding client."""

    owner: int
    share: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    """Round 3, client → server: b-shares of the survivors, s-key shares of the dropped — never both."""

    round_id: int
    sender: int
    b_shares: tuple[RevealedShare, ...]
    s_shares: tuple[RevealedShare, ...]


Message = (
    AdvertiseKeys | KeyBroadcast | EncryptedShare | ShareKeys | ShareForward
    | MaskedInput | UnmaskRequest | RevealedShare | UnmaskResponse
)

_MAGIC = b"FSA2"  # 2: ShareKeys carries the commitment to b_u
_TYPES: tuple[type, ...] = (
    AdvertiseKeys, KeyBroadcast, EncryptedShare, ShareKeys, ShareForward,
    MaskedInput, UnmaskRequest, RevealedShare, UnmaskResponse,
)  # fmt: skip
_TAG = {cls: i + 1 for i, cls in enumerate(_TYPES)}
# field kinds: "i" int, "b" bytes, "I" tuple of ints, or a message class for a tuple of that class
_SCHEMA: dict[type, tuple[tuple[str, object], ...]] = {
    AdvertiseKeys: (("round_id", "i"), ("sender", "i"), ("c_public", "b"), ("s_public", "b")),
    KeyBroadcast: (("round_id", "i"), ("threshold", "i"), ("clients", AdvertiseKeys)),
    EncryptedShare: (("round_id", "i"), ("sender", "i"), ("recipient", "i"), ("nonce", "b"), ("ciphertext", "b")),
    ShareKeys: (("round_id", "i"), ("sender", "i"), ("b_commitment", "b"), ("shares", EncryptedShare)),
    ShareForward: (("round_id", "i"), ("recipient", "i"), ("participants", "I"), ("shares", EncryptedShare)),
    MaskedInput: (("round_id", "i"), ("sender", "i"), ("data", "b")),
    UnmaskRequest: (("round_id", "i"), ("survivors", "I"), ("dropped", "I")),
    RevealedShare: (("owner", "i"), ("share", "b")),
    UnmaskResponse: (("round_id", "i"), ("sender", "i"), ("b_shares", RevealedShare), ("s_shares", RevealedShare)),
}
assert all(tuple(f.name for f in fields(c)) == tuple(n for n, _ in s) for c, s in _SCHEMA.items())


def _enc_body(msg, out: list) -> None:
    for name, kind in _SCHEMA[type(msg)]:
        v = getattr(msg, name)
        if kind == "i":
            out.append(struct.pack("<q", v))
        elif kind == "b":
            out.append(struct.pack("<I", len(v)))
            out.append(bytes(v))
        elif kind == "I":
            out.append(struct.pack(f"<I{len(v)}q", len(v), *v))
        else:
            out.append(struct.pack("<I", len(v)))
            for item in v:
                if type(item) is not kind:
                    raise TypeError(f"{type(msg).__name__}.{name} must hold {kind.__name__}")
                _enc_body(item, out)


def encode(msg: Message) -> bytes:
    """Canonical bytes of a message."""
    if type(msg) not in _TAG:
        raise TypeError(f"not a secure-aggregation message: {type(msg).__name__}")
    out = [_MAGIC, bytes([_TAG[type(msg)]])]
    _enc_body(msg, out)
    return b"".join(out)


def wire_size(msg: Message) -> int:
    """Bytes of :func:`encode` (msg), computed without building them."""
    n = 0 if type(msg) not in _TAG else 5

    def body(m) -> int:
        s = 0
        for name, kind in _SCHEMA[type(m)]:
            v = getattr(m, name)
            if kind == "i":
                s += 8
            elif kind == "b":
                s += 4 + len(v)
            elif kind == "I":
                s += 4 + 8 * len(v)
            else:
                s += 4 + sum(body(item) for item in v)
        return s

    return n + body(msg)


class _Reader:
    def __init__(self, data: bytes):
        self.mv = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.mv):
            raise SecAggMessageError("malformed secure-aggregation message (truncated)")
        v = self.mv[self.pos : self.pos + n]
        self.pos += n
        return v

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]


def _dec_body(cls: type, r: _Reader):
    vals = []
    for _, kind in _SCHEMA[cls]:
        if kind == "i":
            vals.append(struct.unpack("<q", r.take(8))[0])
        elif kind == "b":
            vals.append(bytes(r.take(r.u32())))
        elif kind == "I":
            n = r.u32()
            vals.append(tuple(struct.unpack(f"<{n}q", r.take(8 * n))))
        else:
            vals.append(tuple(_dec_body(kind, r) for _ in range(r.u32())))
    return cls(*vals)


def decode(data: bytes) -> Message:
    """Parse :func:`encode` output; raises :class:`SecAggMessageError` on anything malformed."""
    r = _Reader(data)
    magic = bytes(r.take(4))
    if magic == b"FSA1":
        raise SecAggMessageError("secure-aggregation message of format 1 (an older fedtensor); this one speaks "
                                 "format 2: update every party")
    if magic != _MAGIC:
        raise SecAggMessageError("not a secure-aggregation message (bad magic)")
    tag = r.take(1)[0]
    if not 1 <= tag <= len(_TYPES):
        raise SecAggMessageError(f"unknown secure-aggregation message type {tag}")
    msg = _dec_body(_TYPES[tag - 1], r)
    if r.pos != len(r.mv):
        raise SecAggMessageError("malformed secure-aggregation message (trailing bytes)")
    return msg
