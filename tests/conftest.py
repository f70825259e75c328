"""Shared fixtures. The real sample volumes live outside the repo: ``$FEDTENSOR_DATA``, else
``<repo>/../shared/data`` (CI clones the repo next to a ``shared/`` copy); tests that need them are
skipped only when neither exists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run by default, so CI and `make test` are repeatable
# and a failure always reproduces; `make fuzz` (HYPOTHESIS_PROFILE=explore) draws new ones each run.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REPO_ROOT = Path(__file__).resolve().parents[1]

VOLUME_NAMES = (
    "ct_chest.nii.gz",
    "ct_abdomen.nii.gz",
    "ct_head_uint8.nii.gz",
    "mr_brain_gd.nii.gz",
    "ct_series_dicom",
)


def _find_data_dir() -> Path | None:
    env = os.environ.get("FEDTENSOR_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _find_data_dir()
    if d is None:
        pytest.skip("sample data not found (set FEDTENSOR_DATA or provide ../shared/data)")
    return d


@pytest.fixture(scope="session")
def volume_paths(data_dir: Path) -> dict[str, Path]:
    """name → path for the five shared sample volumes (the DICOM series is a directory)."""
    paths = {name: data_dir / name for name in VOLUME_NAMES}
    missing = [n for n, p in paths.items() if not p.exists()]
    if missing:
        pytest.skip(f"sample volumes missing from {data_dir}: {', '.join(missing)}")
    return paths


@pytest.fixture(scope="session")
def head_crop_paths(volume_paths, tmp_path_factory) -> list[Path]:
    """Three 40×40×32 crops of the real ct_head_uint8 as ``.npy`` files: a tiny federation's volumes."""
    import numpy as np

    from fedtensor.io import read_volume

    vol = read_volume(volume_paths["ct_head_uint8.nii.gz"]).data
    d = tmp_path_factory.mktemp("head_crops")
    out = []
    for i, (y, x) in enumerate([(60, 60), (60, 130), (130, 90)]):
        p = d / f"head{i}.npy"
        np.save(p, np.ascontiguousarray(vol[y:y + 40, x:x + 40, 12:44]))
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------------
# Appended for the codec / tensor / fuzz tests: real volumes read once per session.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def load_volume(volume_paths):
    """``load_volume(name)`` → the :class:`~fedtensor.io.Volume` of a shared sample, read once per session.

    Tests must treat the returned volume as read-only (its array is shared between tests).
    """
    from fedtensor.io import read_volume

    cache: dict = {}

    def load(name: str):
        if name not in cache:
            vol = read_volume(volume_paths[name])
            vol.data.setflags(write=False)
            cache[name] = vol
        return cache[name]

    return load


@pytest.fixture(scope="session")
def ct_crop(load_volume):
    """A small (32, 32, 16) int32 crop of ct_abdomen with the source geometry (fast to compress)."""
    import numpy as np

    from fedtensor.io import Volume

    vol = load_volume("ct_abdomen.nii.gz")
    data = np.ascontiguousarray(vol.data[40:72, 30:62, 40:56])
    return Volume(data, vol.spacing, vol.affine, {})
