"""The paper's codec: one truncated Tucker (OMLSVD) of the whole volume, kept for comparison.

Ranks are chosen so that truncation spends at most half of the error budget; the core is quantised
with the rest of it and coded with the same context coder as the block codec; factor matrices travel
as float32, which is the method's fixed overhead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedtensor.codec.entropy import BinaryStream
from fedtensor.codec.grid import GridCoder
from fedtensor.codec.quantize import dequantize, finest_step, largest_step_within, quantize
from fedtensor.codec.header import orthonormal_bases
from fedtensor.errors import FormatError
from fedtensor.tensor.rank import ranks_for_error
from fedtensor.tensor.tucker import hooi, tucker_to_tensor


class GlobalTucker:
    """Truncated OMLSVD of a normalised volume (centred, unit range), sized for ``max_sse``."""

    def __init__(self, x: np.ndarray, max_sse: float, n_iter: int = 5):
        self.shape = tuple(x.shape)
        xc = jax.device_put(np.asarray(x, np.float32))
        norm2 = float(jnp.sum(jnp.square(xc)))
        rel = float(np.sqrt(0.5 * max_sse / max(norm2, 1e-30)))
        self.ranks = ranks_for_error(xc, min(rel, 1.0))
        core, factors = hooi(xc, self.ranks, n_iter=n_iter)
        self.factors = [jax.device_put(np.asarray(f, np.float32)) for f in factors]
        self.core = core
        # Measured, not ‖x‖² − ‖core‖²: in float32 that difference is mostly rounding (0.003 for a true
        # 9e-9 on an MR crop), and the step search then starts far too fine.
        self.truncation_sse = float(jnp.sum(jnp.square(xc - tucker_to_tensor(core, factors))))

    def step_for_sse(self, max_sse: float) -> float:
        budget = max(max_sse - self.truncation_sse, 1e-3 * max_sse)
        hi = 4 * float(np.sqrt(np.prod(self.shape)))
        return largest_step_within(self.core, budget, finest_step(self.shape), hi)

    def quantize(self, step: float):
        return quantize(self.core, jnp.float32(step))

    def reconstruct(self, q, step: float) -> np.ndarray:
        return _reconstruct(q, step, self.factors)

    def encode(self, q, step: float) -> tuple[dict, list[bytes]]:
        s = BinaryStream()
        _code_core(s, self.ranks, np.asarray(q, np.int64))
        params = {"ranks": list(self.ranks), "step": step}
        return params, [np.concatenate([np.asarray(f).ravel() for f in self.factors]).astype("<f4").tobytes(), s.finish()]


def _code_core(s: BinaryStream, ranks, q: np.ndarray | None) -> np.ndarray:
    shape = (*ranks, 1)
    return GridCoder().code(s, shape, np.zeros(shape, np.int64), 0, None if q is None else q[..., None])[..., 0]


def _reconstruct(q, step, factors) -> np.ndarray:
    return np.asarray(tucker_to_tensor(dequantize(jax.device_put(q), jnp.float32(step)), factors))


def decode(params: dict, sections: list[bytes], shape) -> np.ndarray:
    ranks = params.get("ranks")
    if (not isinstance(ranks, list) or len(ranks) != 3 or len(sections) != 2
            or not all(isinstance(r, int) and 1 <= r <= n for r, n in zip(ranks, shape))):
        raise FormatError("corrupted omlsvd-global parameters")
    sizes = [n * r for n, r in zip(shape, ranks)]
    if len(sections[0]) != 4 * sum(sizes) or len(sections[1]) % 4:
        raise FormatError("corrupted omlsvd-global payload")
    flat = orthonormal_bases(sections[0], "omlsvd-global")
    bounds = np.cumsum([0, *sizes])
    factors = [jax.device_put(flat[a:b].reshape(n, r)) for a, b, n, r in zip(bounds[:-1], bounds[1:], shape, ranks)]
    coded = BinaryStream(np.frombuffer(sections[1], np.uint32))
    q = _code_core(coded, ranks, None)
    coded.check_consumed()
    return _reconstruct(q.astype(np.int32), float(params["step"]), factors)
