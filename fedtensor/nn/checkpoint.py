"""Model directories and checkpoints (safetensors), the SHA-256 model id, and their errors.

A *model directory* (what ``fedtensor train --out DIR`` writes and ``--model DIR`` reads)::

    DIR/model.safetensors   best weights; its metadata holds the architecture ("fedtensor_model" JSON)
    DIR/model.json          manifest: model_id (= SHA-256 of model.safetensors), config, training summary
    DIR/history.csv         per-epoch training / validation losses;  DIR/loss.png  the same, plotted
    DIR/checkpoint/         latest training state (weights + optimiser, state.json) for --resume
    DIR/cache/              (default) cached decoded training volumes

The model id is the SHA-256 of ``model.safetensors`` — the weights *and* the architecture metadata — so
equal ids mean bit-identical models. Loading checks the file against the manifest's id and fails with a
one-line :class:`ModelError` on any corruption, truncation or mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fedtensor.errors import FedtensorError
from fedtensor.io.atomic import atomic_write_bytes

MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "model.json"
STATE_DIR = "checkpoint"
STATE_FILE = "state.safetensors"
STATE_JSON = "state.json"
FORMAT = "fedtensor-restoration"
FORMAT_VERSION = 1


class ModelError(FedtensorError):
    """A model directory or checkpoint is missing, corrupted, or does not fit this fedtensor."""


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path``'s contents atomically (:func:`fedtensor.io.atomic_write_bytes`: a failed write
    leaves neither a partial file nor a temp file behind)."""
    atomic_write_bytes(path, data, force=True)


# ------------------------------------------------------------------------------ pytrees ⇄ safetensors


def _key(path) -> str:
    return jax.tree_util.keystr(path)


def tree_to_bytes(tree: Any, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a pytree of arrays to safetensors bytes (keys = ``jax.tree_util.keystr`` paths)."""
    import safetensors.numpy as stn

    flat = {_key(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return stn.save(flat, metadata=metadata)


def finite_tree(tree: Any) -> bool:
    """Every leaf of a pytree of arrays finite (weights of a diverged run are not)."""
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree))


def tree_from_bytes(template: Any, data: bytes, what: str) -> Any:
    """Fill ``template``'s structure with the arrays stored in ``data`` (shapes and dtypes checked)."""
    import safetensors.numpy as stn

    try:
        stored = stn.load(bytes(data))
    except Exception as err:  # safetensors raises its own SafetensorError (or others on garbage)
        raise ModelError(f"corrupted {what}: {one_line(err)}") from None
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [_key(p) for p, _ in leaves]
    if set(keys) != set(stored):
        raise ModelError(f"{what} does not match this model architecture (different parameter names)")
    out = []
    for k, (_, ref) in zip(keys, leaves):
        a = stored[k]
        if a.shape != tuple(ref.shape) or a.dtype != np.dtype(ref.dtype):
            raise ModelError(f"{what} does not match this model architecture ({k}: {a.shape} {a.dtype} vs "
                             f"{tuple(ref.shape)} {np.dtype(ref.dtype)})")
        out.append(a)
    return jax.tree_util.tree_unflatten(treedef, out)


def safetensors_metadata(data: bytes, what: str) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (header parsed without loading the tensors)."""
    try:
        (n,) = struct.unpack_from("<Q", data)
        if n > len(data) - 8 or n > 100 << 20:
            raise ValueError("header length")
        header = json.loads(data[8:8 + n].decode())
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("metadata")
        return meta
    except (struct.error, ValueError, UnicodeDecodeError, AttributeError, RecursionError) as err:
        raise ModelError(f"corrupted {what}: unreadable header ({err.__class__.__name__})") from None


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or err.__class__.__name__
    return text[:200]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------- model dirs


def check_model_dir(model_dir: Path) -> Path:
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelError(f"not a model directory (a file): {d}" if d.exists() else f"model directory not found: {d}")
    if not (d / MODEL_FILE).is_file():
        hint = " (training has not finished an epoch yet)" if (d / STATE_DIR).is_dir() else ""
        raise ModelError(f"not a fedtensor model directory (no {MODEL_FILE}): {d}{hint}")
    return d


def read_manifest(model_dir: Path) -> dict:
    p = Path(model_dir) / MANIFEST_FILE
    if not p.is_file():
        return {}
    try:
        m = json.loads(p.read_text())
        if not isinstance(m, dict):
            raise ValueError
        return m
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ModelError(f"corrupted model manifest: {p}") from None


def read_model_bytes(model_dir: Path) -> tuple[bytes, str, dict]:
    """``(bytes of model.safetensors, model id, manifest)``, verified against the manifest's id."""
    d = check_model_dir(model_dir)
    data = (d / MODEL_FILE).read_bytes()
    mid = sha256_hex(data)
    manifest = read_manifest(d)
    want = manifest.get("model_id")
    if want is None:
        raise ModelError(f"{d} has no {MANIFEST_FILE} naming its model id: {MODEL_FILE} cannot be verified")
    if want != mid:
        raise ModelError(f"corrupted model checkpoint in {d}: SHA-256 of {MODEL_FILE} does not match model.json "
                         f"({mid[:12]}… ≠ {str(want)[:12]}…)")
    return data, mid, manifest


def model_id(model_dir: str | os.PathLike) -> str:
    """The SHA-256 model id of a model directory (verified against its manifest)."""
    return read_model_bytes(Path(model_dir))[1]
