"""Values made fit for strict JSON, which has no infinity or NaN."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def jsonable(o):
    """``o`` with dict keys as strings, tuples as lists, numpy scalars as Python numbers, paths as strings,
    and every non-finite float as the string ``"inf"``, ``"-inf"`` or ``"nan"`` (``float()`` reads them
    back); anything else as it is."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else str(f)
    if isinstance(o, Path):
        return str(o)
    return o
