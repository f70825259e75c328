"""The entropy coder's worker processes: their count, their pipe protocol, their errors."""

import copy
import io
import os

import numpy as np
import pytest

from fedtensor.codec import parallel
from fedtensor.errors import FedtensorError, FormatError


def test_worker_count_follows_groups_cores_memory_or_the_users_count(monkeypatch):
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda _: set(range(6)), raising=False)
    monkeypatch.delenv(parallel.WORKERS_ENV, raising=False)
    slab = 1 << 20
    each = parallel.worker_bytes(slab)
    assert parallel.worker_count(1, slab, 100 * each) == 1  # one group: coded here
    assert parallel.worker_count(4, slab, 100 * each) == 4  # one worker per group
    assert parallel.worker_count(16, slab, 100 * each) == 6  # one per core
    assert parallel.worker_count(16, slab, 3 * each + 1) == 3  # as many as the memory holds
    assert parallel.worker_count(16, slab, each - 1) == 1
    # the user's count wins over cores and memory, never over the groups
    monkeypatch.setenv(parallel.WORKERS_ENV, "2")
    assert parallel.worker_count(16, slab, 100 * each) == 2
    monkeypatch.setenv(parallel.WORKERS_ENV, "8")
    assert parallel.worker_count(16, slab, 0) == 8
    assert parallel.worker_count(3, slab, 0) == 3
    monkeypatch.setenv(parallel.WORKERS_ENV, "0")
    assert parallel.worker_count(16, slab, 100 * each) == 1
    monkeypatch.setenv(parallel.WORKERS_ENV, "\u00b2")  # a digit that int() refuses: not a count
    assert parallel.worker_count(16, slab, 100 * each) == 6


@pytest.mark.parametrize("shape, groups", [
    ((96, 96, 96), 1), ((28, 512, 512), 1),  # below 2^23 voxels: one group, coded here
    ((256, 256, 256), 8), ((256, 256, 512), 8), ((512, 512, 512), 8),  # eight groups
    ((512, 512, 1024), 16), ((512, 512, 1000), 16)])  # then groups of 2^24 voxels
def test_volumes_from_eight_million_voxels_code_in_at_least_eight_groups(shape, groups):
    from fedtensor.codec.stream import Slabs, slab_depth
    b = (4, 4, 8)
    slabs = Slabs(shape, b, slab_depth(shape, b))
    assert slabs.n_groups == groups
    assert slabs.group * slabs.slab_voxels <= max(parallel.GROUP_VOXELS, slabs.slab_voxels * len(slabs))


@pytest.mark.parametrize("shape, b, depth", [
    ((120, 126, 164), (4, 4, 4), 28), ((120, 126, 164), (4, 4, 4), 30), ((120, 126, 164), (4, 4, 4), 120),  # chest CT
    ((512, 512, 20), (8, 8, 16), 64),  # the DICOM series: padded to 2^23 voxels, but 5.2 M of its own
])
def test_a_small_volume_is_one_group_whatever_its_slabs_and_padding(shape, b, depth):
    from fedtensor.codec.stream import Slabs
    slabs = Slabs(shape, b, depth)
    assert slabs.n_groups == 1 and slabs.group == len(slabs)


def test_the_workers_memory_is_half_again_the_input_or_eight_workers():
    assert parallel.memory_budget(1 << 30) == 3 << 29
    assert parallel.memory_budget(1 << 20) == 512 << 20
    assert 512 << 20 >= 8 * parallel.worker_bytes(1 << 20)


def test_messages_round_trip_with_their_arrays_and_a_cut_pipe_is_an_eof():
    f = io.BytesIO()
    arrays = [np.arange(12, dtype=np.int16).reshape(3, 4), np.zeros((0, 5)), np.asfortranarray(np.eye(3))]
    parallel._write(f, ("decode_group", (arrays, b"raw", None)))
    parallel._write(f, FormatError("bad"))
    whole = f.getvalue()
    f.seek(0)
    name, (got, raw, none) = parallel._read(f)
    assert name == "decode_group" and raw == b"raw" and none is None
    for a, b in zip(arrays, got):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    err = parallel._read(f)
    assert isinstance(err, FormatError) and str(err) == "bad"
    with pytest.raises(EOFError):
        parallel._read(f)
    with pytest.raises(EOFError):
        parallel._read(io.BytesIO(whole[:len(whole) // 3]))
    with pytest.raises(EOFError, match="unexpected bytes"):  # a banner a site hook printed: not a message
        parallel._read(io.BytesIO(b"Welcome to the cluster! Python ready.\n" + whole))


def test_a_worker_that_dies_or_garbles_its_pipe_is_a_worker_error_not_a_hang(monkeypatch):
    """Killed (e.g. for memory) mid-call, or its pipe unreadable (a MemoryError or OverflowError while
    reading it used to end the feeder thread silently, and the call then waited forever): a prompt
    WorkerError, a FedtensorError that no one mistakes for a corrupted stream."""
    grids, b = [(8, 16, 16)] * 4, (4, 4, 4)
    q = np.ones((*grids[0], *b), np.int32)
    (section,) = parallel.encode_group(grids[:1], b, [q])
    tasks = [(i % 2, (i, grids[0], b, section, parallel.BlockCoders(), True)) for i in range(4)]
    with pytest.raises(parallel.WorkerError, match="worker process failed"):
        with parallel.Workers(2) as w:
            w._procs[1].kill()
            w._procs[1].wait()
            list(w.stream(parallel.decode_slab, tasks))

    def unreadable(f):
        raise OverflowError("cannot fit 'int' into an index-sized integer")

    monkeypatch.setattr(parallel, "_read", unreadable)
    with pytest.raises(parallel.WorkerError, match="OverflowError"):
        with parallel.Workers(2) as w:
            list(w.stream(parallel.decode_slab, tasks))
    assert issubclass(parallel.WorkerError, FedtensorError) and not issubclass(parallel.WorkerError, FormatError)


def test_a_caller_that_stops_early_leaves_no_worker_behind():
    grids, b = [(8, 16, 16)] * 6, (4, 4, 4)
    q = np.ones((*grids[0], *b), np.int32)
    (section,) = parallel.encode_group(grids[:1], b, [q])
    primer = parallel.BlockCoders()
    with parallel.Workers(2) as w:
        results = w.stream(parallel.decode_slab, [(i % 2, (i, grids[0], b, section, primer, True)) for i in range(6)])
        np.testing.assert_array_equal(next(results), q)
        results.close()  # tasks were outstanding, results unread
        procs = list(w._procs)
    assert all(p.poll() is not None for p in procs)


def test_workers_import_the_coder_without_jax_and_the_package_stays_whole():
    import subprocess
    import sys

    code = ("import sys, fedtensor.codec.parallel; assert 'jax' not in sys.modules; "
            "import fedtensor.codec as c; assert c.stream.SLAB_VOXELS and c.compress is c.api.compress; "
            "assert not hasattr(c, 'no_such_module'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_slab_tasks_run_on_their_groups_worker_interleaved_and_come_back_in_order():
    """``Workers.stream``: slabs of three groups, sent round-robin across the groups and two workers, are
    coded as if each group were coded alone in turn (its statistics carried from slab to slab in its
    worker), and the results come back in task order."""
    from fedtensor.codec.blockcoef import BlockCoders

    rng = np.random.default_rng(1)
    grid, b = (2, 3, 4), (4, 4, 4)
    qs = [np.round(rng.laplace(0, 3, (*grid, *b)) * (rng.random((*grid, *b)) < 0.4)).astype(np.int32) for _ in range(9)]
    primer = BlockCoders()
    parallel.encode_group([grid], b, qs[:1], primer)
    want = {g: parallel.encode_group([grid] * 3, b, qs[3 * g:3 * g + 3], copy.deepcopy(primer)) for g in range(3)}
    order = [3 * g + r for r in range(3) for g in range(3)]  # 0, 3, 6, 1, 4, 7, ...
    tasks = [(g % 2, (g, grid, b, qs[i], primer if r == 0 else None, r == 2))
             for i in order for g, r in [divmod(i, 3)]]
    with parallel.Workers(2) as w:
        got = list(w.stream(parallel.encode_slab, tasks, ahead=1))
        assert got == [want[i // 3][i % 3] for i in order]
        with pytest.raises(KeyError):  # a task for a group its worker never started
            list(w.stream(parallel.encode_slab, [(0, (5, grid, b, qs[0]))]))

        def failing():
            yield tasks[0]
            raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            list(w.stream(parallel.encode_slab, failing()))
        procs = list(w._procs)
    assert all(p.poll() is not None for p in procs)


def test_slab_coders_copy_the_first_slabs_state_only_for_later_groups():
    """One group: every slab carries the same state on, never copied (a copy is as large as the state).
    Several: each later group starts from a copy of what slab 0 left."""
    one = parallel.slab_coders(4, 4)
    states = [next(one) for _ in range(4)]
    assert all(s is states[0] for s in states)
    two = parallel.slab_coders(2, 5)
    first = next(two)
    first.dc_plane = np.ones((1, 1), np.int64)  # what slab 0 leaves
    second = next(two)
    assert second is first
    second.dc_plane = np.full((1, 1), 7, np.int64)  # slab 1 moves the state on
    third, fourth, fifth = next(two), next(two), next(two)
    assert third is not first and third.dc_plane[0, 0] == 1 and fourth is third
    assert fifth is not third and fifth.dc_plane[0, 0] == 1


def _coded_by(w: parallel.Workers, n_tasks: int = 4) -> list[bytes]:
    """A few real slabs coded on ``w`` (two groups, one per worker), as the encoder sends them."""
    rng = np.random.default_rng(3)
    grid, b = (2, 3, 4), (4, 4, 4)
    qs = [np.round(rng.laplace(0, 3, (*grid, *b))).astype(np.int32) for _ in range(n_tasks)]
    primer = parallel.BlockCoders()
    tasks = [(i % 2, (i % 2, grid, b, q, primer if i < 2 else None, i >= n_tasks - 2)) for i, q in enumerate(qs)]
    return list(w.stream(parallel.encode_slab, tasks))


def test_idle_workers_serve_the_next_call_and_end_after_their_idle_time(monkeypatch):
    """Workers that answered every task wait for the next call (same processes, same bytes), and exit
    once idle for ``FEDTENSOR_WORKER_IDLE`` seconds; ``0`` keeps none."""
    import time

    parallel.end_idle_workers(wait=True)
    monkeypatch.setenv(parallel.IDLE_ENV, "1.0")
    with parallel.Workers(2) as w:
        first, procs = _coded_by(w), list(w._procs)
    with parallel.Workers(2) as w:
        assert sorted(p.pid for p in w._procs) == sorted(p.pid for p in procs)
        assert _coded_by(w) == first
    assert all(p.poll() is None for p in procs)
    deadline = time.monotonic() + 10  # well within the default idle time (30 s)
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(p.poll() is not None for p in procs)

    monkeypatch.setenv(parallel.IDLE_ENV, "0")
    with parallel.Workers(2) as w:
        _coded_by(w)
        procs = list(w._procs)
    for p in procs:
        p.wait(timeout=30)


def test_a_dead_idle_worker_is_replaced_and_workers_of_a_failed_call_are_not_kept(monkeypatch):
    from fedtensor.bench.memory import release_free_memory

    monkeypatch.setenv(parallel.IDLE_ENV, "60")
    parallel.end_idle_workers(wait=True)
    with parallel.Workers(2) as w:
        want, (dead, kept) = _coded_by(w), list(w._procs)
    dead.kill()
    dead.wait()
    with parallel.Workers(2) as w:
        assert kept in w._procs and dead not in w._procs and len(w._procs) == 2
        assert _coded_by(w) == want
        procs = list(w._procs)
    with pytest.raises(KeyError):  # a task for a group the worker never started: the call fails
        with parallel.Workers(2) as w:
            assert sorted(map(id, w._procs)) == sorted(map(id, procs))  # the idle ones, reused
            list(w.stream(parallel.encode_slab, [(0, (7, (2, 3, 4), (4, 4, 4), np.zeros((2, 3, 4, 4, 4, 4), np.int32)))]))
    assert all(p.poll() is not None for p in procs)  # killed, not kept
    with parallel.Workers(2) as w:
        assert not set(w._procs) & set(procs)
        assert _coded_by(w) == want
    assert all(p.poll() is None for p in w._procs)  # kept idle ...
    release_free_memory()  # ... until a memory measurement ends them first
    assert all(p.poll() is not None for p in w._procs)


@pytest.mark.parametrize("value, seconds", [("", 30.0), ("2.5", 2.5), ("0", 0.0), ("-3", 0.0), ("nan", 0.0),
                                            ("abc", 30.0), ("inf", float("inf"))])
def test_idle_time_setting(monkeypatch, value, seconds):
    monkeypatch.setenv(parallel.IDLE_ENV, value)
    assert parallel.idle_seconds() == seconds


def test_idle_workers_kept_forever_need_no_timer_and_at_most_one_per_core(monkeypatch):
    """``inf`` keeps them until exit (a Timer cannot wait that long: it raised in its thread); more idle
    workers than cores (concurrent calls) are ended."""
    monkeypatch.setenv(parallel.IDLE_ENV, "inf")
    monkeypatch.setattr(parallel, "usable_cores", lambda: 1)
    parallel.end_idle_workers(wait=True)
    timer = parallel._expiry  # one an earlier test's workers may have left running
    with parallel.Workers(2) as w:
        _coded_by(w)
        procs = list(w._procs)
    assert [p for _, p in parallel._idle] == procs[-1:] and parallel._expiry is timer
    procs[0].wait(timeout=30)
    parallel.end_idle_workers(wait=True)
    assert procs[1].poll() is not None


def test_a_forked_child_does_not_keep_idle_workers_alive():
    """The child closes its copies of the workers' pipes: ending them in the parent does not wait for
    the child to exit."""
    import time
    import warnings

    parallel.end_idle_workers(wait=True)
    with parallel.Workers(2) as w:
        _coded_by(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a multi-threaded process
        pid = os.fork()
    if pid == 0:  # the child only waits
        time.sleep(20)
        os._exit(0)
    try:
        t0 = time.monotonic()
        parallel.end_idle_workers(wait=True)
        assert time.monotonic() - t0 < 0.9  # a worker still held by the child is killed after 1 s
        assert all(p.returncode == 0 for p in w._procs)  # exited on its own, not killed
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_narrow_keeps_every_value_it_narrows():
    """int16 only where every value fits: +32768 went through the pipe as −32768 with an off-by-one."""
    assert parallel.narrow(np.array([0, (1 << 15) - 1, -(1 << 15) + 1], np.int32)).dtype == np.int16
    for edge in (1 << 15, -(1 << 15)):
        q = np.array([0, edge], np.int32)
        out = parallel.narrow(q)
        assert out.tolist() == [0, edge] and out.dtype == np.int32
