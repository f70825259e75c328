"""Block-Tucker coding in slabs along axis 0: bounded memory, one stream.

The (edge-padded) volume is cut along axis 0 into slabs of ``depth`` voxels, a multiple of the block
depth (header ``params.slab``). Every pass — Gram matrices for the bases, the decoded-PSNR check of a
quantiser step, the final encoding — visits one slab at a time: send it to the device raw, normalise
it there (:class:`~fedtensor.codec.normalize.DeviceMap`), transform and quantise it, then code its
integer block grid into its own payload section, the entropy coder's context statistics (and the DC
predictor's last plane) carried on from the previous slab, so thin slabs cost no bits. Only coded
bytes outlive a slab; the decoder writes each decoded slab, mapped back to the original dtype on the
device, into one preallocated array. Every slab has the same static shape (the last one is
edge-padded), so each jitted function compiles once per volume geometry.

A slab's coefficients are exactly those of the whole-volume block transform (blocks never straddle
slabs), so a stream equals the whole-volume quantised grid coded slab by slab, and the decoder returns
the whole-volume reconstruction up to float32 summation order (tests/test_stream.py). Encoder and
decoder run the inverse on the same slab shapes, so the PSNR the encoder measured is exactly that of
the decoder's output.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import itertools
import math
import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fedtensor.codec.blockcoef import BlockCoders
from fedtensor.codec.normalize import (DeviceMap, decoded_shifted, denormalize, device_map, from_unit, normalize,
                                       rows_per_chunk, shifted, to_unit)
from fedtensor.codec.parallel import (Workers, decode_group, decode_slab, encode_group, encode_slab, group_voxels,
                                      memory_budget, narrow, slab_coders, worker_count)
from fedtensor.codec.quantize import RECON_OFFSET, band_rounding, dequantize, finest_step, quantize
from fedtensor.codec.header import orthonormal_bases
from fedtensor.errors import FormatError
from fedtensor.tensor.block import _to_blocks, expand, from_blocks, padded_shape, project
from fedtensor.tensor.precision import FP32
from fedtensor.tensor.tucker import leading_eigvecs_host
from fedtensor_kernels import block_transform as kernels

#: Most voxels per slab (of the padded volume). The context statistics carry over from slab to slab,
#: so thin slabs cost almost no bits (chest CT at 45 dB: 1 slab 1.6859 bpv, 3 slabs 1.6835, 10 slabs
#: 1.6818); 2²⁰ keeps one slab's working set (~20–30 bytes per voxel) to a few tens of MB.
SLAB_VOXELS = 1 << 20
MIN_SLAB_VOXELS = 1 << 14
#: Passes over at most this many slabs trim the heap after each slab (:func:`trim_heap`). A slab's
#: freed buffers are then a large share of the input (the 2.4 MVoxel head CT's compress peaks at 5.8×
#: its size untrimmed, 3.0–3.4× trimmed); over many slabs each reuses the last one's, and trimming
#: every one only costs time (5 ms a slab: 0.6 s of a 512³ CT's compress).
TRIM_EACH_SLABS = 16
#: Memory one more slab in flight takes (its coefficients and the transform's buffers), per slab voxel.
#: With a slab transformed ahead, the 2.4 MVoxel uint8 head CT (slabs of one 16-deep block row, a
#: tenth of its voxels) peaked at 3.9× its size on average, against 2.6× without; the int16 chest CT's
#: slabs take 0.4× its size at this rate, and it gains 5–15 % speed from the overlap.
LOOKAHEAD_BYTES = 8


def slab_voxels(x: np.ndarray) -> int:
    """Voxels per slab for ``x``: :data:`SLAB_VOXELS`, and at most a sixteenth of the input's bytes, so
    that one slab's working set (20–40 bytes a voxel) stays a small multiple of the input even for
    small volumes. An eighth had the chest CT's compress peak at 3.2–4.1× its size on average (up to
    7.2×) over eight calls, a sixteenth at 1.8–1.9× (up to 2.3×), as fast and in the same bits."""
    return max(MIN_SLAB_VOXELS, min(SLAB_VOXELS, x.nbytes // 16))


def slab_depth(shape, b, slab_voxels: int = SLAB_VOXELS) -> int:
    """Slab thickness along axis 0: a multiple of the block depth, at most the padded axis."""
    px, py, pz = padded_shape(shape, b)
    rows = max(1, slab_voxels // (py * pz * b[0]))
    return min(rows * b[0], px)


@dataclass(frozen=True)
class Slabs:
    """The slab layout of a volume ``shape`` under block shape ``b`` and slab thickness ``depth``, and
    its context groups of ``group`` slabs (default: :func:`~fedtensor.codec.parallel.group_voxels`
    voxels each; see :mod:`fedtensor.codec.parallel`)."""

    shape: tuple[int, int, int]
    b: tuple[int, int, int]
    depth: int
    group: int = 0

    def __post_init__(self):
        if not self.group:
            voxels = group_voxels(math.prod(self.shape))  # the volume's own: padding must not split a small one
            object.__setattr__(self, "group", len(self) if voxels is None else max(1, voxels // self.slab_voxels))

    @property
    def n_groups(self) -> int:
        return -(-len(self) // self.group)

    @property
    def slab_voxels(self) -> int:
        _, py, pz = padded_shape(self.shape, self.b)
        return self.depth * py * pz

    def worker_tasks(self, items: Iterable[tuple[int, object]], workers: int, primer: BlockCoders) -> Iterator[tuple]:
        """:meth:`~fedtensor.codec.parallel.Workers.stream`'s tasks for ``encode_slab`` / ``decode_slab``
        from ``(slab number, coefficients or section)`` items (slab 0, coded by the caller into
        ``primer``, excluded): group ``g``'s slabs on worker ``g % workers``, its first one starting from
        the ``primer``."""
        for i, data in items:
            g = i // self.group
            starts = i == max(1, g * self.group)  # group 0's worker goes on from slab 0
            ends = i == min(len(self), (g + 1) * self.group) - 1
            yield g % workers, (g, self.grid(self.starts[i]), self.b, data, primer if starts else None, ends)

    @property
    def trims_each(self) -> bool:
        """Whether a pass trims the heap after every slab (few slabs: :data:`TRIM_EACH_SLABS`) rather
        than once after the last."""
        return len(self) <= TRIM_EACH_SLABS

    def coding_order(self) -> list[int]:
        """The slabs' numbers, slab 0 first (every group starts from the statistics it leaves), then
        round-robin across the groups, each group's slabs in turn."""
        n, g = len(self), self.group
        return [0] + [k * g + r for r in range(g) for k in range(self.n_groups) if 0 < k * g + r < n]

    def grids(self) -> list[tuple[int, int, int]]:
        return [self.grid(start) for start in self.starts]

    @property
    def starts(self) -> range:
        return range(0, self.shape[0], self.depth)

    def __len__(self) -> int:
        return len(self.starts)

    def rows(self, start: int) -> int:
        """Real voxel rows of the slab at ``start``."""
        return min(self.depth, self.shape[0] - start)

    def grid(self, start: int) -> tuple[int, int, int]:
        """The block grid coded for the slab at ``start`` (its real block rows only)."""
        _, py, pz = padded_shape(self.shape, self.b)
        return -(-self.rows(start) // self.b[0]), py // self.b[1], pz // self.b[2]

    def slab(self, x: np.ndarray, start: int, m: DeviceMap | None, offset: float, scale: float) -> np.ndarray:
        """The slab at ``start`` as the jitted functions take it, edge-padded along axis 0 to ``depth``
        rows: raw voxels (a view, unless it is the last, short slab) when the device normalises (``m``),
        else normalised float32 from the host."""
        r = self.rows(start)
        out = x[start:start + r] if m is not None else normalize(x[start:start + r], offset, scale)
        if r < self.depth:
            out = np.concatenate([out, np.broadcast_to(out[-1:], (self.depth - r, *out.shape[1:]))])
        return out


_PROFILE: list[dict] = []


@contextlib.contextmanager
def profiled():
    """Collect seconds per codec stage of the calls inside the block (for benchmarks)::

        with profiled() as seconds:
            compress(volume)
        seconds  # {"entropy": …, "transform+quantize": …, …}

    Device work is timed up to its result reaching the host, so the figures hold on GPUs too.
    """
    seconds: dict = {}
    _PROFILE.append(seconds)
    try:
        yield seconds
    finally:
        _PROFILE.remove(seconds)


def tick(stage: str, t0: float) -> float:
    """Add ``now - t0`` to ``stage`` in the active :func:`profiled` block (if any); returns now."""
    t = time.perf_counter()
    for seconds in _PROFILE:
        seconds[stage] = seconds.get(stage, 0.0) + t - t0
    return t


def _no_trim(_) -> int:  # not glibc: nothing to hand back this way
    return 0


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return _no_trim


_MALLOC_TRIM = _malloc_trim()


class _Trimmer:
    """Heap trims on a background thread. ``malloc_trim`` walks every malloc arena (JAX's threads have
    their own), 2–3 ms a call that the coder's thread spent waiting. In interleaved runs on the head
    CT: decompress ~10 % less time, compress 1–9 % (runs disagree: a trim holds each arena's lock
    while it walks it, so the coder's own allocations may wait anyway), the same peak memory.
    Requests coalesce: a trim that starts after a request serves it, and every request made before."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        """Fresh state (also in a forked child, whose copy of the lock may be held by a thread that is
        not there)."""
        self._cond = threading.Condition()
        self._asked = self._done = 0
        self._thread = None

    def request(self) -> None:
        if _MALLOC_TRIM is _no_trim:
            return
        with self._cond:
            self._asked += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, args=(self._cond,), daemon=True,
                                                name="fedtensor-heap-trim")
                self._thread.start()
            self._cond.notify_all()

    def wait(self) -> None:
        """Until a trim started after every request made so far has finished."""
        with self._cond:
            asked = self._asked
            self._cond.wait_for(lambda: self._done >= asked)

    def _serve(self, cond: threading.Condition) -> None:
        while True:
            with cond:
                cond.wait_for(lambda: self._asked > self._done)
                serving = self._asked
            try:
                _MALLOC_TRIM(0)
            except Exception:  # best effort: memory stays resident, nothing else goes wrong
                pass
            with cond:
                self._done = serving
                cond.notify_all()


_TRIMMER = _Trimmer()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _TRIMMER._reset())


def trim_heap(wait: bool = False) -> None:
    """Hand freed heap memory back to the OS after a pass over the slabs (on a background thread:
    :class:`_Trimmer`; ``wait`` for it).

    glibc raises its mmap threshold after a large block is freed, so the next slab's arrays come from
    the heap, which keeps the freed ones: a pass leaves about twice one slab's working set resident
    (tens of MB) unless handed back.
    """
    _TRIMMER.request()
    if wait:
        _TRIMMER.wait()


# ---------------------------------------------------------------------------------------------------
# jitted per-slab work (static slab shape; ``impl`` picks the Pallas kernels or the jnp reference)
# ---------------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames="b")
def _slab_grams(slab, m, blocks_rows, b):
    """Mode Gram matrices of the slab's block stack (its first ``blocks_rows`` voxel rows; the rest are
    not blocks of the volume).

    A block's fibers along an axis are the slab's fibers cut in pieces, so each Gram is one product of
    the slab with itself, viewed as rows of pieces: no 6D block view (and its transposed copies) is
    made, only one transposed copy for the middle axis.
    """
    (bx, by, bz), (d, y, z) = b, slab.shape
    py, pz = -(-y // by) * by, -(-z // bz) * bz
    unit = jnp.where((jnp.arange(d) < blocks_rows)[:, None, None], to_unit(slab, m), 0.0)
    x = jnp.pad(unit, ((0, 0), (0, py - y), (0, pz - z)), mode="edge")
    rows = x.reshape(d // bx, bx, py * pz)
    last = x.reshape(-1, bz)
    middle = x.transpose(0, 2, 1).reshape(-1, by)
    return (jnp.einsum("kip,klp->il", rows, rows, precision=FP32),
            jnp.einsum("pi,pl->il", middle, middle, precision=FP32),
            jnp.einsum("pi,pl->il", last, last, precision=FP32))


@partial(jax.jit, static_argnames=("b", "impl"))
def _forward(slab, bases, step, b, impl, m=None):
    """Quantisation indices of a slab (raw, normalised by ``m`` on the device; or already normalised)."""
    return kernels.forward_blocks(_to_blocks(to_unit(slab, m), b), bases, step, band_rounding(b), impl)


@partial(jax.jit, static_argnames=("shape", "impl"))
def _inverse(q, bases, step, shape, impl):
    return from_blocks(kernels.inverse_blocks(q, bases, step, RECON_OFFSET, impl), shape)


@partial(jax.jit, static_argnames=("shape", "impl", "dtype"))
def _decode(q, bases, step, m, shape, impl, dtype):
    """A decoded slab: in ``dtype`` when the device maps it back (``m``), else normalised float32."""
    return from_unit(_inverse(q, bases, step, shape, impl), m, dtype)


def _on_host(rec: np.ndarray, rows: int, m: DeviceMap | None, dtype, offset: float, scale: float) -> np.ndarray:
    """The first ``rows`` rows of a fetched :func:`_decode` result in ``dtype``: as the device mapped
    them back (``m``), or mapped on the host now. The encoder measures and the decoder returns this."""
    rec = rec[:rows]
    return rec if m is not None else denormalize(rec, dtype, offset, scale)


@partial(jax.jit, static_argnames=("impl", "dtype"))
def _exact_errors(q, bases, step, m, slab, rows, impl, dtype):
    """A raw ``slab`` of an integer volume decoded from ``q`` (as :func:`_decode` decodes it) against
    the original, in the volume's units: :func:`square_limbs` of the errors and the max abs error —
    what :func:`error_stats` of the fetched slab gives, exactly, without fetching it (see
    :func:`exact_sse`)."""
    valid = jnp.arange(slab.shape[0]) < rows
    rec = _inverse(q, bases, step, slab.shape, impl)
    if np.dtype(dtype).itemsize == 1 and slab.shape[2] * 255**2 < 2**31:
        # 8-bit voxels: |error| ≤ 255, so each row's Σd² is an exact int32 (one limb). One fused
        # reduction over the slab: the pass takes 0.6× the time it takes with the limbs below (head CT).
        d = jnp.where(valid[:, None, None], jnp.abs(_decoded_error(slab, None, rec, m, dtype)).astype(jnp.int32), 0)
        return jnp.sum(d * d, axis=2)[:, None], jnp.max(d)

    def plane(raw_rec):  # a plane at a time: the errors' integer copies stay a plane's size
        raw, rec = raw_rec
        d = jnp.abs(_decoded_error(raw, None, rec, m, dtype)).astype(jnp.int32)
        return square_limbs(d), jnp.max(d)

    limbs, worst = jax.lax.map(plane, (slab, rec))
    return jnp.where(valid[:, None, None], limbs, 0), jnp.max(jnp.where(valid, worst, 0))


#: Voxels per uint32 partial sum in :func:`square_limbs`.
_RUN = 64


def square_limbs(d):
    """Σd² of non-negative int32 errors ``d`` < 2²⁵ in exact uint32 pieces (traceable): with
    d = h·2¹² + l, d² = h²·2²⁴ + 2hl·2¹² + l², every term < 2²⁶, so its sums over runs of 64 voxels
    fit uint32. Float32 sums would be inexact and float64 is off by default in JAX; the host finishes
    the sum in Python integers (:func:`exact_sse`)."""
    d = d.ravel().astype(jnp.uint32)
    d = jnp.pad(d, (0, -d.size % _RUN)).reshape(-1, _RUN)
    h, l = d >> 12, d & 0xFFF
    return jnp.stack([(h * h).sum(axis=1), (2 * h * l).sum(axis=1), (l * l).sum(axis=1)])


def exact_sse(limbs) -> float:
    """The sum of squares that :func:`square_limbs` split up (``(..., 3, runs)``: any leading axes), or
    of partial sums of d² themselves (``(..., 1, runs)``)."""
    a = np.asarray(limbs)
    total = 0
    for v in a.sum(axis=tuple(range(a.ndim - 2)) + (a.ndim - 1,), dtype=np.uint64):
        total = (total << 12) + int(v)  # (hh·2¹² + hl)·2¹² + ll
    return float(total)


def _in_own_units(m: DeviceMap | None, dtype) -> bool:
    """Whether the rate search compares a volume in its own units (integers the device maps back, so
    rounding happens where the decoder's does) rather than in normalised units."""
    return m is not None and np.dtype(dtype).kind in "iu"


@partial(jax.jit, static_argnames=("b", "dtype"))
def _estimate(slab, m, rows, bases, steps, b, dtype):
    """For each step: per-row squared errors and the max abs error of the decoded slab, in float32.

    The transform runs once; quantise → inverse → map back → round/clip follows per step (one step at a
    time, so memory stays one slab's). Integer volumes with a device map are compared in their units
    less the map's integer shift (rounding happens exactly where the decoder's does); the others in
    normalised units. An estimate (float32 sums): the search uses it, the encode measures.
    """
    unit = to_unit(slab, m)
    return _decoded_errors(project(_to_blocks(unit, b), bases), unit, slab, m, rows, bases, steps, dtype)


def _decoded_errors(c, unit, slab, m, rows, bases, steps, dtype):
    """:func:`_estimate` from the slab's coefficients ``c`` and normalised voxels ``unit`` (traceable)."""
    valid = (jnp.arange(slab.shape[0]) < rows)[:, None, None]

    rounding = band_rounding(c.shape[-3:])

    def one(step):
        rec = from_blocks(expand(dequantize(quantize(c, step, rounding), step, RECON_OFFSET), bases), slab.shape)
        d = jnp.where(valid, _decoded_error(slab, unit, rec, m, dtype), 0.0)
        return jnp.sum(d * d, axis=(1, 2)), jnp.max(jnp.abs(d))

    return jax.lax.map(one, steps)


def _decoded_error(raw, unit, rec, m, dtype):
    """Original minus decoded, for voxels ``raw`` (normalised: ``unit``) decoded as the normalised
    ``rec``: in the volume's own units less the map's shift where :func:`_in_own_units` (rounded where
    the decoder rounds), else in normalised units (traceable)."""
    if _in_own_units(m, dtype):
        return shifted(raw, m) - decoded_shifted(rec, m, dtype)
    return unit - rec


@partial(jax.jit, static_argnames=("b", "dtype"))
def _estimate_coarse(slab, m, rows, bases, steps, anchor, b, dtype):
    """For each step, the squared quantisation error of the slab's coefficients (block rows holding
    real voxels; normalised units), and :func:`_estimate`'s decoded errors at the ``anchor`` step only.

    With an orthonormal transform the decoded error is the coefficients' error, up to the share of
    edge padding and the rounding of integer volumes; one decoded step measures that ratio, the others
    skip their inverse transforms."""
    unit = to_unit(slab, m)
    c = project(_to_blocks(unit, b), bases)
    real = (jnp.arange(c.shape[0]) * b[0] < rows).reshape((-1,) + (1,) * (c.ndim - 1))

    rounding = band_rounding(b)
    # Quantisation keeps the sign, so |error| is that of |c|: the magnitudes are taken (and the padding
    # rows zeroed) once for all steps, and each step is one fused pass (0.55× the time of quantise →
    # dequantise → subtract per step, the same errors).
    a = jnp.where(real, jnp.abs(c), 0.0)

    def one(step):
        k = jnp.floor(a / step + rounding)
        e = a - jnp.where(k > 0, (k + RECON_OFFSET) * step, 0.0)
        return jnp.sum(e * e)

    return jax.lax.map(one, steps), _decoded_errors(c, unit, slab, m, rows, bases, anchor, dtype)


# ---------------------------------------------------------------------------------------------------
# encoder passes
# ---------------------------------------------------------------------------------------------------


def heavy(slabs: Slabs, input_bytes: int) -> bool:
    """Whether one more slab in flight (:data:`LOOKAHEAD_BYTES` a voxel) would take over half the
    input's size. Heavy slabs are transformed one at a time, and the heap is trimmed after each
    (:attr:`Slabs.trims_each`); light ones overlap, and a pass trims once: trimming each slab of the
    chest CT cost 5–10 % of its compress time (the trims, and the page faults after them) and saved
    0.2–0.3× its size of peak memory."""
    return LOOKAHEAD_BYTES * slabs.slab_voxels > input_bytes // 2


def one_behind(results: Iterator, ahead: bool = True) -> Iterator:
    """Dispatched device work, each item given once the next one is dispatched (``ahead``), so that the
    device computes one slab while the host waits for the last: on two cores 20-30 % less time for a
    pass whose per-slab work is small. Not ``ahead``: in turn (one slab's buffers at a time)."""
    pending = None
    for item in results:
        if not ahead:
            yield item
            continue
        if pending is not None:
            yield pending
        pending = item
    if pending is not None:
        yield pending


def fit_bases(x: np.ndarray, slabs: Slabs, offset: float, scale: float) -> list[np.ndarray]:
    """Per-mode bases (HOSVD of the whole block stack) from Gram matrices summed slab by slab.

    Returned as float32: that is what the stream stores, and what both sides transform with.
    """
    grams = [np.zeros((n, n)) for n in slabs.b]
    m = device_map(x.dtype, offset, scale)
    t0 = time.perf_counter()

    def dispatched():
        for start in slabs.starts:
            slab = slabs.slab(x, start, m, offset, scale)
            yield _slab_grams(slab, m, slabs.grid(start)[0] * slabs.b[0], slabs.b)
            del slab

    for slab_grams in one_behind(dispatched(), not heavy(slabs, x.nbytes)):
        for acc, g in zip(grams, slab_grams):
            acc += np.asarray(g, np.float64)  # float64 sum: the order of slabs barely matters
    trim_heap()  # once per pass: only a slab's device buffers come and go, all alike in size
    tick("bases", t0)
    return [leading_eigvecs_host(g, n) for g, n in zip(grams, slabs.b)]


def error_stats(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(sum of squared errors, max abs error)`` in float64, a few rows at a time."""
    sse, worst, chunk = 0.0, 0.0, rows_per_chunk(x.shape)
    for k in range(0, x.shape[0], chunk):
        d = x[k:k + chunk].astype(np.float64) - y[k:k + chunk]
        sse += float(np.vdot(d, d))
        worst = max(worst, float(np.max(np.abs(d), initial=0.0)))
    return sse, worst


@dataclass
class SlabEncoder:
    """The passes of one volume's encoding: decoded error at a step, and the coded stream at a step."""

    x: np.ndarray
    slabs: Slabs
    offset: float
    scale: float
    bases: list[np.ndarray]
    impl: str = "reference"
    workers: Workers | None = None  # started by the caller (:func:`start_workers`); else each encode starts its own

    def __post_init__(self):
        self.map = device_map(self.x.dtype, self.offset, self.scale)

    def _slabs(self, order=None, device_only: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """The slabs (in ``order`` of their numbers, default in turn), the heap trimmed after each or
        once after the last (:attr:`Slabs.trims_each`, where a slab is :attr:`heavy`). ``device_only``:
        the pass's per-slab work is jitted and only sums come back, so each slab's few host buffers
        reuse the last one's and the heap is trimmed once, after the last (a trim takes 2–3 ms and
        freed almost nothing there)."""
        starts, each = self.slabs.starts, self.slabs.trims_each and self.heavy and not device_only
        for start in starts if order is None else (starts[i] for i in order):
            t0 = time.perf_counter()
            slab = self.slabs.slab(self.x, start, self.map, self.offset, self.scale)
            tick("normalize", t0)
            yield start, slab
            del slab  # let the consumer free it before the next slab is made
            if each:
                trim_heap()
        if not each:
            trim_heap()

    @property
    def heavy(self) -> bool:
        """:func:`heavy` for this volume's slabs."""
        return heavy(self.slabs, self.x.nbytes)

    def errors(self, step: float) -> tuple[float, float]:
        """``(SSE, max abs error)`` of the decoded volume at ``step``, in its dtype (rounding included)."""
        sse, worst = 0.0, 0.0
        bases, s = [jax.device_put(u) for u in self.bases], np.float32(step)
        for start, slab in self._slabs():
            t0 = time.perf_counter()
            slab = jax.device_put(slab)
            q = _forward(slab, bases, s, self.slabs.b, self.impl, self.map)
            measured = self._measure(q, slab, start, bases, s)
            del slab, q
            t0 = tick("search: transform+quantize+inverse", t0)
            e = measured()
            tick("search: error", t0)
            sse, worst = sse + e[0], max(worst, e[1])
            del measured  # before the next slab is made: one slab's working set at a time
        return sse, worst

    def _measure(self, q, slab, start: int, bases, step) -> Callable[[], tuple[float, float]]:
        """The decoded error of the slab at ``start`` (quantised as ``q``; ``slab`` as sent to the
        device), dispatched: the returned function waits for it and gives ``(SSE, max abs error)``.
        Integer volumes the device maps are measured there, exactly, and only sums come back; the
        others on the host, from the decoder's own output (same jitted function, same shapes: what the
        encoder measures is what the decoder returns)."""
        r, dtype = self.slabs.rows(start), self.x.dtype
        if _in_own_units(self.map, dtype):
            limbs, worst = _exact_errors(q, bases, step, self.map, slab, r, self.impl, dtype.name)
            return lambda: (exact_sse(limbs), float(worst))
        decoded = _decode(q, bases, step, self.map, slab.shape, self.impl, dtype.name)
        return lambda: error_stats(self.x[start:start + r],
                                   _on_host(np.asarray(decoded), r, self.map, dtype, self.offset, self.scale))

    def estimate(self, steps) -> list[tuple[float, float]]:
        """Estimated ``(SSE, max abs error)`` of the decoded volume at each of ``steps``, in one pass over
        the slabs (float32; see :func:`_estimate`)."""
        unit = 1.0 if _in_own_units(self.map, self.x.dtype) else self.scale
        bases, st = [jax.device_put(u) for u in self.bases], np.asarray(steps, np.float32)
        sse, worst = np.zeros(len(steps)), np.zeros(len(steps))
        t0 = time.perf_counter()
        dispatched = (_estimate(jax.device_put(slab), self.map, self.slabs.rows(start), bases, st, self.slabs.b,
                                self.x.dtype.name) for start, slab in self._slabs(device_only=True))
        for rows, w in one_behind(dispatched, not self.heavy):
            sse += np.asarray(rows, np.float64).sum(axis=1) * unit**2
            worst = np.maximum(worst, np.asarray(w, np.float64) * unit)
            del rows, w
        tick("search: estimate", t0)
        return list(zip(sse.tolist(), worst.tolist()))

    def estimate_coarse(self, steps, anchor: int) -> tuple[list[float], float]:
        """Estimated SSEs of the decoded volume at each of ``steps`` from one decoded step (the
        ``anchor``-th) and the coefficients' errors at all (see :func:`_estimate_coarse`), in one pass;
        and the ratio decoded / coefficient SSE at the anchor (1 where padding and rounding take no
        share of the error, and the coefficients' errors then predict the decoded ones closely)."""
        unit = 1.0 if _in_own_units(self.map, self.x.dtype) else self.scale
        bases, st = [jax.device_put(u) for u in self.bases], np.asarray(steps, np.float32)
        coef, exact = np.zeros(len(steps)), 0.0
        t0 = time.perf_counter()
        dispatched = (_estimate_coarse(jax.device_put(slab), self.map, self.slabs.rows(start), bases, st,
                                       st[anchor:anchor + 1], self.slabs.b, self.x.dtype.name)
                      for start, slab in self._slabs(device_only=True))
        for c, (rows, _) in one_behind(dispatched, not self.heavy):
            coef += np.asarray(c, np.float64) * self.scale**2
            exact += float(np.asarray(rows, np.float64).sum()) * unit**2
            del c, rows
        tick("search: estimate", t0)
        ratio = exact / coef[anchor] if coef[anchor] > 0 else math.nan
        if not (math.isfinite(ratio) and ratio > 0):  # no error at the anchor (lossless there): measure all
            return [e[0] for e in self.estimate(steps)], math.nan
        return (coef * ratio).tolist(), ratio

    def encode(self, step: float, measure: bool = False) -> tuple[list[bytes], tuple[float, float] | None]:
        """One coded section per slab (and, with ``measure``, the decoded ``(SSE, max abs error)``).

        With several groups (and cores for them) the slabs are coded in worker processes, a group's all
        in one worker: this process codes slab 0 (every group starts from the statistics it leaves),
        then transforms the others round-robin across the groups (:meth:`Slabs.coding_order`) and sends
        each to its group's worker, so that every worker starts early. Else slab by slab here."""
        slabs, b = self.slabs, self.slabs.b
        errors = [(0.0, 0.0)] * len(slabs) if measure else None
        workers = worker_count(slabs.n_groups, slabs.slab_voxels, memory_budget(self.x.nbytes))
        if workers > 1 and self.workers is not None:
            workers = min(workers, len(self.workers))
        if workers == 1:
            sections, states = [], slab_coders(slabs.group, len(slabs))
            # Not zip(): it keeps its last tuple, and with it the last slab's coefficients, until the next
            # slab is made, so the heap trim before it could not free them (0.4× the head CT's size).
            for _, grid, q in self._quantised(step, errors, range(len(slabs))):
                t0 = time.perf_counter()
                sections += encode_group([grid], b, [q], next(states))
                del q
                tick("entropy", t0)
        else:
            order = slabs.coding_order()
            # started workers stay up for the next encode; else they start while slab 0 is coded here
            with contextlib.nullcontext(self.workers) if self.workers is not None else Workers(workers) as w:
                t0, spent = time.perf_counter(), [0.0]
                quantised = _timed(self._quantised(step, errors, order), spent)
                _, grid, q = next(quantised)
                primer = BlockCoders()
                rest = ((i, narrow(q)) for i, _, q in quantised)
                # Every group starts from the statistics slab 0 leaves: it is coded in a thread while
                # the workers' first slabs are transformed here (the coder and the device waits release
                # the GIL often enough for the two to overlap).
                with concurrent.futures.ThreadPoolExecutor(1) as thread:
                    first = thread.submit(encode_group, [grid], b, [q], primer)
                    del q
                    ahead = []
                    while not first.done() and len(ahead) < workers and (item := next(rest, None)):
                        ahead.append(item)
                    first = first.result()
                tasks = slabs.worker_tasks(itertools.chain(ahead, rest), workers, primer)
                del ahead
                coded = list(w.stream(encode_slab, tasks))
                tick("entropy", t0 + spent[0])  # this process's share and the wait for the workers
            sections = first + [s for _, s in sorted(zip(order[1:], coded))]
        if not measure:
            return sections, None
        # summed in slab order, whatever the coding order: the same float sums on every path
        return sections, (sum(e[0] for e in errors), max(e[1] for e in errors))

    def _quantised(self, step: float, errors: list | None, order) -> Iterator[tuple[int, tuple[int, int, int], np.ndarray]]:
        """The slabs' numbers (in ``order``), block grids and quantised coefficients; with ``errors``,
        each slab's decoded ``(SSE, max abs error)`` goes there (once the consumer asks for the next).

        Each slab's transform is dispatched before the previous slab is handed over: JAX runs it
        asynchronously, on the device or on other cores, while the host entropy-codes. Where one more
        slab in flight would take over half the input's size (:attr:`heavy`), each is handed over at
        once instead."""
        bases, s = [jax.device_put(u) for u in self.bases], np.float32(step)
        lookahead = not self.heavy
        ahead, made = None, self._slabs(order)
        for i in order:  # not zip(order, made): it keeps its last tuple, the last slab, while making the next
            start, slab = next(made)
            t0 = time.perf_counter()
            slab = jax.device_put(slab)
            q_dev = _forward(slab, bases, s, self.slabs.b, self.impl, self.map)
            # The measurement's inverse transform runs (asynchronously) while the host entropy-codes.
            measured = self._measure(q_dev, slab, start, bases, s) if errors is not None else None
            del slab  # only the int coefficients of a slab live on, and only while it is coded
            tick("transform+quantize", t0)
            if ahead is not None:
                yield from _handed_over(*ahead, errors)
            ahead = (i, self.slabs.grid(start), q_dev, measured)
            del q_dev, measured
            if not lookahead:
                yield from _handed_over(*ahead, errors)
                ahead = None
        if ahead is not None:
            yield from _handed_over(*ahead, errors)


def _handed_over(i: int, grid, q_dev, measured, errors: list | None):
    """:meth:`SlabEncoder._quantised`'s slab ``i``, once its coefficients reach the host."""
    t0 = time.perf_counter()
    q = np.asarray(q_dev)[:grid[0]]
    tick("transform+quantize", t0)
    yield i, grid, q
    del q
    if measured is not None:
        t0 = time.perf_counter()
        errors[i] = measured()
        tick("search: error", t0)


def start_workers(x: np.ndarray) -> Workers | contextlib.nullcontext:
    """The entropy coder's worker processes for ``x`` (a context manager), those idle from an earlier call
    (:mod:`~fedtensor.codec.parallel`) and the rest started now: a process takes 0.15–0.45 s to start
    Python and import numpy, which the block choice and rate search then hide, in part.
    ``nullcontext()`` for a volume coded in one group (:func:`~fedtensor.codec.parallel.group_voxels`;
    counted before the block shape is known, so :meth:`SlabEncoder.encode` uses at most these)."""
    voxels = group_voxels(x.size)
    if voxels is None:
        return contextlib.nullcontext()
    n = worker_count(-(-x.size // voxels), slab_voxels(x), memory_budget(x.nbytes))
    return Workers(n) if n > 1 else contextlib.nullcontext()


def _timed(items: Iterator, spent: list[float]) -> Iterator:
    """``items``, adding the seconds spent producing them to ``spent[0]``."""
    while True:
        t0 = time.perf_counter()
        item = next(items, None)
        spent[0] += time.perf_counter() - t0
        if item is None:
            return
        yield item


# ---------------------------------------------------------------------------------------------------
# decoder
# ---------------------------------------------------------------------------------------------------


#: Largest ratio of padded to real voxels in a stream :func:`check_params` accepts.
_MAX_PADDING = 16


def check_params(params: dict, n_sections: int, shape) -> Slabs:
    """The validated slab layout."""
    b = params.get("block")
    if not isinstance(b, list) or len(b) != 3 or not all(isinstance(n, int) and 1 <= n <= 64 for n in b):
        raise FormatError("corrupted block-tucker parameters")
    b = tuple(b)
    # The encoder's blocks pad a volume at most 16-fold beyond the smallest ones (4×4 blocks on a 1×1×N
    # volume); a forged 64-side on a 1-voxel axis made a 49 KB stream of a 4 MiB volume take 4.6 GB
    # to decode.
    if math.prod(padded_shape(shape, b)) > _MAX_PADDING * math.prod(shape) + 32**3:
        raise FormatError("corrupted block-tucker parameters (block shape)")
    depth = params.get("slab")
    # the encoder's slabs hold 2^14 … SLAB_VOXELS voxels: a forged depth outside that range could make the
    # decoder's working set the whole volume (memory) or millions of one-row slabs (time)
    thinnest = slab_depth(shape, b, MIN_SLAB_VOXELS)
    thickest = slab_depth(shape, b, max(MIN_SLAB_VOXELS, SLAB_VOXELS))
    n_slabs = len(range(0, shape[0], depth)) if _is_int(depth) and depth > 0 else 0
    if not (_is_int(depth) and thinnest <= depth <= thickest and depth % b[0] == 0 and n_sections == 1 + n_slabs):
        raise FormatError("corrupted block-tucker parameters (slab layout)")
    group = params.get("group", n_slabs)  # written only when there are several groups
    if not (_is_int(group) and 1 <= group <= n_slabs):
        raise FormatError("corrupted block-tucker parameters (slab groups)")
    return Slabs(tuple(shape), b, depth, group)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def decode_into(out: np.ndarray, params: dict, sections: list[bytes], offset: float, scale: float,
                impl: str | None = None) -> np.ndarray:
    """Decode a block-tucker stream slab by slab into ``out`` (preallocated, original shape and dtype)."""
    shape = out.shape
    slabs = check_params(params, len(sections), shape)
    b, depth = slabs.b, slabs.depth
    impl = impl or kernels.impl_for(b)
    if len(sections[0]) != 4 * sum(n * n for n in b) or any(len(s) % 4 for s in sections[1:]):
        raise FormatError("corrupted block-tucker payload")
    flat = orthonormal_bases(sections[0], "block-tucker")
    bounds = np.cumsum([0] + [n * n for n in b])
    bases = [jax.device_put(flat[lo:hi].reshape(n, n)) for lo, hi, n in zip(bounds[:-1], bounds[1:], b)]
    step = np.float32(float(params["step"]))
    m = device_map(out.dtype, offset, scale)

    def store(start: int, rec) -> None:  # waits for the slab's device work, then maps it into ``out``
        t0, r = time.perf_counter(), slabs.rows(start)
        rec = np.asarray(rec)
        t0 = tick("dequantize+inverse", t0)
        out[start:start + r] = _on_host(rec, r, m, out.dtype, offset, scale)
        tick("denormalize", t0)

    # One slab of look-ahead: a slab's inverse transform is dispatched (JAX runs it asynchronously) and
    # stored only after the next slab's coefficients are entropy-decoded, so the two overlap. As in the
    # encoder's passes, the heap is trimmed after each slab only where a slab's buffers are a large share
    # of the volume (:func:`heavy`), else once at the end: trimming after each of the chest CT's ten
    # slabs cost ~10 % of its decode time (the trims and the page faults after them) and saved 0.1–0.7×
    # its size of peak memory (chest, abdomen and DICOM CTs; the head CT's slabs are heavy).
    pending, each = None, slabs.trims_each and heavy(slabs, out.nbytes)
    for i, q in _decoded_coefficients(slabs, sections[1:], memory_budget(out.nbytes)):
        start = slabs.starts[i]
        grid = q.shape[:3]
        if grid[0] * b[0] < depth:  # static shapes: zero block rows up to the slab depth
            q = np.concatenate([q, np.zeros((depth // b[0] - grid[0], *q.shape[1:]), q.dtype)])
        rec = _decode(jax.device_put(q), bases, step, m, (depth, *shape[1:]), impl, out.dtype.name)
        del q
        if pending is not None:
            store(*pending)
            if each:
                trim_heap()
        pending = (start, rec)
        del rec
    store(*pending)
    trim_heap()
    return out


def _decoded_coefficients(slabs: Slabs, sections: list[bytes], budget: int) -> Iterator[tuple[int, np.ndarray]]:
    """Each slab's number and int coefficients: with several groups (and cores, and ``budget`` bytes of
    memory, for them), decoded in worker processes, a group's all in one worker, in
    :meth:`Slabs.coding_order`; else slab by slab here, in turn."""
    grids = slabs.grids()
    workers = worker_count(slabs.n_groups, slabs.slab_voxels, budget)
    if workers == 1:
        for i, (grid, section, coders) in enumerate(zip(grids, sections, slab_coders(slabs.group, len(slabs)))):
            t0 = time.perf_counter()
            q = decode_group([grid], slabs.b, [section], coders)[0]
            tick("entropy", t0)
            yield i, q
        return
    with Workers(workers) as w:
        t0, primer = time.perf_counter(), BlockCoders()
        q = decode_group(grids[:1], slabs.b, sections[:1], primer)[0]
        tick("entropy", t0)
        yield 0, q
        del q
        order = slabs.coding_order()[1:]
        tasks = slabs.worker_tasks(((i, sections[i]) for i in order), workers, primer)
        # closed before the workers are: a caller that stops early stops the feeder threads first
        with contextlib.closing(w.stream(decode_slab, tasks)) as results:
            for i in order:
                t0 = time.perf_counter()
                q = next(results).astype(np.int32, copy=False)  # int16 through the pipe, where it fitted
                tick("entropy", t0)  # waiting for the workers
                yield i, q
                del q


_MIN_SAMPLE_BLOCKS = 256  # fewer large blocks misjudged the step: 77 of 16×16×8 in the head CT, by 19 %


def initial_step(x: np.ndarray, b, bases, offset: float, scale: float, mse: float, n_voxels: int | None = None) -> float:
    """Quantiser step meeting ``mse`` (normalised units) on ~``n_voxels`` of evenly spread sampled blocks
    (at least :data:`_MIN_SAMPLE_BLOCKS`, or all).

    A first guess for the PSNR search, which then measures the decoded volume itself. The coefficient
    domain sets it (an orthonormal transform keeps squared errors), corrected once by the decoded error
    of the sample at that step: that error is not spread evenly over a block (edge-padded voxels, smooth
    copies, take less of it than the volume's own: 1.3× too little on a 20-slice series in 16-deep
    blocks), and integer volumes add rounding.
    """
    from fedtensor.codec.blocktucker import gather_blocks
    from fedtensor.codec.quantize import largest_step_within, quantization_sse

    n_voxels = n_voxels or slab_voxels(x)  # a guess only: the search measures; memory ~ one slab of voxels
    grid = tuple(p // m for p, m in zip(padded_shape(x.shape, b), b))
    total = math.prod(grid)
    # One block drawn (seeded) from each of ``count`` equal runs of the grid: spread evenly, yet not
    # aliased with the grid's sides as an even stride is (every 8th block of a 2-deep grid is always
    # the first in depth).
    count = min(max(1, n_voxels // math.prod(b), _MIN_SAMPLE_BLOCKS), total)
    edges = np.linspace(0, total, count + 1)
    idx = np.unique(np.minimum(edges[:-1] + np.random.default_rng(0).random(count) * np.diff(edges), total - 1)
                    .astype(np.int64))
    raw, m = gather_blocks(x, b, idx), device_map(x.dtype, offset, scale)
    blocks = jax.device_put(raw if m is not None else normalize(raw, offset, scale))
    del raw
    corners = jax.device_put((np.stack(np.unravel_index(idx, grid), axis=1) * np.asarray(b)).astype(np.int32))
    u = tuple(jax.device_put(a) for a in bases)
    coef = _sample_coefficients(blocks, u, m)
    hi = 4 * math.prod(b) ** 0.5
    floor = finest_step(b)
    lo = max(hi * 1e-9, floor)
    rounding = band_rounding(b)
    # A subsample's step (~1 % off): the decoded error measured there corrects it below.
    step = largest_step_within(coef, mse * coef.size, lo, hi, rounding, exact=False)
    voxel = float(_sample_decoded_mse(blocks, corners, coef, u, np.float32(step), m, np.asarray(x.shape, np.int32),
                                      x.dtype.name))
    in_coef = float(quantization_sse(coef, np.float32(step), rounding)) / coef.size
    wider = float(quantization_sse(coef, np.float32(step * 1.1), rounding)) / coef.size
    if not (voxel > 0 and wider > in_coef > 0 and math.isfinite(voxel)):
        return max(floor, step)
    # The error grows locally as a power of the step: follow it from the decoded error to the budget.
    power = math.log(wider / in_coef) / math.log(1.1)
    # (in logs, clamped: a power near 0, error barely growing with the step, overflowed a float)
    return max(floor, min(hi, step * math.exp(max(-50.0, min(50.0, math.log(mse / voxel) / power)))))


@jax.jit
def _sample_coefficients(blocks, bases, m):
    return jnp.einsum("nijk,ia,jb,kc->nabc", to_unit(blocks, m), *bases, precision=FP32)


@partial(jax.jit, static_argnames=("dtype",))
def _sample_decoded_mse(blocks, corners, coef, bases, step, m, shape, dtype):
    """Mean squared error (normalised units) of sampled blocks (corners ``(n, 3)``) decoded at ``step``,
    over their voxels inside a volume of ``shape`` (an int32 array: one compilation serves every
    volume), rounded as the decoder rounds integer volumes.

    A chunk of blocks at a time, so the decoded sample is never held whole; the last chunk is moved
    back to end at the last block and counts only the blocks the others did not."""
    n, b = blocks.shape[0], blocks.shape[1:]
    size = min(n, max(1, (1 << 15) // math.prod(b)))
    axes = [jnp.arange(k) for k in b]

    def chunk(i, acc):
        start = jnp.minimum(i * size, n - size)
        blk, c, corner = (jax.lax.dynamic_slice_in_dim(a, start, size) for a in (blocks, coef, corners))
        rec = jnp.einsum("nabc,ia,jb,kc->nijk", dequantize(quantize(c, step, band_rounding(b)), step, RECON_OFFSET),
                         *bases, precision=FP32)
        d = _decoded_error(blk, to_unit(blk, m), rec, m, dtype)
        if _in_own_units(m, dtype):
            d = d / m.scale
        inside = [corner[:, k, None] + axes[k] < shape[k] for k in range(3)]
        keep = ((start + jnp.arange(size) >= i * size)[:, None, None, None]
                & inside[0][:, :, None, None] & inside[1][:, None, :, None] & inside[2][:, None, None, :])
        return acc[0] + jnp.sum(jnp.where(keep, d * d, 0.0)), acc[1] + jnp.sum(keep)

    sse, count = jax.lax.fori_loop(0, -(-n // size), chunk, (jnp.float32(0), jnp.int32(0)))
    return sse / jnp.maximum(count, 1)
