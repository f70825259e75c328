"""Block-Tucker coding in slabs (fedtensor.codec.stream): identity with the whole-volume transform,
slab layouts, refused version-1 streams, bounded memory."""

import hashlib
import math
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedtensor.bench.memory import measure_peak_rss
from fedtensor.codec import compress, decompress, parallel, stream
from fedtensor.codec.blockcoef import BlockCoders, code_block_coefficients
from fedtensor.codec.container import pack, unpack
from fedtensor.codec.entropy import BinaryStream
from fedtensor.codec.normalize import device_map, from_unit, normalization, to_unit
from fedtensor.codec.quantize import band_rounding, dequantize
from fedtensor.errors import FormatError
from fedtensor.io.volume import Volume
from fedtensor_kernels import block_transform as bt
from fedtensor.tensor.block import expand, from_blocks, to_blocks


def _psnr(x, y):
    d = x.astype(np.float64) - y
    return 20 * math.log10(float(np.ptp(x)) / math.sqrt(float(np.mean(d * d))))


@pytest.fixture(scope="module")
def chest(load_volume):
    return load_volume("ct_chest.nii.gz")


@pytest.fixture(scope="module")
def chest_crop(chest):
    """96³ of the chest CT (0.9 M voxels): fast, and cut into several slabs by ``small_slabs``."""
    return Volume(np.ascontiguousarray(chest.data[:96, :96, :96]), chest.spacing, chest.affine, {})


@pytest.fixture
def small_slabs(monkeypatch):
    """Slabs of ~2¹⁷ voxels, so a 96³ crop is cut into several."""
    monkeypatch.setattr(stream, "SLAB_VOXELS", 1 << 17)


def _bases(params, sections):
    flat = np.frombuffer(sections[0], "<f4")
    out, pos = [], 0
    for n in params["block"]:
        out.append(jnp.asarray(flat[pos:pos + n * n].reshape(n, n)))
        pos += n * n
    return out


def test_streamed_encoding_equals_whole_volume_encoding(chest_crop, small_slabs):
    """Every slab's section is bit for bit the whole-volume quantised block grid, coded over that slab's
    block rows with the context statistics carried over from the previous slabs; the streamed decoder
    returns the whole-volume reconstruction."""
    x = chest_crop.data
    blob = compress(chest_crop, psnr=45)
    h, sections = unpack(blob)
    p = h["params"]
    b, depth, step = tuple(p["block"]), p["slab"], p["step"]
    assert len(sections) - 1 == math.ceil(x.shape[0] / depth) >= 3
    bases = _bases(p, sections)
    # The whole volume at once, with the stream's bases and step, normalised as the codec does it, through
    # the transform the codec picks for this block shape (the separable jnp path on a CPU, maybe the
    # Pallas kernel on a GPU).
    m = device_map(x.dtype, p["offset"], p["scale"])
    q = np.asarray(bt.forward_blocks(to_blocks(to_unit(jnp.asarray(x), m), b), bases,
                                     jnp.float32(step), band_rounding(b), bt.impl_for(b)))
    rows = depth // b[0]
    coders = BlockCoders()
    for i, section in enumerate(sections[1:]):
        s = BinaryStream()
        part = q[i * rows:(i + 1) * rows]
        code_block_coefficients(s, part.shape[:3], b, part, coders)
        assert s.finish() == section, f"slab {i} differs"
    # Fresh coders on a later slab give another section: the statistics really are carried.
    s = BinaryStream()
    code_block_coefficients(s, part.shape[:3], b, part)
    assert s.finish() != sections[-1]
    # The decoder's float reconstruction is the whole-volume one up to float32 summation order (the
    # inverse runs on slab-shaped arrays), so a voxel on a rounding edge may land one unit apart.
    whole = np.asarray(from_blocks(expand(dequantize(jnp.asarray(q), jnp.float32(step)), bases), x.shape))
    expected = np.asarray(from_unit(jnp.asarray(whole), m, x.dtype))
    decoded = decompress(blob).data
    assert decoded.dtype == x.dtype
    differ = decoded.astype(np.int64) != expected
    assert np.abs(decoded.astype(np.int64) - expected).max() <= 1 and differ.mean() < 1e-4
    # What the encoder measured is what the decoder returns: the PSNR guarantee holds on the output.
    assert _psnr(x, decoded) >= 45 and h["stats"]["psnr"] == pytest.approx(_psnr(x, decoded), abs=1e-9)


def test_per_slab_trims_find_nothing_of_the_last_slab_alive(load_volume, monkeypatch):
    """Where each slab is a large share of the volume (the uint8 head CT: 11 slabs, each 1 MB of int32
    coefficients, 0.4× the volume's size), a pass trims the heap after each; then no device array of
    the last slab may be held any more, or the trim cannot hand back its memory and the next slab's
    comes on top."""
    head = load_volume("ct_head_uint8.nii.gz")
    alive = []
    monkeypatch.setattr(stream, "trim_heap", lambda: alive.append(sum(a.nbytes for a in jax.live_arrays())))
    before = sum(a.nbytes for a in jax.live_arrays())
    compress(head, psnr=45, block=(16, 16, 8))
    assert len(alive) >= 10  # the encode's trims, one a slab
    assert max(alive) - before < 64 << 10  # the bases at most


def test_heap_trims_run_in_the_background_and_coalesce(monkeypatch):
    """trim_heap returns at once; trims asked for while one runs make one more, not one each; ``wait``
    returns only once a trim started after every request has finished."""
    import threading

    stream._TRIMMER.wait()  # no real trim in flight to call the patched function below
    started, release, finished = threading.Event(), threading.Event(), []

    def slow_trim(_):
        started.set()
        release.wait(5)
        finished.append(len(finished))
        return 0

    monkeypatch.setattr(stream, "_MALLOC_TRIM", slow_trim)
    monkeypatch.setattr(stream, "_TRIMMER", stream._Trimmer())
    stream.trim_heap()
    assert started.wait(5)  # running, and trim_heap has returned
    for _ in range(5):
        stream.trim_heap()
    assert not finished
    release.set()
    stream.trim_heap(wait=True)
    # the first trim, then one for the five requests made while it ran, and perhaps one more for the last
    assert len(finished) in (2, 3)
    assert stream._TRIMMER._done == stream._TRIMMER._asked == 7


def test_a_forked_child_trims_though_the_parent_was_mid_request(monkeypatch):
    """A fork while another thread holds the trimmer's lock: the child starts afresh (it hung on the
    inherited lock before)."""
    import os
    import threading

    holding, done = threading.Event(), threading.Event()

    def hold():  # as another thread inside request() would hold it
        with stream._TRIMMER._cond:
            holding.set()
            done.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # the child: its trim must not wait for a lock no thread of its will release
            try:
                stream.trim_heap(wait=True)
            finally:
                os._exit(0)
    finally:
        done.set()
        holder.join()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung on the trimmer's lock")


@pytest.mark.slow
def test_thin_slabs_cost_almost_no_bits(chest, monkeypatch):
    """The same volume in one slab and in ~10 slabs: the context statistics and the DC predictor carry
    across slab seams, so cutting costs < 0.5 % of the bits (measured: none at all)."""
    monkeypatch.setattr(stream, "SLAB_VOXELS", 1 << 23)
    monkeypatch.setattr(stream, "slab_voxels", lambda x: stream.SLAB_VOXELS)
    one = compress(chest, psnr=45, block=8)
    monkeypatch.setattr(stream, "SLAB_VOXELS", 1 << 18)
    several = compress(chest, psnr=45, block=8)
    assert len(unpack(one)[1]) == 2 and len(unpack(several)[1]) >= 8
    assert len(several) < 1.005 * len(one)


@pytest.mark.parametrize("shape,block", [((37, 9, 5), 4), ((21, 1, 30), (4, 4, 8)), ((1, 97, 81), 8),
                                         ((50, 12, 12), (16, 16, 8))])
def test_ragged_slab_layouts_round_trip(shape, block, monkeypatch):
    """Last slab shorter than the others, dimensions of 1, block deeper than the volume."""
    monkeypatch.setattr(stream, "SLAB_VOXELS", 1 << 10)
    rng = np.random.default_rng(sum(shape))
    # smooth along every axis, so that the block transform beats the exact stream (white noise would not)
    x = rng.normal(size=shape)
    for axis in range(3):
        x = np.cumsum(x, axis=axis)
    x = (x * 40).astype(np.int16)
    vol = Volume(x, (1.0, 1.0, 1.0), np.eye(4), {})
    blob = compress(vol, psnr=40, block=block)
    h = unpack(blob)[0]
    assert h["codec"] == "block-tucker" and h["params"]["slab"] % h["params"]["block"][0] == 0
    assert _psnr(x, decompress(blob).data) >= 40


@pytest.mark.parametrize("size", [1, 63, 64, 1000, 4099])
def test_square_limbs_sum_squares_exactly(size):
    """The device's split sum of squares is exact up to the largest error an integer volume can have
    (2²⁵ − 1), where float32 (or even float64) sums would round."""
    rng = np.random.default_rng(size)
    d = rng.integers(0, 1 << 25, size, dtype=np.int64)
    d[rng.integers(0, size)] = (1 << 25) - 1
    want = sum(int(v) ** 2 for v in d)
    assert stream.exact_sse(stream.square_limbs(jnp.asarray(d, jnp.int32))) == float(want)


@pytest.mark.parametrize("dtype, step", [(np.int16, 0.004), (np.uint8, 0.004), (np.uint8, 2.0), (np.int8, 0.5)])
def test_device_error_measurement_equals_the_host_one(chest_crop, small_slabs, monkeypatch, dtype, step):
    """The encoder's decoded error, summed on the device for integer volumes, is exactly what the host
    computes from the decoded slabs, on every pass (the rate search's and the final encode's); 8-bit
    volumes (one limb per row) up to errors of the whole range."""
    x = chest_crop.data.astype(np.float64)
    if np.dtype(dtype).itemsize == 1:
        lo = np.iinfo(dtype).min
        x = ((x - x.min()) * (255 / np.ptp(x)) + lo).astype(dtype)
    else:
        x = x.astype(dtype)
    offset, scale = normalization(x)
    slabs = stream.Slabs(x.shape, (4, 4, 8), stream.slab_depth(x.shape, (4, 4, 8), stream.slab_voxels(x)))
    assert len(slabs) > 3
    enc = stream.SlabEncoder(x, slabs, offset, scale, stream.fit_bases(x, slabs, offset, scale))
    device = enc.errors(step), enc.encode(step, measure=True)[1]
    monkeypatch.setattr(stream, "_in_own_units", lambda m, dtype: False)  # the host path
    host = enc.errors(step), enc.encode(step, measure=True)[1]
    assert device == host
    assert device[0][0] > 0 and device[0][1] >= (1 if step < 0.1 else 64)


def test_psnr_is_guaranteed_across_slabs(chest_crop, small_slabs):
    for target in (40.0, 50.0):
        blob = compress(chest_crop, psnr=target)
        assert len(unpack(blob)[1]) > 3
        assert _psnr(chest_crop.data, decompress(blob).data) >= target


def test_bpv_mode_streams_within_budget(chest_crop, small_slabs):
    blob = compress(chest_crop, bpv=1.0, block=8)
    assert 0.9 < 8 * len(blob) / chest_crop.data.size <= 1.0
    assert len(unpack(blob)[1]) > 3


def _as_version_1(blob: bytes) -> bytes:
    """A one-slab stream re-packed as format version 1 (no ``slab`` parameter)."""
    h, sections = unpack(blob)
    h = {k: v for k, v in h.items() if k != "sections"}
    h["params"] = {k: v for k, v in h["params"].items() if k != "slab"}
    body = pack(h, sections)[:-32]
    body = body[:4] + struct.pack("<H", 1) + body[6:]
    return body + hashlib.sha256(body).digest()


def test_version_1_streams_are_refused_clearly(load_volume, monkeypatch):
    # version 1 used another entropy coder: its payloads would decode to garbage, so refuse them up front
    vol = load_volume("ct_head_uint8.nii.gz")
    monkeypatch.setattr(stream, "slab_voxels", lambda x: 1 << 23)
    blob = compress(vol, psnr=45)
    assert len(unpack(blob)[1]) == 2  # one slab
    with pytest.raises(FormatError, match="pre-release"):
        decompress(_as_version_1(blob))


@pytest.mark.parametrize("edit", [{"slab": 6}, {"slab": 0}, {"slab": True}, {"slab": 16}, {"slab": "8"},
                                  {"slab": 1 << 40}])
def test_bad_slab_layout_is_a_format_error(chest, edit):
    blob = compress(Volume(chest.data[:40, :40, :40], chest.spacing, chest.affine, {}), psnr=40, block=4)
    h, sections = unpack(blob)
    h = {k: v for k, v in h.items() if k != "sections"}
    h["params"] = {**h["params"], **edit}
    with pytest.raises(FormatError):
        decompress(pack(h, sections))


def test_slab_depth_is_a_block_multiple_within_the_volume():
    assert stream.slab_depth((512, 512, 1000), (4, 4, 8)) == 4
    assert stream.slab_depth((512, 512, 1000), (16, 16, 8)) == 16
    assert stream.slab_depth((512, 512, 1000), (4, 4, 8), 1 << 23) == 16
    assert stream.slab_depth((30, 20, 20), (8, 8, 8)) == 32  # one slab: the padded axis
    assert stream.slab_depth((3000, 4000, 4000), (8, 8, 8)) == 8  # never thinner than a block


def _tiled_ct(load_volume, shape) -> np.ndarray:
    """A large int16 CT made of mirrored copies of the abdomen sample (real texture, smooth seams)."""
    a = load_volume("ct_abdomen.nii.gz").data.astype(np.int16)
    for ax, n in enumerate(shape):
        reps = -(-n // a.shape[ax])
        a = np.concatenate([a if i % 2 == 0 else np.flip(a, ax) for i in range(reps)], axis=ax)
    return np.ascontiguousarray(a[:shape[0], :shape[1], :shape[2]])


@pytest.mark.slow
def test_memory_is_bounded_on_a_large_volume(load_volume):
    """512×512×256 int16 (128 MB, 16 slabs): compress and decompress (whose output is 1×) each stay
    under 3× the input — memory is one slab's working set (~150 MB) plus the coded bytes."""
    x = _tiled_ct(load_volume, (512, 512, 256))
    vol = Volume(x, (1.0, 1.0, 1.0), np.eye(4), {})
    # Same slab shape, so the jitted functions compile outside the measured calls.
    decompress(compress(Volume(x[:64], vol.spacing, vol.affine, {}), psnr=45, block=(4, 4, 8)))
    enc = measure_peak_rss(lambda: compress(vol, psnr=45, block=(4, 4, 8)))
    assert len(unpack(enc.result)[1]) > 2
    dec = measure_peak_rss(lambda: decompress(enc.result))
    assert enc.extra_bytes < 3 * x.nbytes, enc.to_dict(x.nbytes)
    assert dec.extra_bytes < 3 * x.nbytes, dec.to_dict(x.nbytes)
    assert _psnr(x, dec.result.data) >= 45


@pytest.mark.parametrize("shape, depth", [((512, 128, 128), 512), ((4096, 8, 8), 8)])
def test_forged_slab_depths_outside_the_encoders_range_are_refused(shape, depth):
    # re-signed headers declaring one slab for a whole 512×128×128 volume (the decoder's working set would
    # be the whole volume) or 512 one-block-row slabs of 8×8×8 (a coder call per 512 voxels) are refused
    x = np.zeros(shape, np.int16)
    x[::7] = 100  # not constant (and so regular that the exact stream would win: the transform's asked for)
    blob = compress(Volume(x, (1.0, 1.0, 1.0), np.eye(4), {}), psnr=40, block=8, allow_exact=False)
    h, sections = unpack(blob)
    assert h["params"]["slab"] != depth
    h = {k: v for k, v in h.items() if k != "sections"}
    h["params"] = {**h["params"], "block": [8, 8, 8], "slab": depth}
    n = 1 + len(range(0, shape[0], depth))
    forged = pack(h, [sections[0]] + [sections[1]] * (n - 1))
    with pytest.raises(FormatError, match="slab layout"):
        decompress(forged)


@pytest.fixture
def small_groups(monkeypatch, small_slabs):
    """Groups of 2¹⁸ voxels (two ~2¹⁷-voxel slabs), so a 96³ crop has several."""
    monkeypatch.setattr(stream, "group_voxels", lambda voxels: 1 << 18)


@pytest.mark.parametrize("workers", ["1", "2", "3"])
def test_slab_groups_code_alike_in_workers_and_here(chest_crop, small_groups, monkeypatch, workers):
    monkeypatch.setenv("FEDTENSOR_WORKERS", "1")
    here = compress(chest_crop, psnr=45, block=4)
    h, sections = unpack(here)
    slabs = stream.check_params(h["params"], len(sections), chest_crop.data.shape)
    assert slabs.n_groups >= 3 and h["params"]["group"] == slabs.group
    monkeypatch.setenv("FEDTENSOR_WORKERS", workers)
    assert stream.worker_count(slabs.n_groups, slabs.slab_voxels, 0) == int(workers)
    assert compress(chest_crop, psnr=45, block=4) == here  # the stream never depends on the cores
    decoded = decompress(here).data
    assert _psnr(chest_crop.data, decoded) >= 45
    monkeypatch.setenv("FEDTENSOR_WORKERS", "1")
    np.testing.assert_array_equal(decompress(here).data, decoded)


def test_each_group_restarts_from_the_first_slabs_statistics(chest_crop, small_groups):
    # A group decodes by itself given the coders the first slab left, and not with those carried on.
    blob = compress(chest_crop, psnr=45, block=4)
    h, sections = unpack(blob)
    slabs = stream.check_params(h["params"], len(sections), chest_crop.data.shape)
    grids, n = slabs.grids(), slabs.group
    primer = BlockCoders()
    stream.decode_group(grids[:1], slabs.b, sections[1:2], primer)
    carried = BlockCoders()
    stream.decode_group(grids[:n], slabs.b, sections[1:n + 1], carried)
    last = slice(n, min(2 * n, len(grids)))
    qs = stream.decode_group(grids[last], slabs.b, sections[1 + last.start:1 + last.stop], primer)
    assert [q.shape[:3] for q in qs] == grids[last]
    with pytest.raises(FormatError):
        stream.decode_group(grids[last], slabs.b, sections[1 + last.start:1 + last.stop], carried)


@pytest.mark.parametrize("group", [0, -1, True, "2", 2.0, 10**6])
def test_bad_slab_group_is_a_format_error(chest_crop, small_groups, group):
    blob = compress(chest_crop, psnr=40, block=4)
    h, sections = unpack(blob)
    h = {k: v for k, v in h.items() if k != "sections"}
    h["params"] = {**h["params"], "group": group}
    with pytest.raises(FormatError, match="slab groups"):
        decompress(pack(h, sections))


def test_a_corrupted_group_is_reported_from_a_worker(chest_crop, small_groups, monkeypatch):
    monkeypatch.setenv("FEDTENSOR_WORKERS", "2")
    h, sections = unpack(compress(chest_crop, psnr=45, block=4))
    h = {k: v for k, v in h.items() if k != "sections"}
    last = bytearray(sections[-1])
    last[len(last) // 2] ^= 0x5A
    with pytest.raises(FormatError):
        stream.decode_into(np.empty(chest_crop.data.shape, chest_crop.data.dtype), h["params"],
                           [*sections[:-1], bytes(last)], h["params"]["offset"], h["params"]["scale"])


@pytest.mark.parametrize("n, group", [(10, 4), (8, 8), (9, 1), (17, 5)])
def test_slab_coding_order_is_slab_0_then_round_robin_with_each_group_in_turn(n, group):
    slabs = stream.Slabs((n * 4, 8, 8), (4, 4, 4), 4, group)
    order = slabs.coding_order()
    assert order[0] == 0 and sorted(order) == list(range(n))
    for g in range(slabs.n_groups):
        mine = [i for i in order if i // group == g]
        assert mine == sorted(mine)
    # every group's first slab comes before any group's third
    firsts = [order.index(max(1, g * group)) for g in range(slabs.n_groups) if max(1, g * group) < n]
    assert max(firsts) <= slabs.n_groups


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_decoder_stopped_midway_leaves_no_worker_behind(chest_crop, small_groups, monkeypatch):
    """The feeder threads stop before the workers' pipes close: none writes to a closed pipe."""
    import os
    monkeypatch.setenv("FEDTENSOR_WORKERS", "2")
    h, sections = unpack(compress(chest_crop, psnr=45, block=4))
    slabs = stream.check_params(h["params"], len(sections), chest_crop.data.shape)
    def children():  # other tests may leave processes of their own running
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            return set(f.read().split())

    parallel.end_idle_workers()  # the decoder starts its own: those it stops are then told apart
    before = children()
    decoded = stream._decoded_coefficients(slabs, sections[1:], 1 << 30)
    assert [next(decoded)[0] for _ in range(3)] == slabs.coding_order()[:3]
    workers = children() - before
    assert len(workers) == 2
    decoded.close()
    assert not workers & children()


def test_a_region_of_the_most_common_value_decodes_exactly(chest_crop):
    """The normalisation's offset is the most common value, so blocks of it (air, padding) have only
    zero coefficients and decode exactly, whatever the step; with the mean as the offset they shared a
    nonzero DC coefficient and its quantisation error."""
    x = chest_crop.data.copy()
    x[:, :40] = -1000  # 42 % of the voxels: the most common value
    assert normalization(x)[0] == -1000
    vol = Volume(x, (1.0, 1.0, 1.0), np.eye(4), {})
    for target in (35.0, 45.0):
        y = decompress(compress(vol, psnr=target, block=4)).data
        np.testing.assert_array_equal(y[:, :40], x[:, :40])
        assert _psnr(x, y) >= target


def test_first_step_guess_survives_an_error_that_barely_grows_with_the_step():
    """Two voxels in a block mostly of padding: the sampled error grows with the step at a power near
    0, and following that power to the budget overflowed a float (an OverflowError from compress)."""
    from fedtensor.io.volume import Volume

    x = np.array([-15768.756104869755, -4724.341564337806]).reshape(1, 2, 1)
    blob = compress(Volume(x), psnr=40, block=(2, 32, 2))
    assert _psnr(x, decompress(blob).data) >= 40
