"""Tables and files from the benchmark cells: CSV, JSON, BD-rate and summary markdown, figures."""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from fedtensor.bench.bdrate import bd_psnr, bd_rate
from fedtensor.bench.harness import LOSSLESS, num, target_key, write_text_atomic
from fedtensor.jsonable import jsonable

ANCHOR = "fedtensor"
CSV_COLUMNS = (
    "volume", "codec", "target", "status", "bytes", "bpv", "ratio", "psnr", "ssim", "max_error",
    "encode_mvox_s", "decode_mvox_s", "encode_s", "decode_s", "peak_mem_bytes", "peak_mem_over_input",
    "param", "search_evals", "search_s", "codec_label", "kind", "version", "shape", "dtype", "voxels",
    "fingerprint", "reason",
)


def ordered_codecs(codecs: Sequence[str]) -> list[str]:
    from fedtensor.baselines import NAMES

    return [c for c in NAMES if c in codecs]


def select(cells: dict[str, dict], specs, codecs, targets) -> list[dict]:
    """The cells of this run's volumes (by fingerprint), codecs and targets, in report order (an earlier
    run into the same directory may have left cells at other targets)."""
    fps = {s.fingerprint: i for i, s in enumerate(specs)}
    order = {c: i for i, c in enumerate(ordered_codecs(codecs))}
    wanted = {target_key(t) for t in targets} | {LOSSLESS}
    rows = [c for c in cells.values() if c.get("fingerprint") in fps and c.get("codec") in order
            and target_key(c.get("target")) in wanted]
    return sorted(rows, key=lambda c: (fps[c["fingerprint"]], order[c["codec"]],
                                       math.inf if c["target"] == LOSSLESS else float(c["target"])))


def curve(rows: list[dict], volume: str, codec: str) -> list[dict]:
    """Scored lossy points of one codec on one volume, by increasing PSNR."""
    pts = [c for c in rows if c["volume"] == volume and c["codec"] == codec and c.get("status") == "ok"
           and c["target"] != LOSSLESS]
    return sorted(pts, key=lambda c: num(c["psnr"]))


def bd_tables(rows: list[dict], specs, codecs, lo: float, hi: float) -> tuple[dict, dict]:
    """BD-rate (%) and BD-PSNR (dB) of fedtensor against every other lossy codec, per volume."""
    from fedtensor.baselines import BASELINES

    rivals = [c for c in ordered_codecs(codecs) if c != ANCHOR and not BASELINES[c].lossless]
    rate, psnr = {}, {}
    if ANCHOR not in codecs:
        return rate, psnr
    for s in specs:
        ft = curve(rows, s.label, ANCHOR)
        rate[s.label], psnr[s.label] = {}, {}
        for r in rivals:
            rv = curve(rows, s.label, r)
            args = ([num(c["bpv"]) for c in rv], [num(c["psnr"]) for c in rv],
                    [num(c["bpv"]) for c in ft], [num(c["psnr"]) for c in ft])
            rate[s.label][r] = bd_rate(*args, lo=lo, hi=hi) if ft and rv else None
            psnr[s.label][r] = bd_psnr(*args) if ft and rv else None
    return rate, psnr


def _fmt(x, spec=".2f", none="—") -> str:
    if x is None:
        return none
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def bd_markdown(bd: dict, bdp: dict, specs, lo: float, hi: float, n_targets: int) -> str:
    rivals = list(next(iter(bd.values())).keys()) if bd else []
    rows = []
    for s in specs:
        rows.append([s.label] + [_fmt(bd[s.label].get(r), "+.1f") for r in rivals])
    means = []
    for r in rivals:
        vals = [bd[s.label][r] for s in specs if bd[s.label].get(r) is not None]
        means.append(_fmt(statistics.fmean(vals), "+.1f") if vals else "—")
    rows.append(["**mean**"] + means)
    prows = [[s.label] + [_fmt(bdp[s.label].get(r), "+.2f") for r in rivals] for s in specs]
    return "\n".join([
        f"# BD-rate of fedtensor against each rival ({lo:g}–{hi:g} dB)",
        "",
        "Bjøntegaard delta rate (VCEG-M33) of **fedtensor (block Tucker)** against each rival, in %: the average "
        "difference in bits per voxel at equal PSNR. **Negative = fedtensor needs fewer bits.** "
        "log(bpv) is fitted as a polynomial of PSNR through each codec's scored points (of degree one less than "
        f"their number, at most cubic; this run has {n_targets} target(s)) and integrated over the PSNR range "
        f"both curves cover inside {lo:g}–{hi:g} dB. — = no overlap, or a codec with fewer than two scored points.",
        "",
        _md_table(["volume"] + rivals, rows),
        "",
        "## BD-PSNR (dB; positive = fedtensor has the higher PSNR at equal rate, over the rates both curves cover)",
        "",
        _md_table(["volume"] + rivals, prows),
        "",
    ])


def speed_rows(rows: list[dict], codecs, target) -> list[list[str]]:
    """Median (over volumes) encode/decode MVox/s and peak memory per codec at ``target``."""
    out = []
    for c in ordered_codecs(codecs):
        pts = [r for r in rows if r["codec"] == c and r.get("status") == "ok"
               and (r["target"] == LOSSLESS or float(r["target"]) == float(target))]
        if not pts:
            continue
        med = lambda k: statistics.median(num(r[k]) for r in pts if num(r.get(k)) is not None)  # noqa: E731
        out.append([c, target_key(pts[0]["target"]), _fmt(med("encode_mvox_s"), ".2f"), _fmt(med("decode_mvox_s"), ".2f"),
                    _fmt(med("peak_mem_over_input"), ".2f"), str(len(pts))])
    return out


def timing_note(wall_s: float, jobs: int, cpu_s: float, load, in_process: bool = False) -> str:
    import os

    cores = os.cpu_count() or 1
    if in_process:  # (one job or one task: see harness._execute)
        jobs = 1
        text = (f"Wall time {wall_s / 60:.1f} min in one process, the tasks one after another (BLAS and XLA "
                "with their default threads)")
    else:
        text = f"Wall time {wall_s / 60:.1f} min with {jobs} process(es), single-threaded each"
    if cpu_s:
        text += (f"; the tasks used {cpu_s / 60:.1f} CPU-minutes (≈ {cpu_s / 60 / max(jobs, 1):.1f} min of wall "
                 f"time on {jobs} idle core(s))")
    loads = [x for x in (load or ()) if x is not None]
    if loads:
        text += (f"; machine load average {max(loads):.1f} on {cores} core(s) during the run "
                 "(other jobs on a shared machine stretch the wall time and the MVoxel/s figures alike)")
    return text + "."


def summary_markdown(rows, specs, codecs, targets, wall_s: float, jobs: int, bd_md: str, timing: str = "") -> str:
    from fedtensor.baselines import BASELINES

    lossy = [c for c in ordered_codecs(codecs) if not BASELINES[c].lossless]
    lossless = [c for c in ordered_codecs(codecs) if BASELINES[c].lossless]
    parts = [f"# Rate–distortion benchmark — {len(specs)} volume(s), targets {', '.join(f'{t:g}' for t in targets)} dB",
             "", (timing or f"Wall time {wall_s / 60:.1f} min with {jobs} process(es).") + " "
             "bpv = 8 · bytes of the whole stream (headers included) / voxels; each lossy codec's parameter is "
             "the smallest stream whose *decoded* PSNR ≥ the target.", ""]
    parts += ["## Volumes", "", _md_table(["volume", "shape", "dtype", "range", "MVoxel"], [
        [s.label, "×".join(map(str, s.shape)), s.dtype, f"{s.vmin:g}…{s.vmax:g}", f"{s.voxels / 1e6:.2f}"] for s in specs]), ""]
    for t in targets:
        tbl = []
        for c in lossy:
            line = [c]
            for s in specs:
                cell = next((r for r in rows if r["volume"] == s.label and r["codec"] == c
                             and r["target"] != LOSSLESS and float(r["target"]) == t), None)
                if cell is None:
                    line.append("")
                elif cell.get("status") == "ok":
                    line.append(f"{num(cell['bpv']):.3f} ({num(cell['psnr']):.2f})")
                else:
                    line.append(cell.get("status", "?"))
            tbl.append(line)
        parts += [f"## bpv at {t:g} dB (decoded PSNR in brackets)", "", _md_table(["codec"] + [s.label for s in specs], tbl), ""]
    if lossless:
        tbl = []
        for c in lossless:
            line = [c]
            for s in specs:
                cell = next((r for r in rows if r["volume"] == s.label and r["codec"] == c), None)
                line.append("" if cell is None else (f"{num(cell['bpv']):.3f}" if cell.get("status") == "ok"
                                                      else cell.get("status", "?")))
            tbl.append(line)
        parts += ["## Lossless bpv", "", _md_table(["codec"] + [s.label for s in specs], tbl), ""]
    mid = targets[len(targets) // 2]
    parts += [f"## Speed at {mid:g} dB (median over volumes; lossless codecs at their one point)", "",
              "Encode = one encode at the parameter already found (the search is not timed; fedtensor's own rate "
              "control is included in its encode; JIT compilation excluded). Peak memory = extra RSS during the encode "
              "÷ input array bytes.", "",
              _md_table(["codec", "target", "encode MVox/s", "decode MVox/s", "peak mem ×input", "volumes"],
                        speed_rows(rows, codecs, mid)), ""]
    parts += [bd_md.replace("# BD-rate", "## BD-rate", 1).replace("\n## BD-PSNR", "\n### BD-PSNR")]
    return "\n".join(parts)


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        line = []
        for k in CSV_COLUMNS:
            v = r.get(k)
            if isinstance(v, list):
                v = "x".join(map(str, v))
            elif isinstance(v, float):
                v = str(v) if not math.isfinite(v) else f"{v:.6g}"  # inf, -inf, nan
            line.append("" if v is None else v)
        w.writerow(line)
    write_text_atomic(path, buf.getvalue())


def environment() -> dict[str, Any]:
    import os

    import numpy as np

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "numpy": np.__version__}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    for mod in ("jax", "imagecodecs", "pywt", "matplotlib"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    import fedtensor

    info["fedtensor"] = fedtensor.__version__
    return info


#: The figures a run writes in its output directory (see :mod:`fedtensor.bench.figures`).
FIGURES = ("rd_*.png", "storage_*dB.png", "panel_*.png")


def write_reports(cfg, specs, cells: dict[str, dict], *, wall_s: float, jobs: int, task_log, errors, progress,
                  load=None, in_process: bool = False) -> dict:
    from fedtensor.baselines import BASELINES

    out = Path(cfg.out)
    rows = select(cells, specs, cfg.codecs, cfg.targets)
    lo, hi = min(cfg.targets), max(cfg.targets)
    bd, bdp = bd_tables(rows, specs, cfg.codecs, lo, hi)
    bd_md = bd_markdown(bd, bdp, specs, lo, hi, len(cfg.targets)) if ANCHOR in cfg.codecs else ""
    write_csv(out / "results.csv", rows)
    if bd_md:
        write_text_atomic(out / "bd_rate.md", bd_md)
    else:  # an earlier run's table (another codec list) would stand next to this run's results
        (out / "bd_rate.md").unlink(missing_ok=True)
    cpu_s = sum(t.get("cpu_s") or 0.0 for t in task_log)
    summary_md = summary_markdown(rows, specs, cfg.codecs, cfg.targets, wall_s, jobs, bd_md,
                                  timing_note(wall_s, jobs, cpu_s, load, in_process))
    write_text_atomic(out / "summary.md", summary_md)
    figures: list[str] = []
    if cfg.figures:
        from fedtensor.bench import figures as figs

        try:
            figures = figs.write_figures(out, rows, specs, cfg.codecs, cfg.targets)
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not lose the measurements
            errors.append(f"figures: {type(exc).__name__}: {exc}")
    for stale in {p for pattern in FIGURES for p in out.glob(pattern)} - {Path(f) for f in figures}:
        stale.unlink(missing_ok=True)  # an earlier run's figures (other volumes, codecs, targets)
    status_counts: dict[str, int] = {}
    for r in rows:
        status_counts[r.get("status", "?")] = status_counts.get(r.get("status", "?"), 0) + 1
    summary = {
        "benchmark": "fedtensor rate-distortion",
        "definitions": {
            "psnr": "20*log10((max-min of original)/RMSE), all voxels, original units, on the decoded array",
            "bpv": "8*stream bytes (headers included)/voxels", "ratio": "original bytes (input dtype)/stream bytes",
            "ssim": "3D SSIM, Gaussian window sigma=1.5, data range max-min",
            "bd_rate": f"fedtensor vs rival, % bpv at equal PSNR over the overlap within {lo:g}-{hi:g} dB; "
                       "negative = fedtensor smaller",
            "search": "smallest stream whose decoded PSNR >= target (cells that miss it are 'missed', never scored)",
            "speed": "MVoxel/s = voxels/seconds/1e6; encode at the found parameter, one process per core",
        },
        "config": {"volumes": [str(v) for v in cfg.volumes], "targets": cfg.targets, "codecs": cfg.codecs,
                   "jobs": jobs, "in_process": in_process, "repeat": cfg.repeat, "out": str(out)},
        "wall_s": wall_s,
        "task_cpu_s": cpu_s,
        "load_average_5min": list(load) if load else None,
        "environment": environment(),
        "volumes": [asdict(s) for s in specs],
        "codecs": {c: BASELINES[c]().describe() for c in ordered_codecs(cfg.codecs)},
        "status_counts": status_counts,
        "bd_rate": bd, "bd_psnr": bdp,
        "tasks": task_log, "errors": errors, "figures": figures,
        "cells": rows,
    }
    summary["files"] = ["results.csv", "results.json", *(["bd_rate.md"] if bd_md else []), "summary.md",
                        *(Path(f).name for f in figures)]
    write_text_atomic(out / "results.json", json.dumps(jsonable(summary), indent=1, allow_nan=False) + "\n")
    summary["summary_md"] = summary_md
    return summary
