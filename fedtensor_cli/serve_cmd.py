"""``fedtensor serve``: run the global-weights service, or manage its clients and versions;
``fedtensor fetch-model``: download a version from it into a model directory.

Wired into the app by ``register(app)``. The work is done by :mod:`fedtensor.serve`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtensor.errors import FedtensorError
from fedtensor_cli import render
from fedtensor_cli.errors import UsageFailure, cli_errors

DEFAULT_DATA = Path("fedtensor-serve")
TOKEN_ENV = "FEDTENSOR_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _print_token(what: str, token: str) -> None:
    # The token goes to stdout alone (easy to capture); the notice to stderr.
    print(f"{what} (shown once; store it safely, the server keeps only its hash):", file=sys.stderr)
    print(token, flush=True)


def read_token(token_file: Path | None) -> str | None:
    if token_file is not None:
        try:
            tok = token_file.read_text().strip()
        except OSError as e:
            raise UsageFailure(f"cannot read --token-file: {e.strerror or e}: {token_file}") from None
        if not tok:
            raise UsageFailure(f"--token-file is empty: {token_file}")
        return tok
    return os.environ.get(TOKEN_ENV) or None


def register(app: typer.Typer) -> None:
    """Add the ``serve`` and ``fetch-model`` commands to ``app``."""

    @app.command("serve")
    @cli_errors
    def serve(
        data: Annotated[Path, typer.Option("--data", "-d", metavar="DIR",
                                           help="Data directory: model versions, client token hashes, round history.")] = DEFAULT_DATA,
        host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free port).")] = 8000,
        allow_remote: Annotated[bool, typer.Option("--allow-remote",
                                                   help="Allow a non-loopback --host (plain HTTP: put a TLS proxy in front).")] = False,
        add_client: Annotated[Optional[list[str]], typer.Option("--add-client", metavar="NAME",
                                                                help="Register a client, print its token once, and exit (repeatable).")] = None,
        remove_client: Annotated[Optional[list[str]], typer.Option("--remove-client", metavar="NAME",
                                                                   help="Revoke a client's token and exit (repeatable).")] = None,
        list_clients: Annotated[bool, typer.Option("--list-clients", help="List the registered clients and exit.")] = False,
        admin_token: Annotated[bool, typer.Option("--admin-token",
                                                  help="Issue a new admin token (replacing the old one), print it once, and exit.")] = False,
        publish: Annotated[Optional[Path], typer.Option("--publish", metavar="MODEL_DIR",
                                                        help="Publish a model directory as the next version and exit.")] = None,
        meta: Annotated[Optional[str], typer.Option("--meta", metavar="JSON", help="With --publish: a JSON object stored with the version.")] = None,
        list_versions: Annotated[bool, typer.Option("--list", help="List the stored versions (hash-verified) and exit.")] = False,
        max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=1, help="Largest request body accepted.")] = 256,
        stage_timeout: Annotated[float, typer.Option("--stage-timeout", min=0,
                                                     help="Seconds a secure-aggregation stage waits for clients (0: until all arrive or the admin closes it).")] = 600,
        web: Annotated[bool, typer.Option("--web", help="Also serve the web interface at / (it has no authentication: "
                                                        "loopback hosts only, never behind a proxy).")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Management actions print one JSON object.")] = False,
    ) -> int | None:
        """Serve the global model versions over HTTP (API under /api/v1), or manage clients and versions.

        Clients authenticate with 'Authorization: Bearer TOKEN' (tokens from --add-client; --admin-token for publishing and rounds).

        Without a management option the server runs until Ctrl-C. It listens on 127.0.0.1 unless --host is given; a non-loopback host also needs --allow-remote, because tokens travel in clear over plain HTTP.
        """
        from fedtensor.serve.auth import AuthError, TokenRegistry, check_client_name
        from fedtensor.serve.store import ModelStore

        if data.exists() and not data.is_dir():
            raise UsageFailure(f"--data must be a directory: {data}")
        if meta is not None and publish is None:
            raise UsageFailure("--meta needs --publish")
        managing = bool(add_client or remove_client or list_clients or admin_token or publish or list_versions)
        for name in add_client or []:  # a bad name is a bad command line: refused before anything is written
            try:
                check_client_name(name)
            except AuthError as err:
                raise UsageFailure(str(err)) from None
        # --publish's inputs read before anything is written: a bad --meta or model directory after a new
        # token was issued lost the old one and never showed the new
        to_publish = None if publish is None else _read_publication(publish, meta)
        if managing:
            if not (add_client or admin_token or publish) and not data.is_dir():
                # reading (or revoking from) a store that is not there: a mistyped --data, not a new store
                raise FedtensorError(f"no weights store at {data} (it is created by --add-client, --admin-token, "
                                     "--publish or by serving)")
            data.mkdir(mode=0o700, parents=True, exist_ok=True)
            registry = TokenRegistry(data)
            out: dict = {"command": "serve", "data": str(data)}
            for name in remove_client or []:
                registry.remove(name)
                out.setdefault("removed", []).append(name)
                if not json_out:
                    print(f"revoked client {name}", file=sys.stderr)
            for name in add_client or []:
                who, token = registry.add_client(name)
                out.setdefault("added", []).append({"name": who.name, "id": who.id, "token": token})
                if not json_out:
                    _print_token(f"token of client {who.name} (id {who.id})", token)
            if admin_token:
                token = registry.set_admin()
                out["admin_token"] = token
                if not json_out:
                    _print_token("admin token", token)
            if publish is not None:
                out["published"] = ModelStore(data).publish(*to_publish).to_dict()
                if not json_out:
                    v = out["published"]
                    print(f"published version {v['version']} ({v['sha256']})", file=sys.stderr)
            if list_clients:
                out["clients"] = [{"name": p.name, "id": p.id, "role": p.role} for p in registry.clients()]
                if not json_out:
                    for p in out["clients"]:
                        print(f"{p['id']:>6}  {p['name']}  ({p['role']})")
            if list_versions:
                store = ModelStore(data)
                out["versions"] = [v.to_dict() for v in store.versions()]
                for v in out["versions"]:
                    store.model_bytes(v["version"])  # verify every hash
                if not json_out:
                    for v in out["versions"]:
                        print(f"{v['version']:>6}  {v['sha256']}  {v['created']}  {json.dumps(v['meta'], sort_keys=True)}")
            if json_out:
                render.emit_json(out)
            return

        if not is_loopback(host) and not allow_remote:
            raise UsageFailure(f"--host {host} is not a loopback address: add --allow-remote "
                               "(and serve it behind a TLS proxy: tokens travel in clear over plain HTTP)")
        if not math.isfinite(max_upload_mb):
            raise UsageFailure(f"--max-upload-mb must be a finite number, got {max_upload_mb}")
        from fedtensor.serve.rounds import MAX_STAGE_TIMEOUT, valid_stage_timeout

        if not valid_stage_timeout(stage_timeout or None):  # 0: no deadline; NaN and ≥ 10⁹ refused
            raise UsageFailure(f"--stage-timeout must be a number of seconds below {MAX_STAGE_TIMEOUT:g} (0: none), "
                               f"got {stage_timeout:g}")
        # stopped by Ctrl-C or SIGTERM, as a server is meant to stop: a finished command (exit 0)
        return _run_server(data, host, port, int(max_upload_mb * (1 << 20)), stage_timeout or None, web)

    @app.command("fetch-model")
    @cli_errors
    def fetch_model_cmd(
        url: Annotated[str, typer.Argument(metavar="URL", help="The service, e.g. http://127.0.0.1:8000")],
        out: Annotated[Path, typer.Argument(metavar="DIR", help="Model directory to write (created if needed).")],
        version: Annotated[Optional[int], typer.Option("--version", "-v", min=1, help="Version to fetch (default: latest).")] = None,
        token_file: Annotated[Optional[Path], typer.Option("--token-file", metavar="FILE",
                                                           help=f"File holding the client token (default: ${TOKEN_ENV}).")] = None,
        force: Annotated[bool, typer.Option("--force", "-f", help="Replace another model already in DIR.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    ) -> None:
        """Download a global model version (SHA-256 verified) for: fedtensor decompress IN.ftz OUT --model DIR"""
        from fedtensor.serve.client import fetch_model, model_info

        token = read_token(token_file)
        if token is None:
            raise UsageFailure(f"no token: pass --token-file or set ${TOKEN_ENV}")
        info = model_info(url, token, version)
        fetch_model(url, token, out, int(info["version"]), force=force)
        res = {"command": "fetch-model", "version": info["version"], "model_id": info["sha256"], "out": str(out)}
        if json_out:
            render.emit_json(res)
        else:
            print(f"fetched version {info['version']} (model id {info['sha256']}) into {out}")


def _read_publication(model_dir: Path, meta: str | None) -> tuple[bytes, dict, dict]:
    """``(model bytes, manifest, meta)`` that ``--publish MODEL_DIR --meta JSON`` stores."""
    from fedtensor.nn.checkpoint import read_model_bytes

    try:
        meta_d = json.loads(meta) if meta else {}
    except ValueError:
        raise UsageFailure("--meta must be a JSON object") from None
    if not isinstance(meta_d, dict):
        raise UsageFailure("--meta must be a JSON object")
    blob, _, manifest = read_model_bytes(model_dir)
    return blob, manifest, meta_d


def server_config(host: str, max_bytes: int, stage_timeout: float | None, web: bool = False) -> dict:
    """The app config of a server listening on ``host``, with the web interface if ``web`` (which needs a
    loopback host).

    The web interface has no authentication, so it is asked for, never implied by a loopback host: a
    loopback server is also what a reverse proxy forwards to. With it, web pages answer only requests
    addressed to a loopback name (a page elsewhere whose name resolves to 127.0.0.1 or ::1, DNS
    rebinding, gets a 400) and not forwarded by a proxy (403).
    """
    if web and not is_loopback(host):
        raise UsageFailure(f"--web needs a loopback --host (the web interface has no authentication), got {host}")
    config = {"MAX_CONTENT_LENGTH": max_bytes, "FEDTENSOR_ROUND_STAGE_TIMEOUT": stage_timeout, "FEDTENSOR_WEB": web}
    if web:
        config["FEDTENSOR_ALLOWED_HOSTS"] = sorted({"localhost", "127.0.0.1", "::1", host.strip("[]").lower()})
    return config


def _run_server(data: Path, host: str, port: int, max_bytes: int, stage_timeout: float | None, web: bool) -> int:
    try:
        from werkzeug.serving import make_server

        from fedtensor.serve.app import create_app
    except ModuleNotFoundError as e:  # the service is an optional part
        raise FedtensorError(f"fedtensor serve needs Flask ({e.name} is not installed): "
                             "pip install 'fedtensor[web]'") from None

    app = create_app(data, config=server_config(host, max_bytes, stage_timeout, web))
    _probe_listen(host, port)  # werkzeug would print its own message and sys.exit(1) instead
    srv = make_server(host, port, app, threaded=True)
    store, registry = app.extensions["fedtensor_store"], app.extensions["fedtensor_auth"]
    shown = f"[{host}]" if ":" in host else host
    n_clients = sum(1 for p in registry.clients() if not p.is_admin)
    base = f"http://{shown}:{srv.server_port}"
    web = (f", web interface at {base}/" if "web" in app.blueprints
           else " (web interface off: --web serves it, on a loopback host)")
    def _stop(signum, frame):  # SIGTERM (systemd, docker, kill): stop like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:  # (from the first line out: a Ctrl-C as soon as it shows stops the server like any later one)
        print(f"fedtensor serve: API at {base}/api/v1{web}  (data {data}, "
              f"{len(store.versions())} versions, {n_clients} clients; Ctrl-C stops)", file=sys.stderr, flush=True)
        if not any(p.is_admin for p in registry.clients()):
            print("note: no admin token yet (fedtensor serve --admin-token): publishing and rounds are disabled",
                  file=sys.stderr, flush=True)
        srv.serve_forever()  # werkzeug's returns on KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
        web_jobs = app.extensions.get("fedtensor_web")
        if web_jobs is not None:  # a running web job stops at its next stage, so the exit is not held up
            web_jobs.close()
    print("stopped", file=sys.stderr)
    return 0


def _probe_listen(host: str, port: int) -> None:
    """Fail with one clear line if ``host:port`` cannot be bound."""
    from fedtensor.errors import FedtensorError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FedtensorError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug does: ignore TIME_WAIT
        try:
            s.bind(addr)
        except OSError as e:
            raise FedtensorError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
