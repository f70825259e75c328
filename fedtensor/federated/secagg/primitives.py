"""The cryptographic building blocks, all from ``cryptography`` (OpenSSL):

* key agreement: X25519; every shared secret goes through HKDF-SHA256 with a label that names its use,
  the protocol version, the round id and the two client ids (domain separation);
* authenticated encryption of the Shamir shares: AES-256-GCM, 96-bit random nonce, associated data
  binding (round id, sender, recipient); the key is specific to the round and to the direction
  sender → recipient, so every key encrypts exactly one message;
* the mask PRG: AES-128-CTR keystream from counter block 0, read as little-endian uint32 words, keyed
  by a 128-bit HKDF output (128-bit security, like X25519; ~30 % faster than AES-256 here).
  :func:`add_masks` expands many seeds at once in cache-sized chunks and adds/subtracts the words into an
  accumulator in place (numpy uint32 arithmetic wraps mod 2^32);
* :class:`RandomSource`: ``os.urandom``, or — for reproducible tests only — a seeded ChaCha20 DRBG.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedtensor.federated.secagg.errors import SecAggMessageError

PROTOCOL = b"fedtensor-secagg-v1"
KEY_BYTES = 32  # X25519 public/private keys, b_u, AES-256-GCM keys
PRG_KEY_BYTES = 16  # AES-128-CTR mask keys
NONCE_BYTES = 12
COMMITMENT_BYTES = 32  # SHA-256 of b_u (see seed_commitment)
TAG_BYTES = 16
MAX_CLIENT_ID = (1 << 31) - 1
MAX_ROUND_ID = (1 << 63) - 1

WORD = np.dtype("<u4")  # one coordinate of Z_2^32
CHUNK_WORDS = 1 << 15  # 128 KiB of keystream per call: stays in L2 with the accumulator slice
_ZERO_IV = bytes(16)


# --------------------------------------------------------------------------------------------------
# randomness
# --------------------------------------------------------------------------------------------------


class RandomSource:
    """Callable ``rng(n) -> n random bytes``.

    ``RandomSource()`` uses ``os.urandom``. ``RandomSource(seed=..., label=...)`` is a deterministic
    ChaCha20 stream keyed by SHA-256(seed, label): **for reproducible tests and simulations only** —
    anyone who knows the seed knows every key and mask.
    """

    def __init__(self, seed: bytes | int | str | None = None, label: bytes | str = b""):
        self.deterministic = seed is not None
        self._enc = None
        if seed is not None:
            if isinstance(seed, int):
                seed = seed.to_bytes((seed.bit_length() + 8) // 8, "little", signed=True)
            if isinstance(seed, str):
                seed = seed.encode()
            if isinstance(label, str):
                label = label.encode()
            h = hashlib.sha256()
            for part in (PROTOCOL, b"drbg", seed, label):
                h.update(len(part).to_bytes(4, "little") + part)
            self._enc = Cipher(algorithms.ChaCha20(h.digest(), bytes(16)), None).encryptor()

    def __call__(self, n: int) -> bytes:
        if self._enc is None:
            return os.urandom(n)
        return self._enc.update(bytes(n))


# --------------------------------------------------------------------------------------------------
# key agreement and key derivation
# --------------------------------------------------------------------------------------------------


def generate_keypair(rng: RandomSource) -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: (private key, 32-byte raw public key)."""
    sk = X25519PrivateKey.from_private_bytes(rng(KEY_BYTES))
    return sk, sk.public_key().public_bytes_raw()


def private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes_raw()


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes_raw()


_FIELD_P = (1 << 255) - 19


def agree(sk: X25519PrivateKey, peer_public: bytes, peer: int) -> bytes:
    """Raw X25519 shared secret with ``peer``'s public key (rejects malformed / low-order keys, and
    non-canonical encodings: X25519 ignores the top bit and reduces mod 2^255 − 19, so one key has other
    byte strings, which would slip past the comparisons of keys as bytes)."""
    if len(peer_public) == 32 and int.from_bytes(peer_public, "little") >= _FIELD_P:
        raise SecAggMessageError(f"invalid X25519 public key of client {peer}: not canonically encoded")
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggMessageError(f"invalid X25519 public key of client {peer}: {exc}") from None


def check_public_key(peer_public: bytes, peer: int) -> None:
    """Raise :class:`SecAggMessageError` unless ``peer_public`` is a key every client can agree with (a
    trial exchange: X25519 refuses low-order points, whose shared secret would be all zeros)."""
    agree(X25519PrivateKey.generate(), peer_public, peer)


def _hkdf(ikm: bytes, label: bytes, *context: int, length: int = KEY_BYTES) -> bytes:
    info = PROTOCOL + b"|" + label + b"|" + struct.pack(f"<{len(context)}Q", *context)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def share_key(shared: bytes, round_id: int, sender: int, recipient: int) -> bytes:
    """AES-256-GCM key for the shares sender → recipient (direction-specific)."""
    return _hkdf(shared, b"share-encryption", round_id, sender, recipient)


def share_ad(round_id: int, sender: int, recipient: int) -> bytes:
    """Associated data of a share ciphertext: binds it to (protocol, round, sender, recipient)."""
    return PROTOCOL + b"|share|" + struct.pack("<QQQ", round_id, sender, recipient)


def pairwise_seed(shared: bytes, round_id: int, u: int, v: int) -> bytes:
    """PRG key s_uv of the pairwise mask between u and v (symmetric in u, v)."""
    return _hkdf(shared, b"pairwise-mask", round_id, min(u, v), max(u, v), length=PRG_KEY_BYTES)


def self_mask_seed(b: bytes, round_id: int) -> bytes:
    """PRG key of the self mask, derived from the shared-out 32-byte secret b_u."""
    return _hkdf(b, b"self-mask", round_id, length=PRG_KEY_BYTES)


def seed_commitment(b: bytes, round_id: int, owner: int) -> bytes:
    """SHA-256 commitment to client ``owner``'s secret b_u (256 random bits: the hash reveals nothing of
    it, and a different b_u cannot match it)."""
    return hashlib.sha256(PROTOCOL + b"|b-commitment|" + struct.pack("<2Q", round_id, owner) + b).digest()


def encrypt_share(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return AESGCM(key).encrypt(nonce, plaintext, ad)


def decrypt_share(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes, sender: int) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, ad)
    except InvalidTag:
        raise SecAggMessageError(
            f"share ciphertext from client {sender} failed AES-GCM authentication (tampered, or not for this pair/round)"
        ) from None


# --------------------------------------------------------------------------------------------------
# mask PRG
# --------------------------------------------------------------------------------------------------


def _keystream(seed: bytes):
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()


def prg_words(seed: bytes, n: int) -> np.ndarray:
    """PRG(seed) as ``n`` uint32 words: the AES-128-CTR keystream (counter block 0), little-endian."""
    return np.frombuffer(_keystream(seed).update(bytes(4 * n)), dtype=WORD).copy()


def add_masks(acc: np.ndarray, plus: Sequence[bytes] = (), minus: Sequence[bytes] = (), chunk_words: int = CHUNK_WORDS) -> None:
    """``acc += Σ_{k∈plus} PRG(k) − Σ_{k∈minus} PRG(k)`` (mod 2^32), in place.

    All keystreams advance together, chunk by chunk: each chunk of keystream is written into one reused
    buffer (``update_into``, no allocation) and folded into the matching accumulator slice while both are
    still in cache. Equivalent to, but ~1.5–2× faster than, expanding each seed over the whole vector.
    """
    if acc.dtype != WORD or acc.ndim != 1 or not acc.flags.writeable:
        raise TypeError("accumulator must be a writeable 1-D little-endian uint32 array")
    streams = [(_keystream(k), np.add) for k in plus] + [(_keystream(k), np.subtract) for k in minus]
    if not streams or acc.size == 0:
        return
    chunk = max(1, min(chunk_words, acc.size))
    zeros = bytes(4 * chunk)
    buf = bytearray(4 * chunk + 15)  # update_into wants len(data) + block_size - 1
    words = np.frombuffer(buf, dtype=WORD, count=chunk)
    for start in range(0, acc.size, chunk):
        n = min(chunk, acc.size - start)
        seg = acc[start : start + n]
        src = zeros if n == chunk else zeros[: 4 * n]
        w = words if n == chunk else words[:n]
        for enc, op in streams:
            enc.update_into(src, buf)
            op(seg, w, out=seg)
