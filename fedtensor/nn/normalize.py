"""Per-modality intensity normalisation, the codec's operating point as a conditioning vector, and the
block-phase input channels.

Normalisation maps a volume to roughly ``[0, 1]`` (the net's input is clipped to
``[-0.1, 1.5]``); the correction the net predicts is added to the *unclipped* decoded volume, so values
outside the window (e.g. CT below −1024 HU) are kept and the original dtype and range are restored
exactly by the final cast:

* ``ct``: Hounsfield units (a volume whose minimum is ≤ −500): ``(v + 1024) / 4095`` (window −1024…3071);
* ``u8``: 8-bit volumes: ``v / 255``;
* ``mr`` (anything else): ``(v − p0.5) / (p99.5 − p0.5)``, percentiles of the volume being restored.

The kind is decided from the *decoded* volume, so training and inference agree without the original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedtensor.errors import FormatError
from fedtensor.nn.model import COND_DIM

CT_LO, CT_HI = -1024.0, 3071.0
INPUT_CLIP = (-0.1, 1.5)
DETAIL_CLIP = 8.0
#: Intensity channels per voxel (:func:`intensity_features`); the three block-phase channels follow.
N_FEATURES = 2
#: Centre of log(normalised step): the operating points of interest (≈ 36–44 dB) lie within ±1 of it.
LOG_STEP_CENTRE = -2.5
BLOCK_CODECS = ("block-tucker",)
RESTORABLE_CODECS = ("block-tucker", "omlsvd-global")


@dataclass(frozen=True)
class Normaliser:
    kind: str
    lo: float
    scale: float

    def forward(self, v: np.ndarray) -> np.ndarray:
        """Original units → normalised (float32, unclipped)."""
        return ((np.asarray(v, np.float32) - np.float32(self.lo)) / np.float32(self.scale)).astype(np.float32)

    def net_input(self, v: np.ndarray, s: float) -> np.ndarray:
        """The intensity channels the net sees, ``(D, H, W, 2)``: the clipped normalised intensity, and
        its local detail ``x − box₃(x)`` in units of the step ``s`` (soft-clipped to ±8), in which the
        codec's artefacts are O(1) at every rate, like the target."""
        x = np.clip(self.forward(v), *INPUT_CLIP)
        return intensity_features(x, s)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lo": self.lo, "scale": self.scale}


def normaliser_for(decoded: np.ndarray) -> Normaliser:
    """The normalisation of a (decoded) volume: CT in HU, 8-bit, or percentile-scaled (MR and others)."""
    a = np.asarray(decoded)
    if a.dtype == np.uint8:
        return Normaliser("u8", 0.0, 255.0)
    if float(a.min()) <= -500.0:
        return Normaliser("ct", CT_LO, CT_HI - CT_LO)
    sample = a.ravel()[:: max(1, a.size // 2_000_000)].astype(np.float64)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(sample.min()), float(sample.max())
    return Normaliser("mr", float(lo), float(max(hi - lo, 1e-6)))


Block = tuple[int, int, int]
NO_BLOCK: Block = (0, 0, 0)


def block_shape(codec: str, params: dict) -> Block:
    """The per-axis block shape of a stream (``(0, 0, 0)`` for codecs without blocks)."""
    if codec not in BLOCK_CODECS:
        return NO_BLOCK
    b = params.get("block")
    sides = (b,) * 3 if isinstance(b, (int, float)) else tuple(b or ())
    if len(sides) != 3 or not all(int(n) == n and 1 <= n <= 64 for n in sides):
        raise ValueError(f"bad block shape {b!r}")
    return tuple(int(n) for n in sides)


def operating_point(codec: str, params: dict, norm: Normaliser) -> tuple[float, np.ndarray, Block]:
    """``(s, cond, block)`` for a stream: ``s`` the quantiser step in normalised units (the scale of the
    predicted correction), ``cond`` the :data:`COND_DIM`-vector the net is conditioned on, ``block`` the
    per-axis block shape whose grid the phase channels mark (``(0, 0, 0)`` for codecs without blocks).

    ``cond = [log(s) − LOG_STEP_CENTRE, is_block_tucker, is_omlsvd_global, mean over axes of 4 / side]``
    (symmetric in the axes, so the flips/permutations of training augmentation leave it unchanged).
    """
    if codec not in RESTORABLE_CODECS:
        raise ValueError(f"codec {codec!r} is not restorable")
    step = float(params["step"]) * float(params.get("scale", 1.0))  # the step in the volume's units
    if not (math.isfinite(step) and step > 0):  # each factor passed the header's checks; their product not
        raise FormatError(f"corrupted stream: its quantiser step in the volume's units is {step!r}")
    s = step / norm.scale
    block = block_shape(codec, params)
    cond = np.array([math.log(s) - LOG_STEP_CENTRE, codec == "block-tucker", codec == "omlsvd-global",
                     np.mean([4.0 / b for b in block]) if block[0] else 0.0], np.float32)
    assert cond.shape == (COND_DIM,)
    return s, cond, block


def phase_of(index: np.ndarray, block: int) -> np.ndarray:
    """cos(2π((i mod b) + ½)/b) of absolute voxel indices (zeros when ``block`` is 0).

    Symmetric inside each block (a block-aligned flip leaves it unchanged); it marks the codec's block
    boundaries, where the artefacts are."""
    index = np.asarray(index)
    if not block:
        return np.zeros(index.shape, np.float32)
    return np.cos(2 * np.pi * (np.mod(index, block) + 0.5) / block).astype(np.float32)


def phase_1d(n: int, start: int, block: int) -> np.ndarray:
    """:func:`phase_of` for the absolute indices ``start … start+n-1`` (``start`` may be negative)."""
    return phase_of(np.arange(start, start + n), block)


def intensity_features(x: np.ndarray, s: float) -> np.ndarray:
    """``(D,H,W)`` clipped normalised intensities → ``(D,H,W,2)``: ``x`` and ``DETAIL_CLIP·tanh(d/DETAIL_CLIP)``
    with ``d = (x − box₃(x)) / s`` (3×3×3 mean, edge-extended: a voxel's value depends on its
    neighbours only, so tiles agree with the whole volume away from their borders)."""
    from scipy.ndimage import uniform_filter

    x = np.asarray(x, np.float32)
    d = (x - uniform_filter(x, size=3, mode="nearest")) * np.float32(1.0 / s)
    out = np.empty((*x.shape, N_FEATURES), np.float32)
    out[..., 0] = x
    out[..., 1] = np.float32(DETAIL_CLIP) * np.tanh(d * np.float32(1.0 / DETAIL_CLIP))
    return out


def assemble_input(feats: np.ndarray, phases) -> np.ndarray:
    """Append three block-phase channels to intensity features ``(D,H,W,K)`` → ``(D,H,W,K+3)``.

    ``phases`` are three 1-D arrays (lengths D, H, W): channel K + k is ``phases[k]`` along axis k
    (see :func:`phase_1d`), so it marks the codec's block grid along that axis.
    """
    d, h, w, k = feats.shape
    pd, ph, pw = (np.asarray(p, np.float32) for p in phases)
    if (len(pd), len(ph), len(pw)) != (d, h, w):
        raise ValueError("phase arrays do not match the features' shape")
    out = np.empty((d, h, w, k + 3), np.float32)
    out[..., :k] = feats
    out[..., k] = pd[:, None, None]
    out[..., k + 1] = ph[None, :, None]
    out[..., k + 2] = pw[None, None, :]
    return out


def block_phases(shape, block: Block, origin=(0, 0, 0)) -> list[np.ndarray]:
    """The three phase arrays of a box of ``shape`` whose first voxel has absolute index ``origin``."""
    return [phase_1d(n, o, b) for n, o, b in zip(shape, origin, block)]
