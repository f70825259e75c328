"""Bjøntegaard delta metrics (VCEG-M33) between two rate–distortion curves.

BD-rate: fit log(rate) as a polynomial of PSNR for each curve (cubic, as in VCEG-M33; with fewer than
four points, the exact polynomial of degree n − 1 through them), integrate both over the PSNR
interval where the curves overlap (optionally clipped to ``[lo, hi]``), and turn the mean log-rate
difference back into a ratio:

    BD-rate = exp( (∫ ln R_test − ∫ ln R_anchor) / (D_hi − D_lo) ) − 1        (in %)

Negative means the test codec needs fewer bits than the anchor for the same PSNR. BD-PSNR is the
mirror image: PSNR as a polynomial of log(rate), mean PSNR difference over the overlapping rates.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _points(rate: Sequence[float], quality: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rate, np.float64)
    q = np.asarray(quality, np.float64)
    if r.shape != q.shape:
        raise ValueError(f"rate and quality must have the same length ({r.shape} vs {q.shape})")
    ok = np.isfinite(r) & np.isfinite(q) & (r > 0)
    r, q = r[ok], q[ok]
    order = np.argsort(q)
    r, q = r[order], q[order]
    keep = np.concatenate([[True], np.diff(q) > 1e-9])[:len(q)]  # one point per quality (none left: none)
    return r[keep], q[keep]


def _mean_of_fit(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    """Mean over [lo, hi] of the polynomial fitted to y(x) (degree min(3, n − 1))."""
    deg = min(3, len(x) - 1)
    poly = np.polyfit(x, y, deg)
    integral = np.polyint(poly)
    return float((np.polyval(integral, hi) - np.polyval(integral, lo)) / (hi - lo))


def bd_rate(
    rate_anchor: Sequence[float], psnr_anchor: Sequence[float],
    rate_test: Sequence[float], psnr_test: Sequence[float],
    *, lo: float | None = None, hi: float | None = None,
) -> float | None:
    """BD-rate of ``test`` against ``anchor`` in percent (negative = ``test`` needs fewer bits).

    ``lo``/``hi`` clip the PSNR interval of integration (e.g. 40 and 50 dB). ``None`` when either
    curve has fewer than two usable points or the curves do not overlap inside ``[lo, hi]``.
    """
    ra, pa = _points(rate_anchor, psnr_anchor)
    rt, pt = _points(rate_test, psnr_test)
    if len(pa) < 2 or len(pt) < 2:
        return None
    d_lo = max(pa[0], pt[0], -math.inf if lo is None else lo)
    d_hi = min(pa[-1], pt[-1], math.inf if hi is None else hi)
    if not d_hi - d_lo > 1e-9:
        return None
    diff = _mean_of_fit(pt, np.log(rt), d_lo, d_hi) - _mean_of_fit(pa, np.log(ra), d_lo, d_hi)
    return (math.exp(diff) - 1.0) * 100.0


def bd_psnr(
    rate_anchor: Sequence[float], psnr_anchor: Sequence[float],
    rate_test: Sequence[float], psnr_test: Sequence[float],
) -> float | None:
    """BD-PSNR of ``test`` against ``anchor`` in dB (positive = ``test`` is better at equal rate)."""
    ra, pa = _points(rate_anchor, psnr_anchor)
    rt, pt = _points(rate_test, psnr_test)
    if len(pa) < 2 or len(pt) < 2:
        return None
    la, lt = np.log(ra), np.log(rt)
    oa, ot = np.argsort(la), np.argsort(lt)
    la, pa, lt, pt = la[oa], pa[oa], lt[ot], pt[ot]
    r_lo, r_hi = max(la[0], lt[0]), min(la[-1], lt[-1])
    if not r_hi - r_lo > 1e-12:
        return None
    return _mean_of_fit(lt, pt, r_lo, r_hi) - _mean_of_fit(la, pa, r_lo, r_hi)
