"""The block-Tucker transform codec: shared per-mode bases, dead-zone quantisation, context coding."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from fedtensor.codec.blockcoef import code_block_coefficients
from fedtensor.codec.entropy import BinaryStream
from fedtensor.codec.quantize import dequantize, largest_step_within, quantize
from fedtensor.errors import FormatError
from fedtensor.tensor.block import block_bases, block_grid, expand, from_blocks, project, to_blocks


class BlockTucker:
    """One volume's transform: its bases and coefficients, ready to be quantised at any step."""

    def __init__(self, x: np.ndarray, b: int = 8, n_iter: int = 0):
        self.shape, self.b = tuple(x.shape), b
        self.offset = float(np.mean(x, dtype=np.float64))
        blocks = to_blocks(jnp.asarray(x, jnp.float32) - self.offset, b)
        # Bases travel as float32 in the stream; encode with exactly those values.
        self.bases = [jnp.asarray(np.asarray(u, np.float32)) for u in block_bases(blocks, (b, b, b), n_iter)]
        self.coef = _project(blocks, self.bases)
        self.padding_ratio = float(np.prod(self.shape) / self.coef.size)

    def step_for_sse(self, max_sse: float, value_range: float) -> float:
        """Largest quantiser step whose (coefficient-domain) error fits ``max_sse`` over the real voxels."""
        hi = max(value_range, 1e-6) * 4 * self.b**1.5
        return largest_step_within(self.coef, max_sse / self.padding_ratio, hi * 1e-9, hi)

    def quantize(self, step: float) -> jax.Array:
        return quantize(self.coef, jnp.float32(step))

    def reconstruct(self, q: jax.Array, step: float) -> np.ndarray:
        return reconstruct(q, step, self.bases, self.shape, self.offset)

    def encode(self, q: jax.Array, step: float) -> tuple[dict, list[bytes]]:
        s = BinaryStream()
        code_block_coefficients(s, block_grid(self.shape, self.b), self.b, np.asarray(q, np.int64))
        params = {"block": self.b, "step": step, "offset": self.offset}
        return params, [np.stack([np.asarray(u) for u in self.bases]).astype("<f4").tobytes(), s.finish()]


@jax.jit
def _project(blocks, bases):
    return project(blocks, bases)


@jax.jit
def _expand(core, bases):
    return expand(core, bases)


def reconstruct(q, step: float, bases, shape, offset: float) -> np.ndarray:
    x = from_blocks(_expand(dequantize(jnp.asarray(q), jnp.float32(step)), bases), tuple(shape))
    return np.asarray(x, np.float64) + offset


def decode(params: dict, sections: list[bytes], shape: tuple[int, int, int]) -> np.ndarray:
    b = params.get("block")
    if not isinstance(b, int) or not 1 <= b <= 64 or len(sections) != 2:
        raise FormatError("corrupted block-tucker parameters")
    if len(sections[0]) != 3 * b * b * 4 or len(sections[1]) % 4:
        raise FormatError("corrupted block-tucker payload")
    bases = [jnp.asarray(u) for u in np.frombuffer(sections[0], "<f4").reshape(3, b, b)]
    s = BinaryStream(np.frombuffer(sections[1], np.uint32))
    q = code_block_coefficients(s, block_grid(shape, b), b)
    return reconstruct(q.astype(np.int32), float(params["step"]), bases, shape, float(params["offset"]))
