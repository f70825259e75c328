"""The restoration network: a small residual 3D U-Net (Flax NNX) that predicts the codec's error.

Layout (channels last, ``(B, D, H, W, C)``; every spatial size a multiple of :data:`ALIGN`)::

    input: intensity, its detail, 3 block-phase channels             full resolution
    space-to-depth ×2                                                 ½ resolution
    ├─ stem conv3 → conv3 + FiLM = h                                  C1 channels
    │    space-to-depth ×2 → linear → residual (conv3, conv3 + FiLM)  ¼ resolution, C2 channels
    │    → linear → depth-to-space ×2, added to h (skip)
    │  h → conv3 + FiLM → conv3 (zero-initialised, 8 outputs)
    └─ + linear 5³ path (zero-initialised; a full-resolution kernel applied at ½ resolution,
         see half_resolution_kernel) → depth-to-space ×2 → correction  full resolution

Working at half resolution from the start (space-to-depth, as in pixel-shuffle super-resolution nets)
keeps every convolution at ≥ 32 channels, which CPUs run several times faster per voxel than thin
full-resolution layers; the codec's blocks (4³ or 8³, aligned at the origin) map onto whole
half-resolution voxels, so nothing is lost at block boundaries. The last layer is zero-initialised, so
an untrained net predicts no correction (restoration = identity). There is no normalisation layer:
every output voxel depends only on the inputs within :data:`RECEPTIVE_RADIUS` voxels, which is what
makes tiled inference exactly equal to whole-volume inference.

Conditioning (FiLM, zero-initialised): a 4-vector describing the codec's operating point, see
:func:`fedtensor.nn.normalize.condition_vector`.

The 3×3×3 convolutions have two mathematically identical implementations: XLA's native 3D convolution
(used on accelerators) and, on CPU, a sum of three 2D convolutions over the depth offsets, which XLA's
CPU backend runs about 3× faster (forward + backward), each through :func:`fedtensor.nn.conv.conv2d_same`
(fast gradients inside loops, one convolution per client under ``vmap``; differentiable once, in
reverse mode). Weights are shared, so checkpoints are portable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedtensor.nn.conv import conv2d_same

#: Number of input channels: normalised intensity, its detail in units of the step, and one
#: block-phase channel per axis (see :mod:`fedtensor.nn.normalize`).
IN_CHANNELS = 5
#: Length of the conditioning vector.
COND_DIM = 4
#: Spatial sizes given to the net must be multiples of this (two space-to-depth ×2 stages).
ALIGN = 4
#: Every output voxel depends only on inputs within this many voxels (per axis), alignment included.
RECEPTIVE_RADIUS = 24


#: Largest channel count or conditioning width a model may declare (the widest benchmarked net has 112).
MAX_WIDTH = 512


def check_channels(channels) -> tuple[int, int]:
    """``channels`` as two ints in [1, :data:`MAX_WIDTH`] (what a model file may declare: bounded before
    any array is built, as its widths size every weight); else :class:`ValueError`."""
    # whole numbers only: "88" was read as (8, 8) and 8.5 as 8 from a damaged model file
    c = () if isinstance(channels, (str, bytes)) else tuple(channels)
    if not c or not all(_whole(v) for v in c):
        raise ValueError(f"channels must be two integers from 1 to {MAX_WIDTH}, got {channels!r}")
    c = tuple(int(v) for v in c)
    if len(c) != 2 or not all(1 <= v <= MAX_WIDTH for v in c):
        raise ValueError(f"channels must be two integers from 1 to {MAX_WIDTH}, got {c}")
    return c


def _whole(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class NetConfig:
    """Architecture hyper-parameters (stored in every checkpoint)."""

    channels: tuple[int, int] = (16, 32)
    cond_hidden: int = 32

    def to_dict(self) -> dict:
        return {"channels": list(self.channels), "cond_hidden": self.cond_hidden}

    @classmethod
    def from_dict(cls, d: dict) -> "NetConfig":
        c, hidden = check_channels(d["channels"]), d["cond_hidden"]
        if not (_whole(hidden) and 1 <= hidden <= MAX_WIDTH):
            raise ValueError(f"cond_hidden must be an integer in [1, {MAX_WIDTH}]")
        return cls(channels=c, cond_hidden=int(hidden))


def _conv_impl() -> str:
    return "2d" if jax.default_backend() == "cpu" else "3d"


def conv3d(x: jax.Array, w: jax.Array, impl: str | None = None) -> jax.Array:
    """'SAME' zero-padded 3D convolution, ``x (B,D,H,W,I)``, ``w (k,k,k,I,O)`` (odd k)."""
    k = w.shape[0]
    impl = impl or _conv_impl()
    if k == 1:
        return jnp.einsum("bdhwi,io->bdhwo", x, w[0, 0, 0])
    if impl == "3d":
        return jax.lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    b, d, h, wd, c = x.shape
    r = k // 2
    xp = jnp.pad(x, ((0, 0), (r, r), (0, 0), (0, 0), (0, 0)))
    out = None
    for i in range(k):  # depth offset i: a 2D convolution over all (batch, depth) slices at once
        xi = xp[:, i:i + d].reshape(b * d, h, wd, c)
        yi = conv2d_same(xi, w[i])
        out = yi if out is None else out + yi
    return out.reshape(b, d, h, wd, w.shape[-1])


def half_resolution_kernel(w: jax.Array) -> jax.Array:
    """The kernel that applies the full-resolution convolution ``w (k,k,k,I,O)`` to
    ``space_to_depth`` input and gives ``space_to_depth`` output: ``conv3d(space_to_depth(x), kh)`` equals
    ``space_to_depth(conv3d(x, w))`` up to float rounding, for even sizes ('SAME' zero padding on both
    sides).

    Full-resolution offset ``d`` from output phase ``a`` lands on half-resolution offset ``q`` and
    input phase ``b`` where ``2q + b = a + d``. A thin full-resolution layer (the net's 5³ linear path,
    5 → 1 channels) becomes a 3³ layer of 40 → 8 channels on an eighth of the voxels, which CPUs run
    about as fast as the net's other half-resolution layers instead of ~10× slower per voxel.
    """
    k = w.shape[0]
    r = k // 2
    lo, hi = (-r) // 2, (1 + r) // 2  # the q reached by a + d over a ∈ {0, 1}, |d| ≤ r
    m = np.zeros((hi - lo + 1, 2, 2, k), np.float32)  # (q, input phase b, output phase a, tap)
    for q in range(lo, hi + 1):
        for b in range(2):
            for a in range(2):
                d = 2 * q + b - a
                if -r <= d <= r:
                    m[q - lo, b, a, d + r] = 1.0
    kh = jnp.einsum("ZBAt,YCDu,XEFv,tuvio->ZYXBCEiADFo", m, m, m, w)
    n = hi - lo + 1
    return kh.reshape(n, n, n, 8 * w.shape[3], 8 * w.shape[4])


def space_to_depth(x: jax.Array) -> jax.Array:
    """``(B, D, H, W, C)`` → ``(B, D/2, H/2, W/2, 8C)``."""
    b, d, h, w, c = x.shape
    x = x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c)
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, d // 2, h // 2, w // 2, 8 * c)


def depth_to_space(x: jax.Array) -> jax.Array:
    """Inverse of :func:`space_to_depth`."""
    b, d, h, w, c8 = x.shape
    c = c8 // 8
    x = x.reshape(b, d, h, w, 2, 2, 2, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, 2 * d, 2 * h, 2 * w, c)


def _init(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, zero: bool = False) -> nnx.Param:
    """He/LeCun-style normal initialisation (std 1/√fan_in), drawn with numpy: building a net costs no
    XLA compilation (jax.random initialisers of ~20 parameter shapes take seconds to compile on CPU)."""
    if zero:
        return nnx.Param(jnp.zeros(shape, jnp.float32))
    return nnx.Param(jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape).astype(np.float32)))


class Dense(nnx.Module):
    """``x @ W + b`` over the last axis."""

    def __init__(self, cin: int, cout: int, rng: np.random.Generator, *, zero_init: bool = False):
        self.kernel = _init(rng, (cin, cout), cin, zero_init)
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


class Conv3d(nnx.Module):
    """k×k×k convolution with bias ('SAME' zero padding)."""

    def __init__(self, cin: int, cout: int, rng: np.random.Generator, k: int = 3, *, zero_init: bool = False):
        self.kernel = _init(rng, (k, k, k, cin, cout), k ** 3 * cin, zero_init)
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return conv3d(x, self.kernel[...]) + self.bias[...]


class FiLM(nnx.Module):
    """Feature-wise affine modulation ``h·(1+γ) + β`` from a conditioning embedding (zero-initialised)."""

    def __init__(self, hidden: int, channels: int, rng: np.random.Generator):
        self.proj = Dense(hidden, 2 * channels, rng, zero_init=True)

    def __call__(self, h: jax.Array, e: jax.Array) -> jax.Array:
        gamma, beta = jnp.split(self.proj(e), 2, axis=-1)
        return h * (1 + gamma[:, None, None, None, :]) + beta[:, None, None, None, :]


class RestorationNet(nnx.Module):
    """Residual 3D U-Net-lite: ``(x (B,D,H,W,5), cond (B,4)) → correction (B,D,H,W,1)``."""

    def __init__(self, config: NetConfig = NetConfig(), *, seed: int = 0):
        c1, c2 = config.channels
        hid = config.cond_hidden
        rng = np.random.default_rng(seed)
        self.config = config
        self.embed = Dense(COND_DIM, hid, rng)
        self.stem = Conv3d(8 * IN_CHANNELS, c1, rng)
        self.enc = Conv3d(c1, c1, rng)
        self.film_enc = FiLM(hid, c1, rng)
        self.down = Dense(8 * c1, c2, rng)
        self.mid1 = Conv3d(c2, c2, rng)
        self.mid2 = Conv3d(c2, c2, rng)
        self.film_mid = FiLM(hid, c2, rng)
        self.up = Dense(c2, 8 * c1, rng)
        self.dec = Conv3d(c1, c1, rng)
        self.film_dec = FiLM(hid, c1, rng)
        self.head = Conv3d(c1, 8, rng, zero_init=True)
        self.linear = Conv3d(IN_CHANNELS, 1, rng, k=5, zero_init=True)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        _, head, linear = self.parts(x, cond)
        return depth_to_space(head + linear)

    def adapted(self, x: jax.Array, cond: jax.Array, coef: jax.Array, thresholds: jax.Array | None = None) -> jax.Array:
        """The correction with a per-stream output layer ``coef (8, K)`` (see :mod:`fedtensor.nn.adapt`):
        at half-resolution phase p, ``coef[p] · [h, head_p, linear_p, 1]`` (K = C1 + 3) or
        ``coef[p] · [h, head_p, linear_p, 1, space_to_depth(x)]`` (K = C1 + 3 + 8·IN_CHANNELS: a 2×2×2
        linear filter of the inputs on top). :func:`identity_adaptation` gives exactly ``self(x, cond)``.

        A classed layer ``coef (C, 8, K)`` has one such layer per intensity class: an output voxel whose
        intensity input (channel 0 of ``x``, the clipped normalised intensity) is at least ``j`` of the
        ``C − 1`` increasing ``thresholds`` takes class ``j``'s coefficients."""
        h, head, linear = self.parts(x, cond)
        c1 = h.shape[-1]
        xs = space_to_depth(x)
        coef = coef[None] if coef.ndim == 2 else coef

        def layer(c):  # one class's output, every voxel
            out = jnp.einsum("bdhwk,pk->bdhwp", h, c[:, :c1]) + head * c[:, c1] + linear * c[:, c1 + 1] + c[:, c1 + 2]
            if c.shape[1] > c1 + 3:
                out = out + jnp.einsum("bdhwk,pk->bdhwp", xs, c[:, c1 + 3:])
            return out

        out = layer(coef[0])
        if coef.shape[0] > 1:
            intensity = xs[..., 0::IN_CHANNELS]  # each phase's own voxel (space_to_depth: phase-major)
            cls = jnp.sum(intensity[..., None] >= jnp.asarray(thresholds, jnp.float32), axis=-1)
            for j in range(1, coef.shape[0]):  # C is small: every class's (cheap) layer, then a select
                out = jnp.where(cls == j, layer(coef[j]), out)
        return depth_to_space(out)

    def parts(self, x: jax.Array, cond: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Half-resolution ``(features h (…, C1), head output (…, 8), linear path (…, 8))``; the
        correction is ``depth_to_space(head + linear)``, one channel per space-to-depth phase."""
        act = nnx.silu
        e = act(self.embed(cond))
        xs = space_to_depth(x)
        h = act(self.stem(xs))
        h = act(self.film_enc(self.enc(h), e))
        q = act(self.down(space_to_depth(h)))
        q = q + self.film_mid(self.mid2(act(self.mid1(q))), e)
        h = h + depth_to_space(self.up(act(q)))
        h = act(self.film_dec(self.dec(h), e))
        linear = conv3d(xs, half_resolution_kernel(self.linear.kernel[...])) + self.linear.bias[...]
        return h, self.head(h), linear


class OutputLayer(NamedTuple):
    """A per-stream output layer (:mod:`fedtensor.nn.adapt`, :meth:`RestorationNet.adapted`): coefficients
    ``coef (C, 8, K)`` of ``C`` intensity classes, split at the ``C − 1`` increasing ``thresholds``
    (float32) of the net's intensity input."""

    coef: np.ndarray
    thresholds: np.ndarray

    @classmethod
    def of(cls, layer) -> OutputLayer:
        """``layer`` as an :class:`OutputLayer`: an ``(8, K)`` array is the one-class layer."""
        if isinstance(layer, OutputLayer):
            return layer
        coef = np.asarray(layer, np.float32)
        return cls(coef[None] if coef.ndim == 2 else coef, np.zeros(0, np.float32))

    def mirrored(self, flips: tuple[bool, bool, bool], c1: int) -> OutputLayer:
        """See :func:`mirrored_adaptation`."""
        return self._replace(coef=mirrored_adaptation(self.coef, flips, c1))


def mirror_permutation(flips: tuple[bool, bool, bool]) -> np.ndarray:
    """Where each space-to-depth offset ``o`` (``4a + 2b + c`` over the axes) of an ``ALIGN``-aligned tile
    lands when the tile is mirrored along the axes in ``flips``: ``o XOR s``, ``s`` the mirrored axes' bits
    (every group maps onto a group)."""
    return np.arange(8) ^ (4 * bool(flips[0]) + 2 * bool(flips[1]) + bool(flips[2]))


def mirrored_adaptation(coef: np.ndarray, flips: tuple[bool, bool, bool], c1: int) -> np.ndarray:
    """The output layer that, applied to the net's pass over an ``ALIGN``-aligned tile mirrored along the
    axes in ``flips`` (and mirrored back), gives the layer ``coef`` (``(8, K)``, or ``(C, 8, K)``
    classed) of the unmirrored tile's geometry.

    The rows (output phases) and the input filter's sub-voxel columns are permuted by
    :func:`mirror_permutation`. (An intensity class goes with its voxel, which mirroring moves along.)"""
    perm = mirror_permutation(flips)
    out = np.asarray(coef)[..., perm, :]
    if out.shape[-1] > c1 + 3:
        filt = out[..., c1 + 3:].reshape(*out.shape[:-1], 8, IN_CHANNELS)[..., perm, :]
        out = np.concatenate([out[..., :c1 + 3], filt.reshape(*out.shape[:-1], -1)], axis=-1)
    return out


def identity_adaptation(c1: int, inputs: bool = False) -> np.ndarray:
    """The output-layer coefficients ``(8, c1 + 3)`` (``inputs``: ``(8, c1 + 3 + 8·IN_CHANNELS)``) under
    which :meth:`RestorationNet.adapted` is the plain net: head and linear path weighted 1, nothing else."""
    coef = np.zeros((8, c1 + 3 + (8 * IN_CHANNELS if inputs else 0)), np.float32)
    coef[:, c1:c1 + 2] = 1.0
    return coef


def param_count(net: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nnx.state(net, nnx.Param)))


def abstract_net(config: NetConfig = NetConfig()) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, state of ShapeDtypeStructs)`` of a net, without keeping any initial value."""
    return nnx.split(nnx.eval_shape(lambda: RestorationNet(config)))


def new_net(config: NetConfig = NetConfig(), seed: int = 0) -> RestorationNet:
    """A freshly initialised net (seeded)."""
    return RestorationNet(config, seed=seed)


__all__ = ["NetConfig", "RestorationNet", "abstract_net", "new_net", "conv3d", "half_resolution_kernel",
           "identity_adaptation", "OutputLayer", "mirror_permutation", "mirrored_adaptation", "param_count", "space_to_depth", "depth_to_space"]
