"""Secure aggregation (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017), built on ``cryptography`` (X25519, HKDF-SHA256, AES-256-GCM, AES-128-CTR).

The server learns the sum of the clients' update vectors — never an individual update.

Protocol (one :class:`SecAggServer`, n :class:`SecAggClient`; U1 ⊇ U2 ⊇ U3 are the clients still alive
after each round, and every round needs ≥ t of them or the protocol aborts with :class:`SecAggAbort`):

0. **AdvertiseKeys** — each client u makes two X25519 pairs, c_u (channel for the shares) and s_u (mask
   agreement), and sends the public halves; the server broadcasts them to U1.
1. **ShareKeys** — u samples a 32-byte seed b_u, Shamir-shares b_u and s_u^SK t-of-|U1| over
   GF(2^127 − 1), and sends to each peer v, through the server, the pair of shares encrypted with
   AES-GCM under HKDF-SHA256(X25519(c_u, c_v)) with associated data (round id, u, v).
2. **MaskedInputCollection** — u encodes its update in fixed point over Z_2^32 and sends
   y_u = x_u + PRG(b_u) + Σ_{v∈U2\\{u}} ±PRG(s_uv), s_uv = HKDF(X25519(s_u, s_v)), PRG = AES-128-CTR;
   pairwise masks cancel in Σ y_u, the self mask PRG(b_u) protects y_u if u's s-key is later revealed.
3. **Unmasking** — each survivor reveals, for each dropped peer, its share of that peer's s-key (the
   server rebuilds the pairwise masks the survivors still carry) and, for each surviving peer, its share
   of b (the server removes the self masks) — never both for one peer: clients refuse (abort) otherwise.
   The server reconstructs, strips the masks and decodes Σ_{u∈U3} x_u (and Σ w_u, in FedAvg mode).

Threat model: the server is honest-but-curious (follows the protocol, tries to learn from what it sees);
up to n − t clients may drop out at any point; the server colluding with fewer than t clients learns
nothing beyond the sum of the honest survivors' inputs. **Not covered**: an actively malicious server
(no signatures on the advertised keys, and no ConsistencyCheck round, so it could impersonate clients or
tell different clients different survivor sets); malicious clients poisoning the sum (inputs are only
range-checked locally); traffic analysis; side channels. Secrets cannot be wiped from Python memory.

Entry points: :func:`secure_sum` (in-process simulation), :class:`SecAggClient`, :class:`SecAggServer`,
:class:`SecAggParams`, :class:`FixedPoint`, the messages in :mod:`.messages` (with :func:`encode` /
:func:`decode` for transport).
"""

from fedtensor.federated.secagg.client import SecAggClient
from fedtensor.federated.secagg.errors import SecAggAbort, SecAggError, SecAggMessageError
from fedtensor.federated.secagg.fixedpoint import FixedPoint
from fedtensor.federated.secagg.messages import (
    AdvertiseKeys,
    EncryptedShare,
    KeyBroadcast,
    MaskedInput,
    RevealedShare,
    ShareForward,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    decode,
    encode,
    wire_size,
)
from fedtensor.federated.secagg.params import SecAggParams
from fedtensor.federated.secagg.primitives import RandomSource
from fedtensor.federated.secagg.server import SecAggResult, SecAggServer
from fedtensor.federated.secagg.simulation import secure_aggregate, secure_sum

__all__ = [
    "AdvertiseKeys",
    "EncryptedShare",
    "FixedPoint",
    "KeyBroadcast",
    "MaskedInput",
    "RandomSource",
    "RevealedShare",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggMessageError",
    "SecAggParams",
    "SecAggResult",
    "SecAggServer",
    "ShareForward",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode",
    "encode",
    "secure_aggregate",
    "secure_sum",
    "wire_size",
]
