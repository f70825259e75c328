"""Atomic file output: write to a temporary file in the target directory, fsync, then rename.

A reader never sees a half-written output, and a failed write (exception, full disk, Ctrl-C) leaves
neither a partial output nor a stray temporary file behind. An existing output is never overwritten
unless ``force=True``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator

from fedtensor.errors import FedtensorError

#: Called before every commit (the rename onto the output); one that raises stops it, the temp file
#: removed. The CLI adds one that raises once Ctrl-C was pressed: an interrupt Python had to swallow
#: (one arriving inside a garbage-collection callback) must not end in a written output.
BEFORE_COMMIT: list[Callable[[], None]] = []

_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def _full_suffix(name: str) -> str:
    """``.nii.gz`` for ``ct.nii.gz``, ``.npy`` for ``a.npy``: what format sniffers look at."""
    p = Path(name)
    if p.suffix.lower() in _COMPRESSED_SUFFIXES and len(p.suffixes) >= 2:
        return "".join(p.suffixes[-2:])
    return p.suffix


def _check_target(path: Path, force: bool) -> None:
    parent = path.parent
    if path.is_dir():
        raise FedtensorError(f"output path is a directory: {path}")
    if path.exists() or path.is_symlink():
        if not force:
            raise FedtensorError(f"output exists: {path} (use --force to overwrite)")
    if not parent.exists():
        raise FedtensorError(f"output directory does not exist: {parent}")
    if not parent.is_dir():
        raise FedtensorError(f"output directory is not a directory: {parent}")


def _create_temp(path: Path) -> Path:
    """Create (O_EXCL) an empty temp file next to ``path``; its mode honours the umask like open().

    Its suffix is ``path``'s in lower case: writers that pick a format by suffix would otherwise rename
    it (nibabel writes ``x.tmp.Nii.gz``'s data to ``x.tmp.nii.gz``), leaving the temp file empty."""
    suffix = _full_suffix(path.name)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    suffix = suffix.lower()
    for _ in range(100):
        # the stem cut to 200 characters: a name near the 255-byte limit still has room for the rest
        tmp = path.parent / f".{stem[:200]}.{secrets.token_hex(6)}.tmp{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except PermissionError:
            raise FedtensorError(f"cannot write to {path.parent}: permission denied") from None
        except OSError as e:
            raise FedtensorError(f"cannot write {path}: {e.strerror or e}") from None
        os.close(fd)
        return tmp
    raise FedtensorError(f"cannot create a temporary file in {path.parent}")  # pragma: no cover


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(d: Path) -> None:
    """Best effort: make the rename itself durable (not supported on every OS/filesystem)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
    except OSError:  # pragma: no cover - nothing more we can do
        pass


#: What ``os.link`` fails with on a filesystem (or between two) without hard links: vfat, some SMB mounts.
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


def _commit(tmp: Path, path: Path, force: bool) -> None:
    """Move ``tmp`` onto ``path``; without ``force`` refuse (atomically where possible) to clobber."""
    if force:
        os.replace(tmp, path)
        return
    try:
        # link() fails if path exists: no window in which another writer's file gets replaced.
        os.link(tmp, path)
    except FileExistsError:
        raise FedtensorError(f"output exists: {path} (use --force to overwrite)") from None
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        # Filesystem without hard links: check-then-replace (tiny race window).
        if path.exists():
            raise FedtensorError(f"output exists: {path} (use --force to overwrite)") from None
        os.replace(tmp, path)
        return
    _unlink_quietly(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = False, allow_empty: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, e.g. ``.nii.gz``) to write the output to.

    On normal exit the temp file is fsync'ed and renamed onto ``path`` (``os.replace``); on any
    exception it is removed and the exception propagates unchanged. Raises :class:`FedtensorError`
    (one line) if ``path`` exists and ``force`` is false, if its directory is missing, or if the
    directory is not writable, or (unless ``allow_empty``) if nothing was written to the temp file.
    """
    path = Path(path)
    _check_target(path, force)
    tmp = _create_temp(path)
    try:
        yield tmp
    except BaseException:
        _unlink_quietly(tmp)
        raise
    try:
        if not tmp.exists() or (tmp.stat().st_size == 0 and not allow_empty):
            raise FedtensorError(f"nothing was written to the temporary file for {path}")
        _fsync_file(tmp)
        for check in BEFORE_COMMIT:
            check()
        _commit(tmp, path, force)
    except OSError as e:
        _unlink_quietly(tmp)
        raise FedtensorError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, force: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    path = Path(path)
    with atomic_path(path, force=force, allow_empty=not data) as tmp:
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
        except OSError as e:
            raise FedtensorError(f"cannot write {path}: {e.strerror or e}") from None
    return path


@contextlib.contextmanager
def locked(path: str | os.PathLike, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (a lock file, created if needed, or a directory) while the
    block runs, against other processes. Yields True; with ``wait=False`` yields False at once when another
    process holds it (and the block runs unlocked: the caller decides).

    A directory on a filesystem that cannot lock one (NFS emulates ``flock`` with write locks, which a
    directory opened read-only cannot take) is not locked: the block runs, unprotected, as before."""
    import fcntl

    p = Path(path)
    directory = p.is_dir()
    fd = os.open(p, os.O_RDONLY) if directory else os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:
            if not directory:
                raise
        yield True
    finally:
        os.close(fd)  # releases the lock
