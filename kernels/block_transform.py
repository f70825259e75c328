"""Block-Tucker forward transform fused with dead-zone quantisation, and its inverse.

A block's coefficients under the separable basis ``(U1, U2, U3)`` are one matrix product with the
Kronecker basis ``K = U1 ⊗ U2 ⊗ U3`` (``B × B`` with ``B = bx·by·bz``): ``C = X K`` for the block stack
``X`` (``N × B``, one block per row, C order). On an accelerator this is one large, matrix-unit-friendly
matmul per tile of blocks, and fusing the quantiser into its epilogue avoids writing the float
coefficients back to memory at all (and reading them again): the kernel reads voxels and writes int32
indices. The inverse fuses dequantisation into the prologue of ``Q Kᵀ``.

Each kernel has a plain ``jnp`` reference; :func:`transform_quantize` and :func:`dequantize_inverse`
pick the Pallas kernel on GPU/TPU and the reference elsewhere. Tests run the kernels in Pallas
interpret mode on CPU against the references.

The codec calls :func:`forward_blocks` / :func:`inverse_blocks` on a grid of blocks
``(gx, gy, gz, bx, by, bz)``. Their ``"reference"`` implementation is the separable ``einsum`` (three
small contractions: ``bx+by+bz`` multiply-adds per coefficient instead of ``B``, which is what a CPU
wants); ``"pallas"`` is the fused Kronecker kernel, ``"interpret"`` the same kernel in interpret mode.
"""

from __future__ import annotations

import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

ROW_TILE = 128  # blocks per program
COL_TILE = 128  # coefficient columns per program (B is padded to a multiple)
K_TILE = 128  # reduction slice loaded per step
IMPLS = ("reference", "pallas", "interpret")


def kron_basis(bases) -> jax.Array:
    """``U1 ⊗ U2 ⊗ U3``: maps a C-ordered block ``(i, j, k)`` to coefficients ``(a, b, c)``."""
    u1, u2, u3 = (jnp.asarray(u, jnp.float32) for u in bases)
    return jnp.kron(jnp.kron(u1, u2), u3)


def _quantize(c, step, rounding):
    return (jnp.sign(c) * jnp.floor(jnp.abs(c) / step + rounding)).astype(jnp.int32)


def _dequantize(q, step, offset):
    qf = q.astype(jnp.float32)
    return jnp.sign(qf) * (jnp.abs(qf) + offset) * step


@jax.jit
def transform_quantize_reference(x: jax.Array, k: jax.Array, step, rounding) -> jax.Array:
    """``quantize(x @ k)`` for ``x`` of shape ``(N, B)``."""
    return _quantize(jnp.dot(x, k, precision=jax.lax.Precision.HIGHEST), step, rounding)


@jax.jit
def dequantize_inverse_reference(q: jax.Array, k: jax.Array, step, offset) -> jax.Array:
    """``dequantize(q) @ k.T`` for ``q`` of shape ``(N, B)``."""
    return jnp.dot(_dequantize(q, step, offset), k.T, precision=jax.lax.Precision.HIGHEST)


def _pad_to(a: jax.Array, rows: int, cols: int) -> jax.Array:
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _forward_kernel(x_ref, k_ref, scal_ref, q_ref, *, n_k: int):
    step, rounding = scal_ref[0], scal_ref[1]

    def body(t, acc):
        sl = pl.ds(t * K_TILE, K_TILE)
        return acc + jnp.dot(x_ref[:, sl], k_ref[sl, :], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros(q_ref.shape, jnp.float32))
    q_ref[...] = _quantize(acc, step, rounding)


def _inverse_kernel(q_ref, kt_ref, scal_ref, x_ref, *, n_k: int):
    step, offset = scal_ref[0], scal_ref[1]

    def body(t, acc):
        sl = pl.ds(t * K_TILE, K_TILE)
        c = _dequantize(q_ref[:, sl], step, offset)
        return acc + jnp.dot(c, kt_ref[sl, :], preferred_element_type=jnp.float32)

    x_ref[...] = jax.lax.fori_loop(0, n_k, body, jnp.zeros(x_ref.shape, jnp.float32))


def _tiled_matmul_call(kernel, a: jax.Array, m: jax.Array, scalars, out_dtype, interpret: bool) -> jax.Array:
    """Run ``kernel`` over (row tile × column tile) programs of ``a (N×B) @ m (B×B)``, padded then cropped."""
    n, b = a.shape
    rows, cols = _round_up(n, ROW_TILE), _round_up(b, max(COL_TILE, K_TILE))
    out = pl.pallas_call(
        partial(kernel, n_k=cols // K_TILE),
        grid=(rows // ROW_TILE, cols // COL_TILE),
        in_specs=[
            pl.BlockSpec((ROW_TILE, cols), lambda i, j: (i, 0)),
            pl.BlockSpec((cols, COL_TILE), lambda i, j: (0, j)),
            pl.BlockSpec((2,), lambda i, j: (0,)),
        ],
        out_specs=pl.BlockSpec((ROW_TILE, COL_TILE), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows, cols), out_dtype),
        interpret=interpret,
    )(_pad_to(a, rows, cols), _pad_to(m, cols, cols), jnp.stack([jnp.float32(v) for v in scalars]))
    return out[:n, :b]


@partial(jax.jit, static_argnames="interpret")
def transform_quantize_pallas(x: jax.Array, k: jax.Array, step, rounding, *, interpret: bool = False) -> jax.Array:
    """Pallas version of :func:`transform_quantize_reference` (static shapes: pad, then crop)."""
    return _tiled_matmul_call(_forward_kernel, x.astype(jnp.float32), k, (step, rounding), jnp.int32, interpret)


@partial(jax.jit, static_argnames="interpret")
def dequantize_inverse_pallas(q: jax.Array, k: jax.Array, step, offset, *, interpret: bool = False) -> jax.Array:
    """Pallas version of :func:`dequantize_inverse_reference`."""
    return _tiled_matmul_call(_inverse_kernel, q, k.T, (step, offset), jnp.float32, interpret)


def accelerated() -> bool:
    """True where the Pallas kernels are the better path (a GPU or TPU backend)."""
    return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


def default_impl() -> str:
    """``"pallas"`` on a GPU/TPU backend, ``"reference"`` elsewhere (decided at run time).

    ``FEDTENSOR_KERNELS`` (one of :data:`IMPLS`) overrides the choice, e.g. to run the ``jnp`` reference
    on a GPU or the Pallas kernels in interpret mode on a CPU.
    """
    forced = os.environ.get("FEDTENSOR_KERNELS", "").strip().lower()
    if forced:
        if forced not in IMPLS:
            from fedtensor.errors import FedtensorError

            raise FedtensorError(f"FEDTENSOR_KERNELS must be one of {', '.join(IMPLS)}, got {forced!r}")
        return forced
    return "pallas" if accelerated() else "reference"


def transform_quantize(x, k, step, rounding) -> jax.Array:
    """Fused block transform + quantisation, Pallas on accelerators, ``jnp`` reference on CPU."""
    fn = transform_quantize_pallas if accelerated() else transform_quantize_reference
    return fn(jnp.asarray(x, jnp.float32), k, np.float32(step), np.float32(rounding))


def dequantize_inverse(q, k, step, offset) -> jax.Array:
    """Fused dequantisation + inverse block transform, Pallas on accelerators, reference on CPU."""
    fn = dequantize_inverse_pallas if accelerated() else dequantize_inverse_reference
    return fn(jnp.asarray(q, jnp.int32), k, np.float32(step), np.float32(offset))


# --------------------------------------------------------------------------------------------------
# block grids (gx, gy, gz, bx, by, bz), as the codec holds them; call these inside a jit with a static impl
# --------------------------------------------------------------------------------------------------


def forward_blocks(blocks: jax.Array, bases, step, rounding, impl: str = "reference") -> jax.Array:
    """int32 quantisation indices of every block's coefficients (same grid shape)."""
    if impl == "reference":
        u1, u2, u3 = bases
        c = jnp.einsum("xyzijk,ia,jb,kc->xyzabc", blocks, u1, u2, u3)
        return _quantize(c, step, rounding)
    flat = blocks.reshape(-1, int(np.prod(blocks.shape[3:])))
    q = transform_quantize_pallas(flat, kron_basis(bases), step, rounding, interpret=impl == "interpret")
    return q.reshape(blocks.shape)


def inverse_blocks(q: jax.Array, bases, step, offset, impl: str = "reference") -> jax.Array:
    """float32 blocks from quantisation indices (the inverse of :func:`forward_blocks`)."""
    if impl == "reference":
        u1, u2, u3 = bases
        return jnp.einsum("xyzabc,ia,jb,kc->xyzijk", _dequantize(q, step, offset), u1, u2, u3)
    flat = q.reshape(-1, int(np.prod(q.shape[3:])))
    x = dequantize_inverse_pallas(flat, kron_basis(bases), step, offset, interpret=impl == "interpret")
    return x.reshape(q.shape)
