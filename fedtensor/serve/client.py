"""A small client of the global-weights service (standard library HTTP: ``urllib``).

* :func:`fetch_model` — download the latest (or a given) version into a model directory that
  ``fedtensor decompress --model DIR`` and :func:`fedtensor.nn.load_model` accept;
* :func:`publish_model` — publish a model directory (or model bytes) as the next version (admin token);
* :class:`RoundParticipant` — one client's side of a secure-aggregation round over HTTP.

Every download is checked three ways: the SHA-256 of the bytes, the ``X-Model-Sha256`` header and the
version record must agree (and the manifest's ``model_id`` too), or :class:`ServiceError` is raised and
nothing is written. ``url`` is the server's base address, e.g. ``http://127.0.0.1:8000``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from fedtensor.errors import FedtensorError

API = "/api/v1"
MODEL_FILE, MANIFEST_FILE = "model.safetensors", "model.json"


class ServiceError(FedtensorError):
    """The service refused a request (``status`` is its HTTP code; 0 when it could not be reached), or
    sent something that fails verification."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class Transport(Protocol):
    """Anything that can send one request to the API: ``(status, lower-case headers, body)``."""

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]: ...


def api_base(url: str) -> str:
    """``http://host:port`` from a base URL, tolerating a trailing ``/`` or ``/api/v1``."""
    u = url.rstrip("/")
    if u.endswith(API):
        u = u[: -len(API)]
    if not u.startswith(("http://", "https://")):
        raise ServiceError(f"service URL must start with http:// or https://, got {url!r}")
    try:
        parts = urllib.parse.urlsplit(u)
        parts.port  # noqa: B018 — raises on a port that is not a number in 0…65535
    except ValueError as err:
        raise ServiceError(f"bad service URL {url!r}: {err}") from None
    if not parts.hostname:
        raise ServiceError(f"bad service URL {url!r}: no host")
    return u


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # the 3xx comes back as an HTTPError: urllib would resend the token to any address


_OPENER = urllib.request.build_opener(_NoRedirect)


class HttpTransport:
    """:class:`Transport` over ``urllib`` with a bearer token. Redirects are refused, not followed:
    ``urllib`` would send the token on to whatever address (or plain-HTTP scheme) one names."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        self.base, self.token, self.timeout = api_base(url), token, timeout

    def request(self, method, path, body=None, headers=None):
        h = dict(headers or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.base + API + path, data=body, method=method, headers=h)
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as err:
            with err:
                if 300 <= err.code < 400:
                    raise ServiceError(f"the weights service at {self.base} redirected to {err.headers.get('Location')!r}: "
                                       "not followed (the token goes to the given address only; give the final one)",
                                       err.code) from None
                return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ServiceError(f"cannot reach the weights service at {self.base}: {reason}") from None


def _transport(url: str | None, token: str | None, transport: Transport | None) -> Transport:
    if transport is not None:
        return transport
    if url is None:
        raise ServiceError("no service URL given")
    return HttpTransport(url, token)


def _check(resp: tuple[int, dict, bytes], what: str) -> tuple[int, dict, bytes]:
    status, headers, body = resp
    if status >= 400:
        try:
            msg = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            msg = body[:200].decode("utf-8", "replace").strip() or "no details"
        raise ServiceError(f"{what}: HTTP {status}: {msg}", status)
    return resp


def _json(resp: tuple[int, dict, bytes], what: str) -> dict:
    try:
        d = json.loads(_check(resp, what)[2])
        if not isinstance(d, dict):
            raise ValueError
        return d
    except (ValueError, RecursionError):
        raise ServiceError(f"{what}: the service sent malformed JSON") from None


# ------------------------------------------------------------------------------------------ models


def write_model_dir(dest: Path, model_bytes: bytes, manifest_bytes: bytes, sha256: str, *, force: bool = False) -> Path:
    """Write a verified model directory (model.safetensors, then model.json) into ``dest``.

    Refuses (unless ``force``) to replace a different model already there; the same model is a no-op."""
    from fedtensor.io.atomic import atomic_write_bytes

    if hashlib.sha256(model_bytes).hexdigest() != sha256:
        raise ServiceError("downloaded model does not match its SHA-256 (corrupted in transit or at rest)")
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError:
        raise ServiceError("downloaded model.json is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("model_id") != sha256:
        raise ServiceError("downloaded model.json names another model id")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FedtensorError(f"model destination is not a directory: {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    old = dest / MODEL_FILE
    if old.exists():
        if hashlib.sha256(old.read_bytes()).hexdigest() == sha256:  # these weights: at most the manifest to do
            try:
                if json.loads((dest / MANIFEST_FILE).read_text()).get("model_id") == sha256:
                    return dest
            except (OSError, ValueError, AttributeError):
                pass  # an interrupted fetch of this model (the weights are written first): completed below
        elif not force:
            raise FedtensorError(f"{dest} already holds another model (use --force to overwrite)")
    atomic_write_bytes(dest / MODEL_FILE, model_bytes, force=True)
    atomic_write_bytes(dest / MANIFEST_FILE, manifest_bytes, force=True)
    return dest


def model_info(url: str | None, token: str | None, version: int | None = None, *,
               transport: Transport | None = None) -> dict:
    """The record of ``version`` (default: the latest)."""
    t = _transport(url, token, transport)
    ref = "latest" if version is None else str(int(version))
    return _json(t.request("GET", f"/models/{ref}"), f"model version {ref}")


def fetch_model(url: str | None, token: str | None, dest_dir: str | os.PathLike, version: int | None = None, *,
                force: bool = False, transport: Transport | None = None) -> Path:
    """Download ``version`` (default: the latest) into ``dest_dir`` as a model directory; returns it.

    The bytes are verified against the SHA-256 in the version record and the ``X-Model-Sha256`` header."""
    t = _transport(url, token, transport)
    info = model_info(url, token, version, transport=t)
    v, sha = info.get("version"), info.get("sha256")
    if not (isinstance(v, int) and v >= 1 and isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha)):
        raise ServiceError("the service's version record is malformed (no version number or SHA-256)")
    if version is not None and v != version:
        raise ServiceError(f"asked for model version {version}, the service answered with version {v}")
    _, h, data = _check(t.request("GET", f"/models/{v}/{MODEL_FILE}"), f"model version {v}")
    if h.get("x-model-sha256") != sha:
        raise ServiceError(f"model version {v}: the X-Model-Sha256 header disagrees with the version record")
    _, _, manifest = _check(t.request("GET", f"/models/{v}/{MANIFEST_FILE}"), f"manifest of version {v}")
    return write_model_dir(Path(dest_dir), data, manifest, sha, force=force)


def _multipart(fields: dict[str, tuple[str | None, bytes, str]]) -> tuple[bytes, str]:
    """multipart/form-data body: ``name → (filename or None, data, content type)``."""
    boundary = "fedtensor-" + secrets.token_hex(16)
    out = []
    for name, (filename, data, ctype) in fields.items():
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: {ctype}\r\n\r\n".encode())
        out.append(data)
        out.append(b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def publish_model(url: str | None, admin_token: str | None, model_dir_or_bytes: str | os.PathLike | bytes,
                  meta: dict | None = None, *, manifest: dict | None = None, base_version: int | None = None,
                  transport: Transport | None = None) -> dict:
    """Publish a model directory (verified against its manifest) or raw ``model.safetensors`` bytes as the
    next version; returns the new version's record (checked against the SHA-256 sent).

    ``base_version``: refuse (HTTP 409) unless it is still the latest version (optimistic concurrency)."""
    if isinstance(model_dir_or_bytes, (bytes, bytearray, memoryview)):
        data, man = bytes(model_dir_or_bytes), dict(manifest or {})
    else:
        from fedtensor.nn.checkpoint import read_model_bytes

        data, _, man = read_model_bytes(Path(model_dir_or_bytes))
        man = {**man, **(manifest or {})}
    sha = hashlib.sha256(data).hexdigest()
    fields = {"model": (MODEL_FILE, data, "application/octet-stream"), "sha256": (None, sha.encode(), "text/plain"),
              "manifest": (None, json.dumps(man).encode(), "application/json"),
              "meta": (None, json.dumps(meta or {}).encode(), "application/json")}
    if base_version is not None:
        fields["base_version"] = (None, str(int(base_version)).encode(), "text/plain")
    body, ctype = _multipart(fields)
    t = _transport(url, admin_token, transport)
    info = _json(t.request("POST", "/models", body, {"Content-Type": ctype}), "publish")
    if info.get("sha256") != sha:
        raise ServiceError("the service recorded another SHA-256 than the one sent")
    return info


# ------------------------------------------------------------------------------------------ rounds


class RoundParticipant:
    """One client's side of a secure-aggregation round (see :mod:`fedtensor.serve.rounds`).

    Step by step — :meth:`join` (AdvertiseKeys), :meth:`share`, :meth:`mask`, :meth:`unmask`; each of the
    last three returns ``False`` while the server's broadcast for it is not ready yet (call again later) —
    or all at once with :meth:`run`. The update sent is a flat delta (see :func:`~.rounds.model_delta`),
    clipped to the round's ``clip``, with the client's sample count as its FedAvg weight."""

    def __init__(self, url: str | None = None, token: str | None = None, *, transport: Transport | None = None):
        self.t = _transport(url, token, transport)
        self.me = _json(self.t.request("GET", "/whoami"), "whoami")
        self.info: dict | None = None
        self.clipped = 0

    @property
    def round(self) -> int:
        if self.info is None:
            raise FedtensorError("join a round first")
        return int(self.info["round"])

    def current(self) -> dict:
        return _json(self.t.request("GET", "/rounds/current"), "current round")

    def _post(self, stage: str, msg) -> dict:
        from fedtensor.federated.secagg import encode

        return _json(self.t.request("POST", f"/rounds/{self.round}/{stage}", encode(msg),
                                    {"Content-Type": "application/octet-stream"}), f"round {self.round} {stage}")

    def _get(self, stage: str):
        from fedtensor.federated.secagg import decode

        status, _, body = _check(self.t.request("GET", f"/rounds/{self.round}/{stage}"), f"round {self.round} {stage}")
        return None if status == 202 else decode(body)

    def join(self, info: dict | None = None) -> dict:
        """Take part in the open round (default: the current one): send this client's public keys."""
        from fedtensor.federated.secagg import SecAggClient, SecAggError
        from fedtensor.serve.rounds import MIN_ROUND_CLIENTS, params_from_info

        info = info or self.current()
        if info.get("status") != "open" or info.get("stage") != "advertise":
            raise ServiceError(f"round {info.get('round')} is not accepting clients (stage {info.get('stage')})", 409)
        try:  # the parameters refuse what would expose this client (e.g. a threshold of half the cohort)
            params = params_from_info(info)
            if params.threshold < MIN_ROUND_CLIENTS:
                raise SecAggError(f"a threshold of {params.threshold} would publish the sum of two clients")
        except SecAggError as err:
            raise ServiceError(f"round {info.get('round')} cannot be joined safely: {err}", 409) from None
        self.info = info
        self.sa = SecAggClient(int(self.me["id"]), params)
        return self._post("advertise", self.sa.advertise_keys())

    def share(self) -> bool:
        kb = self._get("share")
        if kb is None:
            return False
        self._post("share", self.sa.share_keys(kb))
        return True

    def mask(self, delta: np.ndarray, weight: int) -> bool:
        fwd = self._get("masked")
        if fwd is None:
            return False
        clip = self.sa.params.fixed_point.clip
        d = np.asarray(delta, dtype=np.float64).reshape(-1)
        self.clipped = int(np.count_nonzero(np.abs(d) > clip))
        self._post("masked", self.sa.mask_input(fwd, np.clip(d, -clip, clip), int(weight)))
        return True

    def unmask(self) -> bool:
        req = self._get("unmask")
        if req is None:
            return False
        self._post("unmask", self.sa.unmask(req))
        return True

    def run(self, update_fn: Callable[[Path], tuple[np.ndarray, int]], workdir: str | os.PathLike, *,
            poll: float = 1.0, timeout: float = 3600.0) -> dict:
        """Fetch the round's base model into ``workdir``, compute ``(delta, weight) = update_fn(model_dir)``,
        take part in every stage, and return the round's final status."""
        info = self.current()
        base = fetch_model(None, None, Path(workdir) / f"base-v{info['base_version']}", info["base_version"],
                           force=True, transport=self.t)
        delta, weight = update_fn(base)
        self.join(info)
        end = time.monotonic() + timeout
        for step in (self.share, lambda: self.mask(delta, weight), self.unmask):
            while not step():
                if time.monotonic() > end:
                    raise ServiceError(f"round {self.round} timed out waiting for the other clients")
                time.sleep(poll)
        while True:
            info = self.current()
            if info.get("round") != self.round or info.get("status") != "open":
                return info
            if time.monotonic() > end:
                raise ServiceError(f"round {self.round} timed out waiting for the other clients")
            time.sleep(poll)
