"""``fedtensor serve``: the global-weights service (Flask) and its client.

* :mod:`.store` — :class:`ModelStore`: numbered, immutable, SHA-256-verified model versions on disk;
* :mod:`.auth` — per-client bearer tokens, stored hashed; the admin token;
* :mod:`.rounds` — secure-aggregation rounds over HTTP (Bonawitz et al., :mod:`fedtensor.federated.secagg`);
* :mod:`.api` — the ``/api/v1`` blueprint; :mod:`.app` — :func:`create_app`;
* :mod:`.client` — :func:`fetch_model`, :func:`publish_model`, :class:`RoundParticipant` (urllib).

Names are imported lazily so that ``import fedtensor.serve.client`` does not need Flask.
"""

from __future__ import annotations

_EXPORTS = {
    "create_app": "fedtensor.serve.app",
    "ModelStore": "fedtensor.serve.store",
    "VersionInfo": "fedtensor.serve.store",
    "StoreError": "fedtensor.serve.store",
    "TokenRegistry": "fedtensor.serve.auth",
    "fetch_model": "fedtensor.serve.client",
    "publish_model": "fedtensor.serve.client",
    "RoundParticipant": "fedtensor.serve.client",
    "ServiceError": "fedtensor.serve.client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedtensor.serve' has no attribute {name!r}")
