"""Slice-wise PCA: principal components of the slices' rows, truncated, quantised, entropy-coded.

Every slice ``X_k = vol[:, :, k]`` (n1 × n2) is a stack of n1 row vectors in R^n2. One PCA basis is
learned from the rows of all slices (after removing the volume's mean), and every row is represented
by its scores on the first ``r`` components — the classic "eigen-row" transform, applied slice by slice
with a basis that is stored once per volume instead of once per slice.

One parameter, the quantiser step Δ, sets everything:

* truncation: a component is kept when the RMS of its scores is at least ``KEEP·Δ`` (below that it
  would quantise to almost all zeros while its basis vector still costs bits);
* the basis: component ``c`` is quantised with its own step
  ``δ_c = Δ·sqrt(BASIS_NOISE / (r·(E + n2·σ_c²)))`` (E the mean row energy, σ_c the RMS of the
  component's scores): basis noise reaches a row both through its projection (∝ E) and through the
  reconstruction (∝ n2·σ_c²), and this keeps their sum a fixed fraction of the score quantisation
  error. The scores are then projected onto the *dequantised* basis (closed loop);
* scores: fedtensor's dead-zone quantiser with step Δ.

Both the basis and the scores are coded with fedtensor's :class:`~fedtensor.codec.grid.GridCoder`:
components in small groups (one multi-band grid each), scores laid out on the (row, slice) lattice so
the checkerboard contexts see neighbouring rows and slices, with the previous group as the parent.
"""

from __future__ import annotations

import math

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
from fedtensor.baselines.dwt import _dequantize, _quantize

KEEP = 0.35
BASIS_NOISE = 0.3


def _component_class(c: int) -> int:
    return min(15, 2 + int(math.log2(c + 1)))


def component_groups(r: int) -> list[tuple[int, int]]:
    """Components coded together as one multi-band grid: 1, 1, 1, 1, 2, 2, 4, 4, 8, 8, … (at most 32)."""
    groups, c, size, k = [], 0, 1, 0
    while c < r:
        groups.append((c, min(r, c + size)))
        c += size
        k += 1
        if k >= 4 and k % 2 == 0:
            size = min(32, size * 2)
    return groups


def code_components(s, n1: int, n2: int, n3: int, vsteps_len: int, qv=None, qa=None):
    """Encode (``qv`` (n2, r), ``qa`` (n1, r, n3) given) or decode the integer basis and scores.

    Components are coded in groups (one multi-band grid each, see :func:`component_groups`) whose
    parent activity is the last component of the previous group.
    """
    from fedtensor.codec.grid import GridCoder

    r = vsteps_len
    coder = GridCoder()
    out_v = np.zeros((n2, r), np.int64)
    prev = np.zeros((n2, 1, 1, 1), np.int64)
    for c0, c1 in component_groups(r):
        g = (n2, 1, 1, c1 - c0)
        band = coder.code(s, g, np.broadcast_to(prev, g), 1, None if qv is None else qv[:, c0:c1].reshape(g))
        out_v[:, c0:c1] = band.reshape(n2, c1 - c0)
        prev = np.abs(band[..., -1:])
    coder = GridCoder()
    out_a = np.zeros((n1, r, n3), np.int64)
    prev = np.zeros((n1, 1, n3, 1), np.int64)
    total = np.zeros((n1, 1, n3, 1), np.int64)
    for c0, c1 in component_groups(r):
        g = (n1, 1, n3, c1 - c0)
        vals = None if qa is None else qa[:, c0:c1, :].transpose(0, 2, 1).reshape(g)
        band = coder.code(s, g, np.broadcast_to(prev, g), _component_class(c0), vals, extra=total // 4)
        out_a[:, c0:c1, :] = band.reshape(n1, n3, c1 - c0).transpose(0, 2, 1)
        prev = np.abs(band[..., -1:])
        total = total + np.abs(band).sum(axis=-1, keepdims=True)
    return out_v, out_a


class _PcaState:
    def __init__(self, data: np.ndarray):
        self.data = data
        self.n1, self.n2, self.n3 = data.shape
        self.offset = float(np.mean(data, dtype=np.float64))
        x = data.astype(np.float64) - self.offset
        self.rows = np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(-1, self.n2)  # (n1·n3, n2)
        cov = self.rows.T @ self.rows
        w, v = np.linalg.eigh(cov)
        order = np.argsort(w)[::-1]
        self.sigma = np.sqrt(np.maximum(w[order], 0) / self.rows.shape[0])  # RMS score per component
        self.basis = v[:, order]
        self.row_energy = float(np.mean(np.square(self.rows).sum(axis=1)))

    def quantized(self, step: float):
        r = int(np.count_nonzero(self.sigma >= KEEP * step))
        # Basis noise e_c (per-entry variance δ_c²/12) reaches a row through its projection (r·e_c, energy
        # ∝ the row's total energy E) and its reconstruction (a_c·e_c, energy ∝ n2·σ_c²).
        energy = self.row_energy + self.n2 * self.sigma[:r] ** 2
        vsteps = (step * np.sqrt(BASIS_NOISE / (max(r, 1) * np.maximum(energy, 1e-300)))).astype(np.float32)
        qv = _quantize(self.basis[:, :r], vsteps.astype(np.float64)) if r else np.zeros((self.n2, 0), np.int64)
        vhat = qv * vsteps.astype(np.float64)
        scores = self.rows @ vhat  # closed loop: project on the basis the decoder will have
        qa = _quantize(scores, step)  # (n1·n3, r)
        return vsteps, qv, qa

    def reconstruct(self, vsteps, qv, qa, step: float) -> np.ndarray:
        return _reconstruct(vsteps, qv, qa, step, (self.n1, self.n2, self.n3), self.offset, self.data.dtype)

    def encode(self, step: float) -> bytes:
        from fedtensor.codec.entropy import BinaryStream

        vsteps, qv, qa = self.quantized(step)
        r = len(vsteps)
        s = BinaryStream()
        code_components(s, self.n1, self.n2, self.n3, r, qv, qa.reshape(self.n1, self.n3, r).transpose(0, 2, 1))
        h = {"codec": "pca", **volume_header(self.data), "step": step, "offset": self.offset, "rank": r}
        return pack(h, [vsteps.astype("<f4").tobytes(), s.finish()])


def _reconstruct(vsteps, qv, qa_rows, step, shape, offset, dtype) -> np.ndarray:
    n1, n2, n3 = shape
    vhat = qv * vsteps.astype(np.float64)
    rows = _dequantize(qa_rows, step) @ vhat.T if len(vsteps) else np.zeros((n1 * n3, n2))
    x = rows.reshape(n1, n3, n2).transpose(0, 2, 1) + offset
    return to_dtype(x, dtype)


class Pca(QuantiserStepBaseline):
    name = "pca"
    label = "PCA (slice rows) + fedtensor coder"
    kind = "2D slice-wise"
    module_needs = ("fedtensor.codec.grid",)
    state_class = _PcaState

    @classmethod
    def version(cls) -> str:
        return f"numpy {np.__version__} eigh"

    def decode(self, blob: bytes) -> np.ndarray:
        from fedtensor.codec.entropy import BinaryStream

        h, sections = unpack(blob)
        if h.get("codec") != "pca" or len(sections) != 2 or len(sections[0]) % 4 or len(sections[1]) % 4:
            raise FormatError("not a pca stream")
        shape, dtype = header_shape_dtype(h)
        if len(shape) != 3:
            raise FormatError("corrupted pca stream (shape)")
        n1, n2, n3 = shape
        vsteps = np.frombuffer(sections[0], "<f4").astype(np.float32)
        if len(vsteps) != int(h.get("rank", -1)) or len(vsteps) > n2:
            raise FormatError("corrupted pca stream (rank)")
        # rank 0 (a constant volume, or a step above every component) codes nothing: an empty section
        s = BinaryStream(np.frombuffer(sections[1], np.uint32), allow_empty=len(vsteps) == 0)
        qv, qa = code_components(s, n1, n2, n3, len(vsteps))
        qa_rows = qa.transpose(0, 2, 1).reshape(n1 * n3, len(vsteps))
        return _reconstruct(vsteps, qv, qa_rows, float(h["step"]), shape, float(h["offset"]), dtype)
