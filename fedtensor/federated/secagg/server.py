"""The server side of the protocol: one :class:`SecAggServer` per aggregation round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from fedtensor.federated.secagg import primitives as P
from fedtensor.federated.secagg import shamir
from fedtensor.federated.secagg.client import _CIPHERTEXT_BYTES, check_client_id
from fedtensor.federated.secagg.errors import SecAggAbort, SecAggError, SecAggMessageError
from fedtensor.federated.secagg.messages import (
    AdvertiseKeys,
    KeyBroadcast,
    MaskedInput,
    ShareForward,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedtensor.federated.secagg.params import SecAggParams

_STAGES = ("advertise", "share", "masked", "unmask", "done")
_MSG_STAGE = {AdvertiseKeys: "advertise", ShareKeys: "share", MaskedInput: "masked", UnmaskResponse: "unmask"}


@dataclass(frozen=True)
class SecAggResult:
    """What the server learns: the (weighted) sum over the survivors U3, and in weighted mode their total
    weight. ``sum`` is float64, flat (``params.vector_length``)."""

    sum: np.ndarray
    total_weight: int | None
    survivors: tuple[int, ...]  # U3: clients whose inputs are in the sum
    dropped: tuple[int, ...]  # U2 \ U3: shared keys, but their masked input never arrived
    tolerance: float  # worst-case |error| per coordinate of ``sum`` from fixed-point rounding
    # U3 members holding a share that was left out of a recovery: wrong as revealed or as dealt to them
    inconsistent: tuple[int, ...] = ()

    @property
    def mean(self) -> np.ndarray:
        """FedAvg mean Σ w·x / Σ w (weighted mode only)."""
        if self.total_weight is None:
            raise SecAggError("mean needs a weighted round (params.weighted=True)")
        if self.total_weight == 0:
            raise SecAggError("mean undefined: the survivors' total weight is 0")
        return self.sum / self.total_weight


class SecAggServer:
    """The server of one round, for the cohort ``clients`` (distinct ids in [1, 2^31)). Per round it
    collects client messages with ``receive_*`` and then closes the round with the matching call:

    0. :meth:`receive_advertise` …, :meth:`broadcast_keys` → :class:`KeyBroadcast` (U1 = senders);
    1. :meth:`receive_shares` …, :meth:`forward_shares` → ``{v: ShareForward}`` (U2);
    2. :meth:`receive_masked_input` …, :meth:`unmask_request` → :class:`UnmaskRequest` (U3);
       masked inputs are summed on arrival (memory: one vector, not one per client);
    3. :meth:`receive_unmask` …, :meth:`finalize` → :class:`SecAggResult`: reconstructs b_u (u ∈ U3) and
       s_v^SK (v ∈ U2 \\ U3, checked against v's advertised key) with Shamir and strips the masks:
       Σ_{U3} y_u − Σ_{U3} PRG(b_u) ∓ Σ_{u∈U3, v∈U2\\U3} PRG(s_uv).

    Closing a round with fewer than ``threshold`` clients raises :class:`SecAggAbort`. A rejected message
    (:class:`SecAggMessageError`: unknown/duplicate sender, other round, closed stage, malformed) leaves the
    state unchanged, so the caller may treat that client as dropped.

    The server is trusted to follow the protocol (honest-but-curious); it never needs a private key.
    """

    def __init__(self, params: SecAggParams, clients: Iterable[int]):
        self.params = params
        cohort = [check_client_id(c) for c in clients]
        if len(set(cohort)) != len(cohort):
            raise SecAggError("duplicate client id in the cohort")
        if len(cohort) != params.num_clients:
            raise SecAggError(f"cohort has {len(cohort)} clients, params.num_clients is {params.num_clients}")
        self.cohort = frozenset(cohort)
        self._stage = "advertise"
        self._keys: dict[int, AdvertiseKeys] = {}
        self._u1: tuple[int, ...] = ()
        self._shares: dict[int, ShareKeys] = {}
        self._b_commitments: dict[int, bytes] = {}
        self._u2: tuple[int, ...] = ()
        self._acc: np.ndarray | None = None
        self._masked_from: list[int] = []
        self._u3: tuple[int, ...] = ()
        self._dropped: tuple[int, ...] = ()
        self._responses: dict[int, UnmaskResponse] = {}
        self._inconsistent: set[int] = set()

    # -- helpers -----------------------------------------------------------------------------------

    @property
    def stage(self) -> str:
        return self._stage

    def _abort(self, what: str, have: int) -> SecAggAbort:
        self._stage = "aborted"
        return SecAggAbort(f"secure aggregation aborted: only {have} clients {what}, threshold is {self.params.threshold}")

    def _accept(self, msg, cls: type, eligible: Iterable[int], seen) -> int:
        """Common checks of a client message; returns its sender."""
        name = cls.__name__
        if not isinstance(msg, cls):
            raise SecAggMessageError(f"expected {name}, got {type(msg).__name__}")
        if self._stage == "aborted":
            raise SecAggAbort("secure aggregation was aborted; no more messages are accepted")
        if msg.round_id != self.params.round_id:
            raise SecAggMessageError(
                f"{name} is for round {msg.round_id}, expected round {self.params.round_id} (replayed or misrouted)"
            )
        if _MSG_STAGE[cls] != self._stage:
            raise SecAggMessageError(
                f"{name} from client {msg.sender} arrived outside its stage (server is in stage {self._stage!r})"
            )
        sender = msg.sender
        if sender not in self.cohort:
            raise SecAggMessageError(f"{name} from unknown client id {sender!r}")
        if sender not in eligible:
            raise SecAggMessageError(f"{name} from client {sender}, who dropped out of an earlier round")
        if sender in seen:
            raise SecAggMessageError(f"duplicate {name} from client {sender} (replayed)")
        return sender

    def _close(self, stage: str, call: str) -> None:
        if self._stage == "aborted":
            raise SecAggAbort("secure aggregation was aborted")
        if self._stage != stage:
            raise SecAggError(f"{call} called out of order (server is in stage {self._stage!r})")

    # -- round 0 -----------------------------------------------------------------------------------

    def receive_advertise(self, msg: AdvertiseKeys) -> None:
        """Round 0: store a client's public keys."""
        sender = self._accept(msg, AdvertiseKeys, self.cohort, self._keys)
        if len(msg.c_public) != P.KEY_BYTES or len(msg.s_public) != P.KEY_BYTES:
            raise SecAggMessageError(f"public keys of client {sender} are not {P.KEY_BYTES} bytes")
        if msg.c_public == msg.s_public:
            raise SecAggMessageError(f"client {sender} advertised the same key twice")
        for key in (msg.c_public, msg.s_public):  # one bad key would make every peer abort later
            P.check_public_key(key, sender)
        used = {k for m in self._keys.values() for k in (m.c_public, m.s_public)}
        if msg.c_public in used or msg.s_public in used:
            raise SecAggMessageError(f"client {sender} advertised a public key already used by another client")
        self._keys[sender] = msg

    def broadcast_keys(self) -> KeyBroadcast:
        """Close round 0: U1 = clients whose keys arrived; broadcast their keys to all of U1."""
        self._close("advertise", "broadcast_keys")
        if len(self._keys) < self.params.threshold:
            raise self._abort("advertised keys", len(self._keys))
        self._u1 = tuple(sorted(self._keys))
        self._stage = "share"
        return KeyBroadcast(self.params.round_id, self.params.threshold, tuple(self._keys[c] for c in self._u1))

    # -- round 1 -----------------------------------------------------------------------------------

    def receive_shares(self, msg: ShareKeys) -> None:
        """Round 1: store a client's encrypted shares (one for every other member of U1)."""
        sender = self._accept(msg, ShareKeys, self._u1, self._shares)
        if len(msg.b_commitment) != P.COMMITMENT_BYTES:
            raise SecAggMessageError(f"ShareKeys from client {sender} holds a commitment of the wrong size")
        want = set(self._u1) - {sender}
        seen = set()
        for e in msg.shares:
            if e.sender != sender or e.round_id != self.params.round_id:
                raise SecAggMessageError(f"ShareKeys from client {sender} holds a share with a foreign header")
            if e.recipient not in want or e.recipient in seen:
                raise SecAggMessageError(
                    f"ShareKeys from client {sender} holds an unexpected or repeated share for {e.recipient}"
                )
            if len(e.nonce) != P.NONCE_BYTES or len(e.ciphertext) != _CIPHERTEXT_BYTES:
                raise SecAggMessageError(f"ShareKeys from client {sender} holds a share of the wrong size")
            seen.add(e.recipient)
        if seen != want:
            raise SecAggMessageError(f"ShareKeys from client {sender} lacks shares for {sorted(want - seen)}")
        self._shares[sender] = msg
        self._b_commitments[sender] = msg.b_commitment

    def forward_shares(self) -> dict[int, ShareForward]:
        """Close round 1: U2 = clients whose shares arrived; route to each the ciphertexts addressed to it."""
        self._close("share", "forward_shares")
        if len(self._shares) < self.params.threshold:
            raise self._abort("shared keys", len(self._shares))
        self._u2 = tuple(sorted(self._shares))
        inbox: dict[int, list] = {v: [] for v in self._u2}
        for u in self._u2:
            for e in self._shares[u].shares:
                if e.recipient in inbox:
                    inbox[e.recipient].append(e)
        self._shares.clear()
        self._acc = np.zeros(self.params.words, dtype=P.WORD)
        self._stage = "masked"
        r = self.params.round_id
        return {v: ShareForward(r, v, self._u2, tuple(inbox[v])) for v in self._u2}

    # -- round 2 -----------------------------------------------------------------------------------

    def receive_masked_input(self, msg: MaskedInput) -> None:
        """Round 2: add a client's masked vector into the running sum (mod 2^32)."""
        sender = self._accept(msg, MaskedInput, self._u2, self._masked_from)
        if len(msg.data) != 4 * self.params.words:
            raise SecAggMessageError(
                f"masked input of client {sender} has {len(msg.data)} bytes, expected {4 * self.params.words}"
            )
        np.add(self._acc, np.frombuffer(msg.data, dtype=P.WORD), out=self._acc)
        self._masked_from.append(sender)

    def unmask_request(self) -> UnmaskRequest:
        """Close round 2: U3 = clients whose masked input arrived; ask U3 to unmask."""
        self._close("masked", "unmask_request")
        if len(self._masked_from) < self.params.threshold:
            raise self._abort("sent masked inputs", len(self._masked_from))
        self._u3 = tuple(sorted(self._masked_from))
        self._dropped = tuple(sorted(set(self._u2) - set(self._u3)))
        self._stage = "unmask"
        return UnmaskRequest(self.params.round_id, self._u3, self._dropped)

    # -- round 3 -----------------------------------------------------------------------------------

    def receive_unmask(self, msg: UnmaskResponse) -> None:
        """Round 3: store a survivor's revealed shares (b-shares for U3, s-key shares for U2 \\ U3 only)."""
        sender = self._accept(msg, UnmaskResponse, self._u3, self._responses)
        b_owners = [s.owner for s in msg.b_shares]
        s_owners = [s.owner for s in msg.s_shares]
        if set(b_owners) & set(s_owners):
            raise SecAggMessageError(f"client {sender} revealed both shares of client(s) {sorted(set(b_owners) & set(s_owners))}")
        if sorted(b_owners) != list(self._u3) or sorted(s_owners) != list(self._dropped):
            raise SecAggMessageError(f"unmask response of client {sender} does not match the request")
        try:
            for s in msg.b_shares + msg.s_shares:
                shamir.check_share(s.share)
        except SecAggError as exc:
            raise SecAggMessageError(f"unmask response of client {sender}: {exc}") from None
        self._responses[sender] = msg

    def _recover(self, shares: dict[int, bytes], valid: Callable[[bytes], bool], what: str, against: str) -> bytes:
        """The secret of ``shares`` that passes ``valid`` (its commitment or advertised key). When all of
        them do not, one share may be wrong: each responder's is left out in turn, and the one whose
        leaving out gives a valid secret is recorded (``SecAggResult.inconsistent``). That share was wrong
        as revealed or as dealt: the server cannot tell the responder's fault from the dealer's, so it
        names the share's holder and blames no one, and leaves it out of this secret only."""
        candidates = [None] + (sorted(shares) if len(shares) > self.params.threshold else [])
        for left_out in candidates:
            subset = {r: sh for r, sh in shares.items() if r != left_out}
            try:
                secret = shamir.combine(subset, self.params.threshold)
            except SecAggError:
                continue
            if valid(secret):
                if left_out is not None:
                    self._inconsistent.add(left_out)
                return secret
        raise SecAggError(f"reconstructed {what} does not match {against} (corrupted shares, and no one responder's "
                          "to leave out)")

    def _is_key_of(self, secret: bytes, v: int) -> bool:
        try:
            return P.public_bytes(P.private_from_bytes(secret)) == self._keys[v].s_public
        except (SecAggError, ValueError):
            return False

    def finalize(self) -> SecAggResult:
        """Close round 3: reconstruct the seeds, strip every mask, decode the sum."""
        self._close("unmask", "finalize")
        p = self.params
        if len(self._responses) < p.threshold:
            raise self._abort("answered the unmasking request", len(self._responses))
        b_sh: dict[int, dict[int, bytes]] = {u: {} for u in self._u3}
        s_sh: dict[int, dict[int, bytes]] = {v: {} for v in self._dropped}
        for responder, msg in self._responses.items():
            for s in msg.b_shares:
                b_sh[s.owner][responder] = s.share
            for s in msg.s_shares:
                s_sh[s.owner][responder] = s.share
        plus, minus = [], []
        try:
            for u in self._u3:
                b = self._recover(b_sh[u], lambda b: P.seed_commitment(b, p.round_id, u) == self._b_commitments[u],
                                  f"self-mask secret of client {u}", "its commitment")
                minus.append(P.self_mask_seed(b, p.round_id))
            for v in self._dropped:
                sk = P.private_from_bytes(self._recover(s_sh[v], lambda k: self._is_key_of(k, v),
                                                        f"key of dropped client {v}", "its advertised key"))
                for u in self._u3:
                    seed = P.pairwise_seed(P.agree(sk, self._keys[u].s_public, u), p.round_id, u, v)
                    (minus if u < v else plus).append(seed)  # undo y_u's ±PRG(s_uv)
        except SecAggError as exc:
            self._stage = "aborted"
            raise SecAggAbort(f"secure aggregation aborted: {exc}") from None
        acc = self._acc
        P.add_masks(acc, plus, minus)
        self._acc = None
        n = len(self._u3)
        if p.weighted:
            total = int(acc[-1])
            if total > p.max_total_weight:
                self._stage = "aborted"
                raise SecAggAbort(
                    f"secure aggregation aborted: total weight {total} exceeds max_total_weight {p.max_total_weight}"
                )
            q = acc[:-1]
        else:
            total, q = None, acc
        # Masks that did not cancel (a key seen differently by two clients, a corrupted masked input) leave
        # words spread over all of Z_2^32; a true sum stays within what n clipped inputs can add up to.
        # (a unit of slack: in float64 a client's rounded w·x·scale can land one above the real bound)
        bound = (n if total is None else total) * p.fixed_point.clip * p.fixed_point.scale * (1 + 1e-12) + n / 2 + 1
        if q.size and np.max(np.abs(q.view(np.dtype("<i4")).astype(np.int64))) > bound:
            self._stage = "aborted"
            raise SecAggAbort("secure aggregation aborted: the unmasked sum lies outside what the clients' clipped "
                              "inputs can add up to (masks did not cancel: a corrupted key or masked input)")
        self._stage = "done"
        return SecAggResult(p.fixed_point.decode_sum(q), total, self._u3, self._dropped,
                            p.fixed_point.tolerance(n), tuple(sorted(self._inconsistent)))
