"""Block-Tucker forward transform fused with dead-zone quantisation, and its inverse.

A block's coefficients under the separable basis ``(U1, U2, U3)`` are one matrix product with the
Kronecker basis ``K = U1 ⊗ U2 ⊗ U3`` (``B × B`` with ``B = bx·by·bz``): ``C = X K`` for the block stack
``X`` (``N × B``, one block per row, C order). On an accelerator this is one large, matrix-unit-friendly
matmul per tile of blocks, and fusing the quantiser into its epilogue avoids writing the float
coefficients back to memory at all (and reading them again): the kernel reads voxels and writes int32
indices. The inverse fuses dequantisation into the prologue of ``Q Kᵀ``.

Each kernel has a plain ``jnp`` reference; :func:`transform_quantize` and :func:`dequantize_inverse`
pick the Pallas kernel on a GPU and the reference elsewhere. Tests run the kernels in Pallas
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

IMPLS = ("reference", "pallas", "interpret")
# Tile settings measured on an H200 (benchmarks/kernels.py, 512³): 128-row tiles exceed the shared
# memory for B ≥ 512; 64 rows × 64 columns, 32-wide reduction slices and 4 warps were the fastest.
ROW_TILE = 64  # blocks per program
COL_TILE = 64  # coefficient columns per program (B is padded to a power of two, at least this)
K_TILE = 32  # reduction slice loaded per step
TILES = (ROW_TILE, COL_TILE, K_TILE)
NUM_WARPS = 4
# The Kronecker kernel does B multiply-adds per coefficient, the separable einsum bx+by+bz: measured on
# an H200 the fused kernel wins for B ≤ 128 (4×4×8: 93 against 32 GVoxel/s) and loses above (8×8×8: 34
# against 44; 16×16×8: 10 against 44), so on a GPU it is used up to this block volume.
PALLAS_MAX_BLOCK = 128
# In-kernel matmul precision. "highest" is true fp32 (IEEE FMA on a GPU): the codec's PSNR floor is
# measured on the encoder's own reconstruction, and a decoder on another backend must compute the same
# voxels to within fp32 rounding, so TF32 (Triton's default, ~1e-3 relative) is never used. "tf32x3"
# (three TF32 tensor-core passes, ~fp32 accuracy) is offered for measurement.
FP32 = jax.lax.Precision.HIGHEST
PRECISIONS = {"highest": FP32, "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3}


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
    """``quantize(x @ k)`` for ``x`` of shape ``(N, B)``; ``rounding`` one value or one per column ``(B,)``."""
    return _quantize(jnp.dot(x, k, precision=FP32), step, rounding)


@jax.jit
def dequantize_inverse_reference(q: jax.Array, k: jax.Array, step, offset) -> jax.Array:
    """``dequantize(q) @ k.T`` for ``q`` of shape ``(N, B)``."""
    return jnp.dot(_dequantize(q, step, offset), k.T, precision=FP32)


def _pad_to(a: jax.Array, rows: int, cols: int) -> jax.Array:
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _forward_kernel(x_ref, k_ref, scal_ref, col_ref, q_ref, *, n_k: int, k_tile: int, precision):
    step = scal_ref[0]

    def body(t, acc):
        sl = pl.ds(t * k_tile, k_tile)
        return acc + jnp.dot(x_ref[:, sl], k_ref[sl, :], precision=precision, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros(q_ref.shape, jnp.float32))
    q_ref[...] = _quantize(acc, step, col_ref[...][None, :])  # each output column (band) its own rounding


def _inverse_kernel(q_ref, kt_ref, scal_ref, x_ref, *, n_k: int, k_tile: int, precision):
    step, offset = scal_ref[0], scal_ref[1]

    def body(t, acc):
        sl = pl.ds(t * k_tile, k_tile)
        c = _dequantize(q_ref[:, sl], step, offset)
        return acc + jnp.dot(c, kt_ref[sl, :], precision=precision, preferred_element_type=jnp.float32)

    x_ref[...] = jax.lax.fori_loop(0, n_k, body, jnp.zeros(x_ref.shape, jnp.float32))


def _pow2_at_least(n: int, m: int) -> int:
    return max(m, 1 << max(0, n - 1).bit_length())


def _tiled_matmul_call(kernel, a: jax.Array, m: jax.Array, scalars, out_dtype, interpret: bool,
                       precision: str, tiles, num_warps, columns: jax.Array | None = None) -> jax.Array:
    """Run ``kernel`` over (row tile × column tile) programs of ``a (N×B) @ m (B×C)``, padded then cropped;
    ``columns`` (``(C,)``, optional) is a per-output-column vector the kernel gets tile by tile.

    ``B`` and ``C`` are padded to powers of two (Triton's block shapes must be powers of two; the
    auto-chosen block volumes already are), ``N`` to a multiple of the row tile.
    """
    row_tile, col_tile, k_tile = tiles
    if any(t < 1 or t & (t - 1) for t in tiles):  # else columns or reduction slices would be skipped
        raise ValueError(f"Pallas tiles must be powers of two, got {tiles}")
    n, b = a.shape
    if m.shape[0] != b:
        raise ValueError(f"a {a.shape} @ m {m.shape}: the inner sizes differ")
    c = m.shape[1]
    if n == 0:  # no program to run (and a zero-row block spec is not a shape Pallas accepts)
        return jnp.zeros((0, c), out_dtype)
    rows = _round_up(n, row_tile)
    inner, cols = _pow2_at_least(b, max(col_tile, k_tile)), _pow2_at_least(c, max(col_tile, k_tile))
    params = {}
    if not interpret and num_warps and jax.default_backend() in ("gpu", "cuda", "rocm"):
        from jax.experimental.pallas import triton as pltriton

        params["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps)
    in_specs = [
        pl.BlockSpec((row_tile, inner), lambda i, j: (i, 0)),
        pl.BlockSpec((inner, col_tile), lambda i, j: (0, j)),
        pl.BlockSpec((2,), lambda i, j: (0,)),
    ]
    operands = [_pad_to(a, rows, inner), _pad_to(m, inner, cols), jnp.stack([jnp.float32(v) for v in scalars])]
    if columns is not None:
        in_specs.append(pl.BlockSpec((col_tile,), lambda i, j: (j,)))
        operands.append(jnp.pad(columns.astype(jnp.float32), (0, cols - c)))
    out = pl.pallas_call(
        partial(kernel, n_k=inner // k_tile, k_tile=k_tile, precision=PRECISIONS[precision]),
        grid=(rows // row_tile, cols // col_tile),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((row_tile, col_tile), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows, cols), out_dtype),
        interpret=interpret,
        **params,
    )(*operands)
    return out[:n, :c]


_STATIC = ("interpret", "precision", "tiles", "num_warps")


@partial(jax.jit, static_argnames=_STATIC)
def transform_quantize_pallas(x: jax.Array, k: jax.Array, step, rounding, *, interpret: bool = False,
                              precision: str = "highest", tiles=TILES, num_warps=NUM_WARPS) -> jax.Array:
    """Pallas version of :func:`transform_quantize_reference` (static shapes: pad, then crop); ``rounding``
    is one value or one per column (band)."""
    columns = jnp.broadcast_to(jnp.asarray(rounding, jnp.float32), (k.shape[1],))
    return _tiled_matmul_call(_forward_kernel, x.astype(jnp.float32), k, (step, 0.0), jnp.int32, interpret,
                              precision, tiles, num_warps, columns=columns)  # (the inverse's 2 scalars' layout)


@partial(jax.jit, static_argnames=_STATIC)
def dequantize_inverse_pallas(q: jax.Array, k: jax.Array, step, offset, *, interpret: bool = False,
                              precision: str = "highest", tiles=TILES, num_warps=NUM_WARPS) -> jax.Array:
    """Pallas version of :func:`dequantize_inverse_reference`."""
    return _tiled_matmul_call(_inverse_kernel, q, k.T, (step, offset), jnp.float32, interpret,
                              precision, tiles, num_warps)


def accelerated() -> bool:
    """True on a GPU backend, where the Pallas kernels were compiled, checked and measured (an H200).

    On a TPU the kernels have never run, so the codec keeps the ``jnp`` reference there unless
    ``FEDTENSOR_KERNELS=pallas`` asks for them.
    """
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def _forced() -> str:
    return os.environ.get("FEDTENSOR_KERNELS", "").strip().lower()


def default_impl() -> str:
    """``"pallas"`` on a GPU backend, ``"reference"`` elsewhere (decided at run time).

    ``FEDTENSOR_KERNELS`` (one of :data:`IMPLS`) overrides the choice, e.g. to run the ``jnp`` reference
    on a GPU or the Pallas kernels in interpret mode on a CPU.
    """
    forced = _forced()
    if forced:
        from fedtensor.errors import FedtensorError

        if forced not in IMPLS:
            raise FedtensorError(f"FEDTENSOR_KERNELS must be one of {', '.join(IMPLS)}, got {forced!r}")
        if forced == "pallas" and jax.default_backend() == "cpu":
            raise FedtensorError("FEDTENSOR_KERNELS=pallas needs a GPU or TPU; 'interpret' runs the Pallas "
                                 "kernels on a CPU")
        return forced
    return "pallas" if accelerated() else "reference"


def impl_for(block) -> str:
    """The implementation the codec uses for block shape ``block``: ``FEDTENSOR_KERNELS`` when set,
    otherwise the Pallas kernel on a GPU for block volumes up to :data:`PALLAS_MAX_BLOCK` and the
    separable ``jnp`` reference elsewhere (the faster of the two as measured)."""
    impl = default_impl()
    if impl == "pallas" and not _forced() and int(np.prod(block)) > PALLAS_MAX_BLOCK:
        return "reference"
    return impl


def transform_quantize(x, k, step, rounding) -> jax.Array:
    """Fused block transform + quantisation on a flat block stack: Pallas on a GPU, the ``jnp`` reference
    elsewhere (any block volume; the codec itself goes through :func:`forward_blocks` and :func:`impl_for`).
    ``rounding``: one value, or one per band ``(B,)``."""
    fn = transform_quantize_pallas if accelerated() else transform_quantize_reference
    return fn(jnp.asarray(x, jnp.float32), k, np.float32(step), np.asarray(rounding, np.float32))


def dequantize_inverse(q, k, step, offset) -> jax.Array:
    """Fused dequantisation + inverse block transform: Pallas on a GPU, the reference elsewhere."""
    fn = dequantize_inverse_pallas if accelerated() else dequantize_inverse_reference
    return fn(jnp.asarray(q, jnp.int32), k, np.float32(step), np.float32(offset))


# --------------------------------------------------------------------------------------------------
# block grids (gx, gy, gz, bx, by, bz), as the codec holds them; call these inside a jit with a static impl
# --------------------------------------------------------------------------------------------------


def forward_blocks(blocks: jax.Array, bases, step, rounding, impl: str = "reference") -> jax.Array:
    """int32 quantisation indices of every block's coefficients (same grid shape); ``rounding`` is one
    value or one per band (the block's shape)."""
    if impl == "reference":
        u1, u2, u3 = bases
        c = jnp.einsum("xyzijk,ia,jb,kc->xyzabc", blocks, u1, u2, u3, precision=FP32)
        return _quantize(c, step, rounding)
    flat = blocks.reshape(-1, int(np.prod(blocks.shape[3:])))
    rounding = jnp.broadcast_to(jnp.asarray(rounding, jnp.float32), blocks.shape[3:]).reshape(-1)  # C order = kron's
    q = transform_quantize_pallas(flat, kron_basis(bases), step, rounding, interpret=impl == "interpret")
    return q.reshape(blocks.shape)


def inverse_blocks(q: jax.Array, bases, step, offset, impl: str = "reference") -> jax.Array:
    """float32 blocks from quantisation indices (the inverse of :func:`forward_blocks`)."""
    if impl == "reference":
        u1, u2, u3 = bases
        return jnp.einsum("xyzabc,ia,jb,kc->xyzijk", _dequantize(q, step, offset), u1, u2, u3, precision=FP32)
    flat = q.reshape(-1, int(np.prod(q.shape[3:])))
    x = dequantize_inverse_pallas(flat, kron_basis(bases), step, offset, interpret=impl == "interpret")
    return x.reshape(q.shape)
