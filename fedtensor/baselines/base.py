"""The interface every rival codec shares, its stream container, and the PSNR-target search.

A :class:`Baseline` turns a :class:`~fedtensor.io.Volume` into bytes for a target and back into an
array:

>>> codec = get_baseline("jpeg2000")                       # doctest: +SKIP
>>> blob = codec.encode(volume, psnr=45)                    # smallest stream with PSNR >= 45 dB
>>> decoded = codec.decode(blob)                            # ndarray, original shape and dtype

Lossy rivals expose one scalar quality parameter (a quantiser step, an error bound, a JPEG-XL distance,
an OpenJPEG quality level, ...). ``encode(volume, psnr=T)`` searches it with :func:`find_smallest`:
every trial is a real encode → decode, and the PSNR is always measured on what ``decode`` returns, so
a codec is never credited with a quality it did not deliver. Codecs that control the PSNR themselves
(fedtensor's own) set ``direct_psnr`` and skip the search. Lossless-only codecs take ``lossless=True``.

Streams carry a small self-describing header (``FTB1`` magic, JSON, length-prefixed sections): the
decoder needs nothing else, and the benchmark counts every byte of it.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from fedtensor.errors import FedtensorError, FormatError, RateError

MAGIC = b"FTB1"


class UnavailableError(FedtensorError):
    """The codec's library (or one of its parts) is not installed on this machine."""


class NotApplicableError(FedtensorError):
    """The codec cannot handle this volume (e.g. a lossless integer coder on non-integer floats)."""


# --------------------------------------------------------------------------------------------------
# stream container
# --------------------------------------------------------------------------------------------------


def pack(header: dict, sections: list[bytes] = ()) -> bytes:
    """``FTB1`` · u32 header length · compact JSON header · (u32 length · bytes) per section."""
    h = json.dumps({**header, "n": len(sections)}, separators=(",", ":")).encode()
    parts = [MAGIC, struct.pack("<I", len(h)), h]
    for s in sections:
        parts += [struct.pack("<I", len(s)), bytes(s)]
    return b"".join(parts)


def unpack(blob: bytes) -> tuple[dict, list[bytes]]:
    blob = bytes(blob)
    if blob[:4] != MAGIC or len(blob) < 8:
        raise FormatError("not a baseline stream (bad magic)")
    (hl,) = struct.unpack_from("<I", blob, 4)
    try:
        header = json.loads(blob[8 : 8 + hl])
    except ValueError:
        raise FormatError("corrupted baseline stream header") from None
    pos, sections = 8 + hl, []
    for _ in range(int(header.get("n", 0))):
        if pos + 4 > len(blob):
            raise FormatError("truncated baseline stream")
        (n,) = struct.unpack_from("<I", blob, pos)
        sections.append(blob[pos + 4 : pos + 4 + n])
        pos += 4 + n
        if pos > len(blob):
            raise FormatError("truncated baseline stream")
    return header, sections


def volume_header(data: np.ndarray) -> dict:
    return {"shape": [int(n) for n in data.shape], "dtype": np.dtype(data.dtype).str}


def header_shape_dtype(h: dict) -> tuple[tuple[int, ...], np.dtype]:
    try:
        return tuple(int(n) for n in h["shape"]), np.dtype(h["dtype"])
    except (KeyError, TypeError, ValueError):
        raise FormatError("corrupted baseline stream header (shape/dtype)") from None


def to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """A float reconstruction cast to the volume's dtype (rounded and clipped for integers)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return np.asarray(x).astype(dtype)


def psnr_db(original: np.ndarray, decoded: np.ndarray, value_range: float | None = None) -> float:
    """PSNR = 20·log10((max − min of original) / RMSE), float64 (same definition as ``fedtensor.metrics``)."""
    a = np.asarray(original)
    if value_range is None:
        value_range = float(a.max()) - float(a.min())
    total, flat_a, flat_b = 0.0, a.reshape(-1), np.asarray(decoded).reshape(-1)
    for i in range(0, flat_a.size, 1 << 22):  # bounded temporaries
        e = flat_a[i : i + (1 << 22)].astype(np.float64) - flat_b[i : i + (1 << 22)].astype(np.float64)
        total += float(np.dot(e, e))
    mse = total / flat_a.size
    if mse == 0:
        return math.inf
    return 20 * math.log10(max(value_range, 1e-300)) - 10 * math.log10(mse)


# --------------------------------------------------------------------------------------------------
# parameter search
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpace:
    """A scalar quality parameter on ``[lo, hi]``; searched on ``u ∈ [0, 1]`` where quality grows with u.

    ``log``: the parameter is spaced geometrically. ``increasing``: quality grows with the parameter
    (an OpenJPEG PSNR level) rather than falls (a quantiser step). ``guess(target)`` is a first try.
    ``scan``: for codecs whose PSNR and size swing up and down as the parameter moves (SZ3), this many
    more settings are tried on a grid over the :data:`SCAN_DB` below the lowest-quality feasible one,
    where a smaller stream that still reaches the target may lie.
    """

    lo: float
    hi: float
    log: bool = True
    increasing: bool = False
    guess: Callable[[float], float] | None = None
    scan: int = 0

    def slope(self) -> float:
        """A prior for dPSNR/du: 20 dB per decade of a step or error bound, 1 dB per unit of a level."""
        if self.log:
            return 20.0 * math.log10(self.hi / self.lo)
        return self.hi - self.lo

    def param(self, u: float) -> float:
        u = min(1.0, max(0.0, u))
        if not self.increasing:
            u = 1.0 - u
        if self.log:
            p = math.exp(math.log(self.lo) + u * (math.log(self.hi) - math.log(self.lo)))
        else:
            p = self.lo + u * (self.hi - self.lo)
        return float(f"{p:.6g}")  # stable cache keys

    def u(self, param: float) -> float:
        if self.log:
            u = (math.log(param) - math.log(self.lo)) / (math.log(self.hi) - math.log(self.lo))
        else:
            u = (param - self.lo) / (self.hi - self.lo)
        u = min(1.0, max(0.0, u))
        return u if self.increasing else 1.0 - u


@dataclass
class Trial:
    """One evaluated parameter: the PSNR of the decoded volume and (when known) the stream size."""

    param: float
    psnr: float
    nbytes: int | None = None
    seconds: float = 0.0


@dataclass
class SearchResult:
    target: float
    param: float | None
    psnr: float | None
    nbytes: int | None
    evaluations: int  # new trials run for this target (cache hits excluded)
    seconds: float
    reached: bool
    trials: list = field(default_factory=list)


SCAN_DB = 3.0  # width of a ParamSpace.scan grid, in dB of the space's prior slope (SZ3 swings by ~1.5 dB)


def find_smallest(
    evaluate: Callable[[float], Trial],
    space: ParamSpace,
    target: float,
    cache: dict[float, Trial] | None = None,
    *,
    size: Callable[[float], int] | None = None,
    tol_db: float = 0.03,
    max_steps: int = 14,
    min_width: float = 2e-4,
) -> SearchResult:
    """The parameter whose stream is smallest among those whose decoded PSNR is ≥ ``target``.

    Coarse then fine: a bracket is first found from the evaluations already in ``cache`` (shared by the
    targets of one volume), else by stepping out from ``space.guess(target)`` with doubling steps; it is
    then narrowed by safeguarded secant steps on PSNR(u) that fall back to plain bisection whenever the
    bracket fails to halve, until the feasible end is within ``tol_db`` of the target, the bracket is
    narrower than ``min_width`` (in u), or ``max_steps`` new evaluations were spent. A space with
    ``scan`` then spends that many more evaluations on a grid below the lowest-quality feasible trial.

    Among all feasible trials, the one with the fewest bytes wins (robust to small non-monotonicities
    of a codec's own rate control). ``evaluate`` may leave ``nbytes`` unset when measuring size is
    expensive; ``size(param)`` is then called on the feasible candidate closest to the target (for
    such codecs — a fixed coder behind a quantiser step — the size falls monotonically with the step).
    """
    cache = {} if cache is None else cache
    t0 = time.perf_counter()
    spent = 0

    def ev(u: float) -> Trial:
        nonlocal spent
        p = space.param(u)
        if p not in cache:
            cache[p] = evaluate(p)
            spent += 1
        return cache[p]

    def bracket() -> tuple[tuple[float, Trial] | None, tuple[float, Trial] | None]:
        lo = hi = None  # lo: best-quality infeasible below the target, hi: lowest-quality feasible
        for p, tr in cache.items():
            u = space.u(p)
            if tr.psnr >= target:
                if hi is None or u < hi[0]:
                    hi = (u, tr)
            elif lo is None or u > lo[0]:
                lo = (u, tr)
        if lo is not None and hi is not None and lo[0] > hi[0]:  # non-monotone: keep a consistent pair
            lo = max(((space.u(p), t) for p, t in cache.items() if t.psnr < target and space.u(p) < hi[0]),
                     default=None, key=lambda x: x[0])
        return lo, hi

    def extrapolate(lo, hi) -> float | None:
        """Where PSNR(u) crosses the target (just past it), from the trials on the known side."""
        side = [(space.u(p), t.psnr) for p, t in cache.items() if math.isfinite(t.psnr)]
        if hi is None:  # all below: extend from the best-quality trials
            side.sort(key=lambda x: -x[0])
            aim, anchor = target + margin_db, lo[0]
        else:  # all above: extend from the lowest-quality trials
            side.sort(key=lambda x: x[0])
            aim, anchor = target - margin_db, hi[0]
        slope = space.slope()
        if len(side) >= 2 and side[0][0] != side[1][0]:
            s2 = (side[0][1] - side[1][1]) / (side[0][0] - side[1][0])
            if s2 > 0:
                slope = s2
        if not side or slope <= 0:
            return None
        u = side[0][0] + (aim - side[0][1]) / slope
        if hi is None:
            return min(1.0, anchor + 0.35, max(u, anchor + 1e-3))
        return max(0.0, anchor - 0.35, min(u, anchor - 1e-3))

    lo, hi = bracket()
    guard, margin_db, step = 0, 0.15, 0.04
    # 1. coarse: find a bracket (first guess, then extrapolation, then doubling steps outwards)
    extrapolated = False
    while (lo is None or hi is None) and spent < max_steps and guard < 4 * max_steps:
        guard += 1
        if lo is None and hi is None:
            u = space.u(space.guess(target)) if space.guess else 0.5
        elif not extrapolated and (u := extrapolate(lo, hi)) is not None:
            extrapolated = True
        elif hi is None:  # every trial so far is below the target: more quality
            if lo[0] >= 1.0:
                break
            u, step = min(1.0, lo[0] + step), step * 2
        else:  # every trial so far reaches it: less quality
            if hi[0] <= 0.0:
                break
            u, step = max(0.0, hi[0] - step), step * 2
        ev(u)
        lo, hi = bracket()
    # 2. fine: narrow it
    use_secant = True
    while lo is not None and hi is not None and spent < max_steps and guard < 4 * max_steps:
        guard += 1
        width = hi[0] - lo[0]
        if hi[1].psnr - target <= tol_db or width <= min_width:
            break
        if use_secant and math.isfinite(hi[1].psnr) and math.isfinite(lo[1].psnr) and hi[1].psnr > lo[1].psnr:
            aim = target + tol_db / 2
            u = lo[0] + (aim - lo[1].psnr) / (hi[1].psnr - lo[1].psnr) * width
            u = min(hi[0] - 0.05 * width, max(lo[0] + 0.05 * width, u))
        else:
            u = 0.5 * (lo[0] + hi[0])
        ev(u)
        lo, hi = bracket()
        if lo is None or hi is None:
            break
        new_width = hi[0] - lo[0]
        use_secant = new_width <= 0.5 * width  # the secant stalls on one side: bisect next
    # 3. a codec whose quality is not monotone in its parameter: a grid below the crossing
    lo, hi = bracket()
    if space.scan and hi is not None:
        width = SCAN_DB / space.slope()
        for k in range(1, space.scan + 1):
            ev(max(0.0, hi[0] - width * k / space.scan))
    feasible = sorted(((space.u(p), t) for p, t in cache.items() if t.psnr >= target), key=lambda x: x[0])
    result = SearchResult(target, None, None, None, spent, 0.0, False)
    if feasible:
        if size is not None and feasible[0][1].nbytes is None:  # the lowest-quality feasible candidate
            feasible[0][1].nbytes = int(size(feasible[0][1].param))
        known = [t for _, t in feasible if t.nbytes is not None]
        best = min(known, key=lambda t: (t.nbytes, -space.u(t.param))) if known else feasible[0][1]
        result = SearchResult(target, best.param, best.psnr, best.nbytes, spent, 0.0, True)
    result.seconds = time.perf_counter() - t0
    result.trials = [(p, t.psnr, t.nbytes) for p, t in sorted(cache.items())]
    return result


# --------------------------------------------------------------------------------------------------
# codecs
# --------------------------------------------------------------------------------------------------


class Prepared:
    """Per-volume state for the search: ``space``, ``evaluate(param) → Trial``, ``encode(param)``.

    The default evaluates by a full encode → decode round trip through the owning codec.
    """

    def __init__(self, codec: "Baseline", volume, space: ParamSpace):
        self.codec, self.volume, self.space = codec, volume, space
        self.data = np.asarray(volume.data)
        self.value_range = float(self.data.max()) - float(self.data.min())

    def encode(self, param: float) -> bytes:
        return self.codec.encode_param(self.volume, param)

    def evaluate(self, param: float) -> Trial:
        t0 = time.perf_counter()
        blob = self.encode(param)
        decoded = self.codec.decode(blob)
        return Trial(param, psnr_db(self.data, decoded, self.value_range), len(blob), time.perf_counter() - t0)

    size = None  # optional: param -> bytes, when evaluate() leaves nbytes unset


class Baseline:
    """A rival codec. Subclasses set the class attributes and implement the hooks they need.

    * lossy, searched: ``space(volume)`` and ``encode_param(volume, param)`` (+ ``decode``);
      optionally ``prepare(volume)`` returning a faster :class:`Prepared`.
    * lossy, direct: ``direct_psnr = True`` and ``encode_psnr(volume, target)``.
    * lossless: ``lossless = True`` and ``encode_lossless(volume)``.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "2D slice-wise", "3D", ...
    lossless: ClassVar[bool] = False
    direct_psnr: ClassVar[bool] = False
    #: imagecodecs codec classes that must report ``available`` (e.g. ``("JPEG2K",)``)
    imagecodecs_needs: ClassVar[tuple[str, ...]] = ()
    #: Python modules that must import
    module_needs: ClassVar[tuple[str, ...]] = ()
    is_fedtensor: ClassVar[bool] = False

    # ---- availability -------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` if this machine can run the codec, else a one-line reason."""
        import importlib

        for mod in cls.module_needs:
            try:
                importlib.import_module(mod)
            except Exception as exc:  # noqa: BLE001 - any import failure means "unavailable"
                return f"python module {mod!r} unavailable ({exc.__class__.__name__})"
        if cls.imagecodecs_needs:
            try:
                import imagecodecs
            except Exception as exc:  # noqa: BLE001
                return f"imagecodecs unavailable ({exc.__class__.__name__})"
            for name in cls.imagecodecs_needs:
                c = getattr(imagecodecs, name, None)
                if c is None or not getattr(c, "available", False):
                    return f"imagecodecs {name} codec not available in this build"
        return None

    @classmethod
    def available(cls) -> bool:
        return cls.unavailable_reason() is None

    def require(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise UnavailableError(f"{self.name}: {reason}")

    @classmethod
    def version(cls) -> str:
        return ""

    def not_applicable_reason(self, volume) -> str | None:
        """``None`` if the codec can code this volume, else why not."""
        return None

    # ---- the public interface -----------------------------------------------------------------
    def encode(self, volume, *, psnr: float | None = None, lossless: bool = False) -> bytes:
        """Bytes for ``volume`` at ``psnr`` (the smallest stream reaching it) or ``lossless``."""
        self.require()
        why = self.not_applicable_reason(volume)
        if why:
            raise NotApplicableError(f"{self.name}: {why}")
        if lossless or self.lossless:
            if not self.lossless:
                raise RateError(f"{self.name} is a lossy codec; give psnr=")
            return self.encode_lossless(volume)
        if psnr is None:
            raise RateError(f"{self.name}: give a target psnr=")
        if self.direct_psnr:
            return self.encode_psnr(volume, psnr)
        prep = self.prepare(volume)
        res = find_smallest(prep.evaluate, prep.space, psnr, size=prep.size)
        if not res.reached:
            finer = self.finer(volume)
            if finer is not None:
                return finer.encode(volume, psnr=psnr)
            raise RateError(f"{self.name} cannot reach {psnr} dB on this volume")
        return prep.encode(res.param)

    def decode(self, blob: bytes) -> np.ndarray:
        raise NotImplementedError

    # ---- hooks ------------------------------------------------------------------------------
    def space(self, volume) -> ParamSpace:
        raise NotImplementedError

    def prepare(self, volume) -> Prepared:
        return Prepared(self, volume, self.space(volume))

    def finer(self, volume) -> "Baseline | None":
        """A variant of this codec that reaches a higher PSNR on ``volume`` at some cost (speed), tried
        only for a target this one cannot reach; None where there is none."""
        return None

    def encode_param(self, volume, param: float) -> bytes:
        raise NotImplementedError

    def encode_psnr(self, volume, target: float) -> bytes:
        raise NotImplementedError

    def encode_lossless(self, volume) -> bytes:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "kind": self.kind, "lossless": self.lossless,
                "version": self.version() if self.available() else None,
                "unavailable": self.unavailable_reason()}


class _StatePrepared(Prepared):
    """The search over a :class:`QuantiserStepBaseline`'s step: quantise and reconstruct in memory to
    measure PSNR (no entropy coding), code only to count bytes."""

    def __init__(self, codec: "QuantiserStepBaseline", volume, space: ParamSpace):
        super().__init__(codec, volume, space)
        self.state = codec.state_class(self.data)

    def evaluate(self, param: float) -> Trial:
        t0 = time.perf_counter()
        decoded = self.state.reconstruct(*self.state.quantized(param), param)
        return Trial(param, psnr_db(self.data, decoded, self.value_range), None, time.perf_counter() - t0)

    def size(self, param: float) -> int:
        return len(self.state.encode(param))

    def encode(self, param: float) -> bytes:
        return self.state.encode(param)


class QuantiserStepBaseline(Baseline):
    """A transform baseline searched over one quantiser step (DWT, PCA). ``state_class(data)`` holds the
    volume's transform; it has ``quantized(step) → parts``, ``reconstruct(*parts, step)`` and
    ``encode(step) → bytes``."""

    state_class: ClassVar[type]

    def space(self, volume) -> ParamSpace:
        return quantiser_step_space(volume)

    def prepare(self, volume) -> Prepared:
        return _StatePrepared(self, volume, self.space(volume))

    def encode_param(self, volume, param: float) -> bytes:
        return self.state_class(np.asarray(volume.data)).encode(float(param))


def imagecodecs():
    """The imagecodecs module, imported on first use (a baseline can be listed without it)."""
    import imagecodecs as ic

    return ic


def imagecodecs_version(fn_name: str) -> str:
    """``imagecodecs X.Y, <library version>`` from imagecodecs' ``<fn_name>()`` when it has one."""
    ic = imagecodecs()
    v = getattr(ic, fn_name, None)
    try:
        return f"imagecodecs {ic.__version__}" + (f", {v()}" if v else "")
    except Exception:  # noqa: BLE001 - version strings are informative only
        return f"imagecodecs {ic.__version__}"


def quantiser_step_space(volume) -> "ParamSpace":
    """Search space of a uniform quantiser step for a PSNR target (DWT, PCA: larger step, fewer bits).

    The guess is the step whose uniform-quantisation noise (step² / 12) alone meets the target, doubled
    because dead zones and transform gains let a larger step through.
    """
    data = np.asarray(volume.data)
    span = max(float(data.max()) - float(data.min()), 1e-12)
    return ParamSpace(span * 1e-7, span * 4, log=True, increasing=False,
                      guess=lambda t: 2 * math.sqrt(12) * rmse_for(span, t))


def rmse_for(value_range: float, target: float) -> float:
    """RMSE that gives PSNR ``target`` for ``value_range``."""
    return max(value_range, 1e-12) / 10 ** (target / 20)
