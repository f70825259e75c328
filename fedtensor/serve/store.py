"""The global-model store: every published version on disk, numbered, with its SHA-256.

Layout of ``root``::

    root/versions/v000001/model.safetensors   the weights (format of :mod:`fedtensor.nn.checkpoint`)
    root/versions/v000001/model.json          the manifest; its ``model_id`` is the SHA-256 above
    root/versions/v000001/version.json        version, sha256, created (ISO 8601 UTC), meta, manifest hash
    root/.lock                                serialises publishers (also across processes)

Each version directory is a complete model directory: ``fedtensor.nn.load_model`` reads it as it is.

**Atomic publish.** A version is assembled in a hidden temporary directory (every file fsync'ed) and
then renamed onto ``vNNNNNN`` — one ``rename(2)``, so a reader or a restarted server sees the whole
version or nothing. A crash mid-publish leaves only a ``.tmp-*`` directory, which is never listed and is
swept away by the next publisher. Versions are never modified or deleted.

**Integrity.** :meth:`ModelStore.model_bytes` re-hashes the file on every read and raises
:class:`CorruptVersionError` when it differs from the recorded SHA-256 (bit rot, tampering).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from fedtensor.errors import FedtensorError
from fedtensor.io.atomic import locked

MODEL_FILE = "model.safetensors"  # = fedtensor.nn.checkpoint.MODEL_FILE (not imported: that pulls in JAX)
MANIFEST_FILE = "model.json"
VERSION_FILE = "version.json"
_VDIR = re.compile(r"^v(\d{6,})$")


class StoreError(FedtensorError):
    """The model store cannot do what was asked (bad model, unwritable directory, ...)."""


class VersionNotFound(StoreError):
    """No such version in the store."""


class CorruptVersionError(StoreError):
    """A stored version no longer matches its recorded SHA-256 (or its record is unreadable)."""


class PublishConflict(StoreError):
    """A publish that would no longer be right: its base is not the latest version any more, or the model
    already is the latest."""


@dataclass(frozen=True)
class VersionInfo:
    """One published global model."""

    version: int
    sha256: str  # the model id: SHA-256 of model.safetensors
    created: str  # ISO 8601, UTC
    meta: dict = field(default_factory=dict)  # free-form: round, clients, n_clients, loss, val_loss, ...
    size: int = 0  # bytes of model.safetensors
    manifest_sha256: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@functools.lru_cache(maxsize=8)
def _abstract_params(config):
    """Parameter names, shapes and dtypes of an architecture (``nnx.eval_shape``: ~0.1 s, so cached)."""
    from fedtensor.nn.model import abstract_net

    return abstract_net(config)[1]


def check_model_bytes(data: bytes) -> dict:
    """Raise :class:`StoreError` unless ``data`` is a fedtensor restoration model that ``load_model`` can
    read (safetensors header, architecture metadata, every parameter's name, shape and dtype); returns the
    architecture metadata. Nothing is materialised on a device."""
    from fedtensor.nn.checkpoint import FORMAT, ModelError, finite_tree, safetensors_metadata, tree_from_bytes
    from fedtensor.nn.model import NetConfig

    try:
        info = json.loads(safetensors_metadata(data, "model")["fedtensor_model"])
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ValueError("format")
        config = NetConfig.from_dict(info["net"])
    except ModelError as err:
        raise StoreError(str(err)) from None
    except (KeyError, ValueError, TypeError, RecursionError):
        raise StoreError("not a fedtensor restoration model (missing or bad architecture metadata)") from None
    try:
        params = tree_from_bytes(_abstract_params(config), data, "model")
    except ModelError as err:
        raise StoreError(str(err)) from None
    if not finite_tree(params):  # load_model refuses it: every client would fail on this version
        raise StoreError("the model's weights are not all finite (from a diverged training run?)")
    return info


_MAX_DEPTH = 64  # nesting of a manifest or meta: far below what recursive serialisers survive


def _plain(value, depth: int = 0):
    """``value`` as JSON gives it back (tuples as lists), every non-finite float as None; ValueError when
    nested deeper than :data:`_MAX_DEPTH`."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return json.loads(json.dumps(value))  # raises on what JSON cannot hold


def fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


class ModelStore:
    """Numbered, immutable, hash-verified model versions under ``root`` (created if missing).

    Thread-safe and safe for several processes publishing into the same directory."""

    def __init__(self, root: str | os.PathLike, *, validate: bool = True):
        self.root = Path(root)
        self.vdir = self.root / "versions"
        self.validate = validate
        try:
            self.vdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the model store in {self.root}: {e.strerror or e}") from None
        if not os.access(self.vdir, os.W_OK | os.X_OK):
            raise StoreError(f"model store is not writable: {self.vdir}")
        self._lock = threading.Lock()
        self._cache: dict[int, VersionInfo] = {}  # records are immutable once committed

    # -- locking -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """In-process lock + ``flock`` on root/.lock (other processes publishing into the same store)."""
        with self._lock, locked(self.root / ".lock"):
            yield

    # -- reading -----------------------------------------------------------------------------------

    def _numbers(self) -> list[int]:
        out = []
        for entry in os.scandir(self.vdir):
            m = _VDIR.match(entry.name)
            if m and entry.is_dir(follow_symlinks=False):
                out.append(int(m.group(1)))
        return sorted(out)

    def _dir(self, version: int) -> Path:
        return self.vdir / f"v{version:06d}"

    def _record(self, version: int) -> VersionInfo:
        info = self._cache.get(version)
        if info is not None:
            return info
        path = self._dir(version) / VERSION_FILE
        try:
            d = json.loads(path.read_text())
            info = VersionInfo(int(d["version"]), str(d["sha256"]), str(d["created"]), dict(d.get("meta") or {}),
                               int(d.get("size", 0)), str(d.get("manifest_sha256", "")))
            if info.version != version or not re.fullmatch(r"[0-9a-f]{64}", info.sha256):
                raise ValueError("inconsistent record")
        except FileNotFoundError:
            raise VersionNotFound(f"model version {version} not found") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptVersionError(f"record of model version {version} is unreadable ({type(e).__name__})") from None
        self._cache[version] = info
        return info

    def versions(self) -> list[VersionInfo]:
        """Every committed version, oldest first (a version whose record is unreadable is skipped; reading
        it with :meth:`get` names the problem)."""
        out = []
        for v in self._numbers():
            try:
                out.append(self._record(v))
            except StoreError:
                continue
        return out

    def latest(self) -> VersionInfo | None:
        """The newest version, or ``None`` for an empty store; :class:`CorruptVersionError` when its record
        is unreadable (an older version is never passed off as the latest)."""
        nums = self._numbers()
        return self._record(nums[-1]) if nums else None

    def _latest_sha(self, version: int) -> str | None:
        """SHA-256 of ``version``, or None when its record is damaged (a new version may replace it)."""
        try:
            return self._record(version).sha256
        except StoreError:
            return None

    def get(self, version: int) -> VersionInfo:
        """The record of ``version``; :class:`VersionNotFound` if absent."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise VersionNotFound(f"model version {version!r} not found (versions are numbered from 1)")
        return self._record(version)

    def model_bytes(self, version: int) -> bytes:
        """The bytes of ``model.safetensors`` of ``version``, verified against its recorded SHA-256."""
        info = self.get(version)
        try:
            data = (self._dir(version) / MODEL_FILE).read_bytes()
        except OSError as e:
            raise CorruptVersionError(f"model version {version} is unreadable: {e.strerror or e}") from None
        if sha256_hex(data) != info.sha256:
            raise CorruptVersionError(
                f"model version {version} is corrupted: SHA-256 of {MODEL_FILE} does not match its record"
            )
        return data

    def manifest_bytes(self, version: int) -> bytes:
        """The bytes of ``model.json`` of ``version``, verified against its recorded hash."""
        info = self.get(version)
        try:
            data = (self._dir(version) / MANIFEST_FILE).read_bytes()
        except OSError as e:
            raise CorruptVersionError(f"manifest of model version {version} is unreadable: {e.strerror or e}") from None
        if info.manifest_sha256 and sha256_hex(data) != info.manifest_sha256:
            raise CorruptVersionError(f"manifest of model version {version} is corrupted (hash mismatch)")
        return data

    def manifest(self, version: int) -> dict:
        return json.loads(self.manifest_bytes(version))

    def verify(self) -> list[int]:
        """Re-hash every version; return the numbers of the intact ones (raises on the first bad one)."""
        for v in self._numbers():
            self.model_bytes(v)
            self.manifest_bytes(v)
        return self._numbers()

    def export(self, version: int, dest_dir: str | os.PathLike, *, force: bool = False) -> Path:
        """Write ``version`` as a model directory (``model.safetensors`` + ``model.json``) that
        ``fedtensor.nn.load_model`` / ``--model DIR`` accepts; returns ``dest_dir``.

        An existing model in ``dest_dir`` is replaced only with ``force`` (or if it is the same model)."""
        from fedtensor.serve.client import write_model_dir

        return write_model_dir(Path(dest_dir), self.model_bytes(version), self.manifest_bytes(version),
                               self.get(version).sha256, force=force)

    # -- writing -----------------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Remove temporaries of publishes that crashed (called with the lock held)."""
        for entry in os.scandir(self.vdir):
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry.path, ignore_errors=True)

    def publish(self, model_bytes: bytes, manifest: dict | None = None, meta: dict | None = None, *,
                base_version: int | None = None, new_model: bool = False) -> VersionInfo:
        """Store ``model_bytes`` as the next version; returns its record.

        ``manifest`` becomes ``model.json`` (its ``model_id`` is set to the SHA-256 of the bytes; a different
        ``model_id`` already in it is an error). ``meta`` is free-form JSON (round, clients, losses, ...).
        :class:`PublishConflict` unless ``base_version`` (when given) is still the latest version, or when
        ``new_model`` and these bytes already are the latest: both are checked under the publish lock, so
        two publishers based on the same version cannot both succeed.
        """
        if not isinstance(model_bytes, (bytes, bytearray, memoryview)) or len(model_bytes) == 0:
            raise StoreError("model bytes are empty")
        model_bytes = bytes(model_bytes)
        sha = sha256_hex(model_bytes)
        try:  # strict JSON: a non-finite figure is null (clients' parsers refuse NaN and Infinity)
            manifest, meta_d = _plain(dict(manifest or {})), _plain(meta or {})
        except (TypeError, ValueError) as e:
            raise StoreError(f"manifest and meta must be JSON objects ({e})") from None
        if not isinstance(meta_d, dict):
            raise StoreError("meta must be a JSON object")
        if manifest.get("model_id") not in (None, sha):
            raise StoreError("manifest model_id does not match the SHA-256 of the model bytes")
        if self.validate:
            arch = check_model_bytes(model_bytes)
            for key in ("format", "version", "net"):  # the weights' own architecture is the truth
                if key in manifest and manifest[key] != arch.get(key):
                    raise StoreError(f"the manifest's {key!r} contradicts the model file's own metadata")
                manifest[key] = arch.get(key)
        manifest["model_id"] = sha
        try:
            manifest_data = json.dumps(_plain(manifest), indent=2, sort_keys=True, allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise StoreError(f"the model's own metadata is not plain JSON ({e})") from None
        with self._exclusive():
            self._sweep()
            nums = self._numbers()
            current = nums[-1] if nums else 0
            if base_version is not None and base_version != current:
                raise PublishConflict(f"stale publish: base_version {base_version} is not the latest version "
                                      f"({current or 'none'})")
            if new_model and current and self._latest_sha(current) == sha:
                raise PublishConflict(f"this model is already the latest version ({current}); not published again")
            version = current + 1
            info = VersionInfo(version, sha, utc_now(), meta_d, len(model_bytes), sha256_hex(manifest_data))
            tmp = self.vdir / f".tmp-{os.getpid()}-{threading.get_ident()}-{version}"
            try:
                tmp.mkdir()
                _write_synced(tmp / MODEL_FILE, model_bytes)
                _write_synced(tmp / MANIFEST_FILE, manifest_data)
                _write_synced(tmp / VERSION_FILE, json.dumps(info.to_dict(), indent=2, sort_keys=True).encode())
                fsync_path(tmp)
                os.rename(tmp, self._dir(version))  # the commit point
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StoreError(f"cannot publish model version {version}: {e.strerror or e}") from None
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_path(self.vdir)
        self._cache[version] = info
        return info
