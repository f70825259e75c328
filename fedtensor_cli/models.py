"""``--model`` for compress, decompress and evaluate: a model directory, or a weights-service URL.

A URL (``http(s)://host:port``, optionally ``…#VERSION``) is fetched from ``fedtensor serve`` with the
token in ``FEDTENSOR_TOKEN`` into a private temporary directory, verified against the SHA-256 the
service sends, and loaded from there; nothing is cached, so "latest" always means the latest.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from fedtensor_cli.errors import UsageFailure

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", metavar="DIR|URL", show_default=False,
                 help="Restoration model: a directory written by 'fedtensor train'/'federate', or a "
                      "weights-service URL (http://host:port\\[#version]; token in FEDTENSOR_TOKEN)."),
]
TtaOpt = Annotated[
    bool, typer.Option("--tta", help="Test-time augmentation: average the model over 8 mirrored passes (8× slower). "
                       "A stream whose restoration layer compress --model fitted is restored as it was fitted.")
]
TOKEN_ENV = "FEDTENSOR_TOKEN"


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def split_version(spec: str) -> tuple[str, int | None]:
    """``"http://h:p#3"`` → ``("http://h:p", 3)``; no fragment → latest (None)."""
    url, _, frag = spec.partition("#")
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError as e:
        raise UsageFailure(f"--model: not a valid URL {url!r} ({e})") from None
    if not host:
        raise UsageFailure(f"--model: the URL {url!r} names no host")
    if not frag:
        return url, None
    if not (frag.isascii() and frag.isdigit()) or int(frag) < 1:
        raise UsageFailure(f"--model: the version after '#' must be a positive integer, got {frag!r}")
    return url, int(frag)


@contextmanager
def loaded_model(spec: str | None) -> Iterator[Any]:
    """The :class:`fedtensor.nn.RestorationModel` named by ``--model`` (None when not given)."""
    if spec is None:
        yield None
        return
    from fedtensor.nn import load_model

    if not is_url(spec):
        yield load_model(Path(spec))
        return
    url, version = split_version(spec)
    from fedtensor.serve.client import fetch_model

    with tempfile.TemporaryDirectory(prefix="fedtensor-model-") as tmp:
        model_dir = fetch_model(url, os.environ.get(TOKEN_ENV), Path(tmp) / "model", version=version)
        yield load_model(model_dir)
