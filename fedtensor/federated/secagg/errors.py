"""Secure-aggregation errors. All derive from :class:`fedtensor.errors.FedtensorError` and carry a
one-line message."""

from __future__ import annotations

from fedtensor.errors import FedtensorError


class SecAggError(FedtensorError):
    """Base class of every secure-aggregation error (also raised for an invalid configuration)."""


class SecAggAbort(SecAggError):
    """The protocol cannot (or must not) go on: fewer than ``threshold`` clients are left at some round,
    or a party was asked to do something that would break privacy (e.g. to reveal both shares of one
    peer). A party that raised this is finished for the round; it refuses every later call."""


class SecAggMessageError(SecAggError):
    """One incoming message was rejected: malformed, from an unknown or duplicate sender, for another
    round or stage (replayed / misrouted), for the wrong pair, or it failed AES-GCM authentication.

    The receiver's state is left unchanged, so a caller may treat the sender as dropped and go on."""
