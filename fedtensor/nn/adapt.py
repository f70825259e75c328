"""Per-stream adaptation of the restoration net's output layer, fitted by the encoder.

A model trained on other hospitals' volumes can be miscalibrated for the volume at hand (in the
leave-one-out benchmark an 8-bit head CT lost 1 dB to a model trained on HU CTs). The encoder has the
original, so it can fix that for a few hundred bytes, as video codecs' adaptive loop filters do: at each
of the 8 half-resolution phases ``p`` of the net's output, the correction becomes

    coef[p] · [h, head_p, linear_p, 1]                       small layer, K = C1 + 3
    coef[p] · [h, head_p, linear_p, 1, space_to_depth(x)]    large layer, K = C1 + 3 + 8·IN_CHANNELS

(``h`` the net's last C1 features, ``head_p`` / ``linear_p`` its two output paths, ``x`` its input: the
large layer adds a 2×2×2 linear filter of the inputs). The plain net is ``coef`` =
:func:`~fedtensor.nn.model.identity_adaptation`. ``coef`` is the weighted least-squares fit of the
codec's error over the whole volume (normal equations accumulated tile by tile, so memory stays
bounded; the small layer's are a block of the large one's, so one pass of the net fits both and gives
their errors), rounded to float16 and stored, base64-encoded, in the stream's header under
:data:`HEADER_KEY`: 8·K numbers, 0.4 or 1.3 KB of header for the default net. The least-squares spaces
contain the plain net, so a fitted correction is never worse on the volume than the plain one (up to
float16 and integer rounding; :func:`~fedtensor.nn.infer.compress_for_quality` measures the result).

With test-time augmentation the regressors are the means over the 8 mirrored passes of each aligned
tile (:func:`~fedtensor.nn.infer.tile_correction`); the header records which kind of layer it is, and
the decoder restores the way the layer was fitted.
"""

from __future__ import annotations

import base64
import binascii
from typing import NamedTuple

import numpy as np

from fedtensor.errors import FormatError
from fedtensor.nn.infer import (
    DEFAULT_TILE,
    MIRRORS,
    RestorationModel,
    as_model,
    check_tile,
    padded_input,
    tile_input,
    tiles,
)
from fedtensor.nn.model import IN_CHANNELS, identity_adaptation, mirror_permutation, space_to_depth
from fedtensor.nn.normalize import RESTORABLE_CODECS, normaliser_for, operating_point

HEADER_KEY = "adaptation"
_RIDGE = 1e-6  # relative to the mean of the normal matrix's diagonal: keeps collinear features solvable
_MAX_COEF = 1e4  # no fit comes near this; a forged header beyond it is refused
_ROWS = 1 << 14  # rows of the design matrix per float32 product (its rounding error stays small)


class Fit(NamedTuple):
    """The squared error (original units², summed over the volume, before any integer rounding) of the
    plain restoration, and the fitted output layers with theirs: the small one (the net's features and
    outputs) and the large one (also a 2×2×2 filter of the inputs)."""

    sse_plain: float
    small: tuple[np.ndarray, float]
    large: tuple[np.ndarray, float]

    def options(self) -> list[tuple[np.ndarray | None, float]]:
        """``(coef or None for the plain net, sse)``, in order of header size."""
        return [(None, self.sse_plain), self.small, self.large]


def fit_adaptation(model: RestorationModel | str, decoded: np.ndarray, info: dict, original: np.ndarray, *,
                   tile: int | None = DEFAULT_TILE, inputs: bool = False, tta: bool = False) -> np.ndarray:
    """The float16-exact output-layer coefficients ``(8, K)`` that best restore ``decoded`` (the stream's
    decoded voxels, ``info`` its header) towards ``original`` in the least-squares sense; ``inputs``: the
    large layer (K = C1 + 43, with a filter of the inputs), else the small one (K = C1 + 3)."""
    found = fit(model, decoded, info, original, tile=tile, tta=tta)
    return (found.large if inputs else found.small)[0]


def fit(model: RestorationModel | str, decoded: np.ndarray, info: dict, original: np.ndarray, *,
        tile: int | None = DEFAULT_TILE, tta: bool = False) -> Fit:
    """Both output layers, with the squared errors of the plain and the adapted restorations, from one
    pass of the net (no restoration needs to be run to know them); ``tta``: of the restorations with
    test-time augmentation (8 passes), the layers fitted to the mean of the mirrored passes."""
    model = as_model(model)
    tile = check_tile(tile)
    codec, params = info.get("codec"), info.get("params") or {}
    c1 = model.config.channels[0]
    small, large = c1 + 3, c1 + 3 + 8 * IN_CHANNELS
    if codec not in RESTORABLE_CODECS:
        sse = float(np.sum((np.asarray(original, np.float64) - decoded) ** 2))
        return Fit(sse, (identity_adaptation(c1), sse), (identity_adaptation(c1, True), sse))
    norm = normaliser_for(decoded)
    s, cond, block = operating_point(codec, params, norm)
    xp, phases, crop = padded_input(norm.net_input(decoded, s), block)
    big = xp.shape[:3]
    target = np.zeros(big, np.float32)  # the codec's error in the net's units; zero weight off the volume
    np.subtract(original, decoded, out=target[crop], dtype=np.float32)
    target[crop] /= np.float32(s * norm.scale)
    axis_inside = [(np.arange(n) >= c.start) & (np.arange(n) < c.stop) for n, c in zip(big, crop)]
    wsum = np.zeros(big, np.float32)
    for sl, w in tiles(big, tile):
        wsum[sl] += w
    # Normal equations of the large layer; the small one's are their leading block.
    lhs, rhs, yy = np.zeros((8, large, large)), np.zeros((8, large)), np.zeros(8)
    cond = np.asarray(cond, np.float32)[None]
    for sl, w in tiles(big, tile):
        sub = tile_input(xp, phases, sl)
        h, head, linear = (a.reshape(-1, a.shape[-1]) for a in _tile_parts(model, sub, cond, tta))
        xs = np.asarray(space_to_depth(sub))[0].reshape(len(h), -1)
        m0, m1, m2 = (m[c] for m, c in zip(axis_inside, sl))
        inside = m0[:, None, None] & m1[None, :, None] & m2[None, None, :]
        weight = _phases(np.where(inside, w / np.maximum(wsum[sl], 1e-12), 0).astype(np.float32))
        y = _phases(target[sl])
        for p in range(8):
            use = np.flatnonzero(weight[:, p] > 0)
            for rows in np.array_split(use, max(1, len(use) // _ROWS)):
                # float32 products over a bounded chunk of rows, summed in float64 across chunks
                x = np.column_stack([h[rows], head[rows, p], linear[rows, p], np.ones(len(rows), np.float32),
                                     xs[rows]])
                wr, yr = weight[rows, p], y[rows, p]
                xw = x * wr[:, None]
                lhs[p] += xw.T @ x
                rhs[p] += xw.T @ yr
                yy[p] += float(wr.astype(np.float64) @ yr.astype(np.float64) ** 2)

    def solve(k: int) -> np.ndarray:
        coef = identity_adaptation(c1, k == large).astype(np.float64)
        for p in range(8):
            a = lhs[p, :k, :k] + _RIDGE * max(np.trace(lhs[p, :k, :k]) / k, 1e-30) * np.eye(k)
            try:
                sol = np.linalg.solve(a, rhs[p, :k])
            except np.linalg.LinAlgError:
                continue
            sol = sol.astype(np.float16).astype(np.float64)  # as sent (and checked by stream_adaptation)
            if np.isfinite(sol).all() and np.abs(sol).max() < _MAX_COEF:
                coef[p] = sol
        return coef

    def sse(c: np.ndarray) -> float:  # Σ w (y − c·x)² from the normal equations, in original units
        k = c.shape[1]
        e = sum(yy[p] - 2 * c[p] @ rhs[p, :k] + c[p] @ lhs[p, :k, :k] @ c[p] for p in range(8))
        return max(float(e), 0.0) * (s * norm.scale) ** 2

    fits = [(c.astype(np.float32), sse(c)) for c in (solve(small), solve(large))]
    return Fit(sse(identity_adaptation(c1).astype(np.float64)), *fits)


def _tile_parts(model: RestorationModel, sub: np.ndarray, cond: np.ndarray, tta: bool):
    """The net's half-resolution parts ``(h, head, linear)`` of one tile, or (``tta``) their means over the
    tile's 8 mirrored passes, each mirrored back onto the tile's own space-to-depth grid (the outputs'
    phase channels permuted by :func:`~fedtensor.nn.model.mirror_permutation`): the
    regressors whose fitted combination :func:`~fedtensor.nn.infer.tile_correction` computes."""
    if not tta:
        return tuple(a[0] for a in model.parts(sub, cond))
    acc = None
    for flips in MIRRORS:
        axes = tuple(k for k in range(3) if flips[k])
        perm = mirror_permutation(flips)
        h, head, linear = (np.flip(a[0], axes) for a in model.parts(np.flip(sub, tuple(a + 1 for a in axes)), cond))
        parts = (h, head[..., perm], linear[..., perm])
        acc = parts if acc is None else tuple(a + b for a, b in zip(acc, parts))
    return tuple(a / len(MIRRORS) for a in acc)


def _phases(a: np.ndarray) -> np.ndarray:
    """A full-resolution tile ``(D, H, W)`` as ``(D·H·W/8, 8)``: its half-resolution voxels' 8 phases, in
    the net's space-to-depth order."""
    return np.asarray(space_to_depth(a[None, ..., None]))[0].reshape(-1, 8).astype(np.float32)


def encode_adaptation(coef: np.ndarray, tta: bool = False) -> dict:
    """The header value of a layer: its little-endian float16 bytes in base64, and whether it was fitted
    to test-time augmentation (the decoder must then restore that way)."""
    return {"layer": base64.b64encode(np.asarray(coef, "<f2").tobytes()).decode("ascii"), "tta": bool(tta)}


def stream_adaptation(info: dict, model: RestorationModel) -> tuple[np.ndarray, bool] | None:
    """``(coef, tta)``: the output layer recorded in a stream's header for ``model`` and whether it was
    fitted to test-time augmentation; None when there is none, or one fitted for another model (it only
    makes sense with the features it was fitted on).

    Raises :class:`~fedtensor.errors.FormatError` for a malformed value."""
    value = info.get(HEADER_KEY)
    if value is None or info.get("model") != model.model_id:
        return None
    c1 = model.config.channels[0]
    layer, tta = (value.get("layer"), value.get("tta")) if isinstance(value, dict) else (None, None)
    try:
        raw = base64.b64decode(layer, validate=True) if isinstance(layer, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    widths = {8 * k * 2: k for k in (c1 + 3, c1 + 3 + 8 * IN_CHANNELS)}
    if len(raw) not in widths or not isinstance(tta, bool):
        raise FormatError("corrupted stream: malformed restoration adaptation in the header")
    coef = np.frombuffer(raw, "<f2").astype(np.float32).reshape(8, widths[len(raw)])
    if not (np.isfinite(coef).all() and np.abs(coef).max() < _MAX_COEF):
        raise FormatError("corrupted stream: restoration adaptation out of range")
    return coef, tta


__all__ = ["HEADER_KEY", "Fit", "fit", "fit_adaptation", "encode_adaptation", "stream_adaptation"]
