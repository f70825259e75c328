"""How the CLI turns exceptions into one ``error: …`` line and an exit code.

=====================================================  =========  ==================================
exception                                              exit code  message
=====================================================  =========  ==================================
:class:`UsageFailure` (bad option values/combinations)  2          ``error: <message>``
:class:`fedtensor.errors.FedtensorError`                1          ``error: <message>``
:class:`OSError` (missing file, permission, disk full)  1          ``error: <strerror>: <filename>``
:class:`KeyboardInterrupt`                             130        ``error: interrupted``
anything else (a bug)                                  3          ``error: internal error: <type>: <msg>``
=====================================================  =========  ==================================

Set ``FEDTENSOR_DEBUG=1`` to print an unexpected exception's traceback too (the exit code stays 3).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from fedtensor.errors import FedtensorError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class UsageFailure(Exception):
    """A bad command line (conflicting options, out-of-range values): exit code 2, like Typer's own."""


def debug_enabled() -> bool:
    return os.environ.get("FEDTENSOR_DEBUG", "").strip() not in ("", "0", "false", "no")


def one_line(message: object) -> str:
    """Collapse a (possibly multi-line) message onto one line."""
    parts = [line.strip() for line in str(message).splitlines()]
    return " ".join(p for p in parts if p)


def describe(exc: BaseException) -> str:
    """The one-line, user-facing text for an exception (no ``error:`` prefix)."""
    if isinstance(exc, OSError) and exc.strerror:
        names = [n for n in (exc.filename, exc.filename2) if n is not None]
        return one_line(": ".join([exc.strerror, *map(os.fsdecode, names)]))
    if isinstance(exc, (FedtensorError, UsageFailure, OSError)):
        return one_line(exc) or type(exc).__name__
    if isinstance(exc, MemoryError):
        return "not enough memory for this input on this machine"
    return one_line(f"internal error: {type(exc).__name__}: {exc}")


def print_error(message: str) -> None:
    """Print ``error: <message>`` to stderr; the message is plain text (never parsed as rich markup)."""
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(Text.assemble(("error:", "bold red"), " ", one_line(message)))


@contextlib.contextmanager
def routed_warnings() -> Iterator[None]:
    """While a command runs: warnings and the WARNING records of nibabel and pydicom as at most one
    ``warning:`` line each on stderr (never a multi-line report around the one-line error); numpy's
    floating-point notes ("… encountered in …", on paths whose results the library checks) are dropped.
    Everything is restored afterwards (``main`` may run in-process, e.g. under tests)."""
    import logging
    import warnings

    shown: set[str] = set()

    def say(text: str) -> None:
        text = one_line(text)
        if text and text not in shown:  # pydicom both warns and logs the same message
            shown.add(text)
            print(f"warning: {text}", file=sys.stderr)

    class OneLine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            say(record.getMessage())

    def said(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            say(record.getMessage())
        return False

    loggers = [logging.getLogger(name) for name in ("nibabel", "pydicom")]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    # nibabel adds a stream handler of its own to nibabel.global when it is imported (mid-command): a
    # filter on that logger says its records once and stops them before any handler prints them raw.
    nib_global = logging.getLogger("nibabel.global")
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *args, **kwargs: say(str(message) or category.__name__)
        warnings.filterwarnings("ignore", message=".*encountered in", category=RuntimeWarning)
        for lg in loggers:
            lg.handlers, lg.propagate = [OneLine(logging.WARNING)], False
        nib_global.addFilter(said)
        try:
            yield
        finally:
            nib_global.removeFilter(said)
            for lg, handlers, propagate in saved:
                lg.handlers, lg.propagate = handlers, propagate


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, UsageFailure):
        return EXIT_USAGE
    if isinstance(exc, (FedtensorError, OSError, MemoryError)):  # (out of memory: the machine's limit, no bug)
        return EXIT_FAILURE
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_INTERNAL


def report(exc: BaseException) -> int:
    """Print the error line for ``exc`` and return its exit code (with a bug's traceback when debugging)."""
    code = exit_code_for(exc)
    if code == EXIT_INTERNAL and debug_enabled():
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print_error("interrupted" if isinstance(exc, KeyboardInterrupt) else describe(exc))
    return code


def cli_errors(func: F) -> F:
    """Decorate a Typer command so that errors become one ``error:`` line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 — mapped to exit codes above
            raise typer.Exit(report(exc)) from None

    return wrapper  # type: ignore[return-value]
