"""Output of the CLI: one JSON object (``--json``) or rich tables, and progress displays."""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def jsonable(obj: Any) -> Any:
    """Plain JSON types: paths → str, numpy → Python, non-finite floats → None (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def emit_json(obj: Mapping[str, Any]) -> None:
    typer.echo(json.dumps(jsonable(obj), allow_nan=False))


def out_console() -> Console:
    return Console(highlight=False)


def interactive(json_out: bool) -> bool:
    """Progress displays only for humans: not with --json, not when stdout is piped."""
    return not json_out and sys.stdout.isatty()


@contextlib.contextmanager
def status(message: str, enabled: bool) -> Iterator[None]:
    """A spinner on stderr while a single file is processed."""
    if not enabled:
        yield
        return
    with Console(stderr=True).status(Text(message)):
        yield


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Any]:
    """Yield ``advance(label)``; a rich progress bar on stderr when enabled."""
    if not enabled:
        yield lambda label=None: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("starting", total=total)

        def advance(label: str | None = None) -> None:
            progress.update(task, advance=1, description=label or "")

        yield advance


# ---------------------------------------------------------------------------------------------- values


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def num(value: float | None, fmt: str = ".4g", unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        if value < 0:  # PSNR of a constant original against anything else: no peak to measure against
            return "-∞ (constant original)" if unit == " dB" else "-∞"
        return "∞ (exact)" if unit == " dB" else "∞"
    return f"{value:{fmt}}{unit}"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def target_text(record: Mapping[str, Any]) -> str:
    mode, value = record.get("mode"), record.get("target")
    return {
        "psnr": f"PSNR ≥ {value:g} dB" if value is not None else "PSNR",
        "max_error": f"|error| ≤ {value:g}" if value is not None else "max error",
        "bpv": f"≈ {value:g} bits/voxel" if value is not None else "bpv",
        "lossless": "lossless",
    }.get(str(mode), str(mode))


def params_text(params: Any) -> str:
    """``block=16x16x8, step=1.338, offset=49.53``: the codec parameters of a stream header, compactly
    (a block shape as ``--block`` takes it)."""
    if not isinstance(params, Mapping):
        return ""
    simple = {k: v for k, v in params.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    block = params.get("block")
    if isinstance(block, list) and block and all(isinstance(n, int) and not isinstance(n, bool) for n in block):
        simple = {"block": "x".join(map(str, block)), **simple}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in simple.items())


def _shape(record: Mapping[str, Any]) -> str:
    shape = record.get("shape")
    return "×".join(str(s) for s in shape) if shape else "-"


# ---------------------------------------------------------------------------------------------- tables


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\x1b``): a file's header is untrusted, and raw
    escape sequences would drive the terminal (set its title, clear it, recolour it)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _kv_table(title: str, rows: Sequence[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:  # as Text: never read as rich markup ("[red]…" in a header's key)
        table.add_row(Text(printable(key)), Text(printable(value)))
    return table


def compress_table(r: Mapping[str, Any]) -> Table:
    enc = r.get("encode_seconds")
    speed = ""
    if enc and r.get("shape"):
        speed = f" ({math.prod(r['shape']) / enc / 1e6:.3g} MVoxel/s)"
    return _kv_table(
        "fedtensor compress",
        [
            ("input", f"{r['input']}  ({_shape(r)} {r.get('dtype', '')})"),
            ("output", str(r["output"])),
            ("size", f"{size(r.get('original_bytes'))} → {size(r.get('compressed_bytes'))}"),
            ("ratio", num(r.get("ratio"), ".2f", " : 1")),
            ("bits per voxel", num(r.get("bpv"), ".4f")),
            ("PSNR", num(r.get("psnr_db"), ".2f", " dB")),
            ("SSIM", num(r.get("ssim"), ".5f") if r.get("ssim") is not None else "not measured (--ssim)"),
            ("max abs error", num(r.get("max_abs_error"), ".6g")),
            ("time", f"encode {seconds(enc)}{speed}"),
            *restored_rows(r),
            ("codec", f"{r.get('codec')}  {params_text(r.get('params'))}"),
            ("target", target_text(r) + (" (after restoration)" if r.get("relies_on_restoration") else "")),
        ],
    )


def restored_rows(r: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The rows for figures measured after restoration by a model (none without ``model_id``)."""
    if not r.get("model_id"):
        return []
    return [
        ("restored by", f"model {str(r['model_id'])[:12]}…"),
        ("PSNR restored", num(r.get("psnr_db_restored"), ".2f", " dB")),
        ("SSIM restored", num(r.get("ssim_restored"), ".5f")),
        ("max abs error restored", num(r.get("max_abs_error_restored"), ".6g")),
    ]


def decompress_table(r: Mapping[str, Any]) -> Table:
    return _kv_table(
        "fedtensor decompress",
        [
            ("input", f"{r['input']}  ({size(r.get('compressed_bytes'))}, codec {r.get('codec')})"),
            ("output", f"{r['output']}  ({size(r.get('output_bytes'))})"),
            ("volume", f"{_shape(r)} {r.get('dtype', '')}"),
            ("time", f"decode {seconds(r.get('decode_seconds'))}"
                     + (f", restore {seconds(r.get('restore_seconds'))}" if r.get("model_id") else "")),
            *([("restored by", f"model {str(r['model_id'])[:12]}…")] if r.get("model_id") else []),
        ],
    )


def evaluate_table(r: Mapping[str, Any]) -> Table:
    rows = [
        ("original", f"{r['original']}  ({_shape(r)} {r.get('dtype', '')})"),
        ("decoded", str(r["decoded"])),
        ("PSNR", num(r.get("psnr_db"), ".2f", " dB")),
        ("SSIM", num(r.get("ssim"), ".5f")),
        ("max abs error", num(r.get("max_abs_error"), ".6g")),
    ]
    if r.get("compressed_bytes") is not None:
        rows += [
            ("compressed size", size(r["compressed_bytes"])),
            ("ratio", num(r.get("ratio"), ".2f", " : 1")),
            ("bits per voxel", num(r.get("bpv"), ".4f")),
        ]
    return _kv_table("fedtensor evaluate", rows + restored_rows(r))


def _compact(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(jsonable(value), separators=(", ", ": "))
    return str(value)


def info_table(info: Mapping[str, Any]) -> Table:
    return _kv_table("fedtensor info", [(str(k), _info_value(str(k), v)) for k, v in info.items()])


def _info_value(key: str, value: Any) -> str:
    layer = value.get("layer") if key == "adaptation" and isinstance(value, dict) else None
    if isinstance(layer, str):  # base64 of the coded coefficients: their size says enough
        size = len(layer) * 3 // 4 - layer[-2:].count("=")
        tta = " (for test-time augmentation)" if value.get("tta") is True else ""
        classes = value.get("classes")
        n = len(classes) + 1 if isinstance(classes, list) and classes else 1
        per = f" in {n} intensity classes" if n > 1 else ""
        return f"restoration output layer fitted to this stream: {size} bytes{per}{tta}"
    return "—" if value is None else _compact(value)


def batch_table(title: str, records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Table:
    """One row per file; ``columns`` picks from: ratio, bpv, psnr, ssim, max_error, shape, time."""
    cells = {
        "ratio": ("ratio", lambda r: num(r.get("ratio"), ".2f"), "right"),
        "bpv": ("bpv", lambda r: num(r.get("bpv"), ".4f"), "right"),
        "psnr": ("PSNR dB", lambda r: num(r.get("psnr_db"), ".2f"), "right"),
        "ssim": ("SSIM", lambda r: num(r.get("ssim"), ".5f"), "right"),
        "max_error": ("max err", lambda r: num(r.get("max_abs_error"), ".4g"), "right"),
        "shape": ("shape", _shape, "left"),
        "time": ("time", lambda r: seconds(r.get("encode_seconds", r.get("decode_seconds"))), "right"),
    }
    table = Table(title=title, title_justify="left")
    table.add_column("input", overflow="fold")
    table.add_column("output", overflow="fold")
    for c in columns:
        table.add_column(cells[c][0], justify=cells[c][2])
    for r in records:
        name = Path(str(r["input"])).name
        if r.get("ok"):
            table.add_row(Text(printable(name)), Text(printable(Path(str(r["output"])).name)),
                          *(cells[c][1](r) for c in columns))
        else:
            table.add_row(Text(printable(name)), Text("FAILED", style="red"), *("-" for _ in columns))
    return table
