"""Pallas kernels (interpret mode on CPU) against their jnp references, and against the codec's path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedtensor.codec.quantize import RECON_OFFSET, ROUNDING, band_rounding, dequantize, quantize
from fedtensor.tensor.block import block_bases, expand, project, to_blocks
from fedtensor_kernels import block_transform as bt


# On a GPU the compiled kernels are checked too (CI has none: there they are skipped).
PALLAS_IMPLS = ["interpret", pytest.param("pallas", marks=pytest.mark.skipif(not bt.accelerated(),
                                                                             reason="needs a GPU backend"))]


def _case(shape, b, seed=0):
    rng = np.random.default_rng(seed)
    x = np.cumsum(rng.standard_normal(shape), axis=0).astype(np.float32) * 10
    blocks = to_blocks(jnp.asarray(x), b)
    bases = block_bases(blocks, b)
    return blocks, bases


@pytest.mark.parametrize("shape,b", [((20, 12, 9), (4, 4, 4)), ((16, 16, 16), (8, 8, 8)), ((40, 8, 8), (4, 4, 8))])
def test_kron_reference_matches_separable_projection(shape, b):
    blocks, bases = _case(shape, b)
    k = bt.kron_basis(bases)
    flat = np.asarray(blocks).reshape(-1, int(np.prod(b)))
    coef = np.asarray(bt.transform_quantize_reference(flat, k, 1e-3, 0.5)) * 1e-3
    expected = np.asarray(project(blocks, bases)).reshape(flat.shape)
    np.testing.assert_allclose(coef, expected, atol=2e-3 + 1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("per_band", [False, True])
@pytest.mark.parametrize("n,b", [(5, (4, 4, 4)), (130, (4, 4, 8)), (260, (8, 8, 8))])
def test_pallas_forward_equals_reference(n, b, per_band):
    rng = np.random.default_rng(n)
    us = [np.linalg.qr(rng.standard_normal((m, m)))[0].astype(np.float32) for m in b]
    k = bt.kron_basis(us)
    x = (rng.standard_normal((n, int(np.prod(b)))) * 50).astype(np.float32)
    step = 3.0
    # one rounding, or one per band (column) spanning the whole unit interval: a misplaced column shows
    rounding = rng.uniform(0, 1, k.shape[1]).astype(np.float32) if per_band else ROUNDING
    ref = np.asarray(bt.transform_quantize_reference(x, k, step, rounding))
    got = np.asarray(bt.transform_quantize_pallas(x, k, step, rounding, interpret=True))
    assert got.shape == ref.shape and got.dtype == np.int32
    # Summation order differs; a coefficient sitting exactly on a bin edge may round either way.
    mismatch = np.abs(got - ref)
    assert mismatch.max() <= 1 and (mismatch > 0).mean() < 1e-3


@pytest.mark.parametrize("n,b", [(7, (4, 4, 4)), (200, (8, 8, 4))])
def test_pallas_inverse_equals_reference(n, b):
    rng = np.random.default_rng(n + 1)
    us = [np.linalg.qr(rng.standard_normal((m, m)))[0].astype(np.float32) for m in b]
    k = bt.kron_basis(us)
    q = rng.integers(-20, 21, (n, int(np.prod(b)))).astype(np.int32)
    ref = np.asarray(bt.dequantize_inverse_reference(q, k, 2.5, RECON_OFFSET))
    got = np.asarray(bt.dequantize_inverse_pallas(q, k, 2.5, RECON_OFFSET, interpret=True))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_fused_round_trip_matches_codec_quantiser(impl):
    """The fused Pallas kernels against the codec's own projection + quantiser and its inverse."""
    blocks, bases = _case((24, 16, 16), (8, 8, 8), seed=3)
    b = int(np.prod((8, 8, 8)))
    flat = jnp.asarray(np.asarray(blocks).reshape(-1, b))
    k = bt.kron_basis(bases)
    step, interpret = np.float32(4.0), impl == "interpret"
    q = np.asarray(bt.transform_quantize_pallas(flat, k, step, np.float32(ROUNDING), interpret=interpret))
    q_codec = np.asarray(quantize(project(blocks, bases), step)).reshape(flat.shape)
    assert (q != q_codec).mean() < 1e-3
    x = np.asarray(bt.dequantize_inverse_pallas(jnp.asarray(q), k, step, np.float32(RECON_OFFSET),
                                                interpret=interpret))
    x_codec = np.asarray(expand(dequantize(jnp.asarray(q.reshape(q_codec.shape[0], 8, 8, 8)[None, None]), step), bases))
    np.testing.assert_allclose(x, x_codec.reshape(x.shape), rtol=1e-4, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# the kernels as the codec calls them: block grids, selection at run time, whole streams
# ------------------------------------------------------------------------------------------------


def _ct_blocks(ct_crop, b):
    from fedtensor.codec.normalize import normalization, normalize

    x = np.asarray(ct_crop.data)[:32, :32, :32]
    blocks = to_blocks(jnp.asarray(normalize(x, *normalization(x))), b)
    return blocks, [jnp.asarray(np.asarray(u, np.float32)) for u in block_bases(blocks, b)]



@pytest.mark.parametrize("impl", PALLAS_IMPLS)
@pytest.mark.parametrize("b", [(4, 4, 8), (8, 8, 8), (16, 16, 8)])
def test_block_grid_kernels_match_reference(ct_crop, b, impl):
    """forward_blocks / inverse_blocks: Pallas vs the separable jnp path the CPU codec runs."""
    blocks, bases = _ct_blocks(ct_crop, b)
    step = jnp.float32(2e-3)
    rounding = band_rounding(b)  # the codec's, one per band
    q_ref = np.asarray(bt.forward_blocks(blocks, bases, step, rounding, "reference"))
    q_pal = np.asarray(bt.forward_blocks(blocks, bases, step, rounding, impl))
    assert q_pal.shape == q_ref.shape == blocks.shape and np.abs(q_ref).max() > 10
    mismatch = np.abs(q_pal - q_ref)  # different summation order: a value on a bin edge may round either way
    assert mismatch.max() <= 1 and (mismatch > 0).mean() < 1e-3
    x_ref = np.asarray(bt.inverse_blocks(jnp.asarray(q_ref), bases, step, RECON_OFFSET, "reference"))
    x_pal = np.asarray(bt.inverse_blocks(jnp.asarray(q_ref), bases, step, RECON_OFFSET, impl))
    np.testing.assert_allclose(x_pal, x_ref, atol=1e-5)
    # and the reference is the codec's quantiser on the separable projection
    np.testing.assert_array_equal(q_ref, np.asarray(quantize(project(blocks, bases), step, rounding)))


def test_kernel_choice_at_run_time(monkeypatch):
    monkeypatch.delenv("FEDTENSOR_KERNELS", raising=False)
    assert bt.default_impl() == ("pallas" if bt.accelerated() else "reference")
    monkeypatch.setenv("FEDTENSOR_KERNELS", "interpret")
    assert bt.default_impl() == "interpret"
    monkeypatch.setenv("FEDTENSOR_KERNELS", "cuda-please")
    from fedtensor.errors import FedtensorError

    with pytest.raises(FedtensorError, match="FEDTENSOR_KERNELS"):
        bt.default_impl()
    if jax.default_backend() == "cpu":  # compiled Pallas cannot run here: a clear error, not an internal one
        monkeypatch.setenv("FEDTENSOR_KERNELS", "pallas")
        with pytest.raises(FedtensorError, match="needs a GPU"):
            bt.default_impl()


def test_the_codec_picks_pallas_on_a_gpu_for_small_blocks_only(monkeypatch):
    """On an accelerator: Pallas for block volumes up to PALLAS_MAX_BLOCK, the separable reference above
    (measured faster there), whatever the shape when FEDTENSOR_KERNELS forces one; on a CPU the reference."""
    monkeypatch.delenv("FEDTENSOR_KERNELS", raising=False)
    monkeypatch.setattr(bt, "accelerated", lambda: True)
    assert bt.PALLAS_MAX_BLOCK == 128
    assert bt.impl_for((4, 4, 8)) == bt.impl_for((8, 4, 4)) == bt.impl_for((2, 8, 8)) == "pallas"
    assert bt.impl_for((8, 8, 8)) == bt.impl_for((4, 4, 16)) == "reference"
    monkeypatch.setenv("FEDTENSOR_KERNELS", "interpret")
    assert bt.impl_for((8, 8, 8)) == bt.impl_for((4, 4, 8)) == "interpret"
    monkeypatch.delenv("FEDTENSOR_KERNELS")
    monkeypatch.setattr(bt, "accelerated", lambda: False)
    assert bt.impl_for((4, 4, 8)) == bt.impl_for((8, 8, 8)) == "reference"


@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_pallas_wrappers_take_any_basis_and_no_blocks(impl):
    """A rank-truncated basis (B×R) and an empty stack give the reference's shapes and values."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(0, 30, (10, 64)), jnp.float32)
    k = jnp.asarray(np.linalg.qr(rng.normal(size=(64, 64)))[0][:, :8], jnp.float32)
    q_ref = bt.transform_quantize_reference(x, k, np.float32(0.5), np.float32(0.5))
    q = bt.transform_quantize_pallas(x, k, np.float32(0.5), np.float32(0.5), interpret=impl == "interpret")
    assert q.shape == q_ref.shape == (10, 8)
    assert np.mean(np.asarray(q) != np.asarray(q_ref)) < 0.02
    x_ref = bt.dequantize_inverse_reference(q_ref, k, np.float32(0.5), np.float32(0.0))
    back = bt.dequantize_inverse_pallas(q_ref, k, np.float32(0.5), np.float32(0.0), interpret=impl == "interpret")
    assert back.shape == x_ref.shape == (10, 64)
    np.testing.assert_allclose(np.asarray(back), np.asarray(x_ref), rtol=1e-5, atol=1e-4)
    empty = bt.transform_quantize_pallas(x[:0], k, np.float32(0.5), np.float32(0.5), interpret=impl == "interpret")
    assert empty.shape == (0, 8) and empty.dtype == jnp.int32


@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_codec_streams_with_pallas_kernels_match_reference(ct_crop, monkeypatch, impl):
    """The whole codec with the Pallas kernels and with the jnp reference: the target is met both ways,
    decoded volumes agree to the rounding of a few voxels, rates within 0.5 %."""
    from fedtensor.codec import compress, decompress

    x = np.asarray(ct_crop.data)
    out = {}
    for path in ("reference", impl):
        monkeypatch.setenv("FEDTENSOR_KERNELS", path)
        blob = compress(ct_crop, psnr=45, block=(4, 4, 8))
        out[path] = (blob, decompress(blob).data)
        d = out[path][1].astype(np.float64) - x
        assert 20 * np.log10(np.ptp(x) / np.sqrt(np.mean(d * d))) >= 45
    (b_ref, x_ref), (b_pal, x_pal) = out["reference"], out[impl]
    assert abs(len(b_pal) / len(b_ref) - 1) < 5e-3
    diff = np.abs(x_pal.astype(np.int64) - x_ref)
    assert (diff > 0).mean() < 0.05


@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_stream_decoded_by_the_other_path_keeps_its_quality(ct_crop, monkeypatch, impl):
    """A block-tucker stream encoded with the Pallas kernels (a GPU encoder) and decoded with the jnp
    reference (a CPU decoder), and the other way round: the kernels compute in true fp32, so the two
    decoders differ by fp32 rounding only — a voxel on a rounding edge may land one unit apart, and the
    PSNR the encoder measured (and guaranteed) holds on the other path to within that."""
    from fedtensor.codec import compress, decompress, read_info

    x = np.asarray(ct_crop.data).astype(np.int64)
    for enc, dec in ((impl, "reference"), ("reference", impl)):
        monkeypatch.setenv("FEDTENSOR_KERNELS", enc)
        blob = compress(ct_crop, psnr=45, block=(4, 4, 8))
        own = decompress(blob).data.astype(np.int64)
        monkeypatch.setenv("FEDTENSOR_KERNELS", dec)
        other = decompress(blob).data.astype(np.int64)
        assert np.abs(other - own).max() <= 1 and (other != own).mean() < 1e-3
        sse = float(np.sum((other - x) ** 2))
        assert 10 * np.log10(np.ptp(x) ** 2 * x.size / sse) >= read_info(blob)["stats"]["psnr"] - 0.01 >= 44.99


def test_band_rounding_widens_the_dead_zone_with_the_degree():
    r = band_rounding((4, 4, 8))
    assert r.shape == (4, 4, 8) and r.dtype == np.float32 and not r.flags.writeable
    assert r[0, 0, 0] == pytest.approx(0.45) and r[-1, -1, -1] == pytest.approx(0.25)
    assert r[1, 0, 0] == r[0, 1, 0] == r[0, 0, 1] and r[1, 1, 0] < r[1, 0, 0]  # a function of i + j + k only
    assert 0 < r.min() and r.max() < 0.5  # every band keeps a dead zone


@pytest.mark.parametrize("n", [500, 40000])  # whole arrays, and ones the bisection first subsamples
def test_largest_step_within_meets_the_budget_with_per_band_rounding(n):
    from fedtensor.codec.quantize import largest_step_within, quantization_sse

    b = (4, 4, 8)
    c = jnp.asarray(np.random.default_rng(n).laplace(0, 1, (n, *b)).astype(np.float32))
    rounding = band_rounding(b)
    budget = 0.05 * c.size
    step = largest_step_within(c, budget, 1e-6, 100.0, rounding)
    assert float(quantization_sse(c, np.float32(step), rounding)) <= budget
    assert float(quantization_sse(c, np.float32(step * 1.05), rounding)) > budget  # the largest, nearly
    # the per-band dead zone is what the bisection measured: with one rounding the step differs
    assert abs(largest_step_within(c, budget, 1e-6, 100.0) / step - 1) > 1e-3
    # the subsample's answer alone (the whole array's where it is not subsampled): close, not exact
    rough = largest_step_within(c, budget, 1e-6, 100.0, rounding, exact=False)
    assert rough == step if n == 500 else 0 < abs(rough / step - 1) < 0.02
    with pytest.raises(ValueError, match="trailing position"):
        largest_step_within(c, budget, 1e-6, 100.0, band_rounding((8, 4, 4)))
