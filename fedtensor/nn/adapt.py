"""Per-stream adaptation of the restoration net's output layer, fitted by the encoder.

A model trained on other hospitals' volumes can be miscalibrated for the volume at hand (in the
leave-one-out benchmark an 8-bit head CT lost 1 dB to a model trained on HU CTs). The encoder has the
original, so it can fix that for a few hundred bytes, as video codecs' adaptive loop filters do: at each
of the 8 half-resolution phases ``p`` of the net's output, the correction becomes

    coef[p] · [h, head_p, linear_p, 1]                       small layer, K = C1 + 3
    coef[p] · [h, head_p, linear_p, 1, space_to_depth(x)]    large layer, K = C1 + 3 + 8·IN_CHANNELS

(``h`` the net's last C1 features, ``head_p`` / ``linear_p`` its two output paths, ``x`` its input: the
large layer adds a 2×2×2 linear filter of the inputs). A *classed* layer has one such ``coef`` per
intensity class — a voxel's class is the number of thresholds at or below its decoded intensity, the
thresholds at quantiles of the decoded volume (2–8 classes, as the classes of video codecs' adaptive
loop filters): the net's errors differ between air, soft tissue and bone, and in an 8-bit volume at its
clipped ends. The plain net is ``coef`` =
:func:`~fedtensor.nn.model.identity_adaptation`. ``coef`` is the weighted least-squares fit of the
codec's error over the whole volume (normal equations accumulated tile by tile, so memory stays
bounded; the small layer's are a block of the large one's, so one pass of the net fits both and gives
their errors; the classed layers' are sums of those of the bins between thresholds), rounded to
float16 and stored, base64-encoded, in the stream's header under :data:`HEADER_KEY` with the thresholds:
8·K numbers per class, 0.4 or 1.3 KB of header per class for the default net. Which layer a stream
carries is the encoder's choice (the most bits saved, header included: see
:func:`~fedtensor.nn.infer.compress_for_quality`). The least-squares spaces
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
from fedtensor.nn.model import IN_CHANNELS, OutputLayer, identity_adaptation, mirror_permutation, space_to_depth
from fedtensor.nn.normalize import RESTORABLE_CODECS, normaliser_for, operating_point

HEADER_KEY = "adaptation"
_RIDGE = 1e-6  # relative to the mean of the normal matrix's diagonal: keeps collinear features solvable
# Relative to each feature's own diagonal entry: bounds the coefficients of features that are nearly
# collinear (in a narrow intensity class the intensity inputs all but equal the constant). Without it
# such a class can take coefficients of ~10³ that cancel, and the error predicted from the (float32
# accumulated) normal equations is then meaningless.
_RIDGE_FEATURE = 1e-3
_MAX_COEF = 1e4  # no fit comes near this; a forged header beyond it is refused
_ROWS = 1 << 14  # rows of the design matrix per float32 product (its rounding error stays small)


#: Intensity class counts offered besides the one-class layers (classes split at quantiles of the
#: decoded volume's intensity; a layer per class, as the classes of video codecs' adaptive loop filters).
CLASS_COUNTS = (2, 3, 4, 6, 8)
_QUANTILE_SAMPLE = 1 << 21  # voxels the class thresholds are read from (at most)


class Fit(NamedTuple):
    """The squared error (original units², summed over the volume, before any integer rounding) of the
    plain restoration, and every fitted output layer with its own, by name: ``small`` (the net's features
    and outputs), ``large`` (also a 2×2×2 filter of the inputs), and the classed ones, ``small/C`` and
    ``large/C``, one such layer per intensity class (C classes)."""

    sse_plain: float
    layers: dict

    @property
    def small(self) -> tuple[np.ndarray, float]:
        return self.layers["small"]

    @property
    def large(self) -> tuple[np.ndarray, float]:
        return self.layers["large"]

    def options(self) -> list[tuple[np.ndarray | OutputLayer | None, float]]:
        """``(layer or None for the plain net, sse)``, in order of header size."""
        return [(None, self.sse_plain), *sorted(self.layers.values(), key=lambda v: OutputLayer.of(v[0]).coef.size)]


def fit_adaptation(model: RestorationModel | str, decoded: np.ndarray, info: dict, original: np.ndarray, *,
                   tile: int | None = DEFAULT_TILE, inputs: bool = False, tta: bool = False) -> np.ndarray:
    """The float16-exact output-layer coefficients ``(8, K)`` that best restore ``decoded`` (the stream's
    decoded voxels, ``info`` its header) towards ``original`` in the least-squares sense; ``inputs``: the
    large layer (K = C1 + 43, with a filter of the inputs), else the small one (K = C1 + 3)."""
    found = fit(model, decoded, info, original, tile=tile, tta=tta, classes=())
    return (found.large if inputs else found.small)[0]


def class_thresholds(intensity: np.ndarray, counts=CLASS_COUNTS) -> dict[int, np.ndarray]:
    """Per class count C, the increasing float16-exact thresholds (at most C − 1) splitting ``intensity``
    (the net's intensity input over the volume) at its quantiles j/C; a threshold at the minimum (no
    voxel below it) is dropped, and so is a count whose thresholds another count already has."""
    flat = intensity.reshape(-1)  # (a view for the 1-D strided channel fit passes: only the sample is copied)
    sample = flat[:: max(1, flat.size // _QUANTILE_SAMPLE)]
    lowest, out = float(sample.min()), {}
    for c in counts:
        t = np.unique(np.quantile(sample, np.arange(1, c) / c).astype(np.float16).astype(np.float32))
        t = t[t > lowest]
        if len(t) and not any(np.array_equal(t, u) for u in out.values()):
            out[c] = t
    return out


def fit(model: RestorationModel | str, decoded: np.ndarray, info: dict, original: np.ndarray, *,
        tile: int | None = DEFAULT_TILE, tta: bool = False, classes=CLASS_COUNTS) -> Fit:
    """Every output layer, with the squared errors of the plain and the adapted restorations, from one
    pass of the net (no restoration needs to be run to know them); ``tta``: of the restorations with
    test-time augmentation (8 passes), the layers fitted to the mean of the mirrored passes; ``classes``:
    the intensity class counts to fit classed layers for (:data:`CLASS_COUNTS`)."""
    model = as_model(model)
    tile = check_tile(tile)
    codec, params = info.get("codec"), info.get("params") or {}
    c1 = model.config.channels[0]
    small, large = c1 + 3, c1 + 3 + 8 * IN_CHANNELS
    if codec not in RESTORABLE_CODECS:
        sse = float(np.sum((np.asarray(original, np.float64) - decoded) ** 2))
        return Fit(sse, {"small": (identity_adaptation(c1), sse), "large": (identity_adaptation(c1, True), sse)})
    norm = normaliser_for(decoded)
    s, cond, block = operating_point(codec, params, norm)
    feats = norm.net_input(decoded, s)
    splits = class_thresholds(feats.reshape(-1, feats.shape[-1])[:, 0], classes) if classes else {}
    # Normal equations per base bin (between consecutive thresholds of all counts) and phase: every
    # count's classes are unions of base bins, so one pass fits them all.
    base = np.unique(np.concatenate([np.zeros(0, np.float32), *splits.values()])).astype(np.float32)
    xp, phases, crop = padded_input(feats, block)
    del feats
    big = xp.shape[:3]
    target = np.zeros(big, np.float32)  # the codec's error in the net's units; zero weight off the volume
    np.subtract(original, decoded, out=target[crop], dtype=np.float32)
    target[crop] /= np.float32(s * norm.scale)
    axis_inside = [(np.arange(n) >= c.start) & (np.arange(n) < c.stop) for n, c in zip(big, crop)]
    wsum = np.zeros(big, np.float32)
    for sl, w in tiles(big, tile):
        wsum[sl] += w
    # Normal equations of the large layer; the small one's are their leading block.
    nb = len(base) + 1
    lhs, rhs, yy = np.zeros((nb, 8, large, large)), np.zeros((nb, 8, large)), np.zeros((nb, 8))
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
            # the class rule of RestorationNet.adapted: the number of thresholds at or below the intensity
            bins = np.sum(xs[use, p * IN_CHANNELS, None] >= base, axis=1)
            for b in range(nb):
                in_bin = use[bins == b]
                for rows in np.array_split(in_bin, max(1, len(in_bin) // _ROWS)):
                    # float32 products over a bounded chunk of rows, summed in float64 across chunks
                    x = np.column_stack([h[rows], head[rows, p], linear[rows, p], np.ones(len(rows), np.float32),
                                         xs[rows]])
                    wr, yr = weight[rows, p], y[rows, p]
                    xw = x * wr[:, None]
                    lhs[b, p] += xw.T @ x
                    rhs[b, p] += xw.T @ yr
                    yy[b, p] += float(wr.astype(np.float64) @ yr.astype(np.float64) ** 2)

    def merged(t: np.ndarray):  # the normal equations of the classes split at t (a subset of base)
        cls = np.array([0] + [int(np.sum(t <= lo)) for lo in base])  # each base bin's class
        return [tuple(a[cls == c].sum(axis=0) for a in (lhs, rhs, yy)) for c in range(len(t) + 1)]

    def solve(eqs, k: int) -> np.ndarray:
        coef = np.stack([identity_adaptation(c1, k == large)] * len(eqs)).astype(np.float64)
        for c, (l_, r_, _) in enumerate(eqs):
            for p in range(8):
                a = l_[p, :k, :k]
                a = a + np.diag(_RIDGE_FEATURE * np.diag(a) + _RIDGE * max(np.trace(a) / k, 1e-30))
                try:
                    sol = np.linalg.solve(a, r_[p, :k])
                except np.linalg.LinAlgError:
                    continue
                sol = sol.astype(np.float16).astype(np.float64)  # as sent (and checked by stream_adaptation)
                if np.isfinite(sol).all() and np.abs(sol).max() < _MAX_COEF:
                    coef[c, p] = sol
        return coef

    def sse(eqs, coef: np.ndarray) -> float:  # Σ w (y − c·x)² from the normal equations, in original units
        k = coef.shape[-1]
        e = sum(y_[p] - 2 * cp[p] @ r_[p, :k] + cp[p] @ l_[p, :k, :k] @ cp[p]
                for cp, (l_, r_, y_) in zip(coef, eqs) for p in range(8))
        return max(float(e), 0.0) * (s * norm.scale) ** 2

    one = merged(np.zeros(0, np.float32))
    layers = {}
    for name, k in (("small", small), ("large", large)):
        coef = solve(one, k)
        layers[name] = (coef[0].astype(np.float32), sse(one, coef))
    for t in splits.values():
        eqs = merged(t)
        for name, k in (("small", small), ("large", large)):
            coef = solve(eqs, k)
            layers[f"{name}/{len(t) + 1}"] = (OutputLayer(coef.astype(np.float32), t), sse(eqs, coef))
    return Fit(sse(one, identity_adaptation(c1).astype(np.float64)[None]), layers)


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


def encode_adaptation(coef: OutputLayer | np.ndarray, tta: bool = False) -> dict:
    """The header value of a layer: its little-endian float16 coefficients in base64, whether it was
    fitted to test-time augmentation (the decoder must then restore that way) and, for a classed layer,
    its intensity class thresholds."""
    layer = OutputLayer.of(coef)
    value = {"layer": base64.b64encode(np.asarray(layer.coef, "<f2").tobytes()).decode("ascii"), "tta": bool(tta)}
    if len(layer.thresholds):
        value["classes"] = [float(t) for t in layer.thresholds]  # float16-exact: the repr is exact
    return value


def stream_adaptation(info: dict, model: RestorationModel) -> tuple[OutputLayer, bool] | None:
    """``(layer, tta)``: the output layer recorded in a stream's header for ``model`` and whether it was
    fitted to test-time augmentation; None when there is none, or one fitted for another model (it only
    makes sense with the features it was fitted on).

    Raises :class:`~fedtensor.errors.FormatError` for a malformed value."""
    value = info.get(HEADER_KEY)
    if value is None or info.get("model") != model.model_id:
        return None
    c1 = model.config.channels[0]
    layer, tta, classes = ((value.get("layer"), value.get("tta"), value.get("classes", []))
                           if isinstance(value, dict) else (None, None, None))
    try:
        raw = base64.b64decode(layer, validate=True) if isinstance(layer, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    try:
        numbers = isinstance(classes, list) and not any(isinstance(t, bool) for t in classes)
        thresholds = np.array(classes if numbers else None, np.float64)
    except (TypeError, ValueError):
        thresholds = np.array(np.nan)
    n = thresholds.size + 1
    widths = {n * 8 * k * 2: k for k in (c1 + 3, c1 + 3 + 8 * IN_CHANNELS)}
    if (len(raw) not in widths or not isinstance(tta, bool) or thresholds.ndim != 1 or n > max(CLASS_COUNTS)
            or not (np.isfinite(thresholds).all() and np.all(np.diff(thresholds) > 0))
            or not np.array_equal(thresholds.astype(np.float16), thresholds)):
        raise FormatError("corrupted stream: malformed restoration adaptation in the header")
    coef = np.frombuffer(raw, "<f2").astype(np.float32).reshape(n, 8, widths[len(raw)])
    if not (np.isfinite(coef).all() and np.abs(coef).max() < _MAX_COEF):
        raise FormatError("corrupted stream: restoration adaptation out of range")
    return OutputLayer(coef, thresholds.astype(np.float32)), tta


__all__ = ["HEADER_KEY", "CLASS_COUNTS", "Fit", "class_thresholds", "fit", "fit_adaptation", "encode_adaptation", "stream_adaptation"]
