"""Tucker rank selection from the mode spectra."""

from __future__ import annotations

import numpy as np

from fedtensor.tensor.tucker import mode_spectra, unit_scaled

# float32 rounding leaves squared singular values of ~1e-14 of the total where the exact ones are 0 (a
# constant tensor's): energy within this fraction of the target counts as reached.
_NOISE = 1e-10


def ranks_for_energy(x, energy: float) -> tuple[int, ...]:
    """Smallest per-mode ranks keeping at least ``energy`` (0–1] of each mode's spectral energy."""
    if not 0.0 < energy <= 1.0:  # NaN too
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    ranks = []
    for s in mode_spectra(unit_scaled(x)):
        c = np.cumsum(np.asarray(s, np.float64))
        ranks.append(int(min(np.searchsorted(c, energy * c[-1] * (1 - _NOISE)) + 1, len(c))))
    return tuple(ranks)


def ranks_for_error(x, rel_error: float) -> tuple[int, ...]:
    """Per-mode ranks whose HOSVD error bound ``sqrt(sum_m tail_m) <= rel_error * ||x||`` holds.

    The HOSVD truncation error is at most the root-sum of the discarded eigenvalues over all modes, so
    each mode gets an equal share ``rel_error² ||x||² / ndim`` of the discarded energy.
    """
    if not rel_error >= 0:  # NaN too
        raise ValueError(f"rel_error must be >= 0, got {rel_error}")
    spectra = [np.asarray(s, np.float64) for s in mode_spectra(unit_scaled(x))]
    total = float(spectra[0].sum())
    budget = rel_error**2 * total / len(spectra)
    ranks = []
    for s in spectra:
        tail = np.concatenate([np.cumsum(s[::-1])[::-1], [0.0]])  # tail[r] = energy dropped at rank r
        ranks.append(int(max(1, np.argmax(tail <= budget))))
    return tuple(ranks)
