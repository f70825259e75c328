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
thresholds at quantiles of the decoded volume (2–16 classes, as the classes of video codecs' adaptive
loop filters): the net's errors differ between air, soft tissue and bone, and in an 8-bit volume at its
clipped ends. The plain net is ``coef`` =
:func:`~fedtensor.nn.model.identity_adaptation`. ``coef`` is the weighted least-squares fit of the
codec's error over the whole volume (normal equations accumulated tile by tile, so memory stays
bounded; the small layer's are a block of the large one's, so one pass of the net fits both and gives
their errors; the classed layers' are sums of those of the bins between thresholds).

The fit is sent in the stream's header under :data:`HEADER_KEY`, with the thresholds, as ALF sends its
filters: quantised (each feature's coefficients to a power-of-two step, rounded one at a time with the
error compensated by the ones not yet rounded, :func:`quantise`) and entropy-coded (a quantised Laplace
model per feature, :func:`encode_adaptation`). The precision is chosen per layer by its cost: header
bytes plus the restoration lost, each dB valued as the bytes the stream would need to gain it. A layer
of 8·K coefficients per class (K = 35 or 75 for the default net) takes 0.2–0.6 KB a class, 3–8× less than
float16 would. Which layer a stream carries is the encoder's choice (the most bits saved, header
included: see :func:`~fedtensor.nn.infer.compress_for_quality`). The least-squares spaces contain the
plain net, so a fitted correction is never worse on the volume than the plain one (up to its rounding
and the volume's integer rounding; :func:`~fedtensor.nn.infer.compress_for_quality` measures the result).

With test-time augmentation the regressors are the means over the 8 mirrored passes of each aligned
tile (:func:`~fedtensor.nn.infer.tile_correction`); the header records which kind of layer it is, and
the decoder restores the way the layer was fitted.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import NamedTuple

import numpy as np

from fedtensor.codec.entropy import LAPLACE_LIMIT, BinaryStream
from fedtensor.errors import FormatError
from fedtensor.nn.checkpoint import ModelError
from fedtensor.nn.infer import (
    DEFAULT_TILE,
    MIRRORS,
    NON_FINITE,
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
# The bytes a dB of restored PSNR is worth, as a share of the stream's size: a block-tucker stream grows
# by 12–25 % per dB at 38–42 dB on the CTs (measured on ../shared/data).
_GROWTH_PER_DB = 0.15
#: The added squared error, as a share of the fit's, each coefficient precision tried aims at.
_PRECISIONS = 2.0 ** -np.arange(1.0, 19.0)
_EXPONENTS = (-16, 40)  # a column's step is 2^−e, e in this range


#: Intensity class counts offered besides the one-class layers (classes split at quantiles of the
#: decoded volume's intensity; a layer per class, as the classes of video codecs' adaptive loop filters).
CLASS_COUNTS = (2, 3, 4, 6, 8, 12, 16)
_QUANTILE_SAMPLE = 1 << 21  # voxels the class thresholds are read from (at most)


class Fit(NamedTuple):
    """The squared error (original units², summed over the volume, before any integer rounding) of the
    plain restoration, and every fitted output layer (an :class:`OutputLayer`) with its own, by name:
    ``small`` (the net's features and outputs), ``large`` (also a 2×2×2 filter of the inputs), and the
    classed ones, ``small/C`` and ``large/C``, one such layer per intensity class (C classes)."""

    sse_plain: float
    layers: dict[str, tuple[OutputLayer, float]]

    @property
    def small(self) -> tuple[np.ndarray, float]:
        """The one-class small layer's coefficients ``(8, K)`` and squared error."""
        layer, sse = self.layers["small"]
        return layer.coef[0], sse

    @property
    def large(self) -> tuple[np.ndarray, float]:
        """The one-class large layer's coefficients ``(8, K)`` and squared error."""
        layer, sse = self.layers["large"]
        return layer.coef[0], sse

    def options(self) -> list[tuple[OutputLayer | None, float]]:
        """``(layer or None for the plain net, sse)``, in order of coefficient count."""
        return [(None, self.sse_plain), *sorted(self.layers.values(), key=lambda v: v[0].coef.size)]


def fit_adaptation(model: RestorationModel | str, decoded: np.ndarray, info: dict, original: np.ndarray, *,
                   tile: int | None = DEFAULT_TILE, inputs: bool = False, tta: bool = False,
                   bytes_per_db: float | None = None) -> np.ndarray:
    """The output-layer coefficients ``(8, K)``, as sent, that best restore ``decoded`` (the stream's
    decoded voxels, ``info`` its header) towards ``original`` in the least-squares sense; ``inputs``: the
    large layer (K = C1 + 43, with a filter of the inputs), else the small one (K = C1 + 3)."""
    found = fit(model, decoded, info, original, tile=tile, tta=tta, classes=(), bytes_per_db=bytes_per_db)
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


def _widths(c1: int) -> tuple[int, int]:
    """The feature counts K of the small and the large layer of a net whose last features number c1."""
    return c1 + 3, c1 + 3 + 8 * IN_CHANNELS


class Equations(NamedTuple):
    """The weighted normal equations of the large layer's least-squares fit, per base intensity bin and
    phase: ``lhs (B, 8, K, K)``, ``rhs (B, 8, K)``, ``yy (B, 8)`` (Σ w y²), in the net's units (``unit``
    converts an error to original units), the bins split at ``base`` (the union of every class count's
    ``splits``); the small layer's equations are the leading ``small`` rows and columns."""

    lhs: np.ndarray
    rhs: np.ndarray
    yy: np.ndarray
    base: np.ndarray
    splits: dict
    unit: float
    c1: int

    @property
    def small(self) -> int:
        return _widths(self.c1)[0]

    @property
    def large(self) -> int:
        return _widths(self.c1)[1]

    def merged(self, t: np.ndarray):
        """The ``(lhs, rhs, yy)`` of each class split at ``t`` (a subset of ``base``)."""
        cls = np.array([0] + [int(np.sum(t <= lo)) for lo in self.base])  # each base bin's class
        return [tuple(a[cls == c].sum(axis=0) for a in (self.lhs, self.rhs, self.yy)) for c in range(len(t) + 1)]

    def sse(self, eqs, coef: np.ndarray) -> float:
        """Σ w (y − c·x)² of the layer ``coef (C, 8, k)`` over the classes ``eqs``, in original units²."""
        k = coef.shape[-1]
        e = sum(y_[p] - 2 * cp[p] @ r_[p, :k] + cp[p] @ l_[p, :k, :k] @ cp[p]
                for cp, (l_, r_, y_) in zip(coef, eqs) for p in range(8))
        return max(float(e), 0.0) * self.unit ** 2


def equations(model: RestorationModel | str, decoded: np.ndarray, info: dict, original: np.ndarray, *,
              tile: int | None = DEFAULT_TILE, tta: bool = False, classes=CLASS_COUNTS) -> Equations | None:
    """The normal equations of every output layer's fit from one pass of the net (8 with ``tta``: then
    the regressors are the means of the mirrored passes); None for a stream the net does not restore."""
    model = as_model(model)
    tile = check_tile(tile)
    codec, params = info.get("codec"), info.get("params") or {}
    c1 = model.config.channels[0]
    _, large = _widths(c1)
    if codec not in RESTORABLE_CODECS:
        return None
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
    return Equations(lhs, rhs, yy, base, splits, float(s * norm.scale), c1)


def _ridged(lhs: np.ndarray, k: int) -> np.ndarray:
    """The normal matrices ``lhs (…, K, K)``'s leading ``k × k`` blocks with the fit's ridge added."""
    a = lhs[..., :k, :k]
    diag = np.diagonal(a, axis1=-2, axis2=-1)
    ridge = _RIDGE_FEATURE * diag + _RIDGE * np.maximum(diag.mean(-1, keepdims=True), 1e-30)
    return a + ridge[..., None] * np.eye(k)


def solve(eqs, k: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
    """``(coef, a)``: the least-squares layer ``(C, 8, k)`` of the classes ``eqs`` (see
    :meth:`Equations.merged`), unrounded, and the ridged normal matrices ``(C, 8, k, k)`` it solves; a
    phase whose equations are singular keeps the plain net's coefficients (and an identity matrix)."""
    a = _ridged(np.stack([l_ for l_, _, _ in eqs]), k)
    coef = np.stack([identity_adaptation(c1, k == _widths(c1)[1])] * len(eqs)).astype(np.float64)
    for c, (_, r_, _) in enumerate(eqs):
        for p in range(8):
            try:
                sol = np.linalg.solve(a[c, p], r_[p, :k])
            except np.linalg.LinAlgError:
                sol = None
            # half the decoder's bound: headroom for the compensated rounding, which moves coefficients
            if sol is not None and np.isfinite(sol).all() and np.abs(sol).max() < _MAX_COEF / 2:
                coef[c, p] = sol
            else:
                a[c, p] = np.eye(k)
    return coef, a


def rounding_factor(a: np.ndarray) -> np.ndarray:
    """The upper triangular ``U`` with ``UᵀU = a⁻¹`` for :func:`quantise`, for each metric
    ``a (…, K, K)`` (positive definite: the fit's are ridged). It comes from the Cholesky factor of
    ``a`` itself, taken from the last row up (``a = WWᵀ``, ``W`` upper, ``U = W⁻¹``): factoring the
    explicit inverse fails on the fit's ill-conditioned metrics (condition ~10⁷). A row that cannot be
    factored gets the identity (plain rounding)."""
    flat = a.reshape(-1, a.shape[-1], a.shape[-1])
    out = np.broadcast_to(np.eye(a.shape[-1]), flat.shape).copy()
    for i, m in enumerate(flat):
        try:
            w = np.linalg.cholesky(m[::-1, ::-1])[::-1, ::-1]
        except np.linalg.LinAlgError:
            continue
        out[i] = np.linalg.inv(w)
    return out.reshape(a.shape)


def quantise(coef: np.ndarray, factor: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``coef (…, K)`` rounded to multiples of ``step (K,)``, one coefficient at a time, each rounding
    error compensated by the coefficients not yet rounded under the metric ``a`` whose
    :func:`rounding_factor` is ``factor`` (the optimal brain quantiser in GPTQ's Cholesky form): at a
    coarse step it adds a quarter to a tenth of the squared error plain rounding adds."""
    shape = coef.shape
    w = coef.reshape(-1, shape[-1]).copy()
    u = factor.reshape(-1, shape[-1], shape[-1])
    for j in range(shape[-1]):
        q = np.round(w[:, j] / step[j]) * step[j]
        w[:, j:] -= ((w[:, j] - q) / u[:, j, j])[:, None] * u[:, j, j:]
        w[:, j] = q  # exactly on the grid
    return w.reshape(shape)


def coded_layer(eq: Equations, t: np.ndarray, k: int, bytes_per_db: float) -> tuple[OutputLayer, float]:
    """The layer of ``k`` features in the classes split at ``t`` as sent, with its squared error: the
    least-squares fit quantised (:func:`quantise`) at the precision that costs least, counting its
    coded header bytes and the restoration it loses, each dB lost as ``bytes_per_db`` bytes."""
    eqs = eq.merged(t)
    coef, a = solve(eqs, k, eq.c1)
    exact = max(eq.sse(eqs, coef), 1e-30)
    weight = np.diagonal(a, axis1=-2, axis2=-1).reshape(-1, k).sum(0)
    factor = rounding_factor(a)
    best = None
    for share in _PRECISIONS:  # coarse to fine, until a finer step has nothing left to gain
        # equal squared error per coefficient under plain rounding: ``share`` of the fit's error in all
        step = np.sqrt(12 * share * exact / eq.unit ** 2 / (k * np.maximum(weight, 1e-30)))
        step = 2.0 ** np.clip(np.round(np.log2(step)), -_EXPONENTS[1], -_EXPONENTS[0])
        blob, sent = _encode_layer(quantise(coef, factor, step).astype(np.float32))
        if not np.abs(sent).max() < _MAX_COEF:  # the compensation ran away: the decoder would refuse it
            # plain rounding stays within it: the solution is under half the bound
            blob, sent = _encode_layer((np.round(coef / step) * step).astype(np.float32))
        layer = OutputLayer(sent, t)
        err = eq.sse(eqs, sent.astype(np.float64))
        cost = 4 / 3 * len(blob) + bytes_per_db * 10 * np.log10(max(err, exact) / exact)
        if best is None or cost < best[0]:
            best = (cost, layer, err)
        if err < exact * (1 + 1e-5):
            break
    return best[1], best[2]


def fit(model: RestorationModel | str, decoded: np.ndarray, info: dict, original: np.ndarray, *,
        tile: int | None = DEFAULT_TILE, tta: bool = False, classes=CLASS_COUNTS,
        bytes_per_db: float | None = None) -> Fit:
    """Every output layer as it would be sent, with the squared errors of the plain and the adapted
    restorations, from one pass of the net (no restoration needs to be run to know them); ``tta``: of
    the restorations with test-time augmentation (8 passes), the layers fitted to the mean of the
    mirrored passes; ``classes``: the intensity class counts to fit classed layers for
    (:data:`CLASS_COUNTS`). The coefficients' precision trades header bytes against restoration, each dB
    worth ``bytes_per_db`` (by default the share :data:`_GROWTH_PER_DB` of ``info["file_bytes"]``: what
    the stream would grow by to gain it)."""
    model = as_model(model)
    eq = equations(model, decoded, info, original, tile=tile, tta=tta, classes=classes)
    c1 = model.config.channels[0]
    if eq is None:
        sse = float(np.sum((np.asarray(original, np.float64) - decoded) ** 2))
        return Fit(sse, {name: (OutputLayer.of(identity_adaptation(c1, name == "large")), sse)
                         for name in ("small", "large")})
    if bytes_per_db is None:
        bytes_per_db = _GROWTH_PER_DB * float(info.get("file_bytes") or 0)
    layers = {}
    for t in [np.zeros(0, np.float32), *eq.splits.values()]:
        for name, k in (("small", eq.small), ("large", eq.large)):
            layer, err = coded_layer(eq, t, k, bytes_per_db)
            layers[f"{name}/{len(t) + 1}" if len(t) else name] = (layer, err)
    one = eq.merged(np.zeros(0, np.float32))
    return Fit(eq.sse(one, identity_adaptation(c1).astype(np.float64)[None]), layers)


def _tile_parts(model: RestorationModel, sub: np.ndarray, cond: np.ndarray, tta: bool):
    """The net's half-resolution parts ``(h, head, linear)`` of one tile, or (``tta``) their means over the
    tile's 8 mirrored passes, each mirrored back onto the tile's own space-to-depth grid (the outputs'
    phase channels permuted by :func:`~fedtensor.nn.model.mirror_permutation`): the
    regressors whose fitted combination :func:`~fedtensor.nn.infer.tile_correction` computes."""
    if not tta:
        return _finite(tuple(a[0] for a in model.parts(sub, cond)))
    acc = None
    for flips in MIRRORS:
        axes = tuple(k for k in range(3) if flips[k])
        perm = mirror_permutation(flips)
        h, head, linear = (np.flip(a[0], axes) for a in model.parts(np.flip(sub, tuple(a + 1 for a in axes)), cond))
        parts = (h, head[..., perm], linear[..., perm])
        acc = parts if acc is None else tuple(a + b for a, b in zip(acc, parts))
    return _finite(tuple(a / len(MIRRORS) for a in acc))


def _finite(parts: tuple) -> tuple:
    if not all(np.isfinite(a).all() for a in parts):
        raise ModelError(NON_FINITE)
    return parts


def _phases(a: np.ndarray) -> np.ndarray:
    """A full-resolution tile ``(D, H, W)`` as ``(D·H·W/8, 8)``: its half-resolution voxels' 8 phases, in
    the net's space-to-depth order."""
    return np.asarray(space_to_depth(a[None, ..., None]))[0].reshape(-1, 8).astype(np.float32)


_SIDE = struct.Struct("<BH")  # the blob's class count and feature count K; then K step exponents, centres, scales


def _encode_layer(coef: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The coefficients ``(C, 8, K)``, column by column (feature ``j``): integers ``n`` with coefficient
    ``n · 2^−e_j``, ``e_j`` the smallest exponent at which the column is integral (within
    :data:`_EXPONENTS` and while ``n`` stays within 2¹⁴ of the centre; a column needing more precision
    is rounded); coded as ``n − centre_j · 2^e_j`` (``centre_j`` the column's median, rounded) under a
    quantised Laplace model of the column's own scale. Side information: ``C``, ``K`` and per column
    ``e_j`` (int8), ``centre_j`` (int8) and the scale's index (uint8: ``2^((z − 1)/4 − 8)``, 0 for a
    column equal to its centre, which codes nothing). Returns the blob and the coefficients it holds."""
    coef = np.asarray(coef, np.float32)
    cols = coef.reshape(-1, coef.shape[-1]).astype(np.float64)
    centre = np.clip(np.round(np.median(cols, axis=0)), -128, 127)
    frac, exp = np.frexp(cols)
    mant = np.abs(np.ldexp(frac, 24)).astype(np.int64)  # a float32's significand, exactly
    low = np.log2(np.maximum(mant & -mant, 1)).astype(np.int64)  # its trailing zero bits
    need = np.where(mant > 0, 24 - exp - low, _EXPONENTS[0]).max(axis=0)
    spread = np.abs(cols - centre).max(axis=0)
    cap = np.floor(np.log2(LAPLACE_LIMIT / 2 / np.maximum(spread, 1e-300)))
    e = np.clip(np.minimum(need, cap), _EXPONENTS[0], _EXPONENTS[1] - 1).astype(np.int64)
    r = np.round(cols * 2.0 ** e) - np.round(centre * 2.0 ** e)
    if not np.all(np.abs(r) <= LAPLACE_LIMIT):
        raise ModelError("the model's per-stream output layer is too large to code (weights out of range?)")
    z = np.where(r.any(axis=0), np.clip(np.round(4 * (np.log2(np.maximum(np.abs(r).mean(axis=0), 0.2)) + 8)) + 1,
                                        1, 255), 0).astype(np.uint8)
    side = np.concatenate([e.astype(np.int8).view(np.uint8), centre.astype(np.int8).view(np.uint8), z])
    blob = _SIDE.pack(len(coef), cols.shape[1]) + side.tobytes() + _code_residuals(r[:, z > 0], z[z > 0])
    return blob, _coefficients(r, centre, e, coef.shape)


def _code_residuals(r: np.ndarray, z: np.ndarray) -> bytes:
    stream = BinaryStream()
    stream.laplace(np.broadcast_to(_scale(z), r.shape).reshape(-1), r.reshape(-1))
    return stream.finish()


def _scale(z: np.ndarray) -> np.ndarray:
    return 2.0 ** ((z.astype(np.float64) - 1) / 4 - 8)


def _decode_layer(blob: bytes, classes: int, widths) -> np.ndarray:
    """The coefficients ``(classes, 8, K)`` of :func:`_encode_layer`'s ``blob``, ``K`` one of ``widths``;
    raises :class:`FormatError` for anything an encoder could not have written."""
    if len(blob) < _SIDE.size:
        raise FormatError("corrupted stream: malformed restoration adaptation in the header")
    n, k = _SIDE.unpack_from(blob)
    side = np.frombuffer(blob, np.uint8, 3 * k, _SIDE.size) if len(blob) >= _SIDE.size + 3 * k else None
    words = blob[_SIDE.size + 3 * k:]
    if n != classes or k not in widths or side is None or len(words) % 4:
        raise FormatError("corrupted stream: malformed restoration adaptation in the header")
    exps, centres, z = side[:k].view(np.int8).astype(np.int64), side[k:2 * k].view(np.int8), side[2 * k:]
    if exps.min() < _EXPONENTS[0] or exps.max() >= _EXPONENTS[1]:
        raise FormatError("corrupted stream: restoration adaptation out of range")
    stream = BinaryStream(np.frombuffer(words, "<u4"), allow_empty=True)
    rows, used = classes * 8, z > 0
    r = np.zeros((rows, k))
    r[:, used] = stream.laplace(np.broadcast_to(_scale(z[used]), (rows, int(used.sum()))).reshape(-1),
                                None).reshape(rows, -1)
    stream.check_consumed()
    if _code_residuals(r[:, used], z[used]) != words:  # the coder's one output: no trailing words
        raise FormatError("corrupted stream: malformed restoration adaptation in the header")
    return _coefficients(r, centres, exps, (classes, 8, k))


def _coefficients(r: np.ndarray, centres: np.ndarray, exps: np.ndarray, shape) -> np.ndarray:
    scale = 2.0 ** exps
    return ((r + np.round(centres * scale)) / scale).astype(np.float32).reshape(shape)


def encode_adaptation(coef: OutputLayer | np.ndarray, tta: bool = False) -> dict:
    """The header value of a layer: its coefficients, entropy-coded (:func:`_encode_layer`) in base64,
    whether it was fitted to test-time augmentation (the decoder must then restore that way) and, for a
    classed layer, its intensity class thresholds. The coefficients round-trip exactly when each
    feature's column is a multiple of a power of two (2⁻³⁹ or coarser) within 2¹⁴ steps of its centre;
    :func:`fit`'s always are (it prices the coefficients the coder holds)."""
    layer = OutputLayer.of(coef)
    value = {"layer": base64.b64encode(_encode_layer(layer.coef)[0]).decode("ascii"), "tta": bool(tta)}
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
    if (not raw or not isinstance(tta, bool) or thresholds.ndim != 1 or n > max(CLASS_COUNTS)
            or not (np.isfinite(thresholds).all() and np.all(np.diff(thresholds) > 0))
            or not np.array_equal(thresholds.astype(np.float16), thresholds)):
        raise FormatError("corrupted stream: malformed restoration adaptation in the header")
    coef = _decode_layer(raw, n, _widths(c1))
    if not (np.isfinite(coef).all() and np.abs(coef).max() < _MAX_COEF):
        raise FormatError("corrupted stream: restoration adaptation out of range")
    return OutputLayer(coef, thresholds.astype(np.float32)), tta


__all__ = ["HEADER_KEY", "CLASS_COUNTS", "Fit", "class_thresholds", "fit", "fit_adaptation", "encode_adaptation", "stream_adaptation"]
