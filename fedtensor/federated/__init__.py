"""Federated learning for fedtensor (training the restoration model across hospitals).

:mod:`fedtensor.federated.secagg` is the secure-aggregation protocol (Bonawitz et al., CCS 2017): the
server learns only the (weighted) sum of the clients' updates. Its main names are re-exported here,
lazily, so that importing this package does not require ``cryptography`` (the ``fed`` extra).
"""

from __future__ import annotations

_SECAGG_EXPORTS = ("SecAggAbort", "SecAggClient", "SecAggError", "SecAggParams", "SecAggServer", "secure_sum")

__all__ = list(_SECAGG_EXPORTS)


def __getattr__(name: str):
    if name in _SECAGG_EXPORTS:
        from fedtensor.federated import secagg

        return getattr(secagg, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
