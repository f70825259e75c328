"""Public parameters of one secure-aggregation round, agreed by the server and every client beforehand
(e.g. sent with the round's training config)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtensor.federated.secagg.errors import SecAggAbort, SecAggError
from fedtensor.federated.secagg.fixedpoint import FixedPoint
from fedtensor.federated.secagg.primitives import MAX_ROUND_ID


@dataclass(frozen=True)
class SecAggParams:
    """Parameters of one round.

    * ``round_id`` — unique per aggregation (e.g. the FL round number); bound into every key derivation,
      ciphertext and message, so nothing from another round is accepted.
    * ``num_clients`` (n), ``threshold`` (t, n/2 < t ≤ n, t ≥ 2) — the protocol tolerates up to n − t dropouts,
      and an honest-but-curious server with fewer than t clients learns nothing beyond the sum. An
      active server that tells two groups of survivors different stories about one client unmasks it
      once it colludes with c ≥ 2t − n + 1 clients: t ≤ n/2 is refused (it would need none); Bonawitz
      et al.'s t > 2n/3 tolerates about n/3 colluders.
    * ``vector_length`` — coordinates of the update (flattened).
    * ``fixed_point`` — scale and clip range; must not overflow for n clients (see :mod:`.fixedpoint`).
    * ``weighted`` — FedAvg mode: clients send w·x plus w as one extra coordinate; then
      ``max_total_weight`` (a public bound on Σw) is required for the overflow check.
    """

    round_id: int
    num_clients: int
    threshold: int
    vector_length: int
    fixed_point: FixedPoint
    weighted: bool = False
    max_total_weight: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.round_id, int) and 0 <= self.round_id <= MAX_ROUND_ID):
            raise SecAggError(f"round_id must be an int in [0, 2^63), got {self.round_id!r}")
        if not (isinstance(self.num_clients, int) and self.num_clients >= 2):
            raise SecAggError(f"secure aggregation needs at least 2 clients, got {self.num_clients!r}")
        if not (isinstance(self.threshold, int) and self.threshold >= 2):
            raise SecAggError(f"threshold must be an int ≥ 2, got {self.threshold!r}")
        if self.threshold > self.num_clients:
            raise SecAggAbort(f"secure aggregation aborted: threshold {self.threshold} exceeds the {self.num_clients} clients")
        if 2 * self.threshold <= self.num_clients:
            # Two halves of the cohort could then each reveal one of a client's two secrets to a server
            # that tells one half the client survived and the other that it dropped: its update in clear.
            raise SecAggError(f"threshold {self.threshold} of {self.num_clients} clients must exceed n/2")
        if not (isinstance(self.vector_length, int) and self.vector_length >= 1):
            raise SecAggError(f"vector_length must be a positive int, got {self.vector_length!r}")
        if not isinstance(self.fixed_point, FixedPoint):
            raise SecAggError("fixed_point must be a FixedPoint")
        if self.weighted:
            if not (isinstance(self.max_total_weight, int) and 1 <= self.max_total_weight < 2**32):
                raise SecAggError("weighted secure aggregation needs max_total_weight, an int in [1, 2^32)")
            # Each client's weight is only bounded by W: the summed weight coordinate must not wrap mod
            # 2^32, or a total far above W could pass the server's Σw ≤ W check (and the mean be garbage).
            if self.num_clients * self.max_total_weight >= 2**32:
                raise SecAggError(f"max_total_weight {self.max_total_weight} × {self.num_clients} clients must stay "
                                  "below 2^32 (the summed weights would wrap)")
        self.fixed_point.check_capacity(self.num_clients, self.max_total_weight if self.weighted else None)

    @property
    def words(self) -> int:
        """Length of the masked vector: the update, plus the weight coordinate in weighted mode."""
        return self.vector_length + (1 if self.weighted else 0)
