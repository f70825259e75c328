"""The 2D 'SAME' convolution of the net's CPU path, written so that XLA's CPU backend runs every
convolution of training — forward and both gradients — through its fast (Eigen) kernel, also inside
loops and under ``vmap`` with per-client weights.

Two facts about XLA:CPU (measured with jaxlib 0.10 on the restoration net, 16³ patches) shape it:

* Autodiff emits the gradient convolutions with permuted dimension labels (kernel gradient
  ``f01b_i01o->01bf``, input gradient ``b01f_01oi``). Outside loops XLA rewrites them into the canonical
  NHWC/HWIO form; inside a ``while`` body — the ``lax.scan`` of a client's local steps, the ``lax.map``
  over client chunks — it does not, and they run through a generic loop: one client's 5 local steps
  took 2.5× as long in ``scan`` as unrolled. :func:`conv2d_same` has a custom VJP that emits the
  canonical forms itself (with explicit transposes).
* ``vmap`` of a convolution whose kernel is batched too (one set of weights per simulated client)
  becomes a grouped convolution, which XLA:CPU expands into a dense one over all groups (cost × the
  number of clients). The batching rules here emit one convolution per client instead, and fold the
  clients into the batch axis when only the data is batched.

Forward values are bit-identical to ``lax.conv_general_dilated``; gradients agree to float rounding.
Being a custom VJP, it supports first-order reverse mode only (no ``jvp``, no gradient of a gradient).
Under ``vmap`` with per-entry kernels the program holds one convolution per entry, so compile time
grows with the batch (the simulation's ``client_chunk``, 8 by default).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x: jax.Array, w: jax.Array, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DN)


def _same(x: jax.Array, w: jax.Array) -> jax.Array:
    r = w.shape[0] // 2
    return _conv(x, w, ((r, r), (r, r)))


def _input_grad(dy: jax.Array, w: jax.Array) -> jax.Array:
    # correlation with the spatially flipped kernel, input and output channels swapped
    return _same(dy, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))


def _kernel_grad(x: jax.Array, dy: jax.Array, r: int) -> jax.Array:
    # Σ_n,y,x x[n, y+i-r, x+j-r, c] dy[n, y, x, o] as one canonical convolution: the input channels c
    # act as the batch, the samples n as the contracted features, dy as a (H, W, N, O) kernel. The
    # zero border is the convolution's padding, not a jnp.pad: XLA:CPU runs the padded-operand form
    # 4-8x slower (measured on the net's layer shapes).
    g = _conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), ((r, r), (r, r)))
    return g.transpose(1, 2, 0, 3)


def _per_client(fn, *, kernel_second: bool):
    """``fn(a, b)`` with a batching rule: one call per batch entry (unrolled while tracing), or — when
    ``b`` is a kernel and only ``a`` is batched — one call with the batch folded into ``a``'s samples."""
    f = custom_vmap(fn)

    @f.def_vmap
    def rule(axis_size, in_batched, a, b):
        a_batched, b_batched = in_batched
        if kernel_second and not b_batched:
            y = f(a.reshape(-1, *a.shape[2:]), b)
            return y.reshape(axis_size, -1, *y.shape[1:]), True
        return jnp.stack([f(a[k] if a_batched else a, b[k] if b_batched else b) for k in range(axis_size)]), True

    return f


_same_b = _per_client(_same, kernel_second=True)
_input_grad_b = _per_client(_input_grad, kernel_second=True)


@functools.lru_cache(maxsize=None)
def _kernel_grad_b(r: int):
    return _per_client(functools.partial(_kernel_grad, r=r), kernel_second=False)


@jax.custom_vjp
def conv2d_same(x: jax.Array, w: jax.Array) -> jax.Array:
    """'SAME' zero-padded 2D convolution, stride 1: ``x (N,H,W,I)``, ``w (k,k,I,O)``, odd ``k``."""
    return _forward(x, w)[0]


def _forward(x, w):
    if w.shape[0] % 2 == 0 or w.shape[0] != w.shape[1]:
        raise ValueError(f"conv2d_same needs a square kernel of odd size, got {w.shape[:2]}")
    return _same_b(x, w), (x, w)


def _backward(residuals, dy):
    x, w = residuals
    return _input_grad_b(dy, w), _kernel_grad_b(w.shape[0] // 2)(x, dy)


conv2d_same.defvjp(_forward, _backward)

__all__ = ["conv2d_same"]
