"""What ``fedtensor bench`` needs beyond the library call: argument normalisation, progress, the table.

Kept here (not in the Typer app) so that the command stays a few lines.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from fedtensor.bench.harness import BenchConfig, run_bench
from fedtensor.errors import VolumeError
from fedtensor.io import first_repeat


class BenchUsageError(ValueError):
    """A bad ``fedtensor bench`` command line (mapped to exit code 2 by the CLI)."""


def _split(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out += [p for p in str(v).replace(",", " ").split() if p]
    return out


def normalize_args(volumes: Sequence[str | Path], targets: Sequence[str] | None, codecs: Sequence[str] | None
                   ) -> tuple[list[Path], list[float] | None, list[str] | None]:
    """Volumes, targets and codecs from the command line.

    ``--targets``/``--codecs`` accept comma- or space-separated lists and may be repeated. Because an
    option takes one value, ``--targets 40 45 50 ct.nii.gz`` leaves ``45 50`` among the positional
    volumes: a positional that is not an existing path is taken as one more target (if it is a number
    and ``--targets`` was given) or codec (if it names one and ``--codecs`` was given).
    """
    from fedtensor.baselines import NAMES

    t_list, c_list = _split(targets), _split(codecs)
    paths: list[Path] = []
    for v in volumes:
        p = Path(v)
        if p.exists():
            paths.append(p)
            continue
        s = str(v)
        try:
            float(s)
            is_number = True
        except ValueError:
            is_number = False
        if is_number and targets:
            t_list.append(s)
        elif s in NAMES and codecs:
            c_list.append(s)
        elif is_number or s in NAMES:  # a target or codec given where a volume goes
            raise BenchUsageError(f"no such volume: {s} (targets and codecs follow --targets / --codecs)")
        else:  # as every other command words (and exits on) a missing input
            raise VolumeError(f"input not found: {s}")
    if not paths:
        raise BenchUsageError("give at least one VOLUME (.nii, .nii.gz, .npy or a DICOM series directory)")
    repeat = first_repeat(paths)  # it would be measured again, and counted again in the means
    if repeat:
        raise BenchUsageError("the same volume is given twice ({} and {})".format(*repeat))
    if targets is not None and not t_list:  # `--targets ""` must not silently mean the default targets
        raise BenchUsageError("--targets names no target; give PSNRs in dB, e.g. --targets 40,45,50")
    tv: list[float] | None = None
    if t_list:
        try:
            tv = [float(t) for t in t_list]
        except ValueError:
            raise BenchUsageError(f"--targets must be numbers of dB, got {' '.join(t_list)}") from None
        bad = [t for t in tv if not 0 < t < 400]
        if bad:
            raise BenchUsageError(f"--targets must be PSNRs in dB between 0 and 400, got {bad[0]:g}")
    if codecs is not None and not c_list:  # `--codecs ""` must not silently mean every codec
        raise BenchUsageError(f"--codecs names no codec; choose from: {', '.join(NAMES)}")
    unknown = [c for c in c_list if c not in NAMES]
    if unknown:
        raise BenchUsageError(f"unknown codec {unknown[0]!r}; choose from: {', '.join(NAMES)}")
    return paths, tv, (list(dict.fromkeys(c_list)) or None)


class RichProgress:
    """A rich progress bar on stderr (cells done / total, elapsed, ETA) plus log lines."""

    def __init__(self, enabled: bool = True):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.enabled = enabled and self.console.is_terminal
        self._progress = None
        self._task = None

    def start(self, total: int, description: str) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
        self._progress.start()
        self._task = self._progress.add_task(description, total=max(total, 1))

    def advance(self, n: int, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, description=description)
        elif n and not self.enabled:
            self.log(description)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def run_command(volumes, targets, codecs, out: Path, jobs: int, *, figures: bool = True, json_out: bool = False,
                quiet: bool = False) -> dict:
    """Run ``fedtensor bench`` and print its summary (a rich table, or one JSON object)."""
    paths, tv, cv = normalize_args(volumes, targets, codecs)
    try:
        cfg = BenchConfig(paths, targets=tv or [40.0, 45.0, 50.0], codecs=cv, out=Path(out), jobs=jobs,
                          figures=figures)
    except ValueError as exc:
        raise BenchUsageError(str(exc)) from None
    progress = RichProgress(enabled=not json_out and not quiet)
    if quiet or json_out:
        from fedtensor.bench.harness import QuietProgress

        progress = QuietProgress()
    summary = run_bench(cfg, progress)
    if json_out:
        import json

        from fedtensor.jsonable import jsonable

        brief = {k: summary.get(k) for k in ("wall_s", "status_counts", "bd_rate", "bd_psnr", "errors", "figures")}
        keys = ("volume", "codec", "target", "status", "bpv", "psnr", "ssim", "encode_mvox_s", "decode_mvox_s",
                "reason")
        brief["cells"] = [{k: c.get(k) for k in keys} for c in summary.get("cells", [])]  # the rest: results.json
        print(json.dumps({"command": "bench", "out": str(cfg.out), **jsonable(brief)}))
    else:
        print_summary(summary, cfg)
    return summary


def print_summary(summary: dict, cfg: BenchConfig) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    con = Console(highlight=False)
    bd = summary.get("bd_rate") or {}
    if bd:
        rivals = list(next(iter(bd.values())).keys())
        t = Table(title=f"BD-rate of fedtensor vs each rival, % ({min(cfg.targets):g}–{max(cfg.targets):g} dB; "
                        "negative = fedtensor smaller)")
        t.add_column("volume")
        for r in rivals:
            t.add_column(r, justify="right")
        for vol, row in bd.items():
            t.add_row(vol, *["—" if row.get(r) is None else f"{row[r]:+.1f}" for r in rivals])
        con.print(t)
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(summary.get("status_counts", {}).items()))
    files = summary.get("files", [])
    shown = ", ".join(f for f in files if not f.endswith(".png")) + (", *.png" if any(f.endswith(".png") for f in files) else "")
    con.print(f"cells — {counts}; wall time {summary['wall_s'] / 60:.1f} min; outputs in {cfg.out}/ ({shown})")
    for e in summary.get("errors", [])[:20]:
        con.print(Text.assemble(("warning: ", "yellow"), str(e)))
    # not scored, and why (errors are listed above): one line per codec and reason
    unscored: dict[tuple, list[str]] = {}
    for c in summary.get("cells", []):
        if c.get("status") not in ("ok", "error"):
            unscored.setdefault((c["codec"], c["status"], c.get("reason") or ""), []).append(str(c["volume"]))
    for (codec, status, reason), vols in list(unscored.items())[:20]:
        where = ", ".join(sorted(set(vols)))
        text = f"{codec} on {where}" + (f" — {reason}" if reason else "")
        con.print(Text.assemble((f"{status}: ", "yellow"), text))
