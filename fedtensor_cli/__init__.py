"""fedtensor_cli: the ``fedtensor`` command line (Typer + rich).

The CLI is deliberately thin: it parses arguments, calls :mod:`fedtensor` (``io``, ``codec``,
``metrics``) and prints a rich table or, with ``--json``, one JSON object on stdout. Every user-facing
error becomes one ``error: …`` line on stderr and a non-zero exit code (see :mod:`fedtensor_cli.errors`).
"""
