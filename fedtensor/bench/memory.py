"""Peak resident memory of a block of code (Linux ``/proc``), for the benchmarks.

Two independent figures: a background thread that samples ``/proc/self/statm`` (default every 1 ms),
and the kernel's high-water mark ``VmHWM`` reset through ``/proc/self/clear_refs`` before the block
(exact, when the kernel allows it). Both are relative to the RSS just before the block, after ``gc``
and ``malloc_trim`` so that cached free memory neither inflates the baseline nor hides new use.
On systems without ``/proc`` every figure is ``None``/0 rather than an error.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss(pid: int | str = "self") -> int:
    """Resident set size of a process (default this one) in bytes, from /proc/PID/statm; 0 when it
    cannot be read (no /proc, or the process ended)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def release_free_memory() -> None:
    """Collect garbage, ask glibc to return free heap pages to the OS and end the codec's idle worker
    processes, so that a following RSS-baseline is not inflated by (and later allocations do not
    silently reuse) cached free memory, and the samples, which count child processes, count only those
    the measured block starts (a rival codec measured after fedtensor was charged its idle workers)."""
    parallel = sys.modules.get("fedtensor.codec.parallel")  # not imported: no worker to end
    if parallel is not None:
        parallel.end_idle_workers(wait=True)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) — Linux ≥ 4.0, ``echo 5 > /proc/self/clear_refs``."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _children_rss() -> int:
    """Resident set size of the main thread's child processes (the codec's entropy-coder workers).

    A child between fork and exec still runs this process's image and shares its pages (under vfork,
    its very address space): its RSS would count them a second time, so it is left out."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            pids = f.read().split()
    except OSError:
        return 0
    return sum(current_rss(pid) for pid in pids if _cmdline(pid) != _own_cmdline())


@functools.cache
def _own_cmdline() -> bytes:  # read once, not on every sample
    return _cmdline("self")


def _cmdline(pid: int | str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


class RssPeakSampler:
    """Peak extra resident memory during a block of code.

    A background thread samples ``/proc/self/statm`` every ``interval_s`` (default 1 ms), and adds the
    RSS of the main thread's child processes (worker processes count); the baseline is the RSS just
    before the block. As an independent cross-check the kernel's high-water mark (VmHWM)
    is reset before the block and read after it, when the kernel allows (exact, unlike sampling, which
    can miss spikes shorter than the interval).

    Usage::

        with RssPeakSampler() as m:
            f()
        m.peak_extra_bytes, m.hwm_extra_bytes
    """

    def __init__(self, interval_s: float = 0.001, switch_interval_s: float | None = 0.0005):
        self.interval_s = interval_s
        self.switch_interval_s = switch_interval_s
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self.hwm_extra_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_switch = None
        self._hwm_ok = False

    def _run(self) -> None:
        try:
            fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            return
        try:
            while not self._stop.is_set():
                rss = int(os.pread(fd, 128, 0).split()[1]) * _PAGE + _children_rss()
                if rss > self.peak:
                    self.peak = rss
                self.samples += 1
                time.sleep(self.interval_s)
        finally:
            os.close(fd)

    def __enter__(self) -> "RssPeakSampler":
        release_free_memory()
        if self.switch_interval_s is not None:  # let the sampler get the GIL during pure-Python work
            self._old_switch = sys.getswitchinterval()
            sys.setswitchinterval(self.switch_interval_s)
        self._hwm_ok = _reset_hwm()
        self.baseline = current_rss()
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        end = current_rss()
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, end)
        if self._hwm_ok:
            hwm = _read_hwm()
            if hwm is not None:
                self.hwm_extra_bytes = max(0, hwm - self.baseline)
        if self._old_switch is not None:
            sys.setswitchinterval(self._old_switch)

    @property
    def peak_extra_bytes(self) -> int:
        """Sampled peak RSS minus the RSS just before the block."""
        return max(0, self.peak - self.baseline)

    @property
    def conservative_extra_bytes(self) -> int:
        """The larger of the sampled and the high-water-mark figures."""
        return max(self.peak_extra_bytes, self.hwm_extra_bytes or 0)


@dataclass
class MemoryResult:
    sampled_extra_bytes: int
    hwm_extra_bytes: int | None
    baseline_bytes: int
    samples: int
    result: Any = None

    @property
    def extra_bytes(self) -> int:
        return max(self.sampled_extra_bytes, self.hwm_extra_bytes or 0)

    def to_dict(self, input_nbytes: int | None = None) -> dict:
        d = {
            "sampled_extra_bytes": self.sampled_extra_bytes,
            "hwm_extra_bytes": self.hwm_extra_bytes,
            "extra_bytes": self.extra_bytes,
            "baseline_rss_bytes": self.baseline_bytes,
            "samples": self.samples,
        }
        if input_nbytes:
            d["input_nbytes"] = input_nbytes
            d["extra_over_input"] = self.extra_bytes / input_nbytes
            d["sampled_extra_over_input"] = self.sampled_extra_bytes / input_nbytes
        return d


def measure_peak_rss(fn: Callable[[], Any], interval_s: float = 0.001) -> MemoryResult:
    """Run ``fn`` once under :class:`RssPeakSampler` (call it after any warm-up) and return its figures."""
    with RssPeakSampler(interval_s) as m:
        result = fn()
    return MemoryResult(m.peak_extra_bytes, m.hwm_extra_bytes, m.baseline, m.samples, result)
