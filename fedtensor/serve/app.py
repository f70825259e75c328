"""The Flask application factory of ``fedtensor serve``: the weights API (``/api/v1``) and, when the
module exists, the web interface (:mod:`fedtensor.serve.web`, mounted at ``/``).

Everything lives in the data directory (created 0700 if missing)::

    DATA/versions/      the model store (see :mod:`fedtensor.serve.store`)
    DATA/clients.json   client names, ids and token hashes (0600)
    DATA/rounds.json    secure-aggregation round history (0600)
    DATA/secret_key     Flask's SECRET_KEY, random per data directory (0600)

``app.extensions`` holds ``fedtensor_store`` (:class:`ModelStore`), ``fedtensor_auth``
(:class:`TokenRegistry`) and ``fedtensor_rounds`` (:class:`RoundCoordinator`).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path

from flask import Flask, jsonify, request
from werkzeug.exceptions import BadRequest, Forbidden, HTTPException, InternalServerError

from fedtensor.errors import FedtensorError
from fedtensor.io.atomic import NO_HARD_LINKS
from fedtensor.serve.api import ApiError
from fedtensor.serve.api import bp as api_bp
from fedtensor.serve.auth import TokenFileError, TokenRegistry
from fedtensor.serve.rounds import MAX_STAGE_TIMEOUT, RoundCoordinator, RoundError, RoundSettings, valid_stage_timeout
from fedtensor.serve.store import CorruptVersionError, ModelStore, StoreError, VersionNotFound

API_PREFIX = "/api/v1"
SECRET_FILE = "secret_key"
DEFAULT_MAX_CONTENT_LENGTH = 256 << 20  # bytes; a 1 M-parameter model is ~4 MB, its masked update too
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP")  # set by reverse proxies


def _secret_key(data_dir: Path) -> str:
    """The data directory's persistent secret (created once, 0600 from the start).

    Written whole to a private temporary file, then linked into place: a process starting at the same
    moment reads the winner's key, and a crash leaves no empty key file."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        key = secrets.token_hex(32)
        tmp = data_dir / f".{SECRET_FILE}-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(key + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)  # fails if another process linked its key first: that one is read below
            return key
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in NO_HARD_LINKS:
                raise
            if not path.exists():  # no hard links here: check, then rename (a tiny window)
                os.replace(tmp, path)
                return key
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    key = path.read_text().strip()
    if len(key) < 32:
        raise FedtensorError(f"secret key file is damaged: {path} (delete it to make a new one)")
    return key


def _status_for(err: FedtensorError) -> int:
    if isinstance(err, RoundError):
        return err.status
    if isinstance(err, VersionNotFound):
        return 404
    if isinstance(err, (CorruptVersionError, TokenFileError)):
        return 500  # our own data is damaged: a server fault
    if isinstance(err, StoreError):
        return 400
    return 400


def _json_error(status: int, message: str, headers: dict | None = None):
    resp = jsonify(error=" ".join(str(message).split()), status=status)
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def host_name(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` → ``::1``, ``localhost:80`` →
    ``localhost`` (lower case)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_api() -> bool:
    return request.path == API_PREFIX or request.path.startswith(API_PREFIX + "/")


def create_app(data_dir: str | os.PathLike, *, config: dict | None = None) -> Flask:
    """The app for ``data_dir``. ``config`` entries override Flask's config; fedtensor's own keys:
    ``MAX_CONTENT_LENGTH`` (default 256 MiB), ``FEDTENSOR_ROUND_CLIP`` (0.5),
    ``FEDTENSOR_ROUND_MAX_TOTAL_WEIGHT`` (2^14), ``FEDTENSOR_ROUND_STAGE_TIMEOUT`` (600 s; None = none),
    ``FEDTENSOR_WEB`` (False: the unauthenticated web pages, for a loopback server only) and
    ``FEDTENSOR_ALLOWED_HOSTS`` (host names the app answers)."""
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise FedtensorError(f"data directory is not a directory: {data_dir}")
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise FedtensorError(f"cannot create the data directory {data_dir}: {e.strerror or e}") from None

    app = Flask(__name__)
    settings = RoundSettings()
    app.config.update(
        MAX_CONTENT_LENGTH=DEFAULT_MAX_CONTENT_LENGTH,
        SECRET_KEY=_secret_key(data_dir),
        FEDTENSOR_DATA_DIR=str(data_dir),
        FEDTENSOR_ROUND_CLIP=settings.clip,
        FEDTENSOR_ROUND_MAX_TOTAL_WEIGHT=settings.max_total_weight,
        FEDTENSOR_ROUND_STAGE_TIMEOUT=settings.stage_timeout,
    )
    app.config.update(config or {})

    store = ModelStore(data_dir)
    registry = TokenRegistry(data_dir)
    settings = RoundSettings(clip=float(app.config["FEDTENSOR_ROUND_CLIP"]),
                             max_total_weight=int(app.config["FEDTENSOR_ROUND_MAX_TOTAL_WEIGHT"]),
                             stage_timeout=app.config["FEDTENSOR_ROUND_STAGE_TIMEOUT"])
    if not valid_stage_timeout(settings.stage_timeout):  # else every round opened with the default fails
        raise FedtensorError(f"the stage timeout must be a positive number of seconds below {MAX_STAGE_TIMEOUT:g}, "
                             f"or none; got {settings.stage_timeout!r}")
    app.extensions["fedtensor_store"] = store
    app.extensions["fedtensor_auth"] = registry
    app.extensions["fedtensor_rounds"] = RoundCoordinator(store, registry, data_dir, settings)
    app.register_blueprint(api_bp, url_prefix=API_PREFIX)
    # The web interface has no client authentication: it is for the local user, so it must be asked for
    # (`fedtensor serve` does on a loopback host); an app deployed as documented, under a WSGI server on a
    # public address, runs the authenticated API only.
    if app.config.get("FEDTENSOR_WEB", False) and importlib.util.find_spec("fedtensor.serve.web") is not None:
        from fedtensor.serve import web

        app.register_blueprint(web.bp)

    allowed = app.config.get("FEDTENSOR_ALLOWED_HOSTS")
    names = {str(h).lower() for h in allowed or ()}

    @app.before_request
    def _local_only():
        """The web pages (not the API: its bearer tokens are never sent by a browser on its own) are for
        the local user: not through a proxy, and, with allowed hosts set, not for a foreign page resolving
        its name to our address (DNS rebinding)."""
        if _is_api():
            return
        if any(h in request.headers for h in _PROXY_HEADERS):
            raise Forbidden("the web interface is for local use and is not served through a proxy")
        if names and host_name(request.host) not in names:
            raise BadRequest(f"requests must be addressed to {', '.join(sorted(names))}")

    # The API always answers JSON errors, never an HTML page or a stack trace.
    @app.errorhandler(ApiError)
    def _api_error(err: ApiError):
        return _json_error(err.status, err.message, err.headers)

    @app.errorhandler(FedtensorError)
    def _fedtensor_error(err: FedtensorError):
        status = _status_for(err)
        if status >= 500:
            app.logger.error("%s: %s", type(err).__name__, err)
        if isinstance(err, TokenFileError):  # its message names a server path: for the log only
            err = FedtensorError("the server's token file is damaged (see the server log)")
        if _is_api():
            return _json_error(status, str(err))
        return " ".join(str(err).split()), status, {"Content-Type": "text/plain; charset=utf-8"}

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        if not _is_api():
            return err
        return _json_error(err.code or 500, err.description or err.name)

    @app.errorhandler(Exception)
    def _internal(err: Exception):
        app.logger.exception("internal error on %s %s", request.method, request.path)
        if _is_api():
            return _json_error(500, "internal server error (see the server log)")
        return InternalServerError()

    return app
