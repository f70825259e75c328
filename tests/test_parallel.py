"""The entropy coder's worker processes: their count, their pipe protocol, their errors."""

import io

import numpy as np
import pytest

from fedtensor.codec import parallel
from fedtensor.errors import FormatError


def test_worker_count_follows_groups_cores_memory_or_the_users_count(monkeypatch):
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda _: set(range(6)), raising=False)
    monkeypatch.delenv(parallel.WORKERS_ENV, raising=False)
    each = parallel.worker_bytes(1 << 24)
    assert parallel.worker_count(1, 1 << 24, 100 * each) == 1  # one group: coded here
    assert parallel.worker_count(4, 1 << 24, 100 * each) == 4  # one worker per group
    assert parallel.worker_count(16, 1 << 24, 100 * each) == 6  # one per core
    assert parallel.worker_count(16, 1 << 24, 3 * each + 1) == 3  # as many as the memory holds
    assert parallel.worker_count(16, 1 << 24, each - 1) == 1
    # the user's count wins over cores and memory, never over the groups
    monkeypatch.setenv(parallel.WORKERS_ENV, "2")
    assert parallel.worker_count(16, 1 << 24, 100 * each) == 2
    monkeypatch.setenv(parallel.WORKERS_ENV, "8")
    assert parallel.worker_count(16, 1 << 24, 0) == 8
    assert parallel.worker_count(3, 1 << 24, 0) == 3
    monkeypatch.setenv(parallel.WORKERS_ENV, "0")
    assert parallel.worker_count(16, 1 << 24, 100 * each) == 1


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


def test_workers_run_tasks_in_order_and_raise_their_errors(load_volume):
    from fedtensor.codec.blockcoef import BlockCoders

    rng = np.random.default_rng(0)
    grids, b = [(2, 3, 4)] * 5, (4, 4, 4)
    qs = [np.round(rng.laplace(0, 2, (*g, *b)) * (rng.random((*g, *b)) < 0.3)).astype(np.int32) for g in grids]
    want = [parallel.encode_group(grids[i:i + 2], b, qs[i:i + 2]) for i in range(0, 5, 2)]
    with parallel.Workers(2) as w:
        got = list(w.map(parallel.encode_group, ((grids[i:i + 2], b, qs[i:i + 2]) for i in range(0, 5, 2))))
        assert got == want
        decoded = list(w.map(parallel.decode_group, ((grids[:2], b, s, None, True) for s in want[:1])))
        for q, d in zip(qs, decoded[0]):
            np.testing.assert_array_equal(q, d)
        with pytest.raises(FormatError):
            list(w.map(parallel.decode_group, [(grids[:2], b, [want[0][0], b"\x01" * 8])]))
    # statistics carried into a group by the caller are used (a primer)
    primer = BlockCoders()
    parallel.encode_group(grids[:1], b, qs[:1], primer)
    with parallel.Workers(1) as w:
        (sections,) = w.map(parallel.encode_group, [(grids[1:3], b, qs[1:3], primer)])
    assert sections != parallel.encode_group(grids[1:3], b, qs[1:3])


def test_a_caller_that_stops_early_leaves_no_worker_behind():
    grids, b = [(8, 16, 16)] * 6, (4, 4, 4)
    q = np.ones((*grids[0], *b), np.int32)
    sections = parallel.encode_group(grids[:1], b, [q])
    with parallel.Workers(2) as w:
        results = w.map(parallel.decode_group, [(grids[:1], b, sections)] * 6)
        next(results)
        results.close()  # two tasks were outstanding, one result unread
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
