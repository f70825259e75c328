"""Exceptions with one-line, user-facing messages.

Every error the library raises on bad input derives from :class:`FedtensorError`, so the CLI and the
web app can print ``str(err)`` and exit non-zero without a traceback.
"""


class FedtensorError(Exception):
    """Base class: the message is one line a user can act on."""


class VolumeError(FedtensorError):
    """The input is not a usable 3D volume (missing, wrong dimensionality, NaN/Inf, bad dtype, ...)."""


class FormatError(FedtensorError):
    """A compressed stream is not a valid .ftz file (magic, version, length, checksum, payload)."""


class RateError(FedtensorError):
    """The requested rate/quality target cannot be met (e.g. lossless on non-integer data)."""
