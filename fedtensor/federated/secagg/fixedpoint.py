"""Fixed-point encoding of real-valued updates into Z_2^32, the ring the masks live in.

A client encodes each coordinate x (|x| ≤ ``clip``) with its integer weight w (its sample count; 1 when
unweighted) as ``q = round(w · x · scale)``, stored mod 2^32 (two's complement). The server decodes the
masked-then-unmasked sum Q = Σ q (mod 2^32) as a signed int32 and divides by ``scale``.

**Overflow bound.** The decoding is exact iff |Σ q| ≤ 2^31 − 1. With n clients and total weight W = Σ w
(W = n when unweighted), |Σ q| ≤ W · clip · scale + n/2, so the configuration must satisfy

    W · clip · scale + n/2 ≤ 2^31 − 1,

which :meth:`FixedPoint.check_capacity` enforces and :meth:`FixedPoint.auto` meets with the largest
power-of-two scale. Values outside ±clip are refused (never silently wrapped or clipped).

**Tolerance.** Each q carries a rounding error ≤ 1/2, so per coordinate

    |decoded sum − Σ w·x| ≤ n / (2 · scale)          (weighted or unweighted sum)
    |decoded mean − Σ w·x / W| ≤ n / (2 · scale · W)  (FedAvg mean)

plus float64 rounding of the inputs (w·x·scale is exact in float64 while it is < 2^53).
The weight itself travels as one extra, unscaled uint32 coordinate, exact while W < 2^32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtensor.federated.secagg.errors import SecAggError
from fedtensor.federated.secagg.primitives import WORD

INT32_MAX = (1 << 31) - 1
_CHUNK = 1 << 15


@dataclass(frozen=True)
class FixedPoint:
    """Public encoding parameters: ``scale`` (units per 1.0) and ``clip`` (max |x| accepted)."""

    scale: float
    clip: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise SecAggError(f"fixed-point scale must be a positive finite number, got {self.scale!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecAggError(f"fixed-point clip must be a positive finite number, got {self.clip!r}")

    @classmethod
    def auto(cls, clip: float, num_clients: int, total_weight: int | None = None) -> "FixedPoint":
        """The largest power-of-two scale that cannot overflow for ``num_clients`` clients with total
        weight ≤ ``total_weight`` (default: ``num_clients``, i.e. unweighted)."""
        w = num_clients if total_weight is None else total_weight
        room = INT32_MAX - num_clients / 2
        if not (clip > 0 and w > 0 and room > 0):
            raise SecAggError("fixed-point auto scale needs clip > 0 and a positive total weight")
        fp = cls(2.0 ** math.floor(math.log2(room / (w * clip))), clip)
        if not fp.fits(num_clients, w):  # log2 rounded up to the next power of two
            fp = cls(fp.scale / 2, clip)
        fp.check_capacity(num_clients, w)
        return fp

    def fits(self, num_clients: int, total_weight: int | None = None) -> bool:
        """Whether a sum over ``num_clients`` clients with total weight ``total_weight`` fits int32."""
        w = num_clients if total_weight is None else total_weight
        return w * self.clip * self.scale + num_clients / 2 <= INT32_MAX

    def check_capacity(self, num_clients: int, total_weight: int | None = None) -> None:
        """Raise unless :meth:`fits`."""
        w = num_clients if total_weight is None else total_weight
        if not self.fits(num_clients, w):
            raise SecAggError(
                f"fixed-point overflow: total weight {w} × clip {self.clip:g} × scale {self.scale:g} exceeds 2^31; "
                "lower scale or clip"
            )

    def tolerance(self, num_clients: int) -> float:
        """Worst-case absolute rounding error of a decoded (weighted) sum over ``num_clients`` clients."""
        return num_clients / (2.0 * self.scale)

    def encode(self, x: np.ndarray, weight: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """``round(weight · x · scale) mod 2^32`` as uint32 words (into ``out`` when given).

        Vectorised in cache-sized chunks: float64 product, round half to even, then a direct float64 →
        int32 conversion (in range by the clip and capacity checks) viewed as uint32 (two's complement).
        """
        x = np.asarray(x).reshape(-1)
        if x.dtype.kind not in "fiub":
            raise SecAggError(f"update must be numeric, got dtype {x.dtype}")
        if weight < 0 or weight * self.clip * self.scale > INT32_MAX:
            raise SecAggError(f"weight {weight} × clip × scale does not fit int32")
        if out is None:
            out = np.empty(x.size, dtype=WORD)
        elif out.dtype != WORD or out.shape != (x.size,):
            raise SecAggError("fixed-point output buffer must be uint32 with one word per value")
        if x.size == 0:
            return out
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise SecAggError("update contains NaN or Inf")
        if max(-lo, hi) > self.clip:
            raise SecAggError(
                f"update value {max(-lo, hi):.6g} in magnitude exceeds the fixed-point clip ±{self.clip:g}; "
                "clip the update or raise clip"
            )
        factor = float(weight) * self.scale
        out_i = out.view(np.dtype("<i4"))
        chunk = min(x.size, _CHUNK)
        tmp = np.empty(chunk, dtype=np.float64)
        for s in range(0, x.size, chunk):
            e = min(s + chunk, x.size)
            t = tmp[: e - s]
            np.multiply(x[s:e], factor, out=t, dtype=np.float64)  # float64 math, not float32
            np.rint(t, out=t)
            np.copyto(out_i[s:e], t, casting="unsafe")  # |t| ≤ 2^31 − 1: exact
        return out

    def decode_sum(self, q: np.ndarray) -> np.ndarray:
        """Signed int32 reading of a sum in Z_2^32, divided by ``scale`` (float64)."""
        return np.asarray(q, dtype=WORD).view(np.dtype("<i4")).astype(np.float64) / self.scale
