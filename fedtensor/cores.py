"""The CPU cores this process may use."""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP = Path("/sys/fs/cgroup")
_SELF = Path("/proc/self/cgroup")


def usable_cores() -> int:
    """Cores this process may use: those in its affinity mask (``taskset``, cpusets), or all of the
    machine's, at most its cgroup's CPU quota (``docker --cpus``, a Kubernetes limit: these leave the
    affinity mask whole); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def cgroup_cpu_quota(root: Path = _CGROUP, own: Path = _SELF) -> int | None:
    """The CPU quota of this process's cgroup and its ancestors, in whole cores rounded up (None: no
    quota, or no cgroup filesystem): cgroup v2's ``cpu.max``, else v1's ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: "0::/path"
            files = [(d / "cpu.max", None) for d in _ancestors(root, path)]
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path", mounted as cpu,cpuacct or cpu
            files = [(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us")
                     for base in dict.fromkeys((root / controllers, root / "cpu")) for d in _ancestors(base, path)]
        else:
            continue
        for quota_file, period_file in files:
            try:
                if period_file is None:
                    quota, period = quota_file.read_text().split()[:2]
                else:
                    quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
                if quota not in ("max", "-1") and int(period) > 0 and int(quota) > 0:
                    limits.append(math.ceil(int(quota) / int(period)))
            except (OSError, ValueError):
                continue
    return min(limits) if limits else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    """``mount``/``path`` and its parents up to ``mount`` (a cgroup's limits are its ancestors' too)."""
    parts = [p for p in path.strip().split("/") if p and p != ".."]
    return [mount.joinpath(*parts[:k]) for k in range(len(parts), -1, -1)]
