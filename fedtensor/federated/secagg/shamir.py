"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(p), p = 2^127 − 1.

A 32-byte secret is cut into three chunks of 15, 15 and 2 bytes; each chunk (< 2^120 < p) is one field
element and is shared with its own random polynomial of degree t − 1 (the same evaluation points). A
share for the party with id ``x`` (the evaluation point, 1 ≤ x < p) is therefore three field elements,
written as 3 × 16 little-endian bytes = :data:`SHARE_BYTES` bytes.

Any ``t`` shares determine the secret (Lagrange interpolation at 0); ``t − 1`` shares are independent
of it (information-theoretic). When more than ``t`` shares are supplied, :func:`combine` uses the
redundancy: up to ``(n − t) // 2`` wrong shares are corrected, and more are detected (an error) instead
of silently yielding a wrong secret.
"""

from __future__ import annotations

import itertools
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


def _parse(share: bytes) -> list[int]:
    if len(share) != SHARE_BYTES:
        raise SecAggError(f"Shamir share must be {SHARE_BYTES} bytes, got {len(share)}")
    vals = [int.from_bytes(share[k : k + ELEMENT_BYTES], "little") for k in range(0, SHARE_BYTES, ELEMENT_BYTES)]
    if any(v >= PRIME for v in vals):
        raise SecAggError("Shamir share holds a value outside the field")
    return vals


#: Most candidate polynomials :func:`combine` tries when some shares are wrong (each costs O(n·t²)).
_MAX_CANDIDATES = 512


def _candidate_bases(xs: Sequence[int], t: int):
    """Sets of ``t`` points to interpolate from: the first ``t``, then the first ``t + k`` less ``k`` of
    them (k = 1, 2, …), so that a few wrong shares anywhere are left out by some candidate."""
    yield tuple(xs[:t])
    tries = 1
    for k in range(1, len(xs) - t + 1):
        for left_out in itertools.combinations(range(t + k), k):
            if tries >= _MAX_CANDIDATES:
                return
            tries += 1
            yield tuple(x for i, x in enumerate(xs[:t + k]) if i not in left_out)


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares ``{x: share}``, correcting wrong ones.

    With ``n`` shares, up to ``(n − t) // 2`` wrong shares are corrected (unique decoding of the
    Reed–Solomon code the shares form): the secret is that of the one polynomial of degree ``t − 1``
    on which at least ``(n + t) / 2`` shares lie, found among candidate interpolations. A wrong share
    cannot be blamed on its holder (the dealer may have sent it wrong), so none is named.

    Raises :class:`SecAggError` when there are too few shares or too many wrong ones."""
    t = threshold
    if len(shares) < t:
        raise SecAggError(f"need {t} Shamir shares, have {len(shares)}")
    xs = sorted(shares)
    _check_points(xs)
    vals = {x: _parse(shares[x]) for x in xs}
    need = -(-(len(xs) + t) // 2)
    for base in _candidate_bases(xs, t):
        rows = [[vals[x][k] for x in base] for k in range(N_CHUNKS)]
        others = [x for x in xs if x not in base]  # the base's own shares lie on its polynomial
        agree = t + sum(all(sum(w * y for w, y in zip(_lagrange_weights(base, x), ys)) % PRIME == vals[x][k]
                            for k, ys in enumerate(rows)) for x in others)
        if agree < need:
            continue
        w0 = _lagrange_weights(base, 0)
        secret = [sum(w * y for w, y in zip(w0, ys)) % PRIME for ys in rows]
        if any(s >> (8 * clen) for s, clen in zip(secret, _CHUNK_LENS)):
            break  # the shares' polynomial holds no secret of ours: dealt wrong
        return b"".join(s.to_bytes(clen, "little") for s, clen in zip(secret, _CHUNK_LENS))
    raise SecAggError("inconsistent Shamir shares (too many are off every polynomial of the threshold's degree)")
