"""``fedtensor train DATA... --out DIR``: train a restoration model (see :mod:`fedtensor.nn`).

Wired into the app by ``register(app)``. The work is done by :func:`fedtensor.nn.train`; this module
parses options, expands DATA (volume files, DICOM series directories, or batch directories of volumes),
shows progress and prints the summary.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from fedtensor_cli import paths, render
from fedtensor_cli.errors import UsageFailure, cli_errors


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise UsageFailure(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise UsageFailure(f"{what} must not be empty")
    if not all(math.isfinite(v) for v in vals):
        raise UsageFailure(f"{what} must be finite numbers, got {text!r}")
    return vals


def _ints(text: str, what: str) -> tuple[int, ...]:
    vals = _floats(text, what)
    if any(v != int(v) for v in vals):
        raise UsageFailure(f"{what} must be integers, got {text!r}")
    return tuple(int(v) for v in vals)


def _run_artefact(p: Path, skip: set[Path]) -> bool:
    """A directory a run writes (``--out``, ``--cache``, a directory holding one of them, e.g. the
    ``models`` of ``--out models/ct``, a model or checkpoint directory, a model store, or the checkpoint
    and cache directories of an ``--out`` that is DATA itself), not a series: a resumed run must not read
    its own files as a volume."""
    if not p.is_dir():
        return False
    resolved = p.resolve()
    own = p.parent.resolve() in skip and p.name in ("checkpoint", "cache")
    holds_own = any(s.is_relative_to(resolved) for s in skip)
    run = (p / "model.json").is_file() or (p / "checkpoint").is_dir() or (p / "state.json").is_file()
    store = (p / "versions").is_dir() and (p / ".lock").is_file()  # a model store (federate --publish, serve)
    return own or holds_own or run or store or _a_pair_cache(p)


def _a_pair_cache(p: Path) -> bool:
    """A directory of cached training pairs (another run's ``--cache``): only ``.npz`` files in it."""
    files = [q for q in p.iterdir() if not q.name.startswith(".")]
    return bool(files) and all(q.is_file() and q.name.endswith(".npz") for q in files)


def run_inputs(data: list[Path], val: list[Path] | None, out: Path, cache: Path | None
               ) -> tuple[list[Path], list[Path] | None]:
    """``(volumes, validation volumes)`` of a ``train``/``federate`` run, after checking that ``--out``
    and ``--cache`` can be directories; the run's own directories inside DATA are never volumes."""
    for option, path in (("--out", out), ("--cache", cache)):
        if path is not None and path.exists() and not path.is_dir():
            raise UsageFailure(f"{option} must be a directory: {path}")
    volumes, val_volumes = expand_data(data, skip=(out, cache)), (expand_data(val, skip=(out, cache)) if val else None)
    from fedtensor.io import first_repeat

    repeat = first_repeat([*volumes, *(val_volumes or [])])  # before any pair is made (caught later too)
    if repeat:
        raise UsageFailure("the same volume is given twice ({} and {}): a volume is either trained on or "
                           "validated on, once".format(*repeat))
    return volumes, val_volumes


@contextlib.contextmanager
def removed_if_failed(out: Path) -> Iterator[None]:
    """A run directory this run created is removed when the run fails before writing a file in it."""
    fresh = not out.exists()
    try:
        yield
    except BaseException:
        if fresh and out.is_dir() and not any(p.is_file() for p in out.rglob("*")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def curve_files(out: Path) -> dict:
    """The loss-curve files of a run in ``out`` (the PNG is absent when the plot could not be drawn)."""
    png = out / "loss.png"
    return {"history_csv": str(out / "history.csv"), "loss_png": str(png) if png.is_file() else None}


def expand_data(items: list[Path], skip: tuple[Path | None, ...] = ()) -> list[Path]:
    """Volume files and DICOM series as given; a batch directory contributes each of its volumes (but not
    the ``skip`` directories, nor other model or checkpoint directories in it)."""
    skipped = {Path(s).resolve() for s in skip if s is not None}
    out: list[Path] = []
    for p in items:
        paths.require_input(p)
        if p.is_dir() and paths.is_batch_dir(p):
            out.extend(q for q in paths.batch_volume_inputs(p) if not _run_artefact(q, skipped))
        else:
            out.append(p)
    if not out:
        raise UsageFailure("no training volumes found in DATA")
    return out


# shared with `federate`
DataArgument = Annotated[list[Path], typer.Argument(
    metavar="DATA...", show_default=False, readable=False,  # unreadable: our one-line error, exit 1
    help="Training volumes (files, DICOM series directories, or directories of volumes).")]
ModelDirOption = Annotated[Path, typer.Option("--out", "-o", metavar="DIR", show_default=False,
                                              help="Model directory to write (created if needed).")]


def register(app: typer.Typer) -> None:
    """Add the ``train`` command to ``app``."""

    @app.command("train")
    @cli_errors
    def train(
        data: DataArgument,
        out: ModelDirOption,
        val: Annotated[Optional[list[Path]], typer.Option("--val", metavar="PATH",
                                                          help="Validation-only volume (repeatable); default: --val-fraction of DATA, split by volume.")] = None,
        codec: Annotated[list[str], typer.Option("--codec", metavar="NAME",
                                                 help="Codec(s) whose output to learn: block-tucker, omlsvd-global (repeatable).")] = ["block-tucker"],  # noqa: B006
        targets: Annotated[str, typer.Option("--targets", metavar="DB,...", help="PSNR targets of the training pairs.")] = "36,38,40,42,44",
        blocks: Annotated[str, typer.Option("--blocks", metavar="B,...", help="Block shapes for block-tucker pairs: auto, a side (8) or 8x8x16.")] = "auto,8",
        epochs: Annotated[int, typer.Option("--epochs", min=1, help="Maximum number of epochs.")] = 10,
        patches: Annotated[int, typer.Option("--patches-per-epoch", min=1, help="Training patches per epoch.")] = 3200,
        batch: Annotated[int, typer.Option("--batch", min=1, help="Patches per step.")] = 8,
        patch: Annotated[int, typer.Option("--patch", min=16, help="Patch side (a multiple of 4).")] = 24,
        lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warm-up + cosine).")] = 2e-3,
        channels: Annotated[str, typer.Option("--channels", metavar="C1,C2", help="Channels at ½ and ¼ resolution.")] = "16,32",
        val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of volumes held out for validation.")] = 0.2,
        patience: Annotated[int, typer.Option("--patience", min=1, help="Early stopping: epochs without improvement of the validation loss (checked from "
                                                    "epoch 5 on).")] = 3,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the split, the initialisation and the patches.")] = 0,
        cache: Annotated[Optional[Path], typer.Option("--cache", metavar="DIR", help="Cache of decoded training volumes (default DIR/cache).")] = None,
        force: Annotated[bool, typer.Option("--force", "-f", help="Start over instead of resuming a run in DIR.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")] = False,
    ) -> None:
        """Train a restoration model on (decoded, original) pairs made by fedtensor's own codec.

        Writes DIR/model.safetensors (its SHA-256 is the model id), model.json, history.csv, loss.png.

        An interrupted run resumes from its last finished epoch when started again with the same settings.

        Use the model with: fedtensor decompress IN.ftz OUT --model DIR
        """
        from fedtensor.nn import TrainConfig
        from fedtensor.nn import train as run_training
        from fedtensor.nn.model import check_channels

        ch = _ints(channels, "--channels")
        try:
            check_channels(ch)
        except ValueError as err:
            raise UsageFailure(f"--{err}") from None
        if patch % 4:
            raise UsageFailure(f"--patch must be a multiple of 4, got {patch}")
        cfg = TrainConfig(epochs=epochs, patches_per_epoch=patches, batch=batch, patch=patch, lr=lr,
                          channels=ch, val_fraction=val_fraction, patience=patience, seed=seed,
                          codecs=tuple(codec), targets=_floats(targets, "--targets"),
                          blocks=tuple(b.strip() for b in blocks.split(",") if b.strip()))
        try:
            cfg.check()
        except ValueError as err:
            raise UsageFailure(str(err)) from None
        volumes, val_volumes = run_inputs(list(data), list(val) if val else None, out, cache)
        show = render.interactive(json_out)
        with removed_if_failed(out), _Progress(show) as prog:
            summary = run_training(volumes, out, cfg, val_paths=val_volumes, cache_dir=cache, resume=not force,
                                   progress=prog)
        summary = {**summary, **curve_files(out)}
        if json_out:
            render.emit_json({"command": "train", **summary})
        else:
            render.out_console().print(_table(summary))


class PhaseProgress:
    """Rich progress bars (stderr) for a run's events: the codec pairs (``"data"``), then whatever
    :meth:`on` draws for the run's own events. Disabled, it ignores every event."""

    eta = True  # show a time-remaining column

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None
        self.tasks: dict[str, Any] = {}

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       *([TimeRemainingColumn()] if self.eta else []), TextColumn("{task.fields[info]}")]
            self.progress = Progress(*columns, console=Console(stderr=True), transient=False)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, event: str, info: dict) -> None:
        p = self.progress
        if p is None:
            return
        if event == "data":
            if "data" not in self.tasks:
                self.tasks["data"] = p.add_task("codec pairs", total=info["total"], info="")
            p.update(self.tasks["data"], completed=info["done"], info=info["what"])
        else:
            self.on(event, info, p)

    def on(self, event: str, info: dict, p) -> None:
        raise NotImplementedError


class _Progress(PhaseProgress):
    """Codec pairs, then training steps."""

    last = ""

    def on(self, event: str, info: dict, p) -> None:
        if event == "start":
            total = info["epochs"] * info["steps_per_epoch"]
            done = (info["start_epoch"] - 1) * info["steps_per_epoch"]
            self.spe = info["steps_per_epoch"]
            self.tasks["train"] = p.add_task("training", total=total, completed=done,
                                             info=f"train {', '.join(info['train_volumes'])} · val {', '.join(info['val_volumes']) or '-'}")
        elif event == "step":
            p.update(self.tasks["train"], completed=(info["epoch"] - 1) * self.spe + info["step"],
                     info=f"epoch {info['epoch']} loss {info['loss']:.4g}{self.last}")
        elif event == "epoch":
            gain = info.get("val_gain_db")
            self.last = f" · val {info['val_loss']:.4g} ({gain:+.2f} dB)" if gain is not None else ""
            # the epoch's own figures on the bar now (the next step would show them under the next epoch)
            p.update(self.tasks["train"], info=f"epoch {info['epoch']} loss {info['train_loss']:.4g}{self.last}")
            if info.get("finished"):
                p.update(self.tasks["train"], completed=p.tasks[self.tasks["train"]].total)


def _table(s: dict):
    from rich.table import Table

    t = Table(title="fedtensor train", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    best = next((r for r in (s.get("history") or []) if r["epoch"] == s["best_epoch"]), None)
    rows = [
        ("model id", s["model_id"]),
        ("model dir", s["out"]),
        ("train volumes", ", ".join(s["train_volumes"])),
        ("val volumes", ", ".join(s["val_volumes"]) or "-"),
        ("epochs run", str(s["epochs_run"])),
        ("best epoch", str(s["best_epoch"])),
        ("best val loss", render.num(s.get("best_val_loss"))),
        ("throughput", render.num(s.get("patches_per_s"), ".3g", " patches/s")),
        ("curves", ", ".join(x for x in (s["history_csv"], s["loss_png"]) if x)),
    ]
    if best and best.get("val_gain_db") is not None:
        rows.insert(7, ("val PSNR gain", f"{best['val_gain_db']:+.2f} dB"))
    for k, v in rows:
        t.add_row(k, v)
    return t
