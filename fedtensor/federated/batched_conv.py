"""A convolution for per-client weights under ``vmap`` (the federated simulation on CPU).

``vmap`` of a convolution whose kernel is batched too becomes a grouped convolution
(``feature_group_count`` forward, ``batch_group_count`` for the kernel gradient), and XLA's CPU backend
expands grouped convolutions into dense ones over all groups: a chunk of ``c`` clients then costs about
``c`` times the arithmetic, which is why the plainly vmapped round lost to the per-client loop.

:func:`client_conv3d` computes the same 'SAME' convolution as :func:`fedtensor.nn.model.conv3d` as
im2col + matrix product: for each depth offset, the k² in-plane taps are gathered into the channel axis
(slices and a concatenation) and multiplied by the reshaped kernel. Under ``vmap`` that is a batched
``dot_general`` — one GEMM per client inside one kernel call, and its gradients are GEMMs too — so a
chunk of clients runs as a few large operations instead of many small ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def client_conv3d(x: jax.Array, w: jax.Array) -> jax.Array:
    """'SAME' zero-padded 3D convolution ``x (B,D,H,W,I)``, ``w (k,k,k,I,O)`` (odd k), by im2col."""
    k = w.shape[0]
    r = k // 2
    b, d, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (r, r), (0, 0)))
    out = None
    for i in range(k):  # per depth offset: k² columns per voxel (k³ at once would need k× more memory)
        cols = jnp.concatenate([xp[:, i:i + d, j:j + h, m:m + wd] for j in range(k) for m in range(k)], axis=-1)
        y = jnp.einsum("bdhwi,io->bdhwo", cols, w[i].reshape(k * k * c, w.shape[-1]))
        out = y if out is None else out + y
    return out
