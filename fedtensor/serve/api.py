"""The JSON/bytes API of the global-weights service (a Flask blueprint, mounted at ``/api/v1``).

Every route but ``/health`` needs ``Authorization: Bearer <token>``: a client token for reads and round
messages, the admin token for publishing and for opening/closing rounds. See ``docs/serve.md``.
"""

from __future__ import annotations

import functools
import json
import math
import re

from flask import Blueprint, Response, current_app, g, jsonify, request, url_for

from fedtensor.serve.auth import Principal
from fedtensor.serve.rounds import STAGES, RoundError

bp = Blueprint("fedtensor_api", __name__)

SHA_HEADER = "X-Model-Sha256"


class ApiError(Exception):
    """An HTTP error with a one-line message; rendered as ``{"error": ..., "status": ...}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _store():
    return current_app.extensions["fedtensor_store"]


def _rounds():
    return current_app.extensions["fedtensor_rounds"]


def bearer_token() -> str | None:
    h = request.headers.get("Authorization", "")
    scheme, _, token = h.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require(admin: bool = False):
    """Route decorator: a valid token (the admin's if ``admin``), else 401 / 403. Sets ``g.principal``."""

    def deco(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            token = bearer_token()
            if token is None:
                raise ApiError(401, "authentication required: send 'Authorization: Bearer <token>'",
                               {"WWW-Authenticate": 'Bearer realm="fedtensor"'})
            who = current_app.extensions["fedtensor_auth"].authenticate(token)
            if who is None:
                raise ApiError(401, "invalid or revoked token",
                               {"WWW-Authenticate": 'Bearer realm="fedtensor", error="invalid_token"'})
            if admin and not who.is_admin:
                raise ApiError(403, "this needs the admin token")
            g.principal = who
            return view(*args, **kwargs)

        return wrapper

    return deco


def _version_json(info) -> dict:
    d = info.to_dict()
    d["urls"] = {"model": url_for(".model_file", version=info.version),
                 "manifest": url_for(".manifest_file", version=info.version)}
    return d


def _resolve(version: int | str):
    store = _store()
    if version == "latest":
        info = store.latest()
        if info is None:
            raise ApiError(404, "no model version has been published yet")
        return info
    return store.get(version)


def _bytes_response(data: bytes, mimetype: str, etag: str, sha: str, version: int) -> Response:
    resp = Response(data, mimetype=mimetype)
    resp.headers[SHA_HEADER] = sha
    resp.headers["X-Model-Version"] = str(version)
    resp.headers["Cache-Control"] = "private, max-age=31536000, immutable"  # versions never change
    resp.set_etag(etag)
    return resp.make_conditional(request)


# ------------------------------------------------------------------------------------------ models


@bp.get("/health")
def health():
    return jsonify(status="ok", api=1)


@bp.get("/whoami")
@require()
def whoami():
    p: Principal = g.principal
    return jsonify(name=p.name, id=p.id, role=p.role)


@bp.get("/models")
@require()
def list_models():
    vs = _store().versions()
    return jsonify(versions=[_version_json(v) for v in vs], latest=vs[-1].version if vs else None)


@bp.get("/models/latest")
@bp.get("/models/<int:version>")
@require()
def model_info(version: int | str = "latest"):
    return jsonify(_version_json(_resolve(version)))


@bp.get("/models/<int:version>/model.safetensors")
@require()
def model_file(version: int):
    info = _resolve(version)
    data = _store().model_bytes(info.version)  # re-hashed on every read
    return _bytes_response(data, "application/octet-stream", info.sha256, info.sha256, info.version)


@bp.get("/models/<int:version>/model.json")
@require()
def manifest_file(version: int):
    info = _resolve(version)
    data = _store().manifest_bytes(info.version)
    return _bytes_response(data, "application/json", info.manifest_sha256 or info.sha256, info.sha256, info.version)


@bp.before_request
def _refuse_malformed_length():
    """A Content-Length that is not a non-negative integer is a malformed request: Werkzeug reads it as
    "no body" (length 0), and a route would then act on defaults the client never asked for. (A chunked
    body's length, if any, is ignored, as Werkzeug ignores it.)"""
    length = request.headers.get("Content-Length")
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if length is not None and not chunked and not re.fullmatch(r"[0-9]+", length.strip()):
        raise ApiError(400, "malformed Content-Length header")


def _refuse_constant(token: str):
    raise ValueError(f"{token} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999: JSON's syntax, beyond a double's range
        raise ValueError(f"{text} is beyond the range of a double")
    return value


def _json_object(raw: str | bytes | None, what: str) -> dict:
    """``raw`` parsed as a JSON object ({} when empty). Strict JSON: NaN and Infinity (Python's extension)
    are refused, since they would be stored, then served to clients whose parsers refuse them, and so are
    numbers beyond a double's range (Python reads them as infinity)."""
    if raw is None or not raw.strip():
        return {}
    try:
        d = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise ApiError(400, f"{what} is not valid JSON (NaN, Infinity and numbers beyond a double's range "
                            "are refused)") from None
    if not isinstance(d, dict):
        raise ApiError(400, f"{what} must be a JSON object")
    return d


def _form_json(name: str) -> dict:
    return _json_object(request.form.get(name), f"form field {name!r}")


@bp.post("/models")
@require(admin=True)
def publish():
    """multipart/form-data: ``model`` (file, model.safetensors), ``sha256`` (its hex digest, required),
    optional ``manifest`` and ``meta`` (JSON objects) and ``base_version`` (409 unless still the latest)."""
    from fedtensor.serve.store import PublishConflict, sha256_hex

    if not request.mimetype == "multipart/form-data":
        raise ApiError(415, "send multipart/form-data with a 'model' file and its 'sha256'")
    f = request.files.get("model")
    if f is None:
        raise ApiError(400, "missing the 'model' file field")
    data = f.read()
    want = (request.form.get("sha256") or "").strip().lower()
    if not want:
        raise ApiError(400, "missing the 'sha256' field (hex SHA-256 of the model file)")
    if sha256_hex(data) != want:
        raise ApiError(400, "the model file does not match the 'sha256' sent (corrupted upload)")
    manifest, meta = _form_json("manifest"), _form_json("meta")
    base = request.form.get("base_version")
    if base is not None and not re.fullmatch(r"[0-9]{1,9}", base.strip()):
        raise ApiError(400, "base_version must be a version number")
    try:
        info = _store().publish(data, manifest, meta, base_version=None if base is None else int(base),
                                new_model=True)
    except PublishConflict as err:
        raise ApiError(409, str(err)) from None
    resp = jsonify(_version_json(info))
    resp.status_code = 201
    resp.headers["Location"] = url_for(".model_info", version=info.version)
    return resp


# ------------------------------------------------------------------------------------------ rounds


def _round_error(err: RoundError):
    raise ApiError(err.status, str(err)) from None


@bp.post("/rounds")
@require(admin=True)
def open_round():
    """JSON (all optional): ``clients`` (names), ``threshold``, ``clip``, ``max_total_weight``,
    ``stage_timeout`` (seconds or null)."""
    # The whole body, however it was sent (a chunked one has no Content-Length): never defaults in its place.
    body = _json_object(request.get_data(cache=False), "the request body")
    allowed = {"clients", "threshold", "clip", "max_total_weight", "stage_timeout"}
    extra = sorted(set(body) - allowed)
    if extra:
        raise ApiError(400, f"unknown field(s): {', '.join(extra)}")
    for k in ("threshold", "max_total_weight"):
        if k in body and (isinstance(body[k], bool) or not isinstance(body[k], int)):
            raise ApiError(400, f"{k} must be an integer")
    if "clip" in body and (isinstance(body["clip"], bool) or not isinstance(body["clip"], (int, float))
                           or not 1e-6 <= body["clip"] <= 1e6):
        raise ApiError(400, "clip must be a number between 1e-6 and 1e6 (the bound on each update coordinate)")
    if "stage_timeout" in body and body["stage_timeout"] is not None and (
            isinstance(body["stage_timeout"], bool) or not isinstance(body["stage_timeout"], (int, float))):
        raise ApiError(400, "stage_timeout must be a positive number of seconds or null")  # ("default" is internal)
    kwargs = {k: body[k] for k in allowed if k in body}
    try:
        info = _rounds().open(**kwargs)
    except RoundError as err:
        _round_error(err)
    resp = jsonify(info)
    resp.status_code = 201
    return resp


@bp.get("/rounds")
@require()
def list_rounds():
    return jsonify(rounds=_rounds().history())


@bp.get("/rounds/current")
@require()
def current_round():
    try:
        return jsonify(_rounds().info())
    except RoundError as err:
        _round_error(err)


@bp.get("/rounds/<int:r>")
@require()
def round_info(r: int):
    try:
        return jsonify(_rounds().info(r))
    except RoundError as err:
        _round_error(err)


@bp.post("/rounds/<int:r>/close")
@require(admin=True)
def close_stage(r: int):
    try:
        return jsonify(_rounds().close_stage(r))
    except RoundError as err:
        _round_error(err)


@bp.post("/rounds/<int:r>/abort")
@require(admin=True)
def abort_round(r: int):
    try:
        return jsonify(_rounds().abort(r))
    except RoundError as err:
        _round_error(err)


@bp.post("/rounds/<int:r>/<stage>")
@require()
def submit(r: int, stage: str):
    """Body: one encoded secure-aggregation message (``fedtensor.federated.secagg.encode``)."""
    rounds = _rounds()
    if stage not in STAGES:
        raise ApiError(404, f"unknown round stage {stage!r}; stages are {', '.join(STAGES)}")
    try:
        limit = rounds.body_limit(r, stage)
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, f"{stage} message is larger than any valid one for round {r} ({limit} bytes)")
        body = request.stream.read(limit + 1)
        if len(body) > limit:
            raise ApiError(413, f"{stage} message is larger than any valid one for round {r} ({limit} bytes)")
        result = rounds.submit(r, stage, g.principal, body)
    except RoundError as err:
        _round_error(err)
    resp = jsonify(result)
    resp.status_code = 202
    return resp


@bp.get("/rounds/<int:r>/<stage>")
@require()
def broadcast(r: int, stage: str):
    """The server message a client needs for ``stage`` (encoded); 202 + JSON while it is not ready."""
    try:
        blob = _rounds().broadcast(r, stage, g.principal)
    except RoundError as err:
        _round_error(err)
    if blob is None:
        resp = jsonify(round=r, stage=stage, ready=False)
        resp.status_code = 202
        resp.headers["Retry-After"] = "1"
        return resp
    resp = Response(blob, mimetype="application/octet-stream")
    resp.headers["Cache-Control"] = "no-store"
    return resp
