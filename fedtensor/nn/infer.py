"""Restoration at decompression time: load a model, run it tile by tile, restore the original dtype.

Tiled inference: the intensity features (:meth:`~fedtensor.nn.normalize.Normaliser.net_input`) are
padded by :data:`EDGE_PAD` voxels (reflection) and up to a multiple of :data:`~fedtensor.nn.model.ALIGN`;
the padded grid is cut into tiles of at most ``tile³`` voxels whose starts are multiples of ``ALIGN`` (so the net's
space-to-depth grid is the same as for the whole volume), overlapping by ``2·margin + ramp`` voxels.
Each tile's output is weighted by a separable window that is 0 within ``margin`` (≥ the net's
receptive radius) of a tile side interior to the volume, then ramps linearly to 1 over ``ramp`` voxels;
sides on the volume's edge keep weight 1. Every voxel with a non-zero weight therefore sees exactly the
context it has in a whole-volume pass, so the blended result equals whole-volume inference up to float
rounding, and the seams are blended rather than cut. Restoration goes one row of tiles (along the first
axis) at a time: features, padding and blending sums are held for that row only, and the restored voxels
are written straight into the output (:func:`correction_slabs`), so memory does not grow with depth.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedtensor.nn.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    ModelError,
    finite_tree,
    read_model_bytes,
    safetensors_metadata,
    tree_from_bytes,
)
from fedtensor.nn.model import ALIGN, RECEPTIVE_RADIUS, NetConfig, OutputLayer, RestorationNet, abstract_net
from fedtensor.nn.normalize import (
    N_FEATURES,
    RESTORABLE_CODECS,
    assemble_input,
    normaliser_for,
    operating_point,
    phase_of,
)

EDGE_PAD = 8
FEATURE_ROWS = 16  # rows of features, or of float64 restored voxels, computed at once when restoring
NON_FINITE = "the restoration model's output is not finite here (weights out of range?)"
DEFAULT_TILE = 160
RAMP = 8
MARGIN = -(-RECEPTIVE_RADIUS // ALIGN) * ALIGN


class ModelMismatchWarning(UserWarning):
    """The stream was tuned for a different restoration model than the one used to decode it, or the
    model was not trained on volumes of this intensity kind."""


@dataclass
class RestorationModel:
    """A loaded restoration model: the NNX net, its id and its manifest."""

    net: RestorationNet
    model_id: str
    config: NetConfig
    manifest: dict = field(default_factory=dict)
    path: Path | None = None
    _apply: Any = field(default=None, repr=False)

    @property
    def short_id(self) -> str:
        return self.model_id[:12]

    def apply(self, x: np.ndarray, cond: np.ndarray, coef: OutputLayer | np.ndarray | None = None) -> np.ndarray:
        """The net on a batch: ``x (N,D,H,W,IN_CHANNELS)``, ``cond (N,4)`` → correction ``(N,D,H,W)``;
        with ``coef``, through the per-stream output layer (:mod:`fedtensor.nn.adapt`)."""
        x, cond = jnp.asarray(x, jnp.float32), jnp.asarray(cond, jnp.float32)
        if coef is None:
            return np.asarray(_run(*self._split(), x, cond))
        layer = OutputLayer.of(coef)
        return np.asarray(_run_adapted(*self._split(), x, cond, jnp.asarray(layer.coef, jnp.float32),
                                       jnp.asarray(layer.thresholds, jnp.float32)))

    def parts(self, x: np.ndarray, cond: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`~fedtensor.nn.model.RestorationNet.parts` on a batch, as numpy arrays."""
        return tuple(np.asarray(a) for a in _parts(*self._split(), jnp.asarray(x, jnp.float32),
                                                   jnp.asarray(cond, jnp.float32)))

    def _split(self):
        if self._apply is None:
            self._apply = nnx.split(self.net)
        return self._apply


# One compiled function per architecture and input shape, shared by all models.
@partial(jax.jit, static_argnums=0)
def _run(graphdef, state, x, cond):
    return nnx.merge(graphdef, state)(x, cond)[..., 0]


@partial(jax.jit, static_argnums=0)
def _run_adapted(graphdef, state, x, cond, coef, thresholds):
    return nnx.merge(graphdef, state).adapted(x, cond, coef, thresholds)[..., 0]


@partial(jax.jit, static_argnums=0)
def _parts(graphdef, state, x, cond):
    return nnx.merge(graphdef, state).parts(x, cond)


def model_from_bytes(data: bytes, model_id: str = "", manifest: dict | None = None,
                     path: Path | None = None) -> RestorationModel:
    meta = safetensors_metadata(data, "model checkpoint")
    try:
        info = json_loads(meta["fedtensor_model"])
        if info.get("format") != FORMAT:
            raise ValueError("format")
        config = NetConfig.from_dict(info["net"])
        version = info.get("version", 1)
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError):
        raise ModelError("not a fedtensor restoration model (missing or bad architecture metadata)") from None
    if not (isinstance(version, int) and 1 <= version <= FORMAT_VERSION):
        raise ModelError(f"model format version {version!r} is not one this fedtensor reads "
                         f"(≤ {FORMAT_VERSION}; written by a newer fedtensor?)")
    graphdef, abstract = abstract_net(config)
    state = tree_from_bytes(abstract, data, "model checkpoint")
    if not finite_tree(state):
        raise ModelError("the model's weights are not all finite (from a diverged training run?)")
    net = nnx.merge(graphdef, jax.tree_util.tree_map(jnp.asarray, state))
    return RestorationModel(net, model_id, config, manifest or {}, path)


def json_loads(s: str) -> dict:
    import json

    d = json.loads(s)
    if not isinstance(d, dict):
        raise ValueError("not an object")
    return d


_CACHE: dict[tuple, RestorationModel] = {}


def load_model(model_dir: str | os.PathLike) -> RestorationModel:
    """Load (and verify) the model in ``model_dir``; raises :class:`ModelError` with a one-line reason."""
    d = Path(model_dir)
    data, mid, manifest = read_model_bytes(d)
    key = (str(d.resolve()), mid)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = model_from_bytes(data, mid, manifest, d)
    return _CACHE[key]


def as_model(model: RestorationModel | str | os.PathLike) -> RestorationModel:
    return model if isinstance(model, RestorationModel) else load_model(model)


# ------------------------------------------------------------------------------------------ tiling


def _tile_starts(length: int, tile: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - 2 * MARGIN - RAMP
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _window(size: int, low_inner: bool, high_inner: bool) -> np.ndarray:
    w = np.ones(size, np.float32)
    ramp = (np.arange(1, RAMP + 1, dtype=np.float32) / (RAMP + 1))
    if low_inner:
        w[:MARGIN] = 0
        w[MARGIN:MARGIN + RAMP] = ramp
    if high_inner:
        w[size - MARGIN:] = 0
        w[size - MARGIN - RAMP:size - MARGIN] = np.minimum(w[size - MARGIN - RAMP:size - MARGIN], ramp[::-1])
    return w


def check_tile(tile: int | None) -> int | None:
    if tile is not None:
        tile = int(tile)
        if tile % ALIGN or tile < 2 * MARGIN + RAMP + ALIGN:
            raise ValueError(f"tile must be a multiple of {ALIGN} and ≥ {2 * MARGIN + RAMP + ALIGN}, got {tile}")
    return tile


def padded_input(feats: np.ndarray, block):
    """``(padded features, per-axis block-phase arrays, crop)``: ``feats (D,H,W,F)`` padded by
    :data:`EDGE_PAD` (reflection) and up to a multiple of ``ALIGN``; the phases are those of every padded
    position's original-volume index; ``crop`` slices the volume back out of the padded grid."""
    shape = feats.shape[:3]
    pads = [(EDGE_PAD, EDGE_PAD + (-(n + 2 * EDGE_PAD)) % ALIGN) for n in shape]
    xp = np.pad(feats, [*pads, (0, 0)], mode="reflect" if min(shape) > 1 else "edge")
    phases = [phase_of(np.arange(-lo, n + hi), b) for n, (lo, hi), b in zip(shape, pads, block)]
    return xp, phases, tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, shape))


def tile_input(xp: np.ndarray, phases, sl: tuple[slice, ...]) -> np.ndarray:
    """The net's input ``(1, D, H, W, IN_CHANNELS)`` for the tile ``sl`` of :func:`padded_input`'s grid."""
    return assemble_input(xp[sl], [p[c] for p, c in zip(phases, sl)])[None]


MIRRORS = tuple(itertools.product((False, True), repeat=3))


def tile_correction(model: RestorationModel, sub: np.ndarray, cond: np.ndarray, coef: OutputLayer | np.ndarray | None = None,
                    tta: bool = False) -> np.ndarray:
    """The correction of one assembled tile ``sub (1, D, H, W, IN_CHANNELS)`` (sides multiples of
    ``ALIGN``); ``tta``: the mean over the tile's 8 mirrored versions, each mirrored back (a per-stream
    layer is mirrored with them, :meth:`~fedtensor.nn.model.OutputLayer.mirrored`)."""
    if not tta:
        return model.apply(sub, cond, coef)[0]
    out = np.zeros(sub.shape[1:4], np.float32)
    layer = None if coef is None else OutputLayer.of(coef)
    for flips in MIRRORS:
        axes = tuple(k for k in range(3) if flips[k])
        c = None if layer is None else layer.mirrored(flips, model.config.channels[0])
        out += np.flip(model.apply(np.flip(sub, tuple(a + 1 for a in axes)), cond, c)[0], axes)
    return out / len(MIRRORS)


def tiles(big: tuple[int, int, int], tile: int | None):
    """``(slices, window)`` of the tiles covering a padded volume of shape ``big``: starts multiples of
    ``ALIGN``, overlapping, each ``window`` zero within ``MARGIN`` of an interior side (see the module
    docstring); one whole-volume tile with window 1 when ``tile`` is None."""
    if tile is None:
        yield tuple(slice(0, n) for n in big), np.ones(big, np.float32)
        return
    axes = [_tile_starts(n, tile) for n in big]
    sizes = [min(tile, n) for n in big]
    for starts in itertools.product(*axes):
        sl = tuple(slice(s, s + t) for s, t in zip(starts, sizes))
        ws = [_window(t, s > 0, s + t < n) for s, t, n in zip(starts, sizes, big)]
        yield sl, ws[0][:, None, None] * ws[1][None, :, None] * ws[2][None, None, :]


def correction_map(model: RestorationModel, feats: np.ndarray, block, cond: np.ndarray,
                   tile: int | None = DEFAULT_TILE, coef: OutputLayer | np.ndarray | None = None, tta: bool = False) -> np.ndarray:
    """The net's correction (in units of the step) for a whole volume's intensity features
    ``feats (D,H,W,F)`` (:meth:`~fedtensor.nn.normalize.Normaliser.net_input`).

    ``tile=None`` runs one pass over the whole (padded) volume; otherwise tiles of ≤ ``tile``³ voxels.
    ``coef``: a per-stream output layer (:mod:`fedtensor.nn.adapt`); ``tta``: test-time augmentation, the
    mean over the 8 mirrored versions of each (padded) tile, which is the mean over the mirrored versions
    of the padded volume (every tile is aligned, so its mirror keeps the net's space-to-depth grid).
    """
    out = np.empty(feats.shape[:3], np.float32)
    for start, rows in correction_slabs(model, feats.shape[:3], lambda lo, hi: feats[lo:hi], block, cond, tile,
                                        coef, tta):
        out[start:start + len(rows)] = rows
    return out


def correction_slabs(model: RestorationModel, shape, feats_of, block, cond: np.ndarray, tile: int | None = DEFAULT_TILE,
                     coef: OutputLayer | np.ndarray | None = None, tta: bool = False):
    """:func:`correction_map` slab by slab along the first axis: yields ``(start, rows)``, the finished
    corrections of volume rows ``start …``, in order. ``feats_of(lo, hi)`` gives the features of rows
    ``lo:hi``, asked for one tile row at a time, so the features, their padding and the blending sums
    are held for a tile's depth of rows, not for the whole volume (the same result, bit for bit)."""
    tile = check_tile(tile)
    pads = [(EDGE_PAD, EDGE_PAD + (-(n + 2 * EDGE_PAD)) % ALIGN) for n in shape]
    # np.pad's own index arithmetic, so the padding is exactly padded_input's
    index = [np.pad(np.arange(n), p, mode="reflect" if min(shape) > 1 else "edge") for n, p in zip(shape, pads)]
    phases = [phase_of(np.arange(-lo, n + hi), b) for n, (lo, hi), b in zip(shape, pads, block)]
    big = tuple(len(i) for i in index)
    cond = np.asarray(cond, np.float32)[None]
    starts = [0] if tile is None else _tile_starts(big[0], tile)
    depth = big[0] if tile is None else min(tile, big[0])
    # The blending sums of one tile row's padded rows a0 … a0 + depth (the rows a later tile row
    # overlaps move up to the top when it starts).
    acc, wsum = np.zeros((depth, *big[1:]), np.float32), np.zeros((depth, *big[1:]), np.float32)
    crop = (slice(pads[1][0], pads[1][0] + shape[1]), slice(pads[2][0], pads[2][0] + shape[2]))
    # tiles() goes first axis outermost: a row of tiles (one first-axis slice) at a time
    for k, (a0, row_of_tiles) in enumerate(itertools.groupby(tiles(big, tile), key=lambda t: t[0][0].start)):
        rows = index[0][a0:a0 + depth]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        xp = feats_of(lo, hi)[np.ix_(rows - lo, index[1], index[2])]  # this tile row's padded features
        local_phases = [phases[0][a0:a0 + depth], *phases[1:]]
        for sl, w in row_of_tiles:
            here = (slice(0, depth), *sl[1:])
            acc[here] += w * tile_correction(model, tile_input(xp, local_phases, here), cond, coef, tta)
            wsum[here] += w
        done = (starts[k + 1] if k + 1 < len(starts) else big[0]) - a0  # no later tile reaches these rows
        first, last = max(a0, pads[0][0]), min(a0 + done, pads[0][0] + shape[0])  # of the volume's own
        for c in range(first, last, FEATURE_ROWS):  # a few rows at a time: no whole-row temporaries
            r = slice(c - a0, min(c + FEATURE_ROWS, last) - a0)
            yield c - pads[0][0], acc[r][(slice(None), *crop)] / np.maximum(wsum[r][(slice(None), *crop)], 1e-12)
        keep = depth - done
        acc[:keep], wsum[:keep] = acc[done:], wsum[done:]
        acc[keep:], wsum[keep:] = 0, 0


# ------------------------------------------------------------------------------------------ restore


def _header(info: dict) -> tuple[str, dict]:
    codec = info.get("codec")
    params = info.get("params") or {}
    return codec, params


def restore_array(decoded: np.ndarray, info: dict, model, *, tile: int | None = DEFAULT_TILE,
                  tta: bool = False, adapted: bool = True) -> np.ndarray:
    """Float64 restored voxels (original units, not yet cast) of a decoded volume.

    ``info`` is the stream's header (:func:`fedtensor.codec.read_info`): its codec and parameters (the
    quantiser step, the block shape) are the operating point the model is conditioned on.
    ``tta=True`` averages the corrections of the 8 mirrored versions of the volume (8× the time).
    A per-stream output layer the encoder fitted for this model (:mod:`fedtensor.nn.adapt`) is used, with
    or without test-time augmentation as it was fitted (``tta`` is then the stream's choice);
    ``adapted=False`` ignores the layer.
    """
    from fedtensor.nn.adapt import stream_adaptation  # (it builds on this module)

    model = as_model(model)
    codec, params = _header(info)
    decoded = np.asarray(decoded)
    if codec not in RESTORABLE_CODECS:
        return decoded.astype(np.float64)
    layer = stream_adaptation(info, model) if adapted else None
    coef, tta = (None, tta) if layer is None else layer
    out = np.empty(decoded.shape, np.float64)
    for start, rows in restored_slabs(decoded, codec, params, model, tile, coef, tta):
        out[start:start + len(rows)] = rows
    return out


def restored_slabs(decoded: np.ndarray, codec: str, params: dict, model: RestorationModel, tile: int | None,
                   coef, tta: bool):
    """``(start, float64 restored rows)`` in order along the first axis (:func:`correction_slabs`): the
    features are computed from the decoded rows a tile row needs, with one more row each side for their
    3×3×3 box filter, so they equal the whole volume's."""
    norm = normaliser_for(decoded)
    s, cond, block = operating_point(codec, params, norm)
    depth = decoded.shape[0]

    def feats_of(lo: int, hi: int) -> np.ndarray:
        out = np.empty((hi - lo, *decoded.shape[1:], N_FEATURES), np.float32)
        for c in range(lo, hi, FEATURE_ROWS):  # the filter's temporaries stay a few rows deep
            a, b = max(c - 1, 0), min(c + FEATURE_ROWS + 1, hi + 1, depth)
            e = min(c + FEATURE_ROWS, hi)
            out[c - lo:e - lo] = norm.net_input(decoded[a:b], s)[c - a:e - a]
        return out

    for start, f in correction_slabs(model, decoded.shape, feats_of, block, cond, tile, coef, tta):
        if not np.isfinite(f).all():
            raise ModelError(NON_FINITE)
        rows = decoded[start:start + len(f)]
        yield start, rows.astype(np.float64) + (s * norm.scale) * f.astype(np.float64)


def restore(volume, info: dict, model, *, tile: int | None = DEFAULT_TILE, tta: bool = False):
    """The restored :class:`~fedtensor.io.Volume` (same dtype, shape, geometry) of a decoded volume.

    Streams of the exact codecs (lossless, max-error) are returned unchanged: their guarantees hold
    without restoration and could be broken by it.
    """
    from fedtensor.io import Volume

    codec, _ = _header(info)
    if codec not in RESTORABLE_CODECS:
        return volume
    from fedtensor.nn.adapt import stream_adaptation

    model = as_model(model)
    layer = stream_adaptation(info, model)
    coef, tta = (None, tta) if layer is None else layer
    out = np.empty(volume.data.shape, volume.data.dtype)  # written slab by slab: no float copy of the volume
    for start, rows in restored_slabs(volume.data, codec, info.get("params") or {}, model, tile, coef, tta):
        out[start:start + len(rows)] = to_dtype(rows, out.dtype)
    meta = {**volume.meta, "restoration_model": model.model_id}
    return Volume(out, volume.spacing, volume.affine, meta)


def to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """Cast restored float voxels to ``dtype``: rounded and clipped for integers, clipped to the finite
    range for floats."""
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
    x = np.rint(x) if dtype.kind in "iu" else x
    return np.clip(x, info.min, info.max).astype(dtype)


_KIND_NAMES = {"ct": "CT (HU)", "u8": "8-bit", "mr": "percentile-scaled (MR and other)"}


def model_mismatch(info: dict, model, decoded: np.ndarray | None = None, tta: bool | None = None) -> str | None:
    """A one-line warning when the stream records a model id other than ``model``'s, or when the
    ``decoded`` voxels are of an intensity kind the model was not trained on (its manifest's
    ``intensity_kinds``: restoration can then lower the quality — a model trained on HU CTs cost an
    8-bit CT about 1 dB in the leave-one-out benchmark), or (given ``tta``, the caller's choice) when
    the stream's fitted layer (:mod:`fedtensor.nn.adapt`) decides test-time augmentation otherwise; else
    None."""
    model = as_model(model)
    problems = []
    if tta is not None and info.get("codec") in RESTORABLE_CODECS:
        from fedtensor.nn.adapt import stream_adaptation

        layer = stream_adaptation(info, model)
        if layer is not None and layer[1] != tta:
            how = "with" if layer[1] else "without"
            problems.append(f"this stream's restoration layer was fitted {how} test-time augmentation, so it is "
                            f"restored {how} it{'' if layer[1] else ' (--tta ignored)'}")
    want = info.get("model")
    if isinstance(want, dict):
        want = want.get("id")
    if want and want != model.model_id:
        problems.append(f"this stream was tuned for restoration model {str(want)[:12]}…, but model "
                        f"{model.short_id}… is being used: the restored quality may differ from the one "
                        "recorded at compression")
    codecs = model.manifest.get("codecs")
    if info.get("codec") in RESTORABLE_CODECS and isinstance(codecs, list) and codecs and info["codec"] not in codecs:
        problems.append(f"restoration model {model.short_id}… was trained on {', '.join(map(str, codecs))} streams "
                        f"only and this one is {info['codec']}: restoration may lower its quality")
    kinds = model.manifest.get("intensity_kinds")
    if decoded is not None and info.get("codec") in RESTORABLE_CODECS and isinstance(kinds, list) and kinds:
        kind = normaliser_for(decoded).kind
        if kind not in kinds:
            trained = ", ".join(_KIND_NAMES.get(str(k), str(k)) for k in kinds)
            problems.append(f"restoration model {model.short_id}… was trained on {trained} volumes only and this "
                            f"one is {_KIND_NAMES.get(kind, kind)}: restoration may lower its quality")
    return "; ".join(problems) or None


def restore_stream(data: bytes, model, *, tile: int | None = DEFAULT_TILE, tta: bool = False):
    """``(restored Volume, warning or None)``: ``fedtensor.codec.decompress`` then :func:`restore`; the
    warning is :func:`model_mismatch`'s one-line message (for a CLI to print)."""
    from fedtensor.codec import decompress, read_info

    info = read_info(data)
    model = as_model(model)
    decoded = decompress(data)
    return restore(decoded, info, model, tile=tile, tta=tta), model_mismatch(info, model, decoded.data, tta)


def decompress_restored(data: bytes, model, *, tile: int | None = DEFAULT_TILE, tta: bool = False,
                        warn: bool = True):
    """:func:`restore_stream` that emits the mismatch message as a :class:`ModelMismatchWarning`."""
    vol, msg = restore_stream(data, model, tile=tile, tta=tta)
    if msg and warn:
        warnings.warn(msg, ModelMismatchWarning, stacklevel=2)
    return vol


def tag_stream(data: bytes, model_id: str, extra: dict | None = None, adaptation: np.ndarray | None = None,
               adaptation_tta: bool = False) -> bytes:
    """Re-pack ``.ftz`` bytes with the restoration model id in the header (``"model"``) and, if given,
    figures measured with restoration (``"restoration"``) and the model's per-stream output layer
    (:func:`fedtensor.nn.adapt.fit_adaptation`; ``adaptation_tta``: fitted to test-time augmentation).
    The payload is unchanged."""
    from fedtensor.codec.container import pack, unpack
    from fedtensor.nn.adapt import HEADER_KEY, encode_adaptation

    header, sections = unpack(data)
    header = {k: v for k, v in header.items() if k not in ("sections", "restoration", HEADER_KEY)}
    header["model"] = model_id
    if extra:
        header["restoration"] = extra
    if adaptation is not None:
        header[HEADER_KEY] = encode_adaptation(adaptation, adaptation_tta)
    return pack(header, sections)


def evaluate(original: np.ndarray, data: bytes, model=None, *, tile: int | None = DEFAULT_TILE,
             tta: bool = False) -> dict:
    """PSNR / 3D SSIM of a stream against the original, without and (given a model) with restoration."""
    from fedtensor.codec import decompress, read_info
    from fedtensor.metrics import psnr, ssim3d

    info = read_info(data)
    dec = decompress(data)
    out: dict[str, Any] = {"bpv": info["bits_per_voxel"], "psnr_db": psnr(original, dec.data),
                           "ssim": float(ssim3d(original, dec.data))}
    if model is not None:
        import time

        model = as_model(model)
        t0 = time.perf_counter()
        res = restore(dec, info, model, tile=tile, tta=tta)
        dt = time.perf_counter() - t0
        out.update({"model_id": model.model_id, "psnr_restored_db": psnr(original, res.data),
                    "ssim_restored": float(ssim3d(original, res.data)), "restore_seconds": dt,
                    "model_mismatch": model_mismatch(info, model, dec.data, tta)})
        out["delta_psnr_db"] = out["psnr_restored_db"] - out["psnr_db"]
        out["delta_ssim"] = out["ssim_restored"] - out["ssim"]
    return out


def compress_for_quality(volume, model, *, psnr: float, codec: str = "block-tucker", block: int | None = None,
                         search_db: float = 4.0, iterations: int = 6, tile: int | None = DEFAULT_TILE,
                         tta: bool = False, adapt: bool = True) -> bytes:
    """The cheapest stream whose *restored* PSNR still reaches ``psnr``, tagged with the model id.

    Searches the codec's own PSNR target in ``[psnr − search_db, psnr]`` (secant steps, at most
    ``iterations`` after the first trial at ``psnr``). Each candidate is restored by the plain net and,
    with ``adapt``, by the output layers fitted to it (:mod:`fedtensor.nn.adapt`, the small and the large
    one, each also in 2–16 intensity classes; the stream then carries the layer: 0.2–4 KB of header,
    counted), all with test-time augmentation if ``tta``. One fit (:func:`fedtensor.nn.adapt.fit`: one
    pass of the net, 8 with ``tta``) predicts every restored PSNR; the best is measured (a second pass)
    and steers the search. Every stream returned was decoded,
    restored and measured against the original, so the guarantee holds with restoration. When
    restoration saves nothing, the plain ``compress(psnr=…)`` stream is returned (untagged).
    """
    from fedtensor.codec import compress, decompress, read_info
    from fedtensor.metrics import psnr as psnr_fn
    from fedtensor.metrics import psnr_from_sse
    from fedtensor.nn.adapt import fit

    if not (math.isfinite(search_db) and search_db > 0) or iterations < 0:
        raise ValueError("search_db must be a positive number of dB and iterations ≥ 0")
    model = as_model(model)
    orig = volume.data
    value_range = float(orig.max()) - float(orig.min())

    def sent(raw: bytes, coef, r: float, t: float) -> bytes:
        return tag_stream(raw, model.model_id, {"psnr": r, "target_psnr": psnr, "codec_psnr_target": t, "tta": tta},
                          adaptation=coef, adaptation_tta=tta)

    def restored_db(raw: bytes, coef, decoded=None) -> float:
        info = read_info(sent(raw, coef, psnr, psnr))
        decoded = decompress(raw) if decoded is None else decoded
        return psnr_fn(orig, restore(decoded, info, model, tile=tile, tta=tta).data)

    candidates = []  # (restored dB, measured (else predicted), codec target, raw stream, coef or None)
    streams = {}  # codec target → raw stream

    def trial(t: float) -> float:
        """The measured restored PSNR of the codec's stream at ``t`` dB with the restoration predicted
        best; the other restorations predicted to reach the target are noted, to be measured if chosen.
        (The prediction is the float restoration's: rounding to an integer dtype can move it by a tenth
        of a dB.)"""
        raw = streams[t] = compress(volume, psnr=t, codec=codec, block=block)
        decoded = decompress(raw)
        options = fit(model, decoded.data, read_info(raw), orig, tile=tile, tta=tta).options()
        predicted = [(psnr_from_sse(sse, orig.size, value_range), k)
                     for k, (_, sse) in enumerate(options if adapt else options[:1])]
        best = max(predicted)[1]
        measured = restored_db(raw, options[best][0], decoded)
        candidates.append((measured, True, t, raw, options[best][0]))
        candidates.extend((r, False, t, raw, options[k][0]) for r, k in predicted if k != best and r >= psnr)
        return measured

    # The lowest codec target whose best restoration reaches ``psnr``: the restored PSNR runs about
    # parallel to the target (a steady gain), so secant steps on it land within a few trials; a step
    # that leaves the bracket found so far bisects it instead.
    lo, hi = psnr - search_db, psnr
    t, r = psnr, trial(psnr)
    if r >= psnr:
        slope = 1.0
        for _ in range(iterations):
            nxt = t - (r - psnr) / slope + (0.005 if r < psnr else 0.0)
            nxt = min(max(nxt, lo + 0.01), hi - 0.01) if lo < nxt < hi else 0.5 * (lo + hi)
            r_next = trial(nxt)
            slope = min(max((r_next - r) / (nxt - t), 0.5), 2.0)
            t, r = nxt, r_next
            if r >= psnr:
                hi = t
            else:
                lo = t
            if hi - lo < 0.02 or 0 <= r - psnr < 0.01:
                break
    # The smallest stream that reaches the target, if it is smaller than the codec's own stream for it
    # (the stream at the target itself saves nothing: it is sent plain, without the header).
    plain = streams[psnr]
    chosen = [c for c in candidates if c[2] != psnr and c[0] >= psnr]
    for r, measured, t, raw, coef in sorted(chosen, key=lambda c: len(sent(c[3], c[4], c[0], c[2]))):
        if not measured:
            r = restored_db(raw, coef)
            if r < psnr:
                continue
        blob = sent(raw, coef, r, t)
        if len(blob) < len(plain):
            return blob
    return plain


__all__ = [
    "RestorationModel", "ModelMismatchWarning", "load_model", "restore", "restore_array", "restore_stream",
    "decompress_restored",
    "model_mismatch", "tag_stream", "evaluate", "compress_for_quality", "correction_map",
]
