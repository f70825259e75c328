"""Per-client bearer tokens, stored hashed.

A token is 32 random bytes (``secrets.token_urlsafe(32)``, shown once when it is made); the server keeps
only its SHA-256 (a 256-bit random secret needs no slow password hash) in ``DATA/clients.json`` (mode
0600, written atomically). Each client also gets a numeric id — its identity in secure aggregation.
The admin token (role ``admin``) may publish versions and open and close rounds.

Lookups hash the presented token and compare it with *every* stored hash by ``hmac.compare_digest``,
so timing does not reveal which (or how much of a) hash matched. The file is re-read when it changes, so
``fedtensor serve --add-client`` takes effect on a running server.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fedtensor.errors import FedtensorError
from fedtensor.io.atomic import locked
from fedtensor.serve.store import fsync_path, utc_now

CLIENTS_FILE = "clients.json"
ADMIN = "admin"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_CLIENT_ID = 2**31 - 1  # secure-aggregation client ids are ints in [1, 2^31)


class AuthError(FedtensorError):
    """Bad client name, unknown client, unreadable token file."""


class TokenFileError(AuthError):
    """The token file is damaged: a fault of the server, not of the request (a 500 that names no path)."""


@dataclass(frozen=True)
class Principal:
    """Who a valid token belongs to."""

    name: str
    id: int  # secure-aggregation client id (0 for the admin)
    role: str  # "client" or "admin"

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` by ``data``, readable by the owner only (0600 from creation on)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself survives a power loss only once its directory is synced


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_client_name(name) -> None:
    """:class:`AuthError` unless ``name`` can name a client: 1-64 letters, digits, '.', '_' or '-'."""
    if not isinstance(name, str) or not _NAME.match(name) or name == ADMIN:
        raise AuthError(f"invalid client name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (and not {ADMIN!r})")


class TokenRegistry:
    """The clients of one data directory and their hashed tokens."""

    def __init__(self, data_dir: str | os.PathLike):
        self.path = Path(data_dir) / CLIENTS_FILE
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._entries: dict[str, dict] = {}

    # -- file --------------------------------------------------------------------------------------

    def _load(self) -> dict[str, dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._entries = None, {}
            return self._entries
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                d = json.loads(self.path.read_text())
                entries = d["clients"]
                if not isinstance(entries, dict):
                    raise ValueError
            except (OSError, ValueError, KeyError, TypeError):
                raise TokenFileError(f"token file is unreadable: {self.path}") from None
            self._stamp, self._entries = stamp, entries
        return self._entries

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The registry's read-modify-write, one at a time: across threads, and across processes (two
        ``fedtensor serve --add-client`` at once, or one beside a running server) by ``flock``, so that no
        registration or revocation is lost to another's write."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds the token file
        with self._lock, locked(self.path.parent / ".clients.lock"):
            yield

    def _save(self, entries: dict[str, dict]) -> None:
        write_private(self.path, json.dumps({"clients": entries}, indent=2, sort_keys=True).encode())
        self._stamp = None

    # -- management --------------------------------------------------------------------------------

    def clients(self) -> list[Principal]:
        """Every principal with a valid token (clients and the admin), by id."""
        with self._lock:
            entries = self._load()
        return sorted((Principal(n, int(e["id"]), e.get("role", "client")) for n, e in entries.items() if e.get("sha256")),
                      key=lambda p: p.id)

    def add_client(self, name: str) -> tuple[Principal, str]:
        """Register client ``name`` (new, or revoked before); returns it and its new token (the only time the
        token is seen)."""
        check_client_name(name)
        with self._exclusive():
            entries = dict(self._load())
            if name in entries and not entries[name].get("revoked"):
                raise AuthError(f"client {name!r} already exists (remove it first to issue a new token)")
            # a revoked name may come back, always under a new id (ids are never reused)
            cid = max([int(e["id"]) for e in entries.values()] + [0]) + 1
            if cid > MAX_CLIENT_ID:
                raise AuthError("no client ids left")
            token = secrets.token_urlsafe(32)
            entries[name] = {"id": cid, "role": "client", "sha256": hash_token(token), "created": utc_now()}
            self._save(entries)
        return Principal(name, cid, "client"), token

    def set_admin(self) -> str:
        """Issue a new admin token (replacing any previous one); returns it."""
        with self._exclusive():
            entries = dict(self._load())
            token = secrets.token_urlsafe(32)
            entries[ADMIN] = {"id": 0, "role": ADMIN, "sha256": hash_token(token), "created": utc_now()}
            self._save(entries)
        return token

    def remove(self, name: str) -> None:
        """Revoke ``name``'s token (its client id is never reused)."""
        with self._exclusive():
            entries = dict(self._load())
            if name not in entries:
                raise AuthError(f"no client named {name!r}")
            # keep a tombstone so ids stay unique: a revoked id must never map to a new client
            entries[name] = {**entries[name], "sha256": "", "revoked": utc_now()}
            self._save(entries)

    # -- checking ----------------------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal holding ``token``, or ``None``."""
        if not token:
            return None
        digest = hash_token(token)
        with self._lock:
            entries = self._load()
        found = None
        for name, e in entries.items():  # no early exit: constant work per lookup
            stored = e.get("sha256") or ""
            if hmac.compare_digest(stored.encode(), digest.encode()) and stored:
                found = Principal(name, int(e["id"]), e.get("role", "client"))
        return found

    def by_id(self, cid: int) -> Principal | None:
        for p in self.clients():
            if p.id == cid:
                return p
        return None
