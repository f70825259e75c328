"""Path rules of the CLI: volume suffixes, output checks and directory (batch) mode.

Directory rule — a directory INPUT is a *batch* when it directly holds at least one volume file
(``*.nii``, ``*.nii.gz``, ``*.npy``) or holds nothing but subdirectories; the batch items are those
volume files plus every non-empty subdirectory (each read as one DICOM series). Any other directory
(e.g. one full of ``*.dcm`` or extension-less DICOM files) is read as a single DICOM series.
Names starting with ``.`` are ignored. For ``decompress`` a directory INPUT is always a batch of the
``*.ftz`` files directly inside it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from fedtensor.errors import FedtensorError

from fedtensor_cli.errors import UsageFailure

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npy")  # longest first: ".nii.gz" before ".nii"
FTZ_SUFFIX = ".ftz"


def volume_suffix(path: Path) -> str | None:
    """The volume suffix of ``path`` (case-insensitive), or None."""
    name = path.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def stem(path: Path) -> str:
    """``path``'s name without a volume or ``.ftz`` suffix: ``ct.nii.gz`` → ``ct``, ``s1/`` → ``s1``."""
    suffix = volume_suffix(path) or (FTZ_SUFFIX if path.name.lower().endswith(FTZ_SUFFIX) else "")
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def _visible(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if not p.name.startswith("."))


def require_input(path: Path) -> None:
    if not path.exists():
        raise FedtensorError(f"input not found: {path}")


def is_batch_dir(directory: Path) -> bool:
    """True when ``directory`` is a batch of volumes rather than one DICOM series (rule above)."""
    entries = _visible(directory)
    files = [p for p in entries if p.is_file()]
    if any(volume_suffix(p) for p in files):
        return True
    return bool(entries) and not files


def _outside(entries: list[Path], output: Path | None) -> list[Path]:
    """``entries`` less the batch's own output directory (an earlier run's, inside the input)."""
    if output is None:
        return entries
    out = output.resolve()
    return [p for p in entries if p.resolve() != out]


def batch_volume_inputs(directory: Path, output: Path | None = None) -> list[Path]:
    """The items of a compress batch: volume files, then non-empty subdirectories (DICOM series); never
    the ``output`` directory, if it lies inside."""
    entries = _outside(_visible(directory), output)
    items = [p for p in entries if p.is_file() and volume_suffix(p)]
    folders = [p for p in entries if p.is_dir() and _visible(p)]
    # an earlier run's output folder inside the input (under another name): .ftz files, no series
    outputs = [p for p in folders if all(c.is_file() and c.name.lower().endswith(FTZ_SUFFIX) for c in _visible(p))]
    if outputs:
        warnings.warn(f"skipped {', '.join(p.name for p in outputs)}: holding only .ftz files, "
                      f"{'they are' if len(outputs) > 1 else 'it is'} no DICOM series", stacklevel=2)
    items += [p for p in folders if p not in outputs]
    from fedtensor.io.dicom import looks_like_dicom  # (here: numpy stays out of the CLI's start-up)

    loose = sum(1 for p in entries if p.is_file() and not volume_suffix(p) and looks_like_dicom(p))
    if loose:  # the rule above makes them no item: say so rather than drop a series silently
        warnings.warn(f"{loose} DICOM file{'s' * (loose > 1)} directly in {directory} {'are' if loose > 1 else 'is'} "
                      "not part of the batch (a batch's DICOM series are its subdirectories)", stacklevel=2)
    if not items:
        raise FedtensorError(f"no volumes (*.nii, *.nii.gz, *.npy or DICOM series) found in {directory}")
    return items


def batch_ftz_inputs(directory: Path, output: Path | None = None) -> list[Path]:
    items = [p for p in _outside(_visible(directory), output) if p.is_file() and p.name.lower().endswith(FTZ_SUFFIX)]
    if not items:
        raise FedtensorError(f"no .ftz files found in {directory}")
    return items


def check_output(path: Path, *, force: bool) -> None:
    """Fail early (before any work) when ``path`` cannot or must not be written."""
    if path.is_dir():
        raise FedtensorError(f"output is a directory: {path}")
    if path.exists() and not force:
        raise FedtensorError(f"output exists: {path} (use --force to overwrite)")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise FedtensorError(f"output directory is not a directory: {parent}")
    if not parent.is_dir():
        raise FedtensorError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):  # before the work, not after it
        raise FedtensorError(f"cannot write to {parent}: {_why_unwritable(parent)}")


def _why_unwritable(directory: Path) -> str:
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except (OSError, AttributeError):  # (no statvfs: not POSIX)
        pass
    return "permission denied"


def require_suffix(path: Path, allowed: tuple[str, ...], what: str) -> None:
    if not any(path.name.lower().endswith(s) and len(path.name) > len(s) for s in allowed):
        raise UsageFailure(f"{what} must end with {' or '.join(allowed)}: {path}")


def prepare_output_dir(path: Path) -> None:
    """Create the batch OUTPUT directory (its parent must exist)."""
    if path.exists() and not path.is_dir():
        raise FedtensorError(f"output must be a directory when the input is a directory: {path}")
    if not path.exists() and (volume_suffix(path) or path.name.lower().endswith(FTZ_SUFFIX)):
        # a file name for a batch's output is a slip (a directory INPUT was meant to be one volume)
        raise UsageFailure(f"the input is a directory, so OUTPUT must be a directory, not a file name: {path}")
    if not path.parent.is_dir():
        raise FedtensorError(f"output directory does not exist: {path.parent}")
    where = path if path.exists() else path.parent
    if not os.access(where, os.W_OK | os.X_OK):  # once, not once per item
        raise FedtensorError(f"cannot write to {where}: {_why_unwritable(where)}")
    path.mkdir(exist_ok=True)


def batch_outputs(inputs: list[Path], out_dir: Path, suffix: str) -> list[tuple[Path, Path | None, str | None]]:
    """Pair each input with ``out_dir/<stem><suffix>``; inputs sharing an output name all get an error
    (none of them is written: which one would win must not depend on listing order or on another's
    failure)."""
    by_name: dict[str, list[Path]] = {}
    for src in inputs:
        by_name.setdefault(stem(src) + suffix, []).append(src)
    pairs: list[tuple[Path, Path | None, str | None]] = []
    for src in inputs:
        name = stem(src) + suffix
        clash = by_name[name]
        if len(clash) > 1:
            pairs.append((src, None, f"{', '.join(p.name for p in clash)} would all be written as {name}; "
                                     "rename or move all but one"))
        else:
            pairs.append((src, out_dir / name, None))
    return pairs
