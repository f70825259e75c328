"""The rate–distortion harness: every volume × codec × target PSNR, resumable, in parallel processes.

A *cell* is one (volume, codec, target) measurement. For a lossy codec the smallest stream whose
decoded PSNR reaches the target is found (:func:`fedtensor.baselines.find_smallest`, evaluations
cached across the targets of one volume; fedtensor's codecs use their own PSNR mode). That parameter
is then encoded once more under a timer and a peak-memory sampler, decoded under a timer, and the
decoded array — what the codec's public ``decode`` returns, in the volume's dtype — is checked
against the target and scored (PSNR, 3D SSIM, max error). A cell whose decoded PSNR misses the target
is recorded as ``missed`` and never scored. Lossless codecs have one cell (target ``lossless``),
checked bit-exact.

Cells are appended to ``DIR/cells.jsonl`` (rewritten atomically after every finished task), keyed by
volume label + content fingerprint, codec and target, so an interrupted run resumes where it stopped
and a finished cell is never recomputed. Work is split into (volume, codec) tasks, run largest first
on ``jobs`` spawned processes (each single-threaded, so the timings are per core).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from fedtensor.cores import usable_cores
from fedtensor.errors import FedtensorError, RateError
from fedtensor.jsonable import jsonable

CELLS_FILE = "cells.jsonl"
LOSSLESS = "lossless"
#: statuses that are final: such cells are skipped on resume
FINAL = frozenset({"ok", "unreachable", "n/a", "missed"})
DEFAULT_TARGETS = (40.0, 45.0, 50.0)
#: rough CPU cost per voxel and target (for largest-first scheduling only)
_COST = {"jpegxl": 10, "fedtensor": 6, "omlsvd-global": 6, "jpeg2000": 3, "pca": 3, "dwt": 3, "sperr": 2,
         "htj2k": 1.5, "zstd": 3, "sz3": 1, "zfp": 1, "fedtensor-lossless": 1, "jpeg2000-lossless": 1}
# (FEDTENSOR_WORKERS: fedtensor's entropy coder would start worker processes of its own on large volumes)
_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FEDTENSOR_WORKERS": "1"}
_XLA_SINGLE = "--xla_cpu_multi_thread_eigen=false"


class Progress(Protocol):
    def start(self, total: int, description: str) -> None: ...
    def advance(self, n: int, description: str) -> None: ...
    def log(self, message: str) -> None: ...
    def stop(self) -> None: ...


class QuietProgress:
    def start(self, total, description): pass
    def advance(self, n, description): pass
    def log(self, message): pass
    def stop(self): pass


# --------------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------------


@dataclass
class VolumeSpec:
    path: str
    label: str
    fingerprint: str
    shape: list
    dtype: str
    voxels: int
    nbytes: int
    vmin: float
    vmax: float
    modality: str | None = None


def volume_label(path: Path) -> str:
    """File name without ``.nii.gz``/``.nii``/``.npy``, or the directory name."""
    n = Path(path).name
    for suf in (".nii.gz", ".nii", ".npy"):
        if n.lower().endswith(suf):
            return n[: -len(suf)]
    return n


def fingerprint(data: np.ndarray) -> str:
    h = hashlib.sha1(f"{data.shape}|{data.dtype.str}|".encode())
    h.update(np.ascontiguousarray(data).data)
    return h.hexdigest()[:16]


def guess_modality(data: np.ndarray, meta: dict | None) -> str:
    """``"CT"`` (Hounsfield-like range) or ``"MR"``/other, for display windows only."""
    m = (meta or {}).get("modality") or (meta or {}).get("Modality")
    if m:
        return str(m).upper()
    return "CT" if float(data.min()) <= -500 and float(data.max()) >= 500 else "other"


def describe_volumes(paths: Sequence[Path]) -> list[VolumeSpec]:
    from fedtensor.io import read_volume

    specs, seen = [], {}
    for p in paths:
        vol = read_volume(p)
        d = np.asarray(vol.data)
        label = volume_label(Path(p))
        if label in seen:  # two inputs with the same name: keep labels unique
            seen[label] += 1
            label = f"{label}-{seen[label]}"
        else:
            seen[label] = 1
        specs.append(VolumeSpec(str(Path(p).resolve()), label, fingerprint(d), list(d.shape), d.dtype.name,
                                int(d.size), int(d.nbytes), float(d.min()), float(d.max()),
                                guess_modality(d, vol.meta)))
    return specs


_VOLUMES: dict[str, Any] = {}  # per process: path -> Volume


def _load(spec: VolumeSpec):
    vol = _VOLUMES.get(spec.path)
    if vol is None:
        from fedtensor.io import read_volume

        vol = read_volume(spec.path)
        _VOLUMES[spec.path] = vol
    return vol


# --------------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------------


def target_key(target: float | str) -> str:
    return LOSSLESS if target == LOSSLESS else f"{float(target):g}"


def cell_key(label: str, fp: str, codec: str, target: float | str) -> str:
    return f"{label}|{fp}|{codec}|{target_key(target)}"


def key_of(cell: dict) -> str:
    return cell_key(cell["volume"], cell["fingerprint"], cell["codec"], cell["target"])


def load_cells(out: Path) -> dict[str, dict]:
    """The cells already in ``out/cells.jsonl`` (a torn last line from a crash is ignored)."""
    path = Path(out) / CELLS_FILE
    cells: dict[str, dict] = {}
    if not path.exists():
        return cells
    for line in path.read_text().splitlines():
        try:
            c = json.loads(line)
            cells[key_of(c)] = c
        except (ValueError, KeyError, TypeError):
            continue
    return cells


def write_text_atomic(path: Path, text: str) -> None:
    from fedtensor.io.atomic import atomic_write_bytes

    atomic_write_bytes(path, text.encode(), force=True)


def save_cells(out: Path, cells: dict[str, dict]) -> None:
    lines = [json.dumps(jsonable(c), sort_keys=True, allow_nan=False) for c in cells.values()]
    write_text_atomic(Path(out) / CELLS_FILE, "\n".join(lines) + ("\n" if lines else ""))


def num(x) -> float | None:
    """A cell figure back as a float (``"inf"`` strings included); ``None`` if absent."""
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# measuring one cell (runs in the worker)
# --------------------------------------------------------------------------------------------------


def _base_cell(spec: VolumeSpec, codec, target) -> dict:
    return {"volume": spec.label, "fingerprint": spec.fingerprint, "codec": codec.name, "codec_label": codec.label,
            "kind": codec.kind, "target": LOSSLESS if target == LOSSLESS else float(target),
            "shape": spec.shape, "dtype": spec.dtype, "voxels": spec.voxels}


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


_COMPILES = [0]
_LISTENING = [False]


def compile_count() -> int:
    """JAX compilations so far in this process (listener registered on first use)."""
    if not _LISTENING[0]:
        from jax import monitoring

        def listener(name, *_, **__):
            if name.endswith("backend_compile_duration"):
                _COMPILES[0] += 1

        monitoring.register_event_duration_secs_listener(listener)
        _LISTENING[0] = True
    return _COMPILES[0]


def _timed(fn, sample_memory: bool):
    """``(result, seconds, extra peak bytes)``; a call that JIT-compiled is repeated warm."""
    from fedtensor.bench.memory import RssPeakSampler

    for _ in range(2):
        n0 = compile_count()
        if sample_memory:
            with RssPeakSampler(interval_s=0.002, switch_interval_s=None) as mem:
                t0 = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t0
            extra = mem.conservative_extra_bytes
        else:
            t0 = time.perf_counter()
            out = fn()
            dt, extra = time.perf_counter() - t0, 0
        if compile_count() == n0:
            break
    return out, dt, extra


def _measure(cell: dict, spec: VolumeSpec, vol, codec, encode, target, repeat: int) -> dict:
    """Time ``encode()`` (with peak memory) and ``codec.decode``, check and score the decoded array.

    JIT compilation is never timed: a call during which JAX compiled is run again and the warm call
    is the one reported.
    """
    from fedtensor.metrics import compression_ratio, max_abs_error, psnr, ssim3d

    data = np.asarray(vol.data)
    blob, enc_s, mem = _timed(encode, True)
    for _ in range(max(0, repeat - 1)):
        enc_s = min(enc_s, _timed(encode, False)[1])
    decoded, dec_s, _ = _timed(lambda: codec.decode(blob), False)
    for _ in range(max(0, repeat - 1)):
        dec_s = min(dec_s, _timed(lambda: codec.decode(blob), False)[1])
    decoded = np.asarray(decoded)
    n = spec.voxels
    cell.update(bytes=len(blob), bpv=8.0 * len(blob) / n, ratio=compression_ratio(spec.nbytes, len(blob)),
                encode_s=enc_s, decode_s=dec_s, encode_mvox_s=n / enc_s / 1e6, decode_mvox_s=n / dec_s / 1e6,
                peak_mem_bytes=mem, peak_mem_over_input=mem / max(spec.nbytes, 1))
    if decoded.shape != data.shape or decoded.dtype != data.dtype:
        cell.update(status="missed", reason=f"decoded {decoded.shape} {decoded.dtype} != {data.shape} {data.dtype}")
        return cell
    if target == LOSSLESS:
        # bit for bit: array_equal holds −0.0 equal to +0.0
        exact = bool(np.array_equal(decoded, data) and np.array_equal(np.signbit(decoded), np.signbit(data)))
        cell.update(psnr=math.inf if exact else psnr(data, decoded), ssim=1.0 if exact else ssim3d(data, decoded),
                    max_error=max_abs_error(data, decoded), status="ok" if exact else "missed")
        if not exact:
            cell["reason"] = "lossless codec did not reproduce the volume exactly"
        return cell
    p = psnr(data, decoded)
    cell.update(psnr=p, max_error=max_abs_error(data, decoded))
    if not p >= float(target):  # never score a codec on a PSNR it did not reach
        cell.update(status="missed", reason=f"decoded PSNR {p:.4f} dB < target {float(target):g} dB")
        return cell
    cell.update(ssim=ssim3d(data, decoded), status="ok")
    return cell


def run_cells(spec: VolumeSpec, codec_name: str, targets: Sequence, repeat: int = 1) -> list[dict]:
    """Measure ``codec_name`` on one volume at every target (in this process)."""
    from fedtensor.baselines import get_baseline

    codec = get_baseline(codec_name)
    targets = [LOSSLESS] if codec.lossless else list(targets)
    cells = [_base_cell(spec, codec, t) for t in targets]
    reason = codec.unavailable_reason()
    if reason:
        for c in cells:
            c.update(status="unavailable", reason=reason)
        return cells
    try:
        cells[0]["version"] = codec.version()
    except Exception:  # noqa: BLE001 - informative only
        pass
    for c in cells[1:]:
        c["version"] = cells[0].get("version")
    vol = _load(spec)
    reason = codec.not_applicable_reason(vol)  # (by the code of that version: a newer one may apply)
    if reason:
        for c in cells:
            c.update(status="n/a", reason=reason)
        return cells
    if codec.lossless:
        try:
            _measure(cells[0], spec, vol, codec, lambda: codec.encode_lossless(vol), LOSSLESS, repeat)
        except Exception as exc:  # noqa: BLE001 - a failing codec is reported, the run goes on
            cells[0].update(status="error", reason=_one_line(exc), traceback=traceback.format_exc(limit=6))
        return cells
    prep, cache, finer, finer_cache = None, {}, None, {}
    for cell, t in zip(cells, targets):
        try:
            if codec.direct_psnr:  # the codec's own rate control is its search, and part of its encode
                _measure(cell, spec, vol, codec, lambda: codec.encode_psnr(vol, t), t, repeat)
                cell.update(search_s=cell.get("encode_s"), search_evals=1)
                continue
            if prep is None:
                prep = codec.prepare(vol)
            from fedtensor.baselines import find_smallest

            res = find_smallest(prep.evaluate, prep.space, float(t), cache, size=prep.size)
            used, space = codec, prep.space
            if not res.reached and finer is None:  # e.g. JPEG2000 from 16-bit samples (False: none)
                finer = codec.finer(vol)
                finer = False if finer is None else finer.prepare(vol)
            if not res.reached and finer:
                res = find_smallest(finer.evaluate, finer.space, float(t), finer_cache, size=finer.size)
                used, space = finer.codec, finer.space
                cell["variant"] = "finer"
            cell.update(search_s=res.seconds, search_evals=res.evaluations, param=res.param,
                        search_psnr=res.psnr)
            if not res.reached:
                cell.update(status="unreachable",
                            reason=f"no parameter in [{space.lo:g}, {space.hi:g}] reaches {t:g} dB")
                continue
            param = res.param
            _measure(cell, spec, vol, used, lambda: used.encode_param(vol, param), t, repeat)
        except RateError as exc:  # the codec's own rate control says the target cannot be met
            cell.update(status="unreachable", reason=_one_line(exc))
        except Exception as exc:  # noqa: BLE001
            cell.update(status="error", reason=_one_line(exc), traceback=traceback.format_exc(limit=6))
    return cells


# --------------------------------------------------------------------------------------------------
# the side-by-side panel (fedtensor vs JPEG2000 at the same size)
# --------------------------------------------------------------------------------------------------


def match_size(encode, budget: int, lo: float = 30.0, hi: float = 70.0, limits=(5.0, 150.0), steps: int = 10,
               rel_tol: float = 0.01):
    """``(param, blob)`` with the largest stream not above ``budget`` bytes, sizes growing with ``param``.

    Brackets the budget by widening ``[lo, hi]`` within ``limits``, then interpolates on log(bytes)
    (safeguarded), stopping within ``rel_tol`` of the budget. ``None`` if even ``limits[0]`` is too big.
    """
    tried: dict[float, bytes] = {}

    def ev(p: float) -> int:
        if p not in tried:
            tried[p] = encode(p)
        return len(tried[p])

    while ev(lo) > budget and lo > limits[0]:
        lo = max(limits[0], lo - 2 * (hi - lo))
    while ev(hi) <= budget and hi < limits[1]:
        hi = min(limits[1], hi + 2 * (hi - lo))
    if ev(lo) <= budget < ev(hi):
        for _ in range(steps):
            if budget - ev(lo) <= rel_tol * budget:
                break
            w = hi - lo
            x = lo + (math.log(budget * (1 - rel_tol / 2)) - math.log(ev(lo))) / (math.log(ev(hi)) - math.log(ev(lo))) * w
            x = min(hi - 0.05 * w, max(lo + 0.05 * w, x))
            if ev(x) <= budget:
                lo = x
            else:
                hi = x
    fits = [(p, b) for p, b in tried.items() if len(b) <= budget]
    return max(fits, key=lambda pb: len(pb[1])) if fits else None


def panel_path(out: Path, spec: VolumeSpec) -> Path:
    return Path(out) / "panels" / f"{spec.label}-{spec.fingerprint}.npz"


def run_panel(spec: VolumeSpec, target: float, out: str) -> str | None:
    """fedtensor at ``target`` and JPEG2000 at the largest size not above fedtensor's; save the mid slice."""
    from fedtensor.baselines import get_baseline
    from fedtensor.metrics import psnr, ssim3d

    ft, j2k = get_baseline("fedtensor"), get_baseline("jpeg2000")
    if ft.unavailable_reason() or j2k.unavailable_reason():
        return None
    vol = _load(spec)
    data = np.asarray(vol.data)
    blob = ft.encode(vol, psnr=target)
    dec_ft = ft.decode(blob)
    budget = len(blob)
    best = match_size(lambda level: j2k.encode_param(vol, level), budget)
    if best is None:
        return None
    dec_j = j2k.decode(best[1])
    k = data.shape[2] // 2
    path = panel_path(Path(out), spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(
        tmp, original=data[:, :, k], jpeg2000=dec_j[:, :, k], fedtensor=dec_ft[:, :, k], slice=k,
        spacing=np.asarray(vol.spacing, float), target=target,
        fedtensor_bytes=budget, jpeg2000_bytes=len(best[1]), voxels=data.size,
        fedtensor_psnr=psnr(data, dec_ft), jpeg2000_psnr=psnr(data, dec_j),
        fedtensor_ssim=ssim3d(data, dec_ft), jpeg2000_ssim=ssim3d(data, dec_j), jpeg2000_level=best[0],
        modality=spec.modality or "other",
        # radiological display: anterior up, patient's right on the left (from the voxel-to-RAS affine)
        flip_ud=bool(vol.affine[1, 1] < 0), flip_lr=bool(vol.affine[0, 0] > 0),
    )
    os.replace(tmp, path)
    return str(path)


# --------------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------------


def run_task(task: dict) -> dict:
    """Worker entry point (top level so that spawned processes can unpickle it)."""
    t0, c0 = time.perf_counter(), time.process_time()
    spec = VolumeSpec(**task["volume"])
    result: dict = {"task": task}
    if task["kind"] == "panel":
        try:
            result["panel"] = run_panel(spec, task["target"], task["out"])
        except Exception as exc:  # noqa: BLE001
            result.update(panel=None, error=_one_line(exc))
    else:
        result["cells"] = run_cells(spec, task["codec"], task["targets"], task.get("repeat", 1))
    # CPU seconds (all threads of this process) say what the task costs on an idle machine
    return {**result, "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def _worker_init() -> None:
    os.environ.update(_THREAD_ENV)
    # Import the codecs now, all workers at once: a run then measures one version of the code even if
    # the source tree changes while it runs.
    import fedtensor.baselines  # noqa: F401
    import fedtensor.codec  # noqa: F401
    import fedtensor.metrics  # noqa: F401
    from fedtensor.baselines.fedtensor_codecs import source_digest

    source_digest()  # the loaded code's, before a cell asks


@dataclass
class BenchConfig:
    volumes: list[Path]
    targets: list[float] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    codecs: list[str] | None = None
    out: Path = Path("results")
    jobs: int = 0
    figures: bool = True
    repeat: int = 1
    panels: bool = True

    def __post_init__(self):
        from fedtensor.baselines import NAMES

        self.volumes = [Path(v) for v in self.volumes]
        self.targets = sorted({float(t) for t in self.targets})
        self.codecs = list(self.codecs) if self.codecs else list(NAMES)
        unknown = [c for c in self.codecs if c not in NAMES]
        if unknown:
            raise ValueError(f"unknown codec(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
        if not self.targets or any(not (0 < t < 400) for t in self.targets):
            raise ValueError("targets must be PSNRs in dB between 0 and 400")
        self.out = Path(self.out)
        if self.jobs < 0:
            raise ValueError("--jobs must be >= 0 (0 = one per core)")


def current_version(name: str) -> str | None:
    """The version string ``name``'s cells are measured with now (None: not available here)."""
    from fedtensor.baselines import get_baseline

    codec = get_baseline(name)
    try:
        return codec.version() if codec.available() else None
    except Exception:  # noqa: BLE001 - informative only: such cells are then kept as they are
        return None


def is_done(cell: dict | None, version: str | None) -> bool:
    """Whether a stored cell stands on resume: final, and (where measured) by the codec as it is now."""
    if cell is None or cell.get("status") not in FINAL:
        return False
    return version is None or cell.get("version") == version


def plan_tasks(cfg: BenchConfig, specs: list[VolumeSpec], cells: dict[str, dict]) -> list[dict]:
    from fedtensor.baselines import BASELINES

    tasks = []
    versions = {name: current_version(name) for name in cfg.codecs}
    for spec in specs:
        for name in cfg.codecs:
            lossless = BASELINES[name].lossless
            wanted = [LOSSLESS] if lossless else cfg.targets
            todo = [t for t in wanted
                    if not is_done(cells.get(cell_key(spec.label, spec.fingerprint, name, t)), versions[name])]
            if todo:
                cost = spec.voxels * _COST.get(name, 2) * len(todo)
                tasks.append({"kind": "cells", "volume": asdict(spec), "codec": name, "targets": todo,
                              "repeat": cfg.repeat, "cost": cost, "ncells": len(todo)})
        if (cfg.panels and cfg.figures and "fedtensor" in cfg.codecs and "jpeg2000" in cfg.codecs
                and not panel_path(cfg.out, spec).exists()):
            tasks.append({"kind": "panel", "volume": asdict(spec), "target": min(cfg.targets), "out": str(cfg.out),
                          "cost": spec.voxels * 12, "ncells": 0})
    tasks.sort(key=lambda t: -t["cost"])  # largest first: the pool finishes together
    return tasks


def _describe_task(t: dict) -> str:
    v = t["volume"]["label"]
    return f"{v} · panel" if t["kind"] == "panel" else f"{v} · {t['codec']}"


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """``os.environ`` updated with ``values`` inside the block, restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _execute(tasks: list[dict], jobs: int, on_done, progress: Progress) -> bool:
    """Run ``tasks``, calling ``on_done`` with each result; True where spawned single-threaded workers
    ran them, False where this process did (one job, or one task): then only fedtensor's entropy-coder
    workers are held to one, as BLAS and XLA keep the threads this process started with."""
    if jobs <= 1 or len(tasks) <= 1:
        with _environment({"FEDTENSOR_WORKERS": "1"}):
            for t in tasks:
                progress.advance(0, f"running {_describe_task(t)}")
                on_done(run_task(t))
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    xla = {} if _XLA_SINGLE in flags else {"XLA_FLAGS": f"{flags} {_XLA_SINGLE}".strip()}
    ctx = multiprocessing.get_context("spawn")  # JAX and fork do not mix
    with _environment({**_THREAD_ENV, **xla}):  # inherited by the spawned workers: one thread each
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init)
        try:
            pending = {pool.submit(run_task, t): t for t in tasks}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    t = pending.pop(fut)
                    try:
                        result = fut.result()
                    except Exception as exc:  # noqa: BLE001 - a crashed worker fails its cells only
                        result = {"task": t, "cells": [], "error": _one_line(exc), "seconds": 0.0}
                    on_done(result)
        except BaseException:  # Ctrl-C: drop the queue; finished cells are already saved
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return True


def _loadavg() -> float | None:
    """The machine's 5-minute load average (other jobs on a shared machine inflate wall times)."""
    try:
        return float(os.getloadavg()[1])
    except (AttributeError, OSError):
        return None


def default_jobs() -> int:
    return usable_cores()


def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> dict:
    """Run (or resume) the benchmark described by ``cfg``; write every output into ``cfg.out``.

    Returns the summary also written to ``results.json``.
    """
    from fedtensor.bench import report

    progress = progress or QuietProgress()
    t_start = time.perf_counter()
    load_start = _loadavg()
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise FedtensorError(f"--out must be a directory: {out}")
    progress.log(f"reading {len(cfg.volumes)} volume(s)")
    specs = describe_volumes(cfg.volumes)  # first: a bad volume leaves no output directory behind
    out.mkdir(parents=True, exist_ok=True)
    cells = load_cells(out)
    tasks = plan_tasks(cfg, specs, cells)
    jobs = cfg.jobs or default_jobs()
    jobs = max(1, min(jobs, len(tasks))) if tasks else 1
    total_cells = sum(t["ncells"] for t in tasks)
    from fedtensor.baselines import BASELINES

    wanted = len(specs) * sum(1 if BASELINES[c].lossless else len(cfg.targets) for c in cfg.codecs)
    done_before = wanted - total_cells
    progress.log(f"{len(specs)} volume(s) × {len(cfg.codecs)} codec(s) × {len(cfg.targets)} target(s): "
                 f"{total_cells} cell(s) to run, {done_before} already done; {jobs} process(es)")
    task_log: list[dict] = []
    errors: list[str] = []
    progress.start(total_cells + sum(1 for t in tasks if t["kind"] == "panel"), "benchmark")

    def on_done(result: dict) -> None:
        t = result["task"]
        for c in result.get("cells", []):
            cells[key_of(c)] = c
            if c.get("status") == "error":
                errors.append(f"{c['volume']} · {c['codec']} @ {target_key(c['target'])}: {c.get('reason')}")
        if result.get("error"):
            errors.append(f"{_describe_task(t)}: {result['error']}")
        if t["kind"] == "cells":
            save_cells(out, cells)
        task_log.append({"task": _describe_task(t), "seconds": result.get("seconds"), "cpu_s": result.get("cpu_s"),
                         "cells": t["ncells"]})
        progress.advance(max(t["ncells"], 1 if t["kind"] == "panel" else 0), f"done {_describe_task(t)}")

    try:
        pooled = _execute(tasks, jobs, on_done, progress)
    finally:
        progress.stop()
    wall = time.perf_counter() - t_start
    summary = report.write_reports(cfg, specs, cells, wall_s=wall, jobs=jobs, in_process=not pooled, task_log=task_log,
                                   errors=errors,
                                   progress=progress, load=(load_start, _loadavg()))
    return summary
