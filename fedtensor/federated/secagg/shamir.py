"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(p), p = 2^127 − 1.

A 32-byte secret is cut into three chunks of 15, 15 and 2 bytes; each chunk (< 2^120 < p) is one field
element and is shared with its own random polynomial of degree t − 1 (the same evaluation points). A
share for the party with id ``x`` (the evaluation point, 1 ≤ x < p) is therefore three field elements,
written as 3 × 16 little-endian bytes = :data:`SHARE_BYTES` bytes.

Any ``t`` shares determine the secret (Lagrange interpolation at 0); ``t − 1`` shares are independent
of it (information-theoretic). When more than ``t`` shares are supplied, :func:`combine` interpolates
from the first ``t`` and checks that every other share lies on the same polynomial, so a corrupted
share is detected instead of silently yielding a wrong secret.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Mapping, Sequence

from fedtensor.federated.secagg.errors import SecAggError

PRIME = (1 << 127) - 1  # a Mersenne prime
SECRET_BYTES = 32
CHUNK_BYTES = 15  # 120 bits per field element: always < PRIME
ELEMENT_BYTES = 16
_CHUNK_LENS = (15, 15, 2)
N_CHUNKS = len(_CHUNK_LENS)
SHARE_BYTES = N_CHUNKS * ELEMENT_BYTES  # 48

RandBytes = Callable[[int], bytes]


def _random_element(randbytes: RandBytes) -> int:
    """Uniform element of GF(p) by rejection sampling on 127 random bits."""
    while True:
        v = int.from_bytes(randbytes(16), "little") & ((1 << 127) - 1)
        if v < PRIME:
            return v


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise SecAggError("Shamir evaluation points must be distinct")
    for x in xs:
        if not (isinstance(x, int) and 0 < x < PRIME):
            raise SecAggError(f"Shamir evaluation point {x!r} must be an int in [1, p)")


def split(secret: bytes, threshold: int, xs: Sequence[int], randbytes: RandBytes) -> dict[int, bytes]:
    """Shares of the 32-byte ``secret`` for the parties ``xs``: any ``threshold`` of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"Shamir secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    xs = list(xs)
    _check_points(xs)
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"Shamir threshold {threshold} must be in [1, {len(xs)}]")
    out = {x: bytearray() for x in xs}
    pos = 0
    for clen in _CHUNK_LENS:
        coeffs = [int.from_bytes(secret[pos : pos + clen], "little")]
        coeffs += [_random_element(randbytes) for _ in range(threshold - 1)]
        pos += clen
        rev = coeffs[::-1]
        for x in xs:
            acc = 0
            for c in rev:  # Horner
                acc = (acc * x + c) % PRIME
            out[x] += acc.to_bytes(ELEMENT_BYTES, "little")
    return {x: bytes(v) for x, v in out.items()}


@lru_cache(maxsize=4096)
def _lagrange_weights(xs: tuple[int, ...], at: int) -> tuple[int, ...]:
    """w_i with f(at) = Σ w_i f(x_i) for every polynomial f of degree < len(xs)."""
    ws = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        ws.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(ws)


def check_share(share: bytes) -> None:
    """Raise :class:`SecAggError` unless ``share`` is a well-formed share (its size, field elements)."""
    _parse(share)


def _parse(share: bytes) -> list[int]:
    if len(share) != SHARE_BYTES:
        raise SecAggError(f"Shamir share must be {SHARE_BYTES} bytes, got {len(share)}")
    vals = [int.from_bytes(share[k : k + ELEMENT_BYTES], "little") for k in range(0, SHARE_BYTES, ELEMENT_BYTES)]
    if any(v >= PRIME for v in vals):
        raise SecAggError("Shamir share holds a value outside the field")
    return vals


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares ``{x: share}``.

    Interpolates from the first ``t`` and checks that every other share lies on the same polynomial. A
    wrong share is detected, not located: from the first ``t`` alone it cannot be told which share is the
    wrong one, nor whether its holder or the dealer is to blame, so no party is named.

    Raises :class:`SecAggError` when there are too few shares or when they are inconsistent."""
    if len(shares) < threshold:
        raise SecAggError(f"need {threshold} Shamir shares, have {len(shares)}")
    xs = sorted(shares)
    _check_points(xs)
    base, extra = tuple(xs[:threshold]), xs[threshold:]
    vals = {x: _parse(shares[x]) for x in xs}
    w0 = _lagrange_weights(base, 0)
    checks = [(x, _lagrange_weights(base, x)) for x in extra]
    out = bytearray()
    for k, clen in enumerate(_CHUNK_LENS):
        ys = [vals[x][k] for x in base]
        s = sum(w * y for w, y in zip(w0, ys)) % PRIME
        if any(sum(w * y for w, y in zip(wx, ys)) % PRIME != vals[x][k] for x, wx in checks):
            raise SecAggError("inconsistent Shamir shares (not all on one polynomial of the threshold's degree)")
        if s >> (8 * clen):
            raise SecAggError("inconsistent Shamir shares (reconstructed value out of range)")
        out += s.to_bytes(clen, "little")
    return bytes(out)
