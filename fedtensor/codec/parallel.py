"""Entropy coding of a block-tucker stream's slab groups in worker processes.

The context coder is numpy, C and Python on one core. Its C parts (the context modelling, the range
coding) release the GIL, the Python between them holds it: two threads code a head CT's slabs
1.3–1.9× as fast as one, where worker processes scale with the cores. Slabs therefore fall in
*groups* of ``params.group`` slabs (one group when absent), and every group but the first starts its
coder statistics (:class:`~fedtensor.codec.blockcoef.BlockCoders`) from those the first slab left:
after that slab, groups are coded and decoded independently, each in a worker process. Only volumes
of :data:`SPLIT_VOXELS` or more have several groups: eight, or more of :data:`GROUP_VOXELS` each
(:func:`group_voxels`), so that eight cores share even a 256³ volume's coding.
The restarts cost the bits the tables take to learn again: at 45 dB, +1.0 % on a 256³ CT (8 groups),
+0.91 % on a 512³ one (8 groups; docs/codec.md).
The groups follow from the volume's geometry only, never from the number of cores or workers. (The
stream can still differ in its last bits between machines with other core counts: XLA's float sums,
and with them the bases and the step the search settles on, depend on its thread count — the head CT's
stream is 5 bytes longer on one core than on two. Each such stream decodes alike everywhere.)

Workers are plain ``python -c`` processes that import numpy and constriction but not JAX, and talk
pickle over their pipes: no ``multiprocessing`` start method, so a caller's script is never re-run in
them and a JAX process is never forked. Slabs go to them one at a time (:meth:`Workers.stream`), each
to its group's worker, which keeps the group's statistics between slabs (:func:`encode_slab`,
:func:`decode_slab`). By default there are as many as the groups, the cores and
:func:`memory_budget` allow; ``FEDTENSOR_WORKERS`` sets their number (``1``: code in the calling
process).

A worker that finished its tasks cleanly waits, idle, for the next call in this process (a
compress or decompress) for :data:`IDLE_SECONDS` (``FEDTENSOR_WORKER_IDLE``; ``0``: not kept), then
exits: starting one costs a Python start and a numpy import (0.15–0.25 s on the shared 2-core CPU,
about 0.4 s on a GPU host), which batch work, a server or a benchmark's repeated calls would otherwise
pay each call.
"""

from __future__ import annotations

import atexit
import copy
import itertools
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from typing import Callable, Iterable, Iterator

import numpy as np

from fedtensor.codec.blockcoef import BlockCoders, code_block_coefficients
from fedtensor.codec.entropy import BinaryStream
from fedtensor.cores import usable_cores
from fedtensor.errors import FedtensorError


class WorkerError(FedtensorError):
    """An entropy-coder worker process failed (it ended, e.g. killed for memory, or its pipe carried
    something else): the machine's fault, never the stream's."""

#: Voxels per group of slabs coded with their own statistics, at most and at least.
GROUP_VOXELS = 1 << 24
MIN_GROUP_VOXELS = 1 << 21
#: Volumes with fewer voxels are coded as one group (in this process).
SPLIT_VOXELS = 1 << 23
WORKERS_ENV = "FEDTENSOR_WORKERS"
#: Seconds an idle worker is kept for the next call (:class:`Workers`).
IDLE_SECONDS = 30.0
IDLE_ENV = "FEDTENSOR_WORKER_IDLE"
#: Tasks queued per worker (:meth:`Workers.stream`).
AHEAD = 2


def group_voxels(voxels: int) -> int | None:
    """Voxels per context group of a volume of ``voxels`` (unpadded): ``None`` (one group) below
    :data:`SPLIT_VOXELS`; else an eighth, within :data:`MIN_GROUP_VOXELS` … :data:`GROUP_VOXELS`."""
    if voxels < SPLIT_VOXELS:
        return None
    return min(GROUP_VOXELS, max(MIN_GROUP_VOXELS, voxels // 8))


def worker_count(groups: int, slab_voxels: int, budget: int) -> int:
    """Worker processes for ``groups`` groups of slabs of ``slab_voxels``; 1 means coding in this
    process.

    ``$FEDTENSOR_WORKERS`` sets the count (at most one per group). Otherwise: one per group, at most
    one per usable core, and as many as ``budget`` bytes of memory hold at :func:`worker_bytes` each."""
    if not sys.executable:  # an embedded interpreter: no python to start
        return 1
    asked = os.environ.get(WORKERS_ENV, "").strip()
    if asked.isascii() and asked.isdigit():
        return max(1, min(groups, int(asked)))
    return max(1, min(groups, usable_cores(), budget // worker_bytes(slab_voxels)))


def worker_bytes(slab_voxels: int) -> int:
    """Memory a worker adds: the process (about 30 MB, and the coder's working set), and the int32
    coefficients of the slabs it codes, is fed or has coded (:meth:`Workers.stream`)."""
    return 4 * (AHEAD + 2) * slab_voxels + (48 << 20)


def memory_budget(input_bytes: int) -> int:
    """Memory the workers of a volume of ``input_bytes`` may take: 1.5× its size, or 512 MB (eight
    workers) if that is more. The decoder's own peak is about 1.4× the input, its output included,
    so a large volume decodes within 3× its size; a 16-core machine would otherwise start 16 workers
    for a 512×512×1000 CT and reach 3.2× (measured on an H200 host)."""
    return max(3 * input_bytes // 2, 512 << 20)


def narrow(q: np.ndarray) -> np.ndarray:
    """``q`` as int16 when its values fit (half the bytes through a pipe; the code does not depend on
    the integer type)."""
    if q.size and q.dtype.itemsize > 2 and -(1 << 15) < int(q.min()) and int(q.max()) < 1 << 15:
        return q.astype(np.int16)
    return q


def encode_group(grids, b, qs, coders: BlockCoders | None = None) -> list[bytes]:
    """One coded section per slab of a group, the statistics carried from slab to slab (from
    ``coders``: a group coded slab by slab in the calling process)."""
    coders, sections = coders or BlockCoders(), []
    for grid, q in zip(grids, qs):
        s = BinaryStream()
        code_block_coefficients(s, grid, b, q, coders)
        sections.append(s.finish())
    return sections


def encode_slab(group: int, grid, b, q, start: BlockCoders | None = None, last: bool = False) -> bytes:
    """A worker's task: one slab's coded section, the statistics carried on from the group's previous
    slab, which this worker coded (``start``: the group's first slab, coded from that state; ``last``:
    the group ends here, its state is dropped)."""
    return encode_group([grid], b, [q], _group_coders(group, start, last))[0]


def decode_slab(group: int, grid, b, section: bytes, start: BlockCoders | None = None,
                last: bool = False) -> np.ndarray:
    """A worker's task: the coefficients of one slab (see :func:`encode_slab`), narrowed for the pipe."""
    return decode_group([grid], b, [section], _group_coders(group, start, last), compact=True)[0]


_GROUPS: dict[int, BlockCoders] = {}  # in a worker: the coder state of each group it is coding


def _group_coders(group: int, start: BlockCoders | None, last: bool) -> BlockCoders:
    if start is not None:
        _GROUPS[group] = start
    return _GROUPS.pop(group) if last else _GROUPS[group]


def decode_group(grids, b, sections, coders: BlockCoders | None = None, compact: bool = False) -> list[np.ndarray]:
    """The coefficients of each slab of a group (see :func:`encode_group`); ``compact``: narrowed for a
    pipe (:func:`narrow`)."""
    coders, out = coders or BlockCoders(), []
    for grid, section in zip(grids, sections):
        coded = BinaryStream(np.frombuffer(section, np.uint32))
        q = code_block_coefficients(coded, grid, b, coders=coders)
        coded.check_consumed()
        out.append(narrow(q) if compact else q)
    return out


def slab_coders(group: int, n_slabs: int) -> Iterator[BlockCoders]:
    """The coder state of each of ``n_slabs`` slabs in turn, for coding them one by one in this process
    (draw the next only once the last slab is coded): carried on within a group, and every group after
    the first starting from a copy of the state the first slab left (made only where there is such a
    group: it is as large as the state, 0.3× the head CT's size)."""
    coders = BlockCoders()
    yield coders
    if n_slabs <= group:
        while True:
            yield coders
    primer = copy.deepcopy(coders)
    for i in itertools.count(1):
        if i % group == 0:
            coders = copy.deepcopy(primer)
        yield coders


class Workers:
    """``n`` worker processes (:func:`serve`), each running the tasks given to it in order."""

    def __init__(self, n: int):
        self._procs = _take_idle(n)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self._procs += [subprocess.Popen([sys.executable, "-c", "from fedtensor.codec.parallel import serve; serve()"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
                        for _ in range(n - len(self._procs))]
        _live.update(self._procs)
        self._killed = False

    def __len__(self) -> int:
        return len(self._procs)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and not self._killed:
            _keep_idle(self._procs)  # every task answered: each worker waits for its next
            return
        for p in self._procs:
            p.kill()  # it may be mid-task
        _close(self._procs)  # (the feeder threads, which read the results, have stopped)
        _reap(self._procs)

    def stream(self, fn: Callable, tasks: Iterable[tuple[int, tuple]], ahead: int = AHEAD) -> Iterator:
        """``fn(*args)`` for each ``(worker, args)`` of ``tasks``, on worker number ``worker``, which runs
        its tasks in the order given (state a task leaves in a worker is there for its next); the
        results in task order, each as soon as it and those before it are in.

        A thread per worker feeds it from a queue of ``ahead`` tasks: a lazy producer runs ahead of
        busy workers without a slow one holding up the others, and about ``ahead + 1`` tasks and
        results per worker are held at a time. A worker's exception is raised here; a caller that
        stops early, or fails, kills the workers."""
        done, failed, ready = {}, [], threading.Condition()
        queues = [queue.Queue(ahead) for _ in self._procs]

        def feed(p, tasks: queue.Queue) -> None:
            while (item := tasks.get()) is not None:
                i, args = item
                if failed:
                    continue  # drain: the caller raises
                try:
                    _write(p.stdin, (fn.__name__, args))
                    result = _read(p.stdout)
                except Exception as err:  # any: a feeder that died here would leave the caller waiting
                    result = WorkerError(f"an entropy-coder worker process failed ({type(err).__name__}: {err}); "
                                         "out of memory?")
                with ready:
                    if isinstance(result, BaseException):
                        failed.append(result)
                    done[i] = result
                    ready.notify()

        def ready_results(wait_for: int):  # in order, those in (waiting until ``wait_for`` is)
            nonlocal taken
            while True:
                with ready:
                    ready.wait_for(lambda: failed or taken in done or taken >= wait_for)
                    if failed:
                        raise failed[0]
                    if taken not in done:
                        return
                    result = done.pop(taken)
                taken += 1
                yield result

        threads = [threading.Thread(target=feed, args=pq, daemon=True) for pq in zip(self._procs, queues)]
        for t in threads:
            t.start()
        sent = taken = 0
        try:
            for worker, args in tasks:
                queues[worker].put((sent, args))
                sent += 1
                yield from ready_results(0)
            yield from ready_results(sent)
        finally:
            if taken < sent:  # an error, or a caller that stopped early: a worker may be mid-task
                self._killed = True
                for p in self._procs:
                    p.kill()
            for q in queues:
                q.put(None)
            for t in threads:
                t.join()


def _reap(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.wait()
        p.stdout.close()


def _close(procs: Iterable[subprocess.Popen]) -> None:
    for p in procs:
        for pipe in (p.stdin, p.stdout):
            try:
                pipe.close()
            except (OSError, ValueError):
                pass


def _end(procs: list[subprocess.Popen], wait: bool = False) -> None:
    """End idle workers: they exit on their closed stdin. Their interpreters' teardown (35 ms for eight
    on a GPU host) need not hold up the caller, so they are reaped in the background unless ``wait``
    (then a worker that does not exit within a second, e.g. whose stdin a forked child still holds open,
    is killed)."""
    for p in procs:
        try:
            p.stdin.close()
        except OSError:
            pass
    if not wait:
        if procs:
            threading.Thread(target=_reap, args=(procs,), daemon=True).start()
        return
    for p in procs:
        try:
            p.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            p.kill()
    _reap(procs)


def idle_seconds() -> float:
    """How long an idle worker is kept: ``$FEDTENSOR_WORKER_IDLE`` seconds (``inf``: until the process
    exits), else :data:`IDLE_SECONDS`."""
    try:
        keep = float(os.environ.get(IDLE_ENV, "").strip() or IDLE_SECONDS)
    except ValueError:
        return IDLE_SECONDS
    return keep if keep > 0 else 0.0  # (NaN too)


_FOREVER = 1e6  # idle times from here on start no timer (a Timer cannot wait ~1e10 s)
_idle: list[tuple[float, subprocess.Popen]] = []  # (when it became idle, worker), oldest first
_idle_lock = threading.Lock()
_expiry: threading.Timer | None = None  # the one timer that ends workers idle for too long
_expiry_at = 0.0  # when it fires (monotonic)
_live: weakref.WeakSet = weakref.WeakSet()  # every worker started here, busy or idle


def _take_idle(n: int) -> list[subprocess.Popen]:
    """Up to ``n`` idle workers that are still running, the most recently used first."""
    taken, dead = [], []
    with _idle_lock:
        while _idle and len(taken) < n:
            _, p = _idle.pop()
            (taken if p.poll() is None else dead).append(p)
    _end(dead)
    return taken


def _keep_idle(procs: list[subprocess.Popen]) -> None:
    """Keep ``procs`` for the next call, at most one idle worker per usable core (concurrent calls
    could leave more), for :func:`idle_seconds`."""
    keep = idle_seconds()
    if keep <= 0:
        _end(procs)
        return
    with _idle_lock:
        _idle.extend((time.monotonic(), p) for p in procs)
        surplus = [p for _, p in _idle[:max(0, len(_idle) - usable_cores())]]
        del _idle[:len(surplus)]
        if keep < _FOREVER:
            _schedule_expiry(keep)
    _end(surplus)


def _schedule_expiry(delay: float) -> None:  # with _idle_lock held
    """Have the timer fire in ``delay`` seconds, or sooner if it already would (a shorter idle time,
    set since, must not wait for the timer a longer one started)."""
    global _expiry, _expiry_at
    at = time.monotonic() + delay + 0.05
    if _expiry is not None:
        if _expiry_at <= at:
            return
        _expiry.cancel()
    _expiry, _expiry_at = threading.Timer(at - time.monotonic(), _expire), at
    _expiry.daemon = True
    _expiry.start()


def _expire() -> None:
    """The timer's work: end the workers idle for :func:`idle_seconds`, and wait for the next to be."""
    global _expiry
    keep = idle_seconds()
    now = time.monotonic()
    with _idle_lock:
        _expiry = None
        old = [p for t, p in _idle if now - t >= keep]
        _idle[:] = [(t, p) for t, p in _idle if now - t < keep]
        if _idle and keep < _FOREVER:
            _schedule_expiry(keep - (now - _idle[0][0]))
    _end(old)


def end_idle_workers(wait: bool = False) -> None:
    """End the idle workers kept for the next call; ``wait``: until they have exited (e.g. before
    measuring memory, which counts child processes)."""
    with _idle_lock:
        old = [p for _, p in _idle]
        _idle.clear()
    _end(old, wait)


def _forget_workers() -> None:
    """In a forked child: the workers are the parent's. Close this process's copies of their pipes (a
    copy of a worker's stdin left open would keep it from ever seeing the end of its input)."""
    global _idle_lock, _expiry
    _close(list(_live))
    _idle.clear()
    _live.clear()
    _idle_lock, _expiry = threading.Lock(), None


def _end_at_exit() -> None:
    """No thread may start at exit: end the idle workers here, briefly waited for."""
    procs = [p for _, p in _idle]
    _idle.clear()
    _end(procs, wait=True)


atexit.register(_end_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


_TASKS = {f.__name__: f for f in (encode_slab, decode_slab)}


def serve() -> None:
    """A worker's loop: run each task read from stdin, write its result (or exception) to stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle: it ends the workers
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the results
    while True:
        try:
            name, task = _read(inp)
        except EOFError:
            return
        try:
            result = _TASKS[name](*task)
        except Exception as err:  # sent back and raised in the caller (e.g. a FormatError)
            result = err
        _write(out, result)


_MAGIC = b"FTW1"  # opens every message: anything else on the pipe (a start-up banner) is an error, not a hang


def _write(f, obj) -> None:
    """``obj`` pickled with its arrays' buffers out of band: written as they are, not copied first."""
    buffers = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    f.write(_MAGIC + struct.pack(f"<{2 + len(views)}Q", len(data), len(views), *(v.nbytes for v in views)))
    f.write(data)
    for v in views:
        f.write(v)
    f.flush()


def _read(f):
    def exactly(n: int) -> bytearray:
        buf, got = bytearray(n), 0
        with memoryview(buf) as view:
            while got < n:
                k = f.readinto(view[got:])
                if not k:
                    raise EOFError("an entropy-coder worker process ended")
                got += k
        return buf

    head = exactly(20)
    if head[:4] != _MAGIC:
        raise EOFError(f"unexpected bytes on an entropy-coder worker's pipe: {bytes(head[:20])!r}")
    n, count = struct.unpack("<2Q", head[4:])
    sizes = struct.unpack(f"<{count}Q", exactly(8 * count))
    data = exactly(n)
    return pickle.loads(data, buffers=[exactly(size) for size in sizes])
