"""``compress`` / ``decompress``: rate control, the exact paths, and the .ftz header."""

from __future__ import annotations

import concurrent.futures
import json
import math
import time
from typing import NamedTuple

import jax
import numpy as np

from fedtensor import __version__
from fedtensor.codec import blocktucker, lossless, omlsvd_global, stream
from fedtensor.codec.container import pack, unpack
from fedtensor.codec.header import (MAX_TRANSFORM_STEP, MAX_VOXELS, TRANSFORM_CODECS, check_header, check_params,
                                    check_scaling)
from fedtensor.codec.normalize import denormalize, normalization, normalize, rows_per_chunk, to_dtype
from fedtensor.codec.quantize import finest_step, largest_step_within
from fedtensor.cores import usable_cores
from fedtensor.errors import FedtensorError, FormatError, RateError, VolumeError
from fedtensor.io.nifti import nifti_extras, nifti_qform, nifti_units, space_codes
from fedtensor.io.scaling import apply_scaling, float_errors, rounding_bound, scaling_of, stored_integers
from fedtensor.io.volume import Volume, integer_valued
from fedtensor.metrics import psnr_from_sse
from fedtensor.tensor.block import padded_shape
from fedtensor_kernels import block_transform as kernels

CODECS = TRANSFORM_CODECS
_MAX_RETRIES = 12
_MIN_STEP = 1e-12  # normalised units, far below float32 resolution: only an unreachable PSNR drives steps here
_MIN_RANGE = 1e-100  # below it squared errors at any PSNR target underflow float64 (the SSE would read 0)
#: Exact coding's largest span of integers: 3D Lorenzo residuals reach 4× it, and the entropy coder
#: takes magnitudes below 2**40.
_EXACT_RANGE = 2**37


AUTO_BLOCKS = ((4, 4, 4), (4, 4, 8), (8, 8, 8), (8, 8, 16), (16, 16, 8))
_PICK_SUPERBLOCKS = 192  # 16³ superblocks sampled to rank block shapes (≈ 0.8 M voxels)
#: Shapes whose proxy on a quarter of the superblocks is this much above the best one's are not costed
#: on the others. On the sample CTs and MR at 40–50 dB the shape best on all the superblocks was at most
#: 4.1 % above the best on the quarter (costs of whole streams, :func:`_stream_bits`); the others were
#: often 10–60 % above it. (At 10 % the head CT's runner-up, 9.8 % above at 45 dB, cost 4 ms more.)
_PICK_MARGIN = 0.08


def auto_block(x: np.ndarray, psnr: float = 45.0) -> tuple[int, int, int]:
    """The block shape ``compress(..., psnr=psnr)`` picks for the array ``x`` (no ``block`` given)."""
    offset, scale = normalization(x)
    return _pick_block(x, offset, scale, (float(np.ptp(x)) / scale / 10 ** (psnr / 20)) ** 2)


def _pick_block(x: np.ndarray, offset: float, scale: float, mse: float) -> tuple[int, int, int]:
    """The block shape with the least zeroth-order coefficient entropy over sampled superblocks of ``x``.

    The best shape varies a lot between volumes (fine noisy texture favours 4³, thick slices long
    in-plane blocks); at equal quantiser step the distortion barely depends on the (orthonormal)
    transform, so the per-band entropy of the quantised coefficients ranks the shapes the way the
    real coder does, at a fraction of its cost. ``mse`` is in normalised units.

    Every shape is costed first on a quarter of the superblocks (every fourth, as evenly spread), with
    bases fitted to all of them; only those within :data:`_PICK_MARGIN` of the best there are costed on
    the others too, their histograms added to the quarter's (the costs over all the superblocks, as if
    made at once), and a lone one is the answer. Each cost is that of the shape's whole stream
    (:func:`_stream_bits`: the padding to whole blocks and the bases counted). Where one shape stands
    out (the head CT) the choice takes ~0.6× the time of costing every shape on every superblock;
    where all are close (the chest CT) ~1.1×.
    """
    candidates = [b for b in AUTO_BLOCKS if all(m <= max(n, 4) for m, n in zip(b, x.shape))]
    if len(candidates) == 1:
        return candidates[0]
    index = blocktucker.superblock_index(x.shape, 16, _PICK_SUPERBLOCKS)
    # In the input dtype, normalised per tile; on the device once (not once per candidate).
    every_fourth = np.arange(0, len(index), 4)
    quarter = jax.device_put(blocktucker.gather_blocks(x, 16, index[every_fourth]))
    rest = jax.device_put(blocktucker.gather_blocks(x, 16, np.delete(index, every_fourth)))
    # One step for all shapes (the one meeting the target on the cubic candidate): at equal step the
    # distortion barely depends on the transform. The quarter's coefficients set it (on the sample CTs at
    # 38–50 dB the choices were those of all the tiles), their subsample alone (~1 % off the exact step,
    # 0.87× the choice's time; the five sample volumes' 60 choices at 34–56 dB were the same); the proxy
    # then never holds more coefficients than one tile's, so the choice costs little more memory than
    # the tiles.
    reference = (8, 8, 8) if (8, 8, 8) in candidates else candidates[0]
    budget = mse * quarter.size * x.size / math.prod(padded_shape(x.shape, 16))
    quarter_grams = blocktucker.fiber_grams(quarter, offset, scale)
    step = largest_step_within(blocktucker.tile_coefficients(quarter, reference, offset, scale, quarter_grams),
                               budget, 1e-9, 256.0, exact=False)
    # for all shapes; summed on the host (float64, as the bases are fitted): no XLA program to trace
    grams = [np.asarray(a, np.float64) + np.asarray(b, np.float64)
             for a, b in zip(quarter_grams, blocktucker.fiber_grams(rest, offset, scale))]
    bases = [blocktucker.tile_bases(grams, b) for b in candidates]
    hists = _proxy_histograms(quarter, candidates, bases, offset, scale, step)
    costs = [_stream_bits(_proxy_cost(h, b), quarter.size, b, x.shape) for h, b in zip(hists, candidates)]
    close = [k for k, c in enumerate(costs) if c <= min(costs) * (1 + _PICK_MARGIN)]
    if len(close) > 1 and len(rest):
        more = _proxy_histograms(rest, [candidates[k] for k in close], [bases[k] for k in close], offset, scale, step)
        costs = {k: _stream_bits(_proxy_cost(hists[k] + h, candidates[k]), quarter.size + rest.size, candidates[k],
                                 x.shape) for k, h in zip(close, more)}
        return candidates[min(costs, key=costs.get)]
    return candidates[int(np.argmin(costs))]  # the lone close one, or (no other superblocks) the best


#: What a padded voxel costs against a real one, in :func:`_stream_bits` (edge copies are smooth).
_PAD_WEIGHT = 0.5


def _stream_bits(proxy_bits: float, tile_voxels: int, b, shape) -> float:
    """A shape's proxy on ``tile_voxels`` sampled voxels as the bits of its stream: scaled to the voxels
    it codes (the volume padded to whole blocks) and its bases (float32) added. Both matter on small
    volumes only (a 24³ CT crop took 16×16×8 blocks, 32×32×24 coded voxels and 2.3 KB of bases, for
    1.5× the bits of 4³ at 45 dB). On the sample volumes only the 20-slice DICOM series' choice
    changed, 8×8×16 (padded to 32 slices) to 8×8×8 (24) at 45 and 50 dB: 3.7 % and 8.7 % fewer bits."""
    coded = math.prod(shape) + _PAD_WEIGHT * (math.prod(padded_shape(shape, b)) - math.prod(shape))
    return proxy_bits / tile_voxels * coded + 32 * sum(n * n for n in b)


def _proxy_histograms(tiles, candidates, bases, offset: float, scale: float, step: float) -> list:
    """:func:`_pick_block`'s per-band histograms of each candidate shape on ``tiles`` (with its
    ``bases``)."""
    # Each shape's proxy scans the tiles one by one, small steps that leave cores idle: the shapes run in
    # threads (JAX releases the GIL while a thread waits for its shape), 35–40 % less time on two cores.
    def histograms(shape_bases):
        b, u = shape_bases
        return jax.block_until_ready(blocktucker.tile_histograms(tiles, b, offset, scale, step, bases=u))

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(candidates), usable_cores()))) as pool:
        return list(pool.map(histograms, zip(candidates, bases)))


def _proxy_cost(hist, b) -> float:
    """The rate proxy of shape ``b`` from its histograms: their entropy, corrected for the block size."""
    # Context modelling gains more the more blocks there are: a small, measured correction per
    # doubling of the block volume keeps the proxy's ranking in line with the real coder's. (The proxy
    # quantises with one rounding, ROUNDING, for which that correction was measured: with the codec's
    # per-band rounding it picked worse shapes, e.g. 8³ for the chest CT at 40 dB, 7 % more bits than 4³.)
    return blocktucker.histogram_bits(hist) * (1 + 0.012 * (math.log2(math.prod(b)) - 9))


def _largest_step_reaching(evaluate, psnr: float, step: float, floor: float = _MIN_STEP):
    """Largest step whose decoded PSNR ≥ ``psnr``, starting from a close guess.

    ``evaluate(step) -> (reached_db, payload)``; returns ``(step, reached_db, payload)``. Secant steps
    on PSNR vs log10(step) (−20 dB per decade while MSE ∝ step²), then geometric bisection once the
    answer is bracketed. No step below ``floor`` is tried: short of the target there, it is unreachable.
    """
    ok = bad = prev = None  # (step, reached, payload)
    slope = -20.0
    for _ in range(_MAX_RETRIES):
        reached, payload = evaluate(step)
        if reached >= psnr:
            if ok is None or step > ok[0]:
                ok = (step, reached, payload)
            if reached - psnr < 0.02:
                break
        elif bad is None or step < bad[0]:
            bad = (step, reached, payload)
        if prev is not None and step != prev[0] and math.isfinite(reached) and math.isfinite(prev[1]):
            measured = (reached - prev[1]) / math.log10(step / prev[0])
            # PSNR falls as the step grows; where it did not (integer rounding on a tiny volume), a slope
            # clamped to −1 dB a decade jumped ten decades at once, past any step, and the search gave up
            slope = measured if measured <= -1.0 else -20.0
        prev = (step, reached)
        if ok and bad:
            if bad[0] / ok[0] < 1.002:
                break
            step = math.sqrt(ok[0] * bad[0])
            continue
        gap = (reached - psnr) if math.isfinite(reached) else 20.0
        if gap < 0 and step <= floor:  # the finest step is short of the target
            break
        step = max(floor, step * min(10.0, max(0.1, 10 ** (gap / -slope))) * (0.998 if gap < 0 else 1.0))
    if ok is None:
        raise RateError(f"could not reach {psnr} dB (the dtype's rounding and float32 transforms limit the "
                        "attainable PSNR; --max-error or --lossless are exact)")
    return ok


_COARSE = 10 ** np.array([-0.024, -0.008, 0.008, 0.024])  # steps ~0.3 dB apart: the local PSNR(log step) curve
_ANCHOR = 1  # the coarse step decoded in full; the others are scaled from their coefficients' errors
_TRUSTED_RATIO = 0.02  # decoded / coefficient error within 2 % of 1: padding and rounding take no share
_SCALED_RATIO = 0.25  # within 25 % of 1, the anchor's ratio still scales its neighbours' errors closely
_RATIO_DRIFT = 10.0  # dB per decade of step below the anchor, per unit of |1 − ratio|: their optimism
_FINE = 10 ** (0.0008 * np.arange(-2, 2))  # ~0.016 dB apart (the exact search stopped within 0.02 dB)
_STRAIGHT_DB = 0.01  # of three coarse points around the bracket, the middle this close to the others' line: straight
_MARGIN_DB = 0.01  # an interpolated step aims this far above the target


class StepEstimate(NamedTuple):
    """The rate search's answer from estimates, and the local slope of PSNR in dB per decade of step
    (to correct a miss of the encode's measurement)."""

    step: float
    slope: float


def _step_from_estimates(coarse, estimate, psnr: float, first: float, n: int,
                         value_range: float) -> StepEstimate | None:
    """Largest step whose *estimated* decoded PSNR reaches ``psnr``, in few passes over the volume
    (None when the estimates do not settle it).

    ``coarse(steps, anchor) -> ([sse], ratio)`` estimates several steps in one pass from one decoded
    step, ``estimate(steps) -> [(sse, max_err)]`` decodes them all. A coarse pass of four steps gives the
    local PSNR(log step) curve (about −20 dB per decade), extrapolated to the target until two
    neighbours bracket it. Where the coarse estimates are close (the anchor's ratio of decoded to
    coefficient error near 1, or within :data:`_SCALED_RATIO` of it with a margin for the drift of
    that ratio) and three around the bracket lie on a line (PSNR falls smoothly with the step), the
    step is interpolated, a hair on the safe side; elsewhere a fine pass of decoded steps around the
    interpolated step picks the answer.
    """
    def db(sse):
        return np.array([psnr_from_sse(e, n, value_range) if math.isfinite(e) else -math.inf for e in sse])

    centre, best, slope = first, None, -20.0
    for _ in range(6):
        if not (math.isfinite(centre) and centre > _MIN_STEP):
            return None
        steps = centre * _COARSE
        sse, ratio = coarse(steps, _ANCHOR)
        reached = db(sse)
        if not np.isfinite(reached).all():  # lossless at this step (+inf) or overflowing (-inf)
            if reached[0] == math.inf and reached[-1] != math.inf:
                return None  # a cliff between close steps: leave it to the exact search
            centre = centre * 10 if reached[-1] == math.inf else centre / 10
            continue
        logs = np.log10(steps)
        slope = min((reached[-1] - reached[0]) / (logs[-1] - logs[0]), -1.0)
        good = reached >= psnr
        if good.any():
            best = max(best or 0.0, float(steps[good].max()))
        k = int(np.flatnonzero(good[:-1] & ~good[1:])[0]) if (good[:-1] & ~good[1:]).any() else None
        if k is None:  # not bracketed: extrapolate on the line through the outer two
            centre = steps[0] * 10 ** ((psnr - reached[0]) / slope)
            if best is not None:  # one side is known good: stay at most one decade out
                centre = min(centre, best * 10)
            continue
        local = min((reached[k + 1] - reached[k]) / (logs[k + 1] - logs[k]), -1.0)
        centre = steps[k] * 10 ** ((psnr - reached[k]) / local)
        j = min(k, len(steps) - 3)  # three neighbours around the bracket: is the curve straight there?
        straight = abs(reached[j + 1] - (reached[j] + reached[j + 2]) / 2) <= _STRAIGHT_DB
        if straight and abs(ratio - 1) <= _SCALED_RATIO:
            # Where rounding or padding take a share of the error, the share changes with the step:
            # scaled by the anchor's ratio, smaller steps' estimates come out up to ~1 dB per decade
            # optimistic per 0.1 of |1 − ratio| (0.02 dB at most on the sample CTs), larger ones pessimistic.
            below = max(0.0, math.log10(float(steps[_ANCHOR]) / centre))
            margin = _MARGIN_DB + (abs(ratio - 1) > _TRUSTED_RATIO) * _RATIO_DRIFT * abs(ratio - 1) * below
            return StepEstimate(max(float(steps[k]), centre * 10 ** (margin / local)), local)
        break
    found = None
    for _ in range(3):
        fine = centre * _FINE
        reached = db([e[0] for e in estimate(fine)])
        good = reached >= psnr
        if good.any():
            found = max(found or 0.0, float(fine[good].max()))
            if not good.all() or reached[-1] - psnr < 2 * _MARGIN_DB:
                break
            centre = fine[-1] * (fine[-1] / fine[0])  # the whole window is well above the target: look higher
        elif found:
            break
        else:
            centre = fine[0] / 10 ** 0.003
    found = found or best
    return None if found is None else StepEstimate(found, slope)


def _rate_controlled(attempt, n: int, value_range: float, psnr: float | None, bpv: float | None,
                     first_step: float | None, floor: float = _MIN_STEP):
    """PSNR floor (largest step that meets it, on the decoded volume) or bits-per-voxel ceiling.

    ``attempt(step, measure)`` -> ``(blob or None, (sse, max_err) or None)``: measure only, or encode;
    ``floor``: the finest step it takes.
    """
    if psnr is not None:
        def evaluate(step):
            sse, worst = attempt(step, measure=True)[1]
            return psnr_from_sse(sse, n, value_range), (sse, worst)

        step, _, errors = _largest_step_reaching(evaluate, psnr, first_step, floor)
        return attempt(step, measure=False, errors=errors)[0]
    budget = bpv * n / 8
    lo, hi = 1e-7, 8 * 32**1.5
    best = attempt(hi)[0]
    if len(best) > budget:
        raise _unreachable_bpv(bpv, len(best), n)
    for _ in range(16):  # bisection on the log step: bytes fall as the step grows
        mid = math.sqrt(lo * hi)
        blob = attempt(mid)[0]
        if len(blob) <= budget:
            best, hi = blob, mid
        else:
            lo = mid
        if hi / lo < 1.01:
            break
    return best


def _unreachable_bpv(bpv: float, smallest: int, n: int) -> RateError:
    """The error for a ``--bpv`` below the smallest stream (``smallest`` bytes for ``n`` voxels). The
    budget it suggests is rounded up, with room for the header, which records the target's own digits
    (the stream's rounded size, asked for, fell a few bytes short)."""
    suggest = math.ceil(8 * (smallest + 32) / n * 1e4) / 1e4
    return RateError(f"cannot reach {bpv} bits per voxel: the smallest stream takes {8 * smallest / n:.4f}; "
                     f"ask for at least {suggest:.4f}")


def _lossy(volume: Volume, codec: str, block, psnr: float | None, bpv: float | None, header: dict,
           value_range: float):
    """Transform codecs under a PSNR floor or a bits-per-voxel ceiling.

    ``block-tucker`` streams over slabs along axis 0 (:mod:`fedtensor.codec.stream`): memory stays
    bounded by one slab's working set plus the coded bytes.
    """
    x = volume.data
    if codec != "block-tucker":
        offset, scale, mse = _normalization(x, psnr, value_range)
        return _lossy_global(x, value_range, offset, scale, x.size * mse, psnr, bpv, header)
    with stream.start_workers(x) as workers:  # they start up while the block shape and step are found
        return _block_tucker(x, block, psnr, bpv, header, value_range, workers)


def _normalization(x: np.ndarray, psnr: float | None, value_range: float) -> tuple[float, float, float]:
    """``offset, scale`` of the volume's normalisation, and the target's mean squared error per voxel in
    its units (bpv mode: that of 45 dB, which sizes ranks and blocks for a typical target)."""
    offset, scale = normalization(x)
    target_psnr = psnr if psnr is not None else 45.0
    return offset, scale, (value_range / scale / 10 ** (target_psnr / 20)) ** 2


def _block_tucker(x: np.ndarray, block, psnr: float | None, bpv: float | None, header: dict, value_range: float,
                  workers) -> bytes:
    """:func:`_lossy` for ``block-tucker``; ``workers``: the entropy coder's, if already started."""
    n = x.size
    offset, scale, mse = _normalization(x, psnr, value_range)
    t0 = time.perf_counter()
    b = block or _pick_block(x, offset, scale, mse)
    stream.trim_heap()  # the sampled tiles' memory goes back before the first slab pass
    stream.tick("block choice", t0)
    slabs = stream.Slabs(tuple(x.shape), b, stream.slab_depth(x.shape, b, stream.slab_voxels(x)))
    enc = stream.SlabEncoder(x, slabs, offset, scale, stream.fit_bases(x, slabs, offset, scale),
                             kernels.impl_for(b), workers)

    def attempt(step: float, measure: bool = True, errors=None):
        # (all zeros above the top already) what the decoders accept; below the floor int32 indices
        # would saturate (|coef| ≤ √B for a unit-range volume), and the entropy coder refuses them
        step = min(max(step, finest_step(b)), MAX_TRANSFORM_STEP)
        if measure and errors is None and psnr is not None:  # the PSNR search only needs the error
            return None, enc.errors(step)
        sections, measured = enc.encode(step, measure=errors is None)
        sse, worst = errors or measured
        stats = {"psnr": psnr_from_sse(sse, n, value_range), "max_abs_error": worst}
        params = {"block": list(b), "slab": slabs.depth, "step": step, "offset": offset, "scale": scale}
        if slabs.n_groups > 1:
            params["group"] = slabs.group
        bases = np.concatenate([u.ravel() for u in enc.bases]).astype("<f4").tobytes()
        return pack({**header, "params": params, "stats": stats}, [bases, *sections]), (sse, worst)

    if psnr is not None:
        t0 = time.perf_counter()
        first = stream.initial_step(x, b, enc.bases, offset, scale, mse)
        stream.trim_heap()
        stream.tick("search: first guess", t0)
        # Estimated PSNRs (several steps per pass) pick the step; the encode then measures the decoded
        # volume exactly, and only a miss (an estimate off at the last digit) steps down.
        found = _step_from_estimates(enc.estimate_coarse, enc.estimate, psnr, first, n, value_range)
        step = found.step if found else None
        for _ in range(4 if found else 0):
            blob, (sse, _) = attempt(step, measure=False)
            reached = psnr_from_sse(sse, n, value_range)
            if reached >= psnr:
                return blob
            # Short of the target: step down along the local slope, a hair beyond (a fine step at least).
            short = (psnr - reached + _MARGIN_DB) if math.isfinite(reached) else 1.0
            step /= max(_FINE[1] / _FINE[0], 10 ** (short / -found.slope))
        first = step or first  # the estimates are off (e.g. float data near its precision): exact search
        return _rate_controlled(attempt, n, value_range, psnr, bpv, first, finest_step(b))
    try:
        return _rate_controlled(attempt, n, value_range, psnr, bpv, first_step=None)  # bpv: its own bisection
    except RateError:
        # The shape was picked for 45 dB; on a small volume its bases alone (2.3 KB for 16×16×8) can
        # exceed a budget that the smallest shape's (192 B) meets.
        if block is not None or b == AUTO_BLOCKS[0]:
            raise
        return _block_tucker(x, AUTO_BLOCKS[0], psnr, bpv, header, value_range, workers)


def _lossy_global(x, value_range, offset, scale, max_sse, psnr, bpv, header):
    """``omlsvd-global``: one Tucker decomposition of the whole (normalised) volume, in memory."""
    n = x.size
    tr = omlsvd_global.GlobalTucker(normalize(x, offset, scale), max_sse)

    def attempt(step: float, measure: bool = True, errors=None):
        step = min(max(step, finest_step(x.shape)), MAX_TRANSFORM_STEP)  # (as block-tucker's attempt)
        q = tr.quantize(step)
        decoded = denormalize(tr.reconstruct(q, step), x.dtype, offset, scale)
        sse, worst = stream.error_stats(x, decoded)
        if measure and errors is None and psnr is not None:
            return None, (sse, worst)
        params, sections = tr.encode(q, step)
        stats = {"psnr": psnr_from_sse(sse, n, value_range), "max_abs_error": worst}
        return pack({**header, "params": {**params, "offset": offset, "scale": scale}, "stats": stats},
                    sections), (sse, worst)

    return _rate_controlled(attempt, n, value_range, psnr, bpv, tr.step_for_sse(max_sse), finest_step(x.shape))


def _constant(volume: Volume, header: dict) -> bytes:
    """A constant volume is its value: exact in every mode (and PSNR is undefined for it anyway)."""
    value = volume.data.flat[0].item()
    return pack({**header, "codec": "constant", "params": {"value": value},
                 "stats": {"psnr": math.inf, "max_abs_error": 0.0}}, [])


def _exact(volume: Volume, max_error: float | None, header: dict, value_range: float) -> bytes:
    """Lossless (``max_error`` None or < 1 on integers) or near-lossless on a grid of step 2E
    (``value_range``: max − min of the volume)."""
    data = volume.data
    integer = data.dtype.kind in "iu"
    if max_error is None:
        if not integer_valued(data):
            why = " (it holds -0.0, which integer coding cannot restore bit for bit)" if (
                np.array_equal(data, np.rint(data)) and np.abs(data).max() < 2**52) else ""
            raise RateError(f"exact coding (lossless, or a max error of 0) needs integer-valued voxels{why}; give "
                            "this float volume a positive max error")
        if value_range >= _EXACT_RANGE:
            raise RateError(f"exact coding needs a value range below 2**37; this volume spans {value_range:.6g}")
        offset = int(data.min())
        params, sections = lossless.encode_integers(data.astype(np.int64) - offset)
        return pack({**header, "codec": "lossless", "params": {**params, "offset": offset, "step": 1},
                     "stats": {"psnr": math.inf, "max_abs_error": 0.0}}, sections)
    max_error = min(max_error, value_range)  # any bound beyond the range: one grid point, the minimum
    if integer:
        e = int(math.floor(max_error))
        k, offset = 2 * e + 1, int(data.min())
        q = (data.astype(np.int64) - offset + e) // k
        return _pack_grid(data, q, k, offset, header, max_error, value_range)
    x = data.astype(np.float64)
    offset = float(x.min())
    step = 2.0 * max_error
    # the output dtype's rounding near the largest magnitude (float32 at 1000: 6e-5)
    ulp = float(np.spacing(np.abs(data).max().astype(data.dtype))) if data.dtype.kind == "f" else 0.0
    for _ in range(_MAX_RETRIES):
        q = np.rint((x - offset) / step)
        if q.max(initial=0) >= _EXACT_RANGE:
            raise RateError(f"--max-error {max_error} is too small for this volume's range (a grid of over 2**37 steps)")
        decoded = to_dtype(offset + q * step, data.dtype)
        worst = float(np.max(np.abs(decoded - x)))
        if worst <= max_error:
            return _pack_grid(data, q.astype(np.int64), step, offset, header, max_error, value_range)
        # the output dtype's rounding ate into the bound: tighten the grid by what it ate, and a rounding more
        step -= 2.0 * (worst - max_error) + ulp
        if not step > 0:
            break
    raise RateError(f"--max-error {max_error} is below the precision of this {data.dtype} volume")


def _pack_grid(data, q, step, offset, header, max_error, value_range) -> bytes:
    params, sections = lossless.encode_integers(q)
    decoded = _dequantize_grid(q, step, offset, data.dtype)
    sse, err = stream.error_stats(data, decoded)
    if err > max_error:  # the guarantee is checked, never assumed
        raise FedtensorError(f"internal error: max-error bound violated ({err} > {max_error})")
    stats = {"psnr": psnr_from_sse(sse, data.size, value_range), "max_abs_error": err}
    return pack({**header, "codec": "max-error", "params": {**params, "step": step, "offset": offset},
                 "stats": stats}, sections)


def _dequantize_grid(q, step, offset, dtype) -> np.ndarray:
    return to_dtype(offset + q.astype(np.float64) * step, dtype)


def compress(volume: Volume, *, psnr: float | None = None, max_error: float | None = None,
             bpv: float | None = None, lossless: bool = False, codec: str = "block-tucker",
             block: int | tuple[int, int, int] | None = None, allow_exact: bool = True) -> bytes:
    """Compress a :class:`Volume` to ``.ftz`` bytes.

    Exactly one target: ``psnr`` (dB floor, guaranteed), ``max_error`` (every voxel within ±E,
    guaranteed), ``bpv`` (bits-per-voxel ceiling, best quality within it) or ``lossless`` (bit-exact
    for integer-valued volumes). Default: ``psnr=45``. ``block`` is the block-Tucker block side
    (an int, or a per-axis shape); ``None`` picks the shape per volume among :data:`AUTO_BLOCKS`.
    With ``psnr`` or ``bpv`` an integer volume gets the exact (lossless) stream where that is smaller;
    ``allow_exact=False`` keeps the transform codec's own stream (to compare transforms, say).
    Volumes of 2²³ voxels or more are entropy-coded in worker processes (:mod:`fedtensor.codec.parallel`;
    ``FEDTENSOR_WORKERS`` sets how many); the bytes do not depend on it.
    """
    if not isinstance(volume, Volume):
        raise VolumeError(f"compress takes a fedtensor.io.Volume (Volume(array, spacing, affine)), "
                          f"not {type(volume).__name__}")
    volume.validate()
    psnr, max_error, bpv = (_target(name, v) for name, v in (("psnr", psnr), ("max-error", max_error), ("bpv", bpv)))
    if not isinstance(lossless, (bool, np.bool_)):
        raise RateError(f"lossless must be True or False, got {lossless!r}")
    chosen = [m for m, v in (("psnr", psnr), ("max_error", max_error), ("bpv", bpv), ("lossless", lossless or None))
              if v is not None]
    if len(chosen) > 1:
        raise RateError(f"choose one target, got {', '.join(chosen)}")
    if not chosen:
        psnr, chosen = 45.0, ["psnr"]
    if codec not in CODECS:
        raise RateError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    if psnr is not None and not (0 < psnr < 400):
        raise RateError(f"--psnr must be a positive number of dB, got {psnr}")
    if bpv is not None and not (bpv > 0 and math.isfinite(bpv)):
        raise RateError(f"--bpv must be a positive number, got {bpv}")
    if max_error is not None and not (max_error >= 0 and math.isfinite(max_error)):
        raise RateError(f"--max-error must be a finite number >= 0, got {max_error}")
    if block is not None and codec != "block-tucker":
        raise RateError(f"--block applies to the block-tucker codec only, not {codec}")
    if block is not None:
        sides = (block,) * 3 if np.ndim(block) == 0 else tuple(block)
        if len(sides) != 3 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_))
                                      and 2 <= n <= 32 for n in sides):
            raise RateError(f"--block must be an integer (or three) between 2 and 32, got {block!r}")
        # a side beyond its axis only pads: cut to the axis (e.g. --block 8 for a batch holding a thin
        # volume; a 32-side on a 1×1×131072 volume took 2.7 GB and 3.5× the bits)
        block = tuple(min(int(n), max(2, side)) for n, side in zip(sides, volume.shape))
    if volume.data.size >= MAX_VOXELS:
        raise RateError(f"volume too large ({volume.data.size} voxels); the limit is {MAX_VOXELS}")
    target = {chosen[0]: psnr if psnr is not None else (max_error if max_error is not None else bpv)}
    lo, hi = float(volume.data.min()), float(volume.data.max())  # one pass each, shared by every mode
    value_range = hi - lo
    if (_integers_pay(volume, value_range, psnr, max_error, lossless)
            and (raw := stored_integers(volume)) is not None):
        blob = _scaled_integers(volume, raw, target, value_range, psnr=psnr, max_error=max_error, bpv=bpv,
                                lossless=lossless, codec=codec, block=block, allow_exact=allow_exact)
        if blob is not None:
            return blob
        volume = Volume(volume.data, volume.spacing, volume.affine,
                        {k: v for k, v in volume.meta.items() if k != "nifti_scaling"})
    header = {
        "library": f"fedtensor {__version__}", "codec": codec, "shape": list(volume.shape),
        "dtype": volume.dtype.str, "spacing": list(volume.spacing), "affine": volume.affine.tolist(),
        "target": target,
        "modality": volume.meta.get("modality") or volume.meta.get("Modality"), "model": None,
    }
    if "nifti_codes" in volume.meta:  # the space of the affine (NIfTI [qform, sform] codes), for the writer
        header["nifti_codes"] = list(space_codes(volume.meta).values())
    if (qform := nifti_qform(volume.meta)) is not None:  # a NIfTI file's second space
        header["nifti_qform"] = qform.tolist()
    if nifti_units(volume.meta) != "mm":
        header["nifti_units"] = nifti_units(volume.meta)
    if extras := nifti_extras(volume.meta):  # description, intent, display window, time unit, …
        header["nifti_header"] = extras
    exact = lossless or (max_error is not None and (max_error == 0 or max_error < 1 and volume.dtype.kind in "iu"))
    # (zeros of both signs are one value, yet not bit-exact as one: exact coding refuses them, below)
    if value_range == 0 and not (exact and volume.dtype.kind == "f" and np.signbit(volume.data).any()
                                 and not np.signbit(volume.data).all()):
        blob = _constant(volume, header)
        if bpv is not None and 8 * len(blob) > bpv * volume.data.size:  # the one stream there is
            raise _unreachable_bpv(bpv, len(blob), volume.data.size)
    elif exact:
        blob = _exact(volume, None, header, value_range)
    elif max_error is not None:
        blob = _exact(volume, max_error, header, value_range)
    elif value_range < _MIN_RANGE:
        raise RateError(f"the volume's value range ({value_range:.3g}) is too small for --psnr or --bpv: its "
                        "errors would underflow float64; scale it, or use --max-error")
    elif max(-lo, hi) > float(np.finfo(np.float32).max):
        raise RateError("the volume holds values beyond float32's range (±3.4e38), where the transform codecs "
                        "compute; use --max-error")
    elif not allow_exact:
        blob = _lossy(volume, codec, block, psnr, bpv, header, value_range)
    else:
        blob = _lossy_or_exact(volume, codec, block, psnr, bpv, header, value_range, lo)
    return blob


def _integers_pay(volume: Volume, value_range: float, psnr: float | None, max_error: float | None,
                  lossless: bool) -> bool:
    """Whether to code a float volume's stored integers (if it has them, :func:`stored_integers`) rather
    than its floats: for exact coding, a bits budget, or an error of at least one integer step. Finer
    errors are the floats' (the decoded integers' rounding, 0.29 of a step RMS, would take a large share
    of them: the sample MR's stream at 55 dB was 2.6 % larger and 4× slower as integers)."""
    found = scaling_of(volume.meta)
    if found is None or volume.dtype.kind != "f" or lossless or max_error == 0 or (psnr or 0) >= 300:
        return found is not None  # (exact: only the integers can be; a PSNR beyond the transforms, likewise)
    step = abs(found[0])
    if max_error is not None:
        return max_error >= step
    if psnr is not None:
        return value_range * 10 ** (-psnr / 20) >= step
    return True  # a bits budget: the integers where they fit it, else the floats


#: Streams of the integers tried before a scaled volume is coded as floats instead.
_SCALED_TRIES = 3


def _scaled_integers(volume: Volume, raw: np.ndarray, target: dict, value_range: float, *, psnr, max_error, bpv, lossless, codec, block,
                     allow_exact) -> bytes | None:
    """:func:`compress` of floats made from scaled integers (NIfTI ``scl_slope``, :func:`stored_integers`):
    the integers are coded, under the targets carried to their units, and the header's ``"scaling"``
    turns them back into the same floats (format version 3). None where that does not meet the floats'
    targets (floats of a few distinct levels, say): the caller codes the floats.

    The floats' errors are ``|slope|`` times the integers', give or take their rounding
    (:func:`rounding_bound`): the PSNR target is raised and the error bound lowered by that much, then
    the stream is decoded and measured on the floats (its stats are those figures), and aimed higher
    where it falls short. (:func:`_integers_pay` says when to come here at all.)
    """
    slope, inter, _ = scaling_of(volume.meta)
    x, a, n = volume.data, abs(slope), raw.size
    inner = Volume(raw, volume.spacing, volume.affine, {k: v for k, v in volume.meta.items() if k != "nifti_scaling"})
    aim = {"psnr": psnr, "max_error": max_error, "lossless": lossless}
    if psnr is not None:
        u = rounding_bound(x, value_range)
        span, rmse = a * (float(raw.max()) - float(raw.min())), value_range * 10 ** (-psnr / 20)
        if span > 4 * u and rmse > 2 * u:
            aim["psnr"] = psnr + 20 * math.log10((rmse + 2 * u) / (rmse - 2 * u) * span / (span - 2 * u))
    if max_error is not None:  # below one integer: the integers exactly
        aim["max_error"] = max(0.0, (max_error - 2 * rounding_bound(x, max_error)) / a)
    scaling = {"slope": slope, "inter": inter, "dtype": volume.dtype.str}
    reserve = len(json.dumps({"scaling": scaling})) + 64  # the header's growth: taken off a bits budget
    for _ in range(_SCALED_TRIES):
        if aim["psnr"] is not None and aim["psnr"] >= 300:  # beyond the transforms: the integers exactly
            aim = {"psnr": None, "max_error": None, "lossless": True}
        try:
            # (a budget the header's growth leaves nothing of fails here, and the floats are tried)
            blob = compress(inner, **aim, bpv=None if bpv is None else max(bpv - 8 * reserve / n, 1e-9), codec=codec,
                            block=block, allow_exact=allow_exact)
        except RateError:  # (a budget the integers miss: the floats may meet it)
            return None
        h, sections = unpack(blob)
        sse, worst = float_errors(x, decompress(blob).data, slope, inter)
        reached = psnr_from_sse(sse, n, value_range)
        if psnr is not None and not reached >= psnr:  # (NaN: squared errors beyond float64, a miss too)
            if not math.isfinite(reached):
                return None
            aim["psnr"] += psnr - reached + _MARGIN_DB
            continue
        if max_error is not None and not worst <= max_error:
            aim["max_error"] = max(0.0, float(h["stats"]["max_abs_error"]) - 1)
            continue
        h.pop("sections")
        h.update(scaling=scaling, target=target, stats={"psnr": reached, "max_abs_error": worst})
        out = pack(h, sections)
        if bpv is not None and 8 * len(out) > bpv * n:
            reserve = len(out) - len(blob) + 8
            continue
        return out
    return None


def _target(name: str, value):
    """A rate target as a Python number (None: not chosen); anything but a real number is a
    :class:`RateError`."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RateError(f"--{name} must be a number, got {value!r}")
    return value.item() if isinstance(value, np.generic) else value


_NEAR_EXACT_DB = 6.0  # a lossy stream this close to the integer grid's own PSNR may cost more than exact
_EXACT_MAX_VOXELS = 1 << 25  # the exact coder holds whole-volume int64 copies: not tried unasked beyond this


def _value_entropy(x: np.ndarray, lo: float, value_range: float, stride: int = 7) -> float:
    """Zeroth-order entropy of an integer volume's values, in bits per voxel, estimated on every
    ``stride``-th voxel (on fewer, ~2²⁰, where the range is too wide to count per value; inf for other
    dtypes). The exact coder predicts each voxel from its neighbours, so it rarely needs more: a label
    map or mask has a small one, a CT one (~10 bits) far above any lossy target's bits."""
    if x.dtype.kind not in "iu":
        return math.inf
    chunk = rows_per_chunk(x.shape)
    if value_range >= 1 << 20:  # too wide to count per value: the distinct values of ~2²⁰ sampled voxels
        step = max(stride, x.size >> 20 | 1)
        counts = np.unique(np.concatenate([x[k:k + chunk].reshape(-1)[::step] for k in range(0, x.shape[0], chunk)]),
                           return_counts=True)[1]
    else:
        counts = np.zeros(int(value_range) + 1, np.int64)
        for k in range(0, x.shape[0], chunk):  # a few rows at a time: no whole-volume int64 copy
            sample = x[k:k + chunk].reshape(-1)[::stride]
            counts += np.bincount(sample.astype(np.int64) - int(lo), minlength=counts.size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _residual_entropy(x: np.ndarray, cubes: int = 8, side: int = 16) -> float:
    """Zeroth-order entropy, in bits per voxel, of the exact coder's best Lorenzo residuals (over its
    axis sets, :data:`~fedtensor.codec.lossless.AXIS_SETS`), estimated on ``cubes`` sub-cubes of
    ``side`` voxels spread along the volume's diagonal (inf for non-integer dtypes). Smooth integer
    volumes (ramps, coordinate maps) have many distinct values yet cost the exact coder little."""
    if x.dtype.kind not in "iu":
        return math.inf
    sides = [min(side, n) for n in x.shape]
    starts = [np.linspace(0, n - k, cubes).astype(int) for n, k in zip(x.shape, sides)]
    wide = np.int64 if x.dtype.itemsize > 2 else np.int32  # 3D differences of 16-bit values fit int32
    cube = np.stack([x[a:a + sides[0], b:b + sides[1], c:c + sides[2]] for a, b, c in zip(*starts)]).astype(wide)
    best = math.inf
    for axes in lossless.AXIS_SETS:
        if any(sides[ax] < 2 for ax in axes):
            continue
        res = cube
        for ax in axes:  # interior differences only: a cube's first plane has no neighbour to predict from
            res = np.diff(res, axis=ax + 1)
        counts = np.unique(res, return_counts=True)[1]
        del res
        p = counts / counts.sum()
        best = min(best, float(-(p * np.log2(p)).sum()) + 0.0)  # (+ 0.0: one value's -0.0)
    return best


def _lossy_or_exact(volume: Volume, codec: str, block, psnr: float | None, bpv: float | None, header: dict,
                    value_range: float, lo: float) -> bytes:
    """:func:`_lossy`, or the exact (lossless) stream where it is smaller, or (``bpv``) fits the budget:
    exact is the best quality within a budget, and a lossy stream should not cost more.

    Only integer-valued volumes of at most :data:`_EXACT_MAX_VOXELS` voxels are tried, and only where
    exact may win: the values' zeroth-order entropy (:func:`_value_entropy`; the exact stream needed
    0.4–0.9 of it on the sample CTs), or that of their Lorenzo residuals (:func:`_residual_entropy`,
    for smooth volumes) if smaller, within twice the budget (coded first: it spares the budget's
    bisection when it fits) or twice the lossy stream's bits, or a lossy stream within
    :data:`_NEAR_EXACT_DB` of the PSNR of rounding to integers (``20·log10(range·√12)``). At the usual
    targets on CT, lossless costs several times the bits and is never coded.
    """
    x, n = volume.data, volume.data.size
    budget = None if bpv is None else bpv * n / 8
    eligible = n <= _EXACT_MAX_VOXELS
    # both estimates before the lossy stream's passes (~1 ms): their few buffers are gone by its peak
    value_bits, residual_bits = math.inf, math.inf
    if eligible:
        value_bits, residual_bits = _value_entropy(x, lo, value_range), _residual_entropy(x)

    def may_win(bits: float) -> bool:
        return min(value_bits, residual_bits) <= bits

    if budget is not None and eligible and may_win(2 * bpv) and integer_valued(x):
        exact = _exact(volume, None, header, value_range)
        if len(exact) <= budget:
            return exact
        eligible = False  # tried: it does not fit
    try:
        blob = _lossy(volume, codec, block, psnr, bpv, header, value_range)
    except RateError:
        # A PSNR beyond what float32 transforms reach (an int32 volume at 150 dB, say): the exact stream
        # reaches any, where it is allowed (a budget's own failure is final: exact was tried above).
        if psnr is None or not (eligible and value_range < _EXACT_RANGE and integer_valued(x)):
            raise
        return _exact(volume, None, header, value_range)
    if not eligible:
        return blob
    near_exact = unpack(blob)[0]["stats"]["psnr"] >= 20 * math.log10(value_range * math.sqrt(12)) - _NEAR_EXACT_DB
    if not (near_exact or may_win(2 * 8 * len(blob) / n)) or not integer_valued(x):
        return blob
    exact = _exact(volume, None, header, value_range)
    return exact if len(exact) <= (budget if budget is not None else len(blob)) else blob


def decompress(data: bytes) -> Volume:
    """Decode ``.ftz`` bytes back to a :class:`Volume` (original dtype, spacing and affine)."""
    h, sections = unpack(data)
    shape, dtype = check_header(h)
    p, codec = h["params"], h.get("codec")
    check_params(codec, p, dtype)
    try:
        if codec == "block-tucker":
            x = stream.decode_into(np.empty(shape, dtype), p, sections, float(p["offset"]), float(p["scale"]))
        elif codec in CODECS:
            x = denormalize(omlsvd_global.decode(p, sections, shape), dtype, float(p["offset"]), float(p["scale"]))
        elif codec == "constant":
            x = np.full(shape, p["value"], dtype)
        else:  # lossless or max-error (check_params refused any other codec)
            q = lossless.decode_integers(p, sections, shape)
            if codec == "lossless" and dtype.kind in "iu":  # in place: q is the largest array held here
                q += int(p["offset"])
                x = q.astype(dtype)
            else:
                x = _dequantize_grid(q, float(p["step"]), float(p["offset"]), dtype)
            del q
    except FedtensorError:
        raise
    except MemoryError:
        raise FormatError(f"not enough memory to decode a {'×'.join(map(str, shape))} volume") from None
    except Exception as err:  # untrusted payload: any decoder failure (incl. constriction's) is corruption
        raise FormatError(f"corrupted .ftz payload ({err.__class__.__name__})") from None
    if x.shape != shape:
        raise FormatError("corrupted .ftz payload (shape mismatch)")
    meta = {"format": "ftz", "codec": codec}
    if "scaling" in h:  # scaled integers (format version 3): back to the floats they were coded from
        slope, inter, out = check_scaling(h["scaling"], dtype)
        meta["nifti_scaling"] = {"slope": slope, "inter": inter, "stored": dtype.str}
        x = apply_scaling(x, slope, inter, out)
    if h.get("modality"):
        meta["modality"] = h["modality"]
    codes = h.get("nifti_codes")
    if isinstance(codes, list) and len(codes) == 2:
        meta["nifti_codes"] = space_codes({"nifti_codes": dict(zip(("qform_code", "sform_code"), codes))})
    if (qform := nifti_qform(h)) is not None:
        meta["nifti_qform"] = qform.tolist()
    if (units := nifti_units(h)) != "mm":
        meta["nifti_units"] = units
    if extras := nifti_extras(h):
        meta["nifti_header"] = extras
    return Volume(x, tuple(h["spacing"]), np.asarray(h["affine"], float), meta)
