"""Bit-reproducible GPU encodes: XLA's deterministic GPU ops, asked for before JAX starts its backend.

The encoder's rate search compares error sums with a target, so a sum that differs in its last bit
can pick another step and write another stream. On a GPU, XLA picks kernels by timing them and may sum
with atomics, and two processes encoding the same volume wrote different streams at every point
measured (0 of 9 identical on an H100); with ``--xla_gpu_deterministic_ops=true`` all 9 agreed
(docs/bench/gpu_h100.md). CPUs are deterministic either way, and accept the flag.

XLA reads ``XLA_FLAGS`` once, when JAX first starts a backend: importing :mod:`fedtensor` before any
JAX computation is enough. A flag already in ``XLA_FLAGS`` is left as it is, so
``XLA_FLAGS=--xla_gpu_deterministic_ops=false`` opts out.
"""

from __future__ import annotations

import os
from typing import MutableMapping

FLAG = "--xla_gpu_deterministic_ops"


def request_deterministic_gpu_ops(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Add ``--xla_gpu_deterministic_ops=true`` to ``XLA_FLAGS`` unless the flag is set there already.
    Returns whether it was added. It takes effect only if no JAX backend has started yet."""
    flags = environ.get("XLA_FLAGS", "")
    if FLAG in flags:
        return False
    environ["XLA_FLAGS"] = f"{flags} {FLAG}=true".strip()
    return True
