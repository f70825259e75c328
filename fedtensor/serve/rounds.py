"""Secure-aggregation rounds driven over HTTP: the coordinator the API calls, and the flat parameter view.

One round at a time. The admin opens round r on the latest global version (the *base*), choosing the
cohort; the coordinator then runs one :class:`~fedtensor.federated.secagg.SecAggServer` through its four
stages, fed by the clients' encoded messages::

    stage      client GETs (the server's broadcast)      client POSTs
    advertise  —                                         AdvertiseKeys
    share      KeyBroadcast                              ShareKeys
    masked     ShareForward (addressed to it)            MaskedInput  (its masked, weighted delta)
    unmask     UnmaskRequest                             UnmaskResponse

A stage closes as soon as every eligible client has posted, when the admin closes it (the missing ones
count as dropped), or when its deadline (``stage_timeout``) has passed — checked on every request, so no
background thread is needed. When the last stage closes the server recovers only the FedAvg mean
Σ n_k·Δ_k / Σ n_k of the survivors' deltas; the coordinator adds it to the base weights and publishes the
result as a new version (``meta``: round, clients, n_clients, dropped, base_version, tolerance).

Every rejected submission raises :class:`RoundError` with the HTTP status to answer, and changes nothing:
the checks run before the message reaches the SecAgg server, which itself leaves its state unchanged on a
rejected message. Round numbers are persisted (``DATA/rounds.json``) and never reused; a round still
open when the server stops is recorded as aborted on restart (the SecAgg state lives in memory only).

The flat parameter vector that clients mask is the model's tensors in sorted-name order
(:func:`flat_params`), each flattened in C order, float32.
"""

from __future__ import annotations

import json
import math
import numbers
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fedtensor.errors import FedtensorError
from fedtensor.federated.secagg import (
    AdvertiseKeys,
    EncryptedShare,
    FixedPoint,
    MaskedInput,
    RevealedShare,
    SecAggAbort,
    SecAggError,
    SecAggMessageError,
    SecAggParams,
    SecAggServer,
    ShareKeys,
    UnmaskResponse,
    decode,
    encode,
    wire_size,
)
from fedtensor.federated.secagg import primitives as P
from fedtensor.federated.secagg import shamir
from fedtensor.serve.auth import Principal, TokenRegistry, write_private
from fedtensor.serve.store import ModelStore, utc_now

ROUNDS_FILE = "rounds.json"
STAGES = ("advertise", "share", "masked", "unmask")
_MSG = {"advertise": AdvertiseKeys, "share": ShareKeys, "masked": MaskedInput, "unmask": UnmaskResponse}
_KEY_BYTES, _NONCE_BYTES, _SHARE_BYTES = P.KEY_BYTES, P.NONCE_BYTES, shamir.SHARE_BYTES
_SHARE_CT_BYTES = 2 * shamir.SHARE_BYTES + P.TAG_BYTES  # AES-GCM of (b-share | s-key share)


class RoundError(FedtensorError):
    """A round request that cannot be honoured; ``status`` is the HTTP code to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------ flat parameters


def flat_params(model_bytes: bytes) -> tuple[np.ndarray, list[tuple[str, tuple[int, ...]]], dict[str, str]]:
    """``(vector float32, [(name, shape)...], safetensors metadata)`` of a model file; the vector holds
    every tensor flattened, in sorted-name order (the order clients and server agree on)."""
    import safetensors.numpy as stn

    from fedtensor.nn.checkpoint import ModelError, safetensors_metadata

    meta = safetensors_metadata(model_bytes, "model")
    try:
        tensors = stn.load(bytes(model_bytes))
    except Exception as err:  # safetensors raises its own error type on garbage
        raise ModelError(f"corrupted model: {' '.join(str(err).split())[:200]}") from None
    names = sorted(tensors)
    for n in names:
        if tensors[n].dtype != np.float32:
            raise ModelError(f"model tensor {n} is {tensors[n].dtype}, expected float32")
    spec = [(n, tuple(tensors[n].shape)) for n in names]
    vec = np.concatenate([tensors[n].reshape(-1) for n in names]) if names else np.zeros(0, np.float32)
    return vec, spec, meta


def model_delta(base_bytes: bytes, local_bytes: bytes) -> np.ndarray:
    """``local − base`` as one flat float64 vector (exact for float32 weights; same architecture required)."""
    b, bspec, _ = flat_params(base_bytes)
    loc, lspec, _ = flat_params(local_bytes)
    if bspec != lspec:
        raise FedtensorError("the local model does not have the base model's architecture")
    return loc.astype(np.float64) - b


def apply_delta(base_bytes: bytes, delta: np.ndarray) -> bytes:
    """The base model with ``delta`` added to its flat parameters, in the same safetensors format (same
    names, shapes, float32, architecture metadata) as :func:`fedtensor.nn.checkpoint.tree_to_bytes`."""
    import safetensors.numpy as stn

    vec, spec, meta = flat_params(base_bytes)
    delta = np.asarray(delta, dtype=np.float64).reshape(-1)
    if delta.size != vec.size:
        raise FedtensorError(f"delta has {delta.size} values, the model has {vec.size}")
    if not np.all(np.isfinite(delta)):
        raise FedtensorError("delta contains NaN or Inf")
    new = (vec.astype(np.float64) + delta).astype(np.float32)
    out, pos = {}, 0
    for name, shape in spec:
        size = math.prod(shape)
        out[name] = new[pos:pos + size].reshape(shape)
        pos += size
    return stn.save(out, metadata=meta)


# ------------------------------------------------------------------------------------------ rounds


#: Longest stage timeout in seconds (finite: it is served back as JSON).
MAX_STAGE_TIMEOUT = 1e9


def valid_stage_timeout(timeout) -> bool:
    """Whether ``timeout`` is a stage timeout: None (no deadline) or seconds in (0, MAX_STAGE_TIMEOUT)."""
    return timeout is None or (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                               and 0 < timeout < MAX_STAGE_TIMEOUT)


@dataclass
class RoundSettings:
    """Defaults for new rounds (``create_app`` config ``FEDTENSOR_ROUND_*``)."""

    # Fixed point shares int32 between clients: W·clip·scale < 2^31 (W = max_total_weight), so a loose
    # bound W costs precision: the mean's error is ≤ n / (2·scale·Σn_k). The defaults give scale 2^17.
    clip: float = 0.5  # |Δ| per coordinate a client may send (clients clip before masking)
    max_total_weight: int = 1 << 14  # public bound on Σ n_k (sample counts): keep it tight
    stage_timeout: float | None = 600.0  # seconds a stage stays open; None: only all-in or admin close


@dataclass
class _Round:
    number: int
    params: SecAggParams
    server: SecAggServer
    cohort: dict[int, str]  # client id → name
    base_version: int
    base_sha256: str
    stage_timeout: float | None
    opened: str
    deadline: float | None = None
    status: str = "open"  # open | done | aborted
    reason: str | None = None
    submitted: dict[str, set] = field(default_factory=lambda: {s: set() for s in STAGES})
    eligible: dict[str, frozenset] = field(default_factory=dict)
    keys_blob: bytes | None = None
    forwards: dict[int, bytes] = field(default_factory=dict)
    unmask_blob: bytes | None = None
    result_version: int | None = None
    survivors: tuple[int, ...] = ()
    dropped: tuple[int, ...] = ()

    @property
    def stage(self) -> str:
        return self.server.stage


#: The fewest clients of a round, and its least threshold (the survivors a round needs): with two in the
#: sum, each would learn the other's update from the published mean and its own.
MIN_ROUND_CLIENTS = 3


def default_threshold(n: int) -> int:
    """t > 2n/3 (Bonawitz et al.'s choice against an active server), at least 2."""
    return max(2, (2 * n) // 3 + 1)


class RoundCoordinator:
    """The HTTP side of secure aggregation for one data directory (thread-safe)."""

    def __init__(self, store: ModelStore, registry: TokenRegistry, data_dir: str | Path,
                 settings: RoundSettings | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.store, self.registry = store, registry
        self.path = Path(data_dir) / ROUNDS_FILE
        self.settings = settings or RoundSettings()
        self.clock = clock
        self._lock = threading.RLock()
        self._round: _Round | None = None
        self._history = self._load()
        stale = [h for h in self._history["rounds"] if h.get("status") == "open"]
        for h in stale:  # the SecAgg state of those rounds died with the previous process
            h.update(status="aborted", reason="the server restarted during the round", ended=utc_now())
        if stale:
            self._save()

    # -- persistence -------------------------------------------------------------------------------

    def _load(self) -> dict:
        try:
            d = json.loads(self.path.read_text())
            if not isinstance(d.get("last_round"), int) or not isinstance(d.get("rounds"), list):
                raise ValueError
            return d
        except FileNotFoundError:
            return {"last_round": 0, "rounds": []}
        except (OSError, ValueError, AttributeError):
            raise FedtensorError(f"round history is unreadable: {self.path}") from None

    def _save(self) -> None:
        write_private(self.path, json.dumps(self._history, indent=2, sort_keys=True).encode())

    def _record(self, rd: _Round) -> None:
        rec = {"round": rd.number, "status": rd.status, "reason": rd.reason, "opened": rd.opened,
               "base_version": rd.base_version, "cohort": sorted(rd.cohort.values()),
               "threshold": rd.params.threshold, "result_version": rd.result_version,
               "survivors": [rd.cohort[c] for c in rd.survivors], "dropped": [rd.cohort[c] for c in rd.dropped]}
        if rd.status != "open":
            rec["ended"] = utc_now()
        rounds = [h for h in self._history["rounds"] if h.get("round") != rd.number]
        self._history = {"last_round": max(self._history["last_round"], rd.number), "rounds": rounds + [rec]}
        self._save()

    # -- admin -------------------------------------------------------------------------------------

    def open(self, *, clients: list[str] | None = None, threshold: int | None = None, clip: float | None = None,
             max_total_weight: int | None = None, stage_timeout: float | None | str = "default") -> dict:
        """Open the next round on the latest version with ``clients`` (names; default: every client)."""
        with self._lock:
            self._tick()
            if self._round is not None and self._round.status == "open":
                raise RoundError(409, f"round {self._round.number} is still open; close or abort it first")
            base = self.store.latest()
            if base is None:
                raise RoundError(409, "no global model has been published yet: publish version 1 first")
            known = {p.name: p for p in self.registry.clients() if not p.is_admin}
            if clients is not None and not (isinstance(clients, (list, tuple))
                                            and all(isinstance(n, str) for n in clients)):
                raise RoundError(400, "clients must be a list of client names")
            names = sorted(known) if clients is None else list(clients)
            unknown = sorted(set(names) - set(known))
            if unknown:
                raise RoundError(400, f"unknown client(s): {', '.join(unknown)}")
            if len(set(names)) != len(names):
                raise RoundError(400, "a client is listed twice")
            if len(names) < MIN_ROUND_CLIENTS:  # with two, each client learns the other's update from the mean
                raise RoundError(409, f"a secure-aggregation round needs at least {MIN_ROUND_CLIENTS} clients, "
                                      f"{len(names)} given")
            cohort = {known[n].id: n for n in names}
            n = len(cohort)
            t = default_threshold(n) if threshold is None else threshold
            if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                raise RoundError(400, f"threshold must be a whole number of clients, got {t!r}")
            t = int(t)
            if 2 * t <= n or t < MIN_ROUND_CLIENTS:  # clients refuse such a round
                raise RoundError(400, f"threshold {t} of {n} clients: it must exceed n/2 and be at least "
                                      f"{MIN_ROUND_CLIENTS} (so that no two survivors' sum is published)")
            clip = self.settings.clip if clip is None else clip
            w = self.settings.max_total_weight if max_total_weight is None else max_total_weight
            timeout = self.settings.stage_timeout if stage_timeout == "default" else stage_timeout
            if not valid_stage_timeout(timeout):
                raise RoundError(400, "stage_timeout must be a positive number of seconds or null")
            vec_len = flat_params(self.store.model_bytes(base.version))[0].size
            number = self._history["last_round"] + 1
            try:
                fp = FixedPoint.auto(float(clip), n, int(w))
                params = SecAggParams(round_id=number, num_clients=n, threshold=t, vector_length=int(vec_len),
                                      fixed_point=fp, weighted=True, max_total_weight=int(w))
                server = SecAggServer(params, list(cohort))
            except (SecAggError, TypeError, ValueError, OverflowError) as err:
                raise RoundError(400, f"invalid round parameters: {err}") from None
            rd = _Round(number, params, server, cohort, base.version, base.sha256, timeout, utc_now())
            rd.eligible["advertise"] = frozenset(cohort)
            self._enter_stage(rd)
            self._round = rd
            self._record(rd)
            return self._info(rd)

    def close_stage(self, r: int) -> dict:
        """Close the current stage of round ``r`` now: clients that have not posted count as dropped."""
        with self._lock:
            rd = self._current(r)
            self._advance(rd)
            return self._info(rd)

    def abort(self, r: int, reason: str = "aborted by the admin") -> dict:
        with self._lock:
            rd = self._current(r)
            rd.status, rd.reason = "aborted", reason
            self._record(rd)
            return self._info(rd)

    # -- client ------------------------------------------------------------------------------------

    def info(self, r: int | None = None) -> dict:
        """JSON status of round ``r`` (default: the current or last round)."""
        with self._lock:
            self._tick()
            rd = self._round
            if rd is not None and r in (None, rd.number):
                return self._info(rd)
            if r is None:
                if not self._history["rounds"]:
                    raise RoundError(404, "no round has been opened yet")
                return dict(self._history["rounds"][-1])
            for h in self._history["rounds"]:
                if h.get("round") == r:
                    return dict(h)
            raise RoundError(404, f"round {r} not found")

    def history(self) -> list[dict]:
        with self._lock:
            self._tick()
            return [dict(h) for h in self._history["rounds"]]

    def body_limit(self, r: int, stage: str) -> int:
        """The largest well-formed message a client may post at ``stage`` of round ``r`` (bytes)."""
        with self._lock:
            rd = self._current(r, allow_closed=True)
            return _max_size(rd.params, stage)

    def submit(self, r: int, stage: str, who: Principal, body: bytes) -> dict:
        """Accept client ``who``'s message for ``stage`` of round ``r`` (see the module doc for the checks)."""
        if stage not in STAGES:
            raise RoundError(404, f"unknown round stage {stage!r}; stages are {', '.join(STAGES)}")
        with self._lock:
            self._tick()
            rd = self._current(r)
            self._check_client(rd, who)
            if len(body) > _max_size(rd.params, stage):
                raise RoundError(413, f"{stage} message is larger than any valid one for this round")
            try:
                msg = decode(body)
            except SecAggMessageError as err:
                raise RoundError(400, str(err)) from None
            want = _MSG[stage]
            if type(msg) is not want:
                raise RoundError(400, f"expected {want.__name__} at stage {stage!r}, got {type(msg).__name__}")
            if msg.round_id != r:
                raise RoundError(409, f"{want.__name__} is for round {msg.round_id}, not round {r} (replayed or stale)")
            if msg.sender != who.id:
                raise RoundError(403, f"message claims client id {msg.sender}, but the token belongs to client {who.id}")
            if who.id in rd.submitted[stage]:
                raise RoundError(409, f"client {who.name} already submitted its {stage} message for round {r} (replay)")
            if rd.stage != stage:
                raise RoundError(409, self._stage_mismatch(rd, stage))
            if who.id not in rd.eligible[stage]:
                raise RoundError(409, f"client {who.name} dropped out of round {r} at an earlier stage")
            receive = {"advertise": rd.server.receive_advertise, "share": rd.server.receive_shares,
                       "masked": rd.server.receive_masked_input, "unmask": rd.server.receive_unmask}[stage]
            try:
                receive(msg)
            except SecAggAbort as err:
                self._fail(rd, str(err))
                raise RoundError(409, str(err)) from None
            except SecAggMessageError as err:
                raise RoundError(400, str(err)) from None
            rd.submitted[stage].add(who.id)
            if rd.submitted[stage] >= rd.eligible[stage]:
                self._advance(rd)  # everyone is in: no need to wait for the deadline
            return {"round": r, "accepted": stage, "stage": rd.stage, "status": rd.status}

    def broadcast(self, r: int, stage: str, who: Principal) -> bytes | None:
        """The server message client ``who`` needs to produce its ``stage`` message (encoded), or ``None``
        while the previous stage is still open."""
        if stage not in STAGES[1:]:
            raise RoundError(404, f"no broadcast for stage {stage!r}; use share, masked or unmask")
        with self._lock:
            self._tick()
            rd = self._current(r, allow_closed=True)
            self._check_client(rd, who)
            i = STAGES.index(stage)
            ready = {"share": rd.keys_blob is not None, "masked": bool(rd.forwards),
                     "unmask": rd.unmask_blob is not None}[stage]
            if not ready:
                if rd.status != "open":
                    raise RoundError(409, f"round {r} was {rd.status}: {rd.reason}")
                return None
            if who.id not in rd.eligible.get(stage, ()):
                raise RoundError(409, f"client {who.name} dropped out of round {r} before stage {STAGES[i]!r}")
            if stage == "share":
                return rd.keys_blob
            if stage == "masked":
                return rd.forwards[who.id]
            return rd.unmask_blob

    # -- internals ---------------------------------------------------------------------------------

    def _current(self, r: int, *, allow_closed: bool = False) -> _Round:
        rd = self._round
        last = self._history["last_round"]
        if rd is None or r != rd.number:
            if r > last:
                raise RoundError(409, f"round {r} has not started (the last round is {last})")
            if rd is None or rd.status != "open":  # the last one closed or aborted, or lost to a restart
                raise RoundError(409, f"round {r} is over (stale); no round is open")
            raise RoundError(409, f"round {r} is over (stale); the current round is {rd.number}")
        if rd.status != "open" and not allow_closed:
            raise RoundError(409, f"round {r} is {rd.status}" + (f": {rd.reason}" if rd.reason else ""))
        return rd

    @staticmethod
    def _check_client(rd: _Round, who: Principal) -> None:
        if who.is_admin:
            raise RoundError(403, "the admin token cannot take part in a round; use a client token")
        if who.id not in rd.cohort:
            raise RoundError(403, f"client {who.name} is not in the cohort of round {rd.number}")

    @staticmethod
    def _stage_mismatch(rd: _Round, stage: str) -> str:
        cur = rd.stage
        if cur in STAGES and STAGES.index(stage) < STAGES.index(cur):
            return f"stage {stage!r} of round {rd.number} is closed (the round is at stage {cur!r})"
        return f"stage {stage!r} of round {rd.number} is not open yet (the round is at stage {cur!r})"

    def _enter_stage(self, rd: _Round) -> None:
        rd.deadline = None if rd.stage_timeout is None else self.clock() + rd.stage_timeout

    def _tick(self) -> None:
        """Close the current stage if its deadline has passed."""
        rd = self._round
        if rd is not None and rd.status == "open" and rd.deadline is not None and self.clock() >= rd.deadline:
            self._advance(rd)

    def _fail(self, rd: _Round, reason: str) -> None:
        rd.status, rd.reason = "aborted", reason
        self._record(rd)

    def _advance(self, rd: _Round) -> None:
        """Close the current stage (SecAggServer's closing call) and open the next one."""
        s = rd.server
        try:
            if rd.stage == "advertise":
                rd.keys_blob = encode(s.broadcast_keys())
                rd.eligible["share"] = frozenset(rd.submitted["advertise"])
            elif rd.stage == "share":
                rd.forwards = {v: encode(m) for v, m in s.forward_shares().items()}
                rd.eligible["masked"] = frozenset(rd.forwards)
            elif rd.stage == "masked":
                req = s.unmask_request()
                rd.unmask_blob = encode(req)
                rd.eligible["unmask"] = frozenset(req.survivors)
                rd.survivors, rd.dropped = tuple(req.survivors), tuple(req.dropped)
            elif rd.stage == "unmask":
                self._finish(rd, s.finalize())
                return
        except SecAggError as err:  # too few clients left (SecAggAbort), or corrupted shares
            self._fail(rd, str(err))
            return
        self._enter_stage(rd)
        self._record(rd)

    def _finish(self, rd, result) -> None:
        """Add the securely averaged delta to the base weights and publish the new version."""
        try:
            base = self.store.model_bytes(rd.base_version)
            new = apply_delta(base, result.mean)
            manifest = {k: v for k, v in self.store.manifest(rd.base_version).items() if k != "model_id"}
            names = [rd.cohort[c] for c in result.survivors]
            federated = {"round": rd.number, "base_version": rd.base_version, "base_sha256": rd.base_sha256,
                         "clients": names, "n_clients": len(names), "dropped": [rd.cohort[c] for c in result.dropped],
                         "total_weight": result.total_weight, "secure_aggregation": True,
                         "tolerance": result.tolerance / max(1, result.total_weight)}
            if result.inconsistent:  # a share they held was left out of the recovery (theirs or its dealer's fault)
                federated["inconsistent_shares"] = [rd.cohort[c] for c in result.inconsistent]
            manifest["federated"] = federated
            info = self.store.publish(new, manifest, federated, base_version=rd.base_version)
        except (FedtensorError, ValueError) as err:
            self._fail(rd, f"the aggregate could not be published: {err}")
            return
        rd.status, rd.result_version = "done", info.version
        rd.survivors, rd.dropped = tuple(result.survivors), tuple(result.dropped)
        rd.deadline = None
        self._record(rd)

    def _info(self, rd: _Round) -> dict:
        p = rd.params
        left = None if rd.deadline is None or rd.status != "open" else max(0.0, rd.deadline - self.clock())
        return {
            "round": rd.number, "status": rd.status, "stage": rd.stage if rd.status == "open" else rd.status,
            "reason": rd.reason, "opened": rd.opened, "base_version": rd.base_version, "base_sha256": rd.base_sha256,
            "cohort": [{"id": c, "name": n} for c, n in sorted(rd.cohort.items())],
            "params": {"round_id": p.round_id, "num_clients": p.num_clients, "threshold": p.threshold,
                       "vector_length": p.vector_length, "scale": p.fixed_point.scale, "clip": p.fixed_point.clip,
                       "weighted": p.weighted, "max_total_weight": p.max_total_weight},
            "submitted": {s: len(v) for s, v in rd.submitted.items()},
            "stage_seconds_left": left, "result_version": rd.result_version,
            "survivors": [rd.cohort[c] for c in rd.survivors], "dropped": [rd.cohort[c] for c in rd.dropped],
        }


def params_from_info(info: dict) -> SecAggParams:
    """The :class:`SecAggParams` a client builds from the round's JSON status."""
    try:
        p = info["params"]
        return SecAggParams(round_id=int(p["round_id"]), num_clients=int(p["num_clients"]),
                            threshold=int(p["threshold"]), vector_length=int(p["vector_length"]),
                            fixed_point=FixedPoint(float(p["scale"]), float(p["clip"])), weighted=bool(p["weighted"]),
                            max_total_weight=int(p["max_total_weight"]) if p.get("max_total_weight") else None)
    except (KeyError, TypeError, ValueError) as err:
        raise FedtensorError(f"round parameters are malformed ({type(err).__name__})") from None


def _max_size(p: SecAggParams, stage: str) -> int:
    """Exact encoded size of the largest valid client message of ``stage`` (the body limit)."""
    n, k = p.num_clients, _KEY_BYTES
    if stage == "advertise":
        return wire_size(AdvertiseKeys(0, 0, b"\0" * k, b"\0" * k))
    if stage == "share":
        e = EncryptedShare(0, 0, 0, b"\0" * _NONCE_BYTES, b"\0" * _SHARE_CT_BYTES)
        return wire_size(ShareKeys(0, 0, b"\0" * P.COMMITMENT_BYTES, (e,) * (n - 1)))
    if stage == "masked":
        return wire_size(MaskedInput(0, 0, b"\0" * (4 * p.words)))
    shares = (RevealedShare(0, b"\0" * _SHARE_BYTES),) * n
    return wire_size(UnmaskResponse(0, 0, shares, ()))
