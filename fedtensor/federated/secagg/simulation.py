"""Run the whole protocol in one process: :func:`secure_sum` / :func:`secure_aggregate`.

Used by the federated simulation (``--secure-agg``) and by the tests and benchmark. Every message goes
through the same :class:`SecAggClient` / :class:`SecAggServer` code a deployment would use; only the
transport is a function call.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedtensor.federated.secagg.client import SecAggClient
from fedtensor.federated.secagg.errors import SecAggError
from fedtensor.federated.secagg.fixedpoint import FixedPoint
from fedtensor.federated.secagg.params import SecAggParams
from fedtensor.federated.secagg.primitives import RandomSource
from fedtensor.federated.secagg.server import SecAggResult, SecAggServer

DEFAULT_CLIP = 8.0


def _indices(name: str, idx: Sequence[int], n: int) -> set[int]:
    out = set()
    for i in idx:
        if not (isinstance(i, (int, np.integer)) and 0 <= int(i) < n):
            raise SecAggError(f"{name}: {i!r} is not a client index in [0, {n})")
        out.add(int(i))
    return out


def secure_aggregate(
    updates: Sequence[np.ndarray],
    *,
    threshold: int,
    weights: Sequence[int] | None = None,
    dropouts_after_masking: Sequence[int] = (),
    dropouts_during_unmasking: Sequence[int] = (),
    seed: int | bytes | None = None,
    clip: float = DEFAULT_CLIP,
    scale: float | None = None,
    round_id: int = 0,
    transcript: list | None = None,
) -> SecAggResult:
    """Run the four rounds for clients ``1..n`` holding ``updates`` (equal shapes) and return the
    server's :class:`SecAggResult`.

    * ``dropouts_after_masking`` — indices of clients that complete rounds 0–1 (so the others mask against
      them) but whose masked input never reaches the server: their inputs are excluded and their pairwise
      masks are removed by reconstructing their s-keys.
    * ``dropouts_during_unmasking`` — indices whose masked input arrives (their inputs count) but who never
      answer the unmasking request.
    * ``weights`` — integer sample counts: FedAvg mode (``max_total_weight`` = Σ weights, a simulation
      shortcut; a deployment announces a public bound).
    * ``clip`` — every |update value| must be ≤ clip; ``scale`` — fixed-point scale (default: the largest
      power of two that cannot overflow, see :meth:`FixedPoint.auto`).
    * ``seed`` — reproducible (insecure!) randomness for tests; ``None`` uses ``os.urandom``.
    * ``transcript`` — if a list, every message is appended as ``(direction, message)`` with direction
      ``"to_server"`` or ``"to_client"`` (the server's view is the ``"to_server"`` half).
    """
    n = len(updates)
    if n < 2:
        raise SecAggError(f"secure aggregation needs at least 2 clients, got {n}")
    arrays = [np.asarray(u) for u in updates]
    shape = arrays[0].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise SecAggError(f"update {i} has shape {a.shape}, update 0 has {shape}")
    drop_mask = _indices("dropouts_after_masking", dropouts_after_masking, n)
    drop_unmask = _indices("dropouts_during_unmasking", dropouts_during_unmasking, n)
    if drop_mask & drop_unmask:
        raise SecAggError("a client cannot drop out both after masking and during unmasking")
    weighted = weights is not None
    total = None
    if weighted:
        if len(weights) != n:
            raise SecAggError(f"{len(weights)} weights for {n} updates")
        ws = []
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 0:
                raise SecAggError(f"weights must be integer sample counts ≥ 0, got {w!r}")
            ws.append(int(w))
        total = max(1, sum(ws))
    fp = FixedPoint.auto(clip, n, total) if scale is None else FixedPoint(float(scale), clip)
    params = SecAggParams(
        round_id=round_id, num_clients=n, threshold=threshold, vector_length=int(np.prod(shape, dtype=np.int64)),
        fixed_point=fp, weighted=weighted, max_total_weight=total,
    )  # fmt: skip
    ids = list(range(1, n + 1))
    server = SecAggServer(params, ids)
    clients = [SecAggClient(i, params, rng=RandomSource(seed, f"client-{i}") if seed is not None else None) for i in ids]
    log = transcript.append if transcript is not None else (lambda _m: None)

    def up(m):
        log(("to_server", m))
        return m

    def down(m):
        log(("to_client", m))
        return m

    for c in clients:  # round 0
        server.receive_advertise(up(c.advertise_keys()))
    keys = down(server.broadcast_keys())
    for c in clients:  # round 1
        server.receive_shares(up(c.share_keys(keys)))
    forwards = server.forward_shares()
    for k, c in enumerate(clients):  # round 2
        fwd = down(forwards[c.id])
        if k in drop_mask:
            continue
        y = c.mask_input(fwd, arrays[k], ws[k] if weighted else None)
        server.receive_masked_input(up(y))
    request = down(server.unmask_request())
    for k, c in enumerate(clients):  # round 3
        if k in drop_mask or k in drop_unmask:
            continue
        server.receive_unmask(up(c.unmask(request)))
    return server.finalize()


def secure_sum(
    updates: Sequence[np.ndarray],
    *,
    threshold: int,
    dropouts_after_masking: Sequence[int] = (),
    seed: int | bytes | None = None,
    weights: Sequence[int] | None = None,
    **kwargs,
) -> np.ndarray:
    """Securely aggregate ``updates`` in-process (the full Bonawitz et al. protocol).

    Returns Σ x_u over the surviving clients, or — when integer ``weights`` (sample counts) are given —
    the FedAvg mean Σ w_u x_u / Σ w_u over the survivors; same shape as the updates, float32 for float32
    inputs (float64 otherwise). Exact up to the fixed-point tolerance (see :mod:`.fixedpoint`).
    Raises :class:`SecAggAbort` when fewer than ``threshold`` clients survive. Further keyword arguments
    (``clip``, ``scale``, ``round_id``, ``dropouts_during_unmasking``, ``transcript``) go to
    :func:`secure_aggregate`.
    """
    res = secure_aggregate(
        updates, threshold=threshold, weights=weights, dropouts_after_masking=dropouts_after_masking, seed=seed, **kwargs
    )
    out = res.mean if weights is not None else res.sum
    dt = np.result_type(*[np.asarray(u).dtype for u in updates])
    dt = dt if dt in (np.float32, np.float64) else np.float64
    return out.astype(dt, copy=False).reshape(np.asarray(updates[0]).shape)
