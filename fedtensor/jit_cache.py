"""XLA's compiled programs kept on disk between processes (JAX's persistent compilation cache).

A codec call compiles about twenty small XLA programs for each volume geometry, which takes longer
than the coding itself on a CPU: a fresh ``fedtensor compress`` of a 2.5 MVoxel CT spends some 3 s
compiling and 0.7 s coding. Programs kept on disk make the later calls of a geometry skip XLA's
compiler (tracing and lowering still run). The CLI turns this on; a library user calls :func:`enable_persistent_cache`, or
sets JAX's own ``JAX_COMPILATION_CACHE_DIR``. Each geometry adds about half a megabyte; the directory
is not trimmed (JAX's size limit needs the ``filelock`` package), and may be deleted at any time.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import MutableMapping

#: Set to ``0``, ``off`` or ``no`` to keep every compiled program in memory only.
ENV_SWITCH = "FEDTENSOR_JIT_CACHE"


def default_directory(environ: MutableMapping[str, str] = os.environ) -> Path:
    """``$XDG_CACHE_HOME/fedtensor/jax`` (``~/.cache/fedtensor/jax`` by default)."""
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fedtensor" / "jax"


def enable_persistent_cache(directory: str | os.PathLike | None = None,
                            environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Keep compiled programs in ``directory`` (default :func:`default_directory`) for later processes.

    Must run before JAX is imported: it sets JAX's environment variables, and leaves any already set
    (``JAX_COMPILATION_CACHE_DIR`` chooses the directory) alone; ``FEDTENSOR_JIT_CACHE=0`` only stops
    fedtensor from setting a cache up (JAX's own variables still apply). Every program is kept, however
    short its compilation (JAX's default keeps only those over a second, none of the codec's). Returns the
    directory, or None when switched off by ``FEDTENSOR_JIT_CACHE=0``, when JAX is already imported, or
    when the directory cannot be created (nothing is cached then; nothing fails).
    """
    if environ.get(ENV_SWITCH, "").strip().lower() in {"0", "off", "no", "false"} or "jax" in sys.modules:
        return None
    try:  # no home directory (e.g. a container user without one) or an unwritable cache: no cache
        path = Path(environ.get("JAX_COMPILATION_CACHE_DIR") or directory or default_directory(environ))
        path.mkdir(mode=0o700, parents=True, exist_ok=True)  # (compiled programs others could swap)
    except (OSError, RuntimeError):
        return None
    if not os.access(path, os.W_OK | os.X_OK):  # an existing directory this user cannot write: JAX warned
        return None  # on every compilation
    environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(path))
    environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return path
