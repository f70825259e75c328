"""usable_cores(): the affinity mask, at most the cgroup's CPU quota (read from fake cgroup trees)."""

from __future__ import annotations

from pathlib import Path

from fedtensor import cores


def _tree(tmp_path: Path, files: dict[str, str], own: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self").write_text(own)
    return root, tmp_path / "self"


def test_cgroup_v2_quota_of_the_process_group_and_its_ancestors(tmp_path):
    root, own = _tree(tmp_path, {"cpu.max": "max 100000\n", "kube/cpu.max": "250000 100000\n",
                                 "kube/pod/cpu.max": "max 100000\n"}, "0::/kube/pod\n")
    assert cores.cgroup_cpu_quota(root, own) == 3  # 2.5 cores, from the parent, rounded up
    root, own = _tree(tmp_path / "b", {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cores.cgroup_cpu_quota(root, own) is None


def test_cgroup_v1_quota_under_either_mount_name(tmp_path):
    files = {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "150000\n", "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"}
    root, own = _tree(tmp_path, files, "5:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n")
    assert cores.cgroup_cpu_quota(root, own) == 2
    root, own = _tree(tmp_path / "b", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "1:cpu:/\n")
    assert cores.cgroup_cpu_quota(root, own) is None


def test_no_cgroup_filesystem_or_garbage_means_no_quota(tmp_path):
    assert cores.cgroup_cpu_quota(tmp_path / "none", tmp_path / "missing") is None
    root, own = _tree(tmp_path, {"cpu.max": "lots\n"}, "0::/\n")
    assert cores.cgroup_cpu_quota(root, own) is None


def test_usable_cores_takes_the_smaller_of_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda: 2)
    assert cores.usable_cores() == 2  # a 64-core host, docker --cpus=2: the pools oversubscribed 32×
    monkeypatch.setattr(cores, "cgroup_cpu_quota", lambda: None)
    assert cores.usable_cores() == 64
