"""The ``fedtensor`` command line: compress, decompress, info, evaluate.

Thin by design: arguments are parsed and checked here, all work is done by :mod:`fedtensor`
(``io.read_volume``/``write_volume``, ``codec.compress``/``decompress``/``read_info``, ``metrics``).
Heavy modules (JAX) are imported inside the commands so that ``--help`` and ``--version`` stay fast.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from pathlib import Path
from time import perf_counter
from typing import Annotated, Any, Callable, Iterator, Optional, Sequence

import click
import typer

from fedtensor import __version__
from fedtensor.jit_cache import enable_persistent_cache
from fedtensor_cli.federate_cmd import register as register_federate
from fedtensor_cli.serve_cmd import register as register_serve
from fedtensor_cli.train_cmd import register as register_train
from fedtensor_cli import paths, render
from fedtensor_cli.models import ModelOpt, TtaOpt, loaded_model
from fedtensor_cli.errors import (
    EXIT_FAILURE,
    EXIT_INTERNAL,
    UsageFailure,
    cli_errors,
    debug_enabled,
    describe,
    exit_code_for,
    print_error,
    report,
    routed_warnings,
)
from fedtensor_cli.measure import quality, quality_from_stats, rate

DEFAULT_PSNR = 45.0
DEFAULT_CODEC = "block-tucker"
OUTPUT_FORMATS = ("nii.gz", "nii", "npy")

app = typer.Typer(
    name="fedtensor",
    help=(
        "Compress 3D medical volumes (CT/MR: NIfTI, DICOM series, .npy) into .ftz streams by "
        "block-Tucker transform coding, and decompress, inspect and evaluate them.\n\n"
        "A directory INPUT that holds volume files (or only subdirectories) is a batch: "
        "OUTPUT is then a directory. Errors print one 'error: …' line; exit codes: 0 ok, 1 error, "
        "2 usage error, 3 internal error (FEDTENSOR_DEBUG=1 shows its traceback)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

InputArg = Annotated[Path, typer.Argument(metavar="INPUT", show_default=False, readable=False)]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedtensor {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Block-Tucker compression of 3D medical volumes."""


# --------------------------------------------------------------------------------------- option checks


def rate_target(
    psnr: float | None, max_error: float | None, bpv: float | None, lossless: bool
) -> tuple[str, float | None]:
    """The one rate-control mode the options ask for, as ``(mode, target)``; default ``("psnr", 45)``."""
    given = [(m, v) for m, v in (("psnr", psnr), ("max_error", max_error), ("bpv", bpv)) if v is not None]
    if lossless:
        given.append(("lossless", None))
    if len(given) > 1:
        flags = ", ".join("--" + m.replace("_", "-") for m, _ in given)
        raise UsageFailure(f"choose only one of --psnr, --max-error, --bpv, --lossless (got {flags})")
    if not given:
        return "psnr", DEFAULT_PSNR
    mode, value = given[0]
    if value is not None and value != value:  # NaN
        raise UsageFailure(f"--{mode.replace('_', '-')} must be a number, got nan")
    if mode == "psnr" and not 0 < value < 400:
        raise UsageFailure(f"--psnr must be a number of dB between 0 and 400, got {value:g}")
    if mode == "max_error" and not 0 <= value < float("inf"):
        raise UsageFailure(f"--max-error must be a finite number >= 0, got {value:g}")
    if mode == "bpv" and not 0 < value < float("inf"):
        raise UsageFailure(f"--bpv must be a finite number of bits per voxel > 0, got {value:g}")
    return mode, value


def _codec_kwargs(mode: str, target: float | None) -> dict[str, Any]:
    return {"lossless": True} if mode == "lossless" else {mode: target}


def _check_codec(codec: str | None, block: str | None, mode: str) -> tuple[str, int | tuple[int, ...] | None]:
    """``(codec, block)`` to use: ``codec`` or the default, and ``block`` parsed (a side, or a shape
    ``AxBxC``); options the mode would ignore are refused."""
    from fedtensor.codec import CODECS

    if mode in ("lossless", "max_error") and (codec is not None or block is not None):
        flag = "--codec" if codec is not None else "--block"
        raise UsageFailure(f"{flag} applies to --psnr and --bpv; --{mode.replace('_', '-')} has its own exact coder")
    codec = codec or DEFAULT_CODEC
    if codec not in CODECS:
        raise UsageFailure(f"unknown codec {codec!r}; choose from: {', '.join(CODECS)}")
    if block is None:
        return codec, None
    from fedtensor.tensor.block import parse_block

    try:
        parsed = parse_block(block)  # 8, 8x8x16, or the [8, 8, 16] that info shows
    except ValueError:
        parsed = ()
    sides = (parsed,) if isinstance(parsed, int) else parsed or ()
    if len(sides) not in (1, 3) or not all(2 <= n <= 32 for n in sides):
        raise UsageFailure(f"--block must be a side (8) or a shape (8x8x16), each between 2 and 32, got {block!r}")
    if codec != DEFAULT_CODEC:
        raise UsageFailure(f"--block applies to the {DEFAULT_CODEC} codec only, not {codec}")
    return codec, parsed


# ------------------------------------------------------------------------------------ one-file workers


def _compress_one(
    src: Path, dst: Path, *, mode: str, target: float | None, codec: str, block: int | tuple[int, ...] | None,
    force: bool,
    model: Any = None, tta: bool = False, ssim: bool = False,
) -> dict[str, Any]:
    from fedtensor.codec import compress, decompress, read_info
    from fedtensor.io import read_volume
    from fedtensor.io.atomic import atomic_write_bytes

    paths.check_output(dst, force=force)
    vol = read_volume(src)
    t0 = perf_counter()
    if model is not None and mode == "psnr":  # the cheapest stream whose *restored* PSNR reaches the target
        from fedtensor.nn import compress_for_quality

        data = compress_for_quality(vol, model, psnr=target, codec=codec, block=block, tta=tta)
    else:
        data = compress(vol, codec=codec, block=block, **_codec_kwargs(mode, target))
    encode_s = perf_counter() - t0
    info = read_info(data)  # (checksums the stream: once, and again only if tagging re-packs it)
    restored, warning = None, _exact_note(info, model)
    if warning:
        model = None  # an exact stream: neither restored nor tied to the model
    if model is not None:
        from fedtensor.metrics import psnr as psnr_of
        from fedtensor.nn import restore, tag_stream

        decoded = decompress(data)
        restored = quality(vol.data, restore(decoded, info, model, tta=tta).data)
        plain_db = float(psnr_of(vol.data, decoded.data))
        if info.get("model") == model.model_id:
            pass  # compress_for_quality chose a stream that counts on the restoration: it says so
        elif restored["psnr_db"] < plain_db:  # do not tie the stream to a model that lowers its quality
            warning = (f"restoration model {model.short_id}… lowers this volume's PSNR ({plain_db:.2f} → "
                       f"{restored['psnr_db']:.2f} dB): the stream is not tied to it")
        else:  # the plain stream (or --bpv): record the model it was measured with
            data = tag_stream(data, model.model_id, {"psnr": restored["psnr_db"], "tta": tta})
            info = read_info(data)
    figures, decode_s = quality_from_stats(info.get("stats"), ssim=ssim), None
    if figures is None:  # not all recorded by the codec (SSIM never is): decode and measure
        t0 = perf_counter()
        decoded = decompress(data)
        decode_s = perf_counter() - t0
        figures = quality(vol.data, decoded.data)
    atomic_write_bytes(dst, data, force=force)
    return {
        "ok": True,
        "input": src,
        "output": dst,
        "shape": list(vol.shape),
        "dtype": str(vol.dtype),
        "codec": info.get("codec", codec),  # "lossless"/"max-error" for the exact modes
        "params": info.get("params", {"block": block}),
        "mode": mode,
        "target": target,
        "original_bytes": vol.nbytes,
        "compressed_bytes": len(data),
        **rate(len(data), vol.shape, vol.dtype),
        "ssim": None,  # (measured with --ssim)
        **figures,
        "encode_seconds": encode_s,
        "decode_seconds": decode_s,
        **_restored_fields(model, restored),
        **({"relies_on_restoration": _counts_on_restoration(info)} if model is not None else {}),
        **({"warning": warning} if warning or model is not None else {}),
    }


def _exact_note(info: dict[str, Any], model: Any) -> str | None:
    """The warning for ``--model`` on a stream of an exact codec (lossless, max-error, constant), which is
    never restored (its guarantees hold as decoded); None for a restorable stream or without a model."""
    if model is None:  # (before the import: fedtensor.nn brings flax and optax, half a second)
        return None
    from fedtensor.nn.normalize import RESTORABLE_CODECS

    if info.get("codec") in RESTORABLE_CODECS:
        return None
    return f"a {info.get('codec')} stream is exact as decoded: not restored (--model ignored)"


def _restored_fields(model: Any, restored: dict[str, float] | None) -> dict[str, Any]:
    """``model_id`` and the figures measured with restoration (``*_restored``), when a model was used."""
    if model is None:
        return {}
    return {"model_id": model.model_id, **{f"{k}_restored": v for k, v in (restored or {}).items()}}


def _counts_on_restoration(info: dict[str, Any]) -> bool:
    """Whether the stream needs its model to reach the PSNR it was compressed for (compress --model
    chose a cheaper stream), as its header's figures say; a stream merely tagged with a model does not."""
    if not info.get("model"):
        return False
    target = (info.get("restoration") or {}).get("target_psnr") if isinstance(info.get("restoration"), dict) else None
    reached = (info.get("stats") or {}).get("psnr") if isinstance(info.get("stats"), dict) else None
    return isinstance(target, (int, float)) and isinstance(reached, (int, float)) and reached < target


@contextlib.contextmanager
def _naming(src: Path) -> Iterator[None]:
    """Errors about a damaged .ftz file name the file (a batch or a script's log has many)."""
    from fedtensor.errors import FormatError

    try:
        yield
    except FormatError as err:
        raise FormatError(f"{src}: {err}") from None


def _read_ftz(src: Path) -> tuple[bytes, dict[str, Any]]:
    """An .ftz file's bytes and checked header (:func:`fedtensor.codec.read_info`)."""
    from fedtensor.codec import read_info
    from fedtensor.codec.container import MAGIC, unpack
    from fedtensor.errors import FedtensorError

    if src.is_dir():
        raise FedtensorError(f"{src} is a directory, not an .ftz file")
    if src.exists() and not src.is_file():  # /dev/zero, a FIFO: read to the end, they never end
        raise FedtensorError(f"{src} is not a regular file")
    with open(src, "rb") as f:
        head = f.read(len(MAGIC))
        with _naming(src):
            if head != MAGIC[:len(head)] or not head:  # a 300 MB NIfTI was read whole to say "bad magic"
                unpack(head)  # its one-line FormatError
        data = head + f.read()
    with _naming(src):
        return data, read_info(data)


def _decompress_one(src: Path, dst: Path, *, force: bool, model: Any = None, tta: bool = False) -> dict[str, Any]:
    from fedtensor.codec import decompress
    from fedtensor.io import write_volume

    paths.check_output(dst, force=force)
    data, info = _read_ftz(src)
    t0 = perf_counter()
    with _naming(src):
        vol, warning = decompress(data), None
    decode_s = perf_counter() - t0
    restore_s = None
    exact = _exact_note(info, model)
    if exact:
        model, warning = None, exact
    if model is not None:
        from fedtensor.nn import model_mismatch, restore

        t0 = perf_counter()
        vol, warning = restore(vol, info, model, tta=tta), model_mismatch(info, model, vol.data, tta)
        restore_s = perf_counter() - t0
    elif _counts_on_restoration(info):  # compress --model chose this rate counting on the restoration
        tuned = info["model"].get("id") if isinstance(info["model"], dict) else info["model"]
        warning = (f"this stream was compressed for restoration by model {str(tuned)[:12]}…: without --model it "
                   "decodes below the quality it was compressed for")
    write_volume(vol, dst, force=force)
    return {
        "ok": True,
        "input": src,
        "output": dst,
        "shape": list(vol.shape),
        "dtype": str(vol.dtype),
        "codec": info.get("codec"),
        "compressed_bytes": len(data),
        "output_bytes": dst.stat().st_size,
        "decode_seconds": decode_s,
        **({"model_id": model.model_id, "restore_seconds": restore_s} if model is not None else {}),
        **({"warning": warning} if warning or model is not None else {}),  # (with --model: always, maybe None)
    }


# ------------------------------------------------------------------------------------------ batch mode


def _run_batch(
    pairs: Sequence[tuple[Path, Path | None, str | None]],
    work: Callable[[Path, Path], dict[str, Any]],
    show: bool,
) -> list[dict[str, Any]]:
    """Run ``work(src, dst)`` on every pair; a failure is recorded for its file and the batch goes on."""
    records: list[dict[str, Any]] = []
    with render.progress_bar(len(pairs), show) as advance:
        for src, dst, problem in pairs:
            if problem is None:
                try:
                    record = work(src, dst)
                except Exception as exc:  # noqa: BLE001 — reported per file
                    if exit_code_for(exc) == EXIT_INTERNAL and debug_enabled():
                        raise
                    problem = describe(exc)
            if problem is not None:
                record = {"ok": False, "input": src, "output": dst, "error": problem}
            records.append(record)
            advance(src.name)
    return records


def _single_or_batch(
    command: str, src: Path, dst: Path, batch_inputs: list[Path] | None, suffix: str,
    work: Callable[[Path, Path], dict[str, Any]], show: bool, json_out: bool,
    columns: Sequence[str], table: Callable[[dict[str, Any]], Any],
) -> None:
    """Run ``work`` on one file (a table or JSON record) or, given ``batch_inputs``, on a directory."""
    if batch_inputs is not None:
        paths.prepare_output_dir(dst)
        records = _run_batch(paths.batch_outputs(batch_inputs, dst, suffix), work, show)
        _warn_mismatches(records)
        _finish_batch(command, src, dst, records, json_out, columns)
        return
    with render.status(f"{command}ing {src.name} …", show):
        record = work(src, dst)
    _warn_mismatches([record])
    if json_out:
        render.emit_json({"command": command, **record})
    else:
        render.out_console().print(table(record))


def _not_its_original(ref, test, info: dict | None, measured: float) -> str | None:
    """A warning when the volume ``ref`` (ORIGINAL) does not look like the one ``test`` (DECODED) was made
    from: another dtype, another placement in space, or an .ftz whose recorded PSNR is far above the
    ``measured`` one against ORIGINAL."""
    import numpy

    problems = []
    if ref.dtype != test.dtype:
        problems.append(f"ORIGINAL is {ref.dtype} but DECODED is {test.dtype}")
    placed = "npy" not in (ref.meta.get("format"), test.meta.get("format"))  # a .npy has no geometry
    if placed and not numpy.allclose(ref.affine, test.affine, rtol=1e-5, atol=1e-4):
        problems.append("ORIGINAL and DECODED lie differently in space (their affines differ)")
    recorded = ((info or {}).get("stats") or {}).get("psnr")
    if isinstance(recorded, (int, float)) and math.isfinite(recorded) and math.isfinite(measured):
        if measured < recorded - 1.0:
            problems.append(f"the stream recorded {recorded:.2f} dB at compression but measures {measured:.2f} dB "
                            "against ORIGINAL: is it the volume it was made from?")
    return "; ".join(problems) or None


def _warn_mismatches(records: Sequence[dict[str, Any]]) -> None:
    """One 'warning: …' line on stderr per record that carries one (another restoration model, another
    original)."""
    for r in records:
        if r.get("warning"):
            typer.echo(f"warning: {Path(r['input']).name}: {r['warning']}", err=True)


def _finish_batch(
    command: str, src: Path, dst: Path, records: list[dict[str, Any]], json_out: bool, columns: Sequence[str]
) -> None:
    failed = [r for r in records if not r["ok"]]
    if json_out:
        render.emit_json(
            {"command": command, "batch": True, "input": src, "output": dst,
             "count": len(records), "failed": len(failed), "results": records}
        )
    else:
        title = f"fedtensor {command}: {len(records) - len(failed)} of {len(records)} done"
        render.out_console().print(render.batch_table(title, records, columns))
    for r in failed:  # name the file unless the message already does
        where = str(r["input"])
        print_error(r["error"] if where in r["error"] else f"{Path(where).name}: {r['error']}")
    if failed:
        raise typer.Exit(EXIT_FAILURE)


# -------------------------------------------------------------------------------------------- commands


@app.command()
@cli_errors
def compress(
    input: InputArg,  # noqa: A002 — shadows the builtin inside the command only
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", show_default=False, readable=False)],
    psnr: Annotated[
        Optional[float],
        typer.Option("--psnr", metavar="DB", show_default=False,
                     help=f"Target PSNR in dB (the default mode, at {DEFAULT_PSNR:g} dB)."),
    ] = None,
    max_error: Annotated[
        Optional[float],
        typer.Option("--max-error", metavar="E", show_default=False,
                     help="Bound on every voxel's absolute error, in the volume's units."),
    ] = None,
    bpv: Annotated[
        Optional[float],
        typer.Option("--bpv", metavar="B", show_default=False, help="Target bits per voxel (whole file)."),
    ] = None,
    lossless: Annotated[bool, typer.Option("--lossless", help="Exact reconstruction (integer volumes).")] = False,
    codec: Annotated[
        Optional[str],
        typer.Option("--codec", metavar="NAME",
                     help=f"Codec of --psnr and --bpv: block-tucker or omlsvd-global (default: {DEFAULT_CODEC})."),
    ] = None,
    block: Annotated[
        Optional[str],
        typer.Option("--block", metavar="N|AxBxC",
                     help="Block side (8) or shape (8x8x16, or 8,8,16 as info shows it), cut to the volume's sides; "
                          "default: chosen per volume."),
    ] = None,
    model_spec: ModelOpt = None,
    tta: TtaOpt = False,
    ssim: Annotated[bool, typer.Option("--ssim", help="Also decode the stream and report its 3D SSIM.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Compress a volume (.nii, .nii.gz, .npy or a DICOM series directory) into an .ftz file.

    Give at most one of --psnr, --max-error, --bpv, --lossless (default: --psnr 45). The PSNR and max error reported are those of the decoded stream, measured while encoding; --ssim decodes it once more for the 3D SSIM (fedtensor evaluate reports all three).

    With --model, --psnr is met *after* restoration by that model (a cheaper stream: the encoder also fits the model's output layer to the volume, in up to 16 intensity classes, and sends it, quantised and entropy-coded in 0.2–4 KB, when that makes the stream smaller), the stream records the model's id, and the restored figures are reported too.
    """
    mode, target = rate_target(psnr, max_error, bpv, lossless)
    codec, block = _check_codec(codec, block, mode)
    if model_spec is not None and mode not in ("psnr", "bpv"):
        raise UsageFailure("--model works with --psnr or --bpv (the exact modes are never restored)")
    if tta and model_spec is None:
        raise UsageFailure("--tta needs --model")
    paths.require_input(input)
    show = render.interactive(json_out)
    batch = input.is_dir() and paths.is_batch_dir(input)
    if not batch:
        paths.require_suffix(output, (paths.FTZ_SUFFIX,), "OUTPUT")

    with loaded_model(model_spec) as model:
        def work(src: Path, dst: Path) -> dict[str, Any]:
            return _compress_one(src, dst, mode=mode, target=target, codec=codec, block=block, force=force,
                                 model=model, tta=tta, ssim=ssim)

        _single_or_batch("compress", input, output, paths.batch_volume_inputs(input, output) if batch else None,
                         paths.FTZ_SUFFIX, work, show, json_out,
                         ("ratio", "bpv", "psnr", "ssim", "max_error", "time"), render.compress_table)


@app.command()
@cli_errors
def decompress(
    input: InputArg,  # noqa: A002 — shadows the builtin inside the command only
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", show_default=False, readable=False)],
    fmt: Annotated[
        str,
        typer.Option("--format", metavar="|".join(OUTPUT_FORMATS),
                     help="Output format in directory mode (a single OUTPUT's suffix picks its format)."),
    ] = OUTPUT_FORMATS[0],
    model_spec: ModelOpt = None,
    tta: TtaOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Decompress an .ftz file into OUTPUT (.nii.gz, .nii or .npy).

    With a directory INPUT, every *.ftz in it becomes OUTPUT/<name>.nii.gz (or --format).
    With --model, the decoded volume is restored by that model (tiled, bounded memory); a stream tuned for another model gets a warning.
    """
    if fmt not in OUTPUT_FORMATS:
        raise UsageFailure(f"--format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    if tta and model_spec is None:
        raise UsageFailure("--tta needs --model")
    paths.require_input(input)
    show = render.interactive(json_out)
    if not input.is_dir():
        paths.require_suffix(output, paths.VOLUME_SUFFIXES, "OUTPUT")

    with loaded_model(model_spec) as model:
        def work(src: Path, dst: Path) -> dict[str, Any]:
            return _decompress_one(src, dst, force=force, model=model, tta=tta)

        _single_or_batch("decompress", input, output, paths.batch_ftz_inputs(input, output) if input.is_dir() else None,
                         "." + fmt, work, show, json_out, ("shape", "time"), render.decompress_table)


@app.command()
@cli_errors
def info(input: InputArg, json_out: JsonOpt = False) -> None:  # noqa: A002
    """Show an .ftz file's header (shape, dtype, geometry, codec and parameters) after checking it."""
    import numpy

    paths.require_input(input)
    header = _read_ftz(input)[1]  # the header plus file_bytes, bits_per_voxel, ratio
    header["dtype"] = numpy.dtype(header["dtype"]).name  # "uint8", as compress reports it (not "|u1")
    if json_out:
        ours = {"command": "info", "input": input}  # first, and never masked by keys of the (untrusted) file
        render.emit_json({**ours, **{k: v for k, v in header.items() if k not in ours}})
    else:
        render.out_console().print(render.info_table({"file": str(input),
                                                      **{k: v for k, v in header.items() if k != "file"}}))


@app.command()
@cli_errors
def evaluate(
    original: Annotated[Path, typer.Argument(metavar="ORIGINAL", show_default=False, readable=False)],
    decoded: Annotated[Path, typer.Argument(metavar="DECODED", show_default=False, readable=False)],
    model_spec: ModelOpt = None,
    tta: TtaOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Compare DECODED with ORIGINAL: PSNR, 3D SSIM, max abs error.

    DECODED may be a volume or an .ftz file (decoded in memory; then bits per voxel and ratio too).
    With --model (DECODED an .ftz), the figures are given without and with restoration.
    """
    from fedtensor.io import read_volume

    is_ftz = decoded.name.lower().endswith(paths.FTZ_SUFFIX)
    if original.name.lower().endswith(paths.FTZ_SUFFIX) and not is_ftz:
        raise UsageFailure(f"ORIGINAL {original} is an .ftz file: the order is ORIGINAL DECODED (swapped?)")
    if model_spec is not None and not is_ftz:
        raise UsageFailure("--model needs DECODED to be an .ftz file (the model is conditioned on its header)")
    if tta and model_spec is None:
        raise UsageFailure("--tta needs --model")
    paths.require_input(original)
    paths.require_input(decoded)
    show = render.interactive(json_out)
    with render.status("evaluating …", show), loaded_model(model_spec) as model:
        ref = read_volume(original)
        record: dict[str, Any] = {"ok": True, "original": original, "decoded": decoded,
                                  "shape": list(ref.shape), "dtype": str(ref.dtype)}
        info = None
        if is_ftz:
            from fedtensor.codec import decompress as decode

            data, info = _read_ftz(decoded)
            with _naming(decoded):
                test = decode(data)
            record["compressed_bytes"] = len(data)
            record.update(rate(len(data), test.shape, test.dtype))  # the ratio to the volume the stream holds
        else:
            test = read_volume(decoded)
        record.update(quality(ref.data, test.data))  # raises on a shape mismatch
        record["exact"] = record["max_abs_error"] == 0  # JSON has no infinities: psnr_db is null for ±inf
        record["warning"] = _not_its_original(ref, test, info, record["psnr_db"])
        exact = _exact_note(info, model)
        if exact:
            model, record["warning"] = None, "; ".join(w for w in (record["warning"], exact) if w)
        if model is not None:  # (DECODED is an .ftz: checked above)
            from fedtensor.nn import model_mismatch, restore

            restored = restore(test, info, model, tta=tta)
            record.update(_restored_fields(model, quality(ref.data, restored.data)))
            found = [w for w in (record["warning"], model_mismatch(info, model, test.data, tta)) if w]
            record["warning"] = "; ".join(found) or None
    _warn_mismatches([{**record, "input": decoded}])
    if json_out:
        render.emit_json({"command": "evaluate", **record})
    else:
        render.out_console().print(render.evaluate_table(record))


@app.command()
@cli_errors
def bench(
    volumes: Annotated[list[str], typer.Argument(metavar="VOLUME...", show_default=False)],
    targets: Annotated[Optional[list[str]], typer.Option("--targets", metavar="DB",
                       help="Target PSNRs (default 40 45 50); '40 45 50', '40,45,50' or repeated.")] = None,
    codecs: Annotated[Optional[list[str]], typer.Option("--codecs", metavar="NAME",
                      help="Codecs to run (default: all; see fedtensor.baselines).")] = None,
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Output directory.")] = Path("results"),
    jobs: Annotated[int, typer.Option("--jobs", "-j", metavar="N", help="Processes (0: one per core).")] = 0,
    no_figures: Annotated[bool, typer.Option("--no-figures", help="Skip the PNG figures.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Rate–distortion benchmark of fedtensor against every rival codec (resumable; writes CSV, JSON, PNG)."""
    from fedtensor.bench.cli import BenchUsageError, run_command

    try:
        run_command(volumes, targets, codecs, out, jobs, figures=not no_figures, json_out=json_out)
    except BenchUsageError as exc:
        raise UsageFailure(str(exc)) from None


# ------------------------------------------------------------------------------------------ entry point


def _usage_error_text(exc: Exception) -> str:
    text = exc.format_message()  # type: ignore[attr-defined]
    if text.count("Did you mean") > 1:  # click and Typer each suggest the close command names: keep click's
        text = text[:text.find("Did you mean", text.find("Did you mean") + 1)].rstrip(" (")
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and getattr(ctx, "command_path", None):
        text += f" (see '{ctx.command_path} --help')"
    return text


register_train(app)
register_federate(app)
register_serve(app)

_USAGE_ERRORS = (click.ClickException, *((typer.TyperException,) if hasattr(typer, "TyperException") else ()))


@contextlib.contextmanager
def _interrupts() -> Iterator[threading.Event]:
    """Ctrl-C and SIGTERM (kill, systemd, a batch scheduler's time limit) stop a command alike: temp files
    removed, a fresh run directory left as it was, a checkpoint to resume from, "error: interrupted".

    Each raises :class:`KeyboardInterrupt` and sets the yielded event. Python swallows an exception raised
    inside a garbage-collection callback (printing "Exception ignored in …"): the event then still stops
    the next output's commit, and the command's exit, and that message is not printed."""
    import signal

    from fedtensor.io import atomic

    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # (in-process callers, e.g. tests)
        yield interrupted
        return

    def interrupt(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    def refuse_commit():
        if interrupted.is_set():
            raise KeyboardInterrupt

    def unraisable(info):
        if not (interrupted.is_set() and isinstance(info.exc_value, KeyboardInterrupt)):
            previous_hook(info)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    atomic.BEFORE_COMMIT.append(refuse_commit)
    try:
        yield interrupted
    finally:
        atomic.BEFORE_COMMIT.remove(refuse_commit)
        sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Sequence[str] | None = None, prog_name: str = "fedtensor") -> None:
    """Console-script entry point: run the app; never let a traceback reach the user."""
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    try:
        enable_persistent_cache()  # before any command imports JAX: later runs skip XLA's compiler
        with routed_warnings(), _interrupts() as interrupted:
            rv = app(args=args, prog_name=prog_name, standalone_mode=False)
            # an interrupt Python swallowed: it did not finish as asked (a command that returns its exit
            # code, e.g. serve stopped by Ctrl-C, did)
            if interrupted.is_set() and rv is None:
                raise KeyboardInterrupt
    except typer.Abort:
        print_error("aborted")
        sys.exit(EXIT_FAILURE)
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 — every path ends in one error line
        if isinstance(exc, _USAGE_ERRORS) or (
            hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)
        ):  # usage errors from argument parsing (Click's, or newer Typer's own exception classes)
            print_error(_usage_error_text(exc))
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        _done()
        code = report(exc)
        if isinstance(exc, KeyboardInterrupt) and argv is None:
            _exit_now(code)
        sys.exit(code)
    _done()
    sys.exit(rv if isinstance(rv, int) else 0)


def _exit_now(code: int) -> None:
    """End an interrupted command's process without the interpreter's shutdown: JAX may still be running
    dispatched device work on its threads, and finalising under it crashed the process (SIGSEGV after
    "error: interrupted", e.g. in a federated round). Outputs were already removed or left as they were
    on the way here; only the standard streams need flushing."""
    import os

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _done() -> None:
    """The command has finished (its outputs written, its result printed): a Ctrl-C while the interpreter
    shuts down (JAX's clean-up can take a moment) must not turn the exit code into 130."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":  # pragma: no cover
    main()
