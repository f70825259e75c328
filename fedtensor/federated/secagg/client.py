"""The client side of the protocol: one :class:`SecAggClient` per client per aggregation round."""

from __future__ import annotations

import numpy as np

from fedtensor.federated.secagg import primitives as P
from fedtensor.federated.secagg import shamir
from fedtensor.federated.secagg.errors import SecAggAbort, SecAggError, SecAggMessageError
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
)
from fedtensor.federated.secagg.params import SecAggParams

_PLAINTEXT_BYTES = 2 * shamir.SHARE_BYTES  # b-share | s-key share
_CIPHERTEXT_BYTES = _PLAINTEXT_BYTES + P.TAG_BYTES


def check_client_id(cid: object) -> int:
    if not (isinstance(cid, int) and not isinstance(cid, bool) and 1 <= cid <= P.MAX_CLIENT_ID):
        raise SecAggMessageError(f"invalid client id {cid!r} (must be an int in [1, 2^31))")
    return cid


def _check_round(kind: str, got: int, want: int) -> None:
    if got != want:
        raise SecAggMessageError(f"{kind} is for round {got}, expected round {want} (replayed or misrouted)")


class SecAggClient:
    """One client u. Call, in order:

    0. :meth:`advertise_keys` → :class:`AdvertiseKeys` (fresh X25519 pairs c_u, s_u);
    1. :meth:`share_keys` (server's :class:`KeyBroadcast`) → :class:`ShareKeys`: samples b_u, Shamir-shares
       b_u and s_u^SK t-of-|U1|, encrypts each peer's share pair with AES-GCM under HKDF(X25519(c_u, c_v));
    2. :meth:`mask_input` (:class:`ShareForward`, update, weight) → :class:`MaskedInput`: decrypts and checks
       the shares addressed to it, then sends y_u = encode(x_u) + PRG(b_u) + Σ_{v∈U2, v≠u} ±PRG(s_uv)
       (+ when u < v, − when u > v, so pairwise masks cancel in the sum);
    3. :meth:`unmask` (:class:`UnmaskRequest`) → :class:`UnmaskResponse`: the b-shares of the surviving
       peers and the s-key shares of the dropped ones. It answers **one** request per round and refuses
       (:class:`SecAggAbort`) any request naming a peer as both survivor and dropped — revealing both
       would let the server unmask that peer's input.

    A rejected server message (:class:`SecAggMessageError`) leaves the client's state unchanged; an abort
    is final. Secrets live only in this object (Python cannot reliably wipe memory: drop the object).
    """

    def __init__(self, client_id: int, params: SecAggParams, *, rng: P.RandomSource | None = None):
        self.id = check_client_id(client_id)
        self.params = params
        self._rng = rng if rng is not None else P.RandomSource()
        self._stage = "init"
        self._c_sk = self._s_sk = None
        self._u1: dict[int, AdvertiseKeys] = {}
        self._c_shared: dict[int, bytes] = {}  # v -> X25519(c_u, c_v)
        self._u2: tuple[int, ...] = ()
        self._b = b""
        self._own_b_share = b""
        self._peer_shares: dict[int, tuple[bytes, bytes]] = {}  # v -> (share of b_v, share of s_v^SK)

    # -- helpers -----------------------------------------------------------------------------------

    def _expect(self, stage: str, call: str) -> None:
        if self._stage == "aborted":
            raise SecAggAbort(f"client {self.id} has aborted this round; it refuses {call}")
        if self._stage != stage:  # e.g. a replayed server message: reject it, keep the state
            raise SecAggMessageError(f"client {self.id}: {call} called out of order (protocol stage is {self._stage!r})")

    def _abort(self, msg: str) -> SecAggAbort:
        self._stage = "aborted"
        return SecAggAbort(msg)

    # -- round 0 -----------------------------------------------------------------------------------

    def advertise_keys(self) -> AdvertiseKeys:
        """Round 0 (AdvertiseKeys): generate the key pairs (c_u, s_u) and publish their public halves.

        The keys are not signed: with an honest-but-curious server that is enough; an active server could
        substitute keys (man in the middle) — out of scope, see the package docstring."""
        self._expect("init", "advertise_keys")
        self._c_sk, c_pk = P.generate_keypair(self._rng)
        self._s_sk, s_pk = P.generate_keypair(self._rng)
        self._stage = "advertised"
        return AdvertiseKeys(self.params.round_id, self.id, c_pk, s_pk)

    # -- round 1 -----------------------------------------------------------------------------------

    def share_keys(self, broadcast: KeyBroadcast) -> ShareKeys:
        """Round 1 (ShareKeys): check U1, share b_u and s_u^SK, encrypt one share pair per peer."""
        self._expect("advertised", "share_keys")
        if not isinstance(broadcast, KeyBroadcast):
            raise SecAggMessageError(f"expected KeyBroadcast, got {type(broadcast).__name__}")
        p = self.params
        _check_round("KeyBroadcast", broadcast.round_id, p.round_id)
        if broadcast.threshold != p.threshold:
            raise SecAggMessageError(f"KeyBroadcast threshold {broadcast.threshold} differs from the agreed {p.threshold}")
        u1: dict[int, AdvertiseKeys] = {}
        for k in broadcast.clients:
            cid = check_client_id(k.sender)
            _check_round(f"public keys of client {cid}", k.round_id, p.round_id)
            if cid in u1:
                raise SecAggMessageError(f"KeyBroadcast lists client {cid} twice")
            if len(k.c_public) != P.KEY_BYTES or len(k.s_public) != P.KEY_BYTES:
                raise SecAggMessageError(f"public keys of client {cid} are not {P.KEY_BYTES} bytes")
            u1[cid] = k
        mine = u1.get(self.id)
        if mine is None or (mine.c_public, mine.s_public) != (P.public_bytes(self._c_sk), P.public_bytes(self._s_sk)):
            raise SecAggMessageError(f"KeyBroadcast does not carry client {self.id}'s own public keys")
        pks = [k.c_public for k in u1.values()] + [k.s_public for k in u1.values()]
        if len(set(pks)) != len(pks):
            raise SecAggMessageError("KeyBroadcast contains repeated public keys")
        if len(u1) > p.num_clients:
            raise SecAggMessageError(f"KeyBroadcast lists {len(u1)} clients, more than the agreed {p.num_clients}")
        if len(u1) < p.threshold:
            raise self._abort(f"secure aggregation aborted: {len(u1)} clients advertised keys, threshold is {p.threshold}")

        self._b = self._rng(P.KEY_BYTES)
        xs = sorted(u1)
        b_shares = shamir.split(self._b, p.threshold, xs, self._rng)
        s_shares = shamir.split(P.private_bytes(self._s_sk), p.threshold, xs, self._rng)
        out = []
        c_shared = {}
        for v in xs:
            if v == self.id:
                continue
            c_shared[v] = P.agree(self._c_sk, u1[v].c_public, v)  # reused to decrypt v's shares in round 2
            key = P.share_key(c_shared[v], p.round_id, self.id, v)
            nonce = self._rng(P.NONCE_BYTES)
            ct = P.encrypt_share(key, nonce, b_shares[v] + s_shares[v], P.share_ad(p.round_id, self.id, v))
            out.append(EncryptedShare(p.round_id, self.id, v, nonce, ct))
        self._u1 = u1
        self._c_shared = c_shared
        self._own_b_share = b_shares[self.id]
        self._stage = "shared"
        return ShareKeys(p.round_id, self.id, P.seed_commitment(self._b, p.round_id, self.id), tuple(out))

    # -- round 2 -----------------------------------------------------------------------------------

    def mask_input(self, forward: ShareForward, update: np.ndarray, weight: int | None = None) -> MaskedInput:
        """Round 2 (MaskedInputCollection): decrypt the shares addressed to u, then send the masked update.

        ``update`` has ``params.vector_length`` elements (any shape), each within ±clip. In weighted mode
        ``weight`` (the sample count, an int ≥ 0) is required: the client sends weight·update and weight.
        """
        self._expect("shared", "mask_input")
        if not isinstance(forward, ShareForward):
            raise SecAggMessageError(f"expected ShareForward, got {type(forward).__name__}")
        p = self.params
        _check_round("ShareForward", forward.round_id, p.round_id)
        if forward.recipient != self.id:
            raise SecAggMessageError(f"ShareForward for client {forward.recipient} delivered to client {self.id}")
        u2 = tuple(forward.participants)
        if len(set(u2)) != len(u2):
            raise SecAggMessageError("ShareForward lists a participant twice")
        unknown = sorted(set(u2) - set(self._u1))
        if unknown:
            raise SecAggMessageError(f"ShareForward lists client(s) {unknown} that did not advertise keys")
        if self.id not in u2:
            raise SecAggMessageError(f"ShareForward's participant list omits client {self.id} itself")
        if len(u2) < p.threshold:
            raise self._abort(f"secure aggregation aborted: {len(u2)} clients shared keys, threshold is {p.threshold}")
        peers = set(u2) - {self.id}

        # validate and decrypt every share before touching the update
        got: dict[int, tuple[bytes, bytes]] = {}
        for e in forward.shares:
            if not isinstance(e, EncryptedShare):
                raise SecAggMessageError("ShareForward holds a non-share entry")
            _check_round(f"share from client {e.sender}", e.round_id, p.round_id)
            if e.recipient != self.id:
                raise SecAggMessageError(f"share from client {e.sender} is addressed to client {e.recipient}, not {self.id}")
            if e.sender not in peers:
                raise SecAggMessageError(f"share from client {e.sender}, who is not a peer in this round")
            if e.sender in got:
                raise SecAggMessageError(f"duplicate share from client {e.sender} (replayed)")
            if len(e.nonce) != P.NONCE_BYTES or len(e.ciphertext) != _CIPHERTEXT_BYTES:
                raise SecAggMessageError(f"share from client {e.sender} has the wrong size")
            v = e.sender
            key = P.share_key(self._c_shared[v], p.round_id, v, self.id)
            pt = P.decrypt_share(key, e.nonce, e.ciphertext, P.share_ad(p.round_id, v, self.id), v)
            got[v] = (pt[: shamir.SHARE_BYTES], pt[shamir.SHARE_BYTES :])
        missing = sorted(peers - set(got))
        if missing:
            raise SecAggMessageError(f"ShareForward lacks the shares of client(s) {missing}")

        y = self._encode(update, weight)
        plus = [P.self_mask_seed(self._b, p.round_id)]
        minus = []
        for v in sorted(peers):
            seed = P.pairwise_seed(P.agree(self._s_sk, self._u1[v].s_public, v), p.round_id, self.id, v)
            (plus if self.id < v else minus).append(seed)
        P.add_masks(y, plus, minus)
        self._peer_shares = got
        self._u2 = u2
        self._stage = "masked"
        return MaskedInput(p.round_id, self.id, y.tobytes())

    def _encode(self, update: np.ndarray, weight: int | None) -> np.ndarray:
        p = self.params
        x = np.asarray(update)
        if x.size != p.vector_length:
            raise SecAggError(f"update has {x.size} elements, the round expects {p.vector_length}")
        y = np.empty(p.words, dtype=P.WORD)
        if p.weighted:
            if weight is None or isinstance(weight, bool) or not isinstance(weight, (int, np.integer)) or weight < 0:
                raise SecAggError(f"weighted secure aggregation needs an int weight ≥ 0 (sample count), got {weight!r}")
            weight = int(weight)
            if weight > p.max_total_weight:
                raise SecAggError(f"weight {weight} exceeds the round's max_total_weight {p.max_total_weight}")
            p.fixed_point.encode(x, weight, out=y[:-1])
            y[-1] = weight
        else:
            if weight is not None:
                raise SecAggError("weight given, but this round is unweighted (params.weighted is False)")
            p.fixed_point.encode(x, 1, out=y)
        return y

    # -- round 3 -----------------------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Round 3 (Unmasking): reveal b-shares of survivors and s-key shares of dropped peers, once."""
        if self._stage == "done":
            raise self._abort(
                f"client {self.id} already answered an unmasking request this round; "
                "refusing another (it could reveal both shares of a peer)"
            )
        self._expect("masked", "unmask")
        if not isinstance(request, UnmaskRequest):
            raise SecAggMessageError(f"expected UnmaskRequest, got {type(request).__name__}")
        p = self.params
        _check_round("UnmaskRequest", request.round_id, p.round_id)
        surv, drop = list(request.survivors), list(request.dropped)
        both = sorted(set(surv) & set(drop))
        if both:
            raise self._abort(
                f"client {self.id} refuses to unmask: asked for both the self-mask and the key share of client(s) {both}"
            )
        if len(set(surv)) != len(surv) or len(set(drop)) != len(drop):
            raise SecAggMessageError("UnmaskRequest lists a client twice")
        named, u2 = set(surv) | set(drop), set(self._u2)
        if named - u2:
            raise SecAggMessageError(f"UnmaskRequest names client(s) {sorted(named - u2)} outside this round's U2")
        if u2 - named:
            raise SecAggMessageError(f"UnmaskRequest does not account for client(s) {sorted(u2 - named)}")
        if self.id not in surv:
            raise SecAggMessageError(f"UnmaskRequest does not list client {self.id} as a survivor")
        if len(surv) < p.threshold:
            raise self._abort(f"secure aggregation aborted: {len(surv)} clients sent masked inputs, threshold is {p.threshold}")
        b_out = [RevealedShare(v, self._own_b_share if v == self.id else self._peer_shares[v][0]) for v in sorted(surv)]
        s_out = [RevealedShare(v, self._peer_shares[v][1]) for v in sorted(drop)]
        self._stage = "done"
        return UnmaskResponse(p.round_id, self.id, tuple(b_out), tuple(s_out))
