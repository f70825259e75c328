"""3D discrete wavelet transform coding: PyWavelets' multilevel CDF 9/7 + fedtensor's quantiser and coder.

The *only* difference from fedtensor is the transform, so the comparison isolates block Tucker vs
wavelets:

* transform: ``pywt.dwtn`` with the CDF 9/7 biorthogonal wavelet (``bior4.4``, JPEG2000's lossy
  filter) in periodization mode (non-expansive), up to :data:`MAX_LEVELS` levels. At each level only
  the axes still at least :data:`MIN_SIDE` long are split, so thin volumes (a 20-slice series) keep
  decomposing in-plane; the plan is a pure function of the shape, recomputed by the decoder;
* quantiser: the same dead-zone uniform quantiser (``fedtensor.codec.quantize.ROUNDING`` /
  ``RECON_OFFSET``) with one step for every subband;
* entropy coder: :class:`fedtensor.codec.grid.GridCoder` over :class:`~fedtensor.codec.entropy.BinaryStream`.
  The approximation band is coded as a Lorenzo residual (like fedtensor's DC band); each detail
  subband is one grid, coarse to fine, whose parent activity is the co-located coefficient of the
  same orientation one level coarser (the classic zerotree parent) and whose extra context is the
  magnitude already coded in the sibling subbands at the same position.

The rate parameter is the quantiser step.
"""

from __future__ import annotations

import itertools

import numpy as np

from fedtensor.baselines.base import (
    FormatError,
    QuantiserStepBaseline,
    header_shape_dtype,
    pack,
    to_dtype,
    unpack,
    volume_header,
)

WAVELET = "bior4.4"  # CDF 9/7
MODE = "periodization"
MAX_LEVELS = 5
MIN_SIDE = 16


def level_plan(shape) -> list[tuple[int, ...]]:
    """The axes split at each level (finest first)."""
    cur, plan = list(shape), []
    for _ in range(MAX_LEVELS):
        axes = tuple(a for a in range(3) if cur[a] >= MIN_SIDE)
        if not axes:
            break
        plan.append(axes)
        cur = [-(-n // 2) if a in axes else n for a, n in enumerate(cur)]
    return plan


def band_shapes(shape, plan) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """Input shape of every level (finest first) and the approximation band's shape."""
    cur, inputs = tuple(shape), []
    for axes in plan:
        inputs.append(cur)
        cur = tuple(-(-n // 2) if a in axes else n for a, n in enumerate(cur))
    return inputs, cur


def detail_keys(axes) -> list[str]:
    return ["".join(k) for k in itertools.product("ad", repeat=len(axes)) if "d" in k]


def forward(x: np.ndarray, plan) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    import pywt

    a, details = x, []
    for axes in plan:
        c = pywt.dwtn(a, WAVELET, mode=MODE, axes=axes)
        a = c.pop("a" * len(axes))
        details.append(c)
    return a, details


def inverse(a: np.ndarray, details, plan, inputs) -> np.ndarray:
    import pywt

    for axes, d, shp in zip(reversed(plan), reversed(details), reversed(inputs)):
        a = pywt.idwtn({**d, "a" * len(axes): a}, WAVELET, mode=MODE, axes=axes)
        a = a[tuple(slice(0, n) for n in shp)]
    return a


def _quantize(c: np.ndarray, step: float) -> np.ndarray:
    from fedtensor.codec.quantize import ROUNDING

    return (np.sign(c) * np.floor(np.abs(c) / step + ROUNDING)).astype(np.int64)


def _dequantize(q: np.ndarray, step: float) -> np.ndarray:
    from fedtensor.codec.quantize import RECON_OFFSET

    return np.sign(q) * (np.abs(q) + RECON_OFFSET) * step


def _resample(a: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resampling of a coarser band onto a finer band's lattice."""
    idx = np.ix_(*[(np.arange(n) * m) // n for n, m in zip(shape, a.shape)])
    return a[idx]


def code_bands(s, plan, approx_shape, detail_shape_list, qa=None, qd=None):
    """Encode (``qa``/``qd`` given) or decode (``s`` decoding) the quantised subbands; same traversal."""
    from fedtensor.codec.blockcoef import inverse_lorenzo, lorenzo
    from fedtensor.codec.grid import GridCoder

    coder = GridCoder()
    g = (*approx_shape, 1)
    res = coder.code(s, g, np.zeros(g, np.int64), 0, None if qa is None else lorenzo(qa)[..., None])
    out_a = inverse_lorenzo(res[..., 0]) if s.decoding else qa
    coarser = np.abs(res[..., 0])  # the coarsest details' parent: the approximation's local activity
    coarser_bands: dict[str, np.ndarray] = {}
    out_d: list[dict[str, np.ndarray]] = [dict() for _ in plan]
    for depth, lev in enumerate(reversed(range(len(plan)))):
        shape = detail_shape_list[lev]
        g = (*shape, 1)
        siblings = np.zeros(g, np.int64)
        level_bands: dict[str, np.ndarray] = {}
        for key in detail_keys(plan[lev]):
            par = coarser_bands.get(key)
            parent = _resample(par if par is not None else coarser, shape)[..., None]
            cls = min(15, 1 + 3 * depth + key.count("d") - 1)
            vals = None if qd is None else qd[lev][key][..., None]
            band = coder.code(s, g, parent, cls, vals, extra=siblings // 2)[..., 0]
            out_d[lev][key] = band
            level_bands[key] = np.abs(band)
            siblings = siblings + level_bands[key][..., None]
        coarser_bands = level_bands
        coarser = siblings[..., 0]
    return out_a, out_d


class _DwtState:
    def __init__(self, data: np.ndarray):
        self.data = data
        self.shape = data.shape
        self.offset = float(np.mean(data, dtype=np.float64))
        self.plan = level_plan(self.shape)
        self.inputs, self.approx_shape = band_shapes(self.shape, self.plan)
        self.a, self.details = forward(data.astype(np.float64) - self.offset, self.plan)

    def quantized(self, step: float):
        return _quantize(self.a, step), [{k: _quantize(v, step) for k, v in d.items()} for d in self.details]

    def reconstruct(self, qa, qd, step: float) -> np.ndarray:
        a = _dequantize(qa, step)
        details = [{k: _dequantize(v, step) for k, v in d.items()} for d in qd]
        return to_dtype(inverse(a, details, self.plan, self.inputs) + self.offset, self.data.dtype)

    def encode(self, step: float) -> bytes:
        from fedtensor.codec.entropy import BinaryStream

        qa, qd = self.quantized(step)
        s = BinaryStream()
        code_bands(s, self.plan, self.approx_shape, [d[next(iter(d))].shape for d in qd], qa, qd)
        h = {"codec": "dwt", **volume_header(self.data), "wavelet": WAVELET, "mode": MODE,
             "plan": [list(a) for a in self.plan], "step": step, "offset": self.offset}
        return pack(h, [s.finish()])


class Dwt(QuantiserStepBaseline):
    name = "dwt"
    label = "3D DWT (CDF 9/7) + fedtensor coder"
    kind = "3D"
    module_needs = ("pywt", "fedtensor.codec.grid")
    state_class = _DwtState

    @classmethod
    def version(cls) -> str:
        import pywt

        return f"pywavelets {pywt.__version__}, {WAVELET}, {MODE}"

    def decode(self, blob: bytes) -> np.ndarray:
        from fedtensor.codec.entropy import BinaryStream

        h, sections = unpack(blob)
        if h.get("codec") != "dwt" or len(sections) != 1 or len(sections[0]) % 4:
            raise FormatError("not a dwt stream")
        shape, dtype = header_shape_dtype(h)
        plan = [tuple(int(a) for a in axes) for axes in h.get("plan", [])]
        if plan != level_plan(shape) or h.get("wavelet") != WAVELET or h.get("mode") != MODE:
            raise FormatError("dwt stream written with other transform parameters")
        step, offset = float(h["step"]), float(h["offset"])
        inputs, approx_shape = band_shapes(shape, plan)
        detail_shapes = [band_shapes(inp, [axes])[1] for inp, axes in zip(inputs, plan)]
        s = BinaryStream(np.frombuffer(sections[0], np.uint32))
        qa, qd = code_bands(s, plan, approx_shape, detail_shapes)
        a = _dequantize(qa, step)
        details = [{k: _dequantize(v, step) for k, v in d.items()} for d in qd]
        return to_dtype(inverse(a, details, plan, inputs) + offset, dtype)
