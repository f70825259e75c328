"""Tucker core: HOSVD / HOOI against tensorly and numpy, blockwise Tucker, rank selection."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorly.decomposition import tucker as tl_tucker

from fedtensor.tensor.tucker import mode_spectra

from fedtensor.tensor import (
    block_tucker,
    block_tucker_to_tensor,
    from_blocks,
    hooi,
    hosvd,
    ranks_for_energy,
    ranks_for_error,
    to_blocks,
    tucker_to_tensor,
)

tl.set_backend("numpy")


# ------------------------------------------------------------------------------------------------
# Helpers (all float64 numpy, independent of the library)
# ------------------------------------------------------------------------------------------------


def _unfold(x: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(x, mode, 0).reshape(x.shape[mode], -1)


def _np_hosvd_factors(x: np.ndarray, ranks) -> list[np.ndarray]:
    return [np.linalg.svd(_unfold(x, m), full_matrices=False)[0][:, :r] for m, r in enumerate(ranks)]


def _project_reconstruct(x: np.ndarray, factors) -> np.ndarray:
    """x ×_m (U_m U_m^T) for every mode, in float64."""
    u = [np.asarray(f, np.float64) for f in factors]
    core = np.einsum("ijk,ia,jb,kc->abc", x, *u, optimize=True)
    return np.einsum("abc,ia,jb,kc->ijk", core, *u, optimize=True)


def _recon(core, factors) -> np.ndarray:
    return np.asarray(tucker_to_tensor(core, factors), np.float64)


def _err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def _assert_orthonormal(u, atol=2e-5):
    u = np.asarray(u, np.float64)
    assert u.ndim == 2 and u.shape[1] <= u.shape[0]
    np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=atol)


def _low_rank_plus_noise(shape, ranks, noise, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    core = rng.normal(size=ranks) * 10
    factors = [np.linalg.qr(rng.normal(size=(n, r)))[0] for n, r in zip(shape, ranks)]
    x = np.einsum("abc,ia,jb,kc->ijk", core, *factors, optimize=True)
    return (x + noise * rng.normal(size=shape)).astype(np.float32)


def _edge_pad_blocks(x: np.ndarray, b: int) -> np.ndarray:
    """Independent numpy version of the block view: (gx, gy, gz, b, b, b), edge padding."""
    pad = [(0, -(-n // b) * b - n) for n in x.shape]
    p = np.pad(x, pad, mode="edge")
    gx, gy, gz = (n // b for n in p.shape)
    out = np.empty((gx, gy, gz, b, b, b), p.dtype)
    for i in range(gx):
        for j in range(gy):
            for k in range(gz):
                out[i, j, k] = p[i * b:(i + 1) * b, j * b:(j + 1) * b, k * b:(k + 1) * b]
    return out


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_block(load_volume) -> np.ndarray:
    """A 40×40×30 float32 crop of ct_abdomen (HU values, uncentred)."""
    return np.ascontiguousarray(load_volume("ct_abdomen.nii.gz").data[40:80, 30:70, 40:70], np.float32)


@pytest.fixture(scope="module")
def low_rank() -> np.ndarray:
    return _low_rank_plus_noise((22, 18, 15), (4, 3, 5), noise=0.05, seed=3)


def _data(request, which):
    return request.getfixturevalue(which)


# ------------------------------------------------------------------------------------------------
# HOSVD / HOOI
# ------------------------------------------------------------------------------------------------

# Each distinct (shape, ranks) costs a jit compile of ~1.5 s on CPU: keep this list short and reuse it.
CASES = [
    ("ct_block", (5, 5, 5)),
    ("ct_block", (3, 20, 9)),
    ("low_rank", (4, 3, 5)),
    ("low_rank", (8, 6, 7)),
]


@pytest.mark.parametrize("which,ranks", CASES)
def test_hosvd_matches_numpy_svd_hosvd(request, which, ranks):
    x = _data(request, which)
    xd = x.astype(np.float64)
    core, factors = hosvd(x, ranks)
    assert tuple(core.shape) == ranks
    assert [tuple(f.shape) for f in factors] == [(n, r) for n, r in zip(x.shape, ranks)]
    for f in factors:
        _assert_orthonormal(f)
    ref = _project_reconstruct(xd, _np_hosvd_factors(xd, ranks))
    e, e_ref = _err(_recon(core, factors), xd), _err(ref, xd)
    assert e == pytest.approx(e_ref, rel=1e-4, abs=1e-5 * np.linalg.norm(xd))
    # The core really is the projection of x on the factors.
    np.testing.assert_allclose(
        np.asarray(core, np.float64),
        np.einsum("ijk,ia,jb,kc->abc", xd, *[np.asarray(f, np.float64) for f in factors], optimize=True),
        rtol=1e-4, atol=1e-5 * np.abs(xd).max() * np.sqrt(x.size),
    )


@pytest.mark.parametrize("which,ranks", CASES)
def test_hooi_vs_tensorly(request, which, ranks):
    x = _data(request, which)
    xd = x.astype(np.float64)
    norm = float(np.linalg.norm(xd))
    e_hosvd = _err(_recon(*hosvd(x, ranks)), xd)
    core, factors = hooi(x, ranks, n_iter=30)
    for f in factors:
        _assert_orthonormal(f)
    e_hooi = _err(_recon(core, factors), xd)
    ref = tl_tucker(xd, rank=list(ranks), init="svd", n_iter_max=200, tol=1e-12)
    e_tl = _err(tl.tucker_to_tensor(ref), xd)
    assert e_hooi <= e_hosvd + 1e-5 * norm
    assert abs(e_hooi - e_tl) <= 1e-3 * e_tl + 1e-6 * norm, (e_hooi, e_tl)


def test_hooi_with_zero_iterations_is_hosvd(ct_block):
    c0, f0 = hosvd(ct_block, (5, 5, 5))
    c1, f1 = hooi(ct_block, (5, 5, 5), n_iter=0)
    np.testing.assert_allclose(np.asarray(c1), np.asarray(c0), rtol=1e-5, atol=1e-3)
    for a, b in zip(f0, f1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_hooi_error_does_not_increase_with_iterations(low_rank):
    xd = low_rank.astype(np.float64)
    errs = [_err(_recon(*hosvd(low_rank, (8, 6, 7))), xd)]
    errs += [_err(_recon(*hooi(low_rank, (8, 6, 7), n_iter=n)), xd) for n in (2, 30)]
    tol = 1e-5 * np.linalg.norm(xd)
    assert all(b <= a + tol for a, b in zip(errs, errs[1:])), errs


def test_low_rank_tensor_is_recovered_exactly():
    x = _low_rank_plus_noise((22, 18, 15), (4, 3, 5), noise=0.0, seed=7)  # same shapes as CASES: no compile
    for core, factors in (hosvd(x, (4, 3, 5)), hooi(x, (4, 3, 5), n_iter=30)):
        assert _err(_recon(core, factors), x) <= 1e-5 * np.linalg.norm(x)


def test_full_rank_tucker_is_exact(ct_block):
    core, factors = hosvd(ct_block, ct_block.shape)
    for f in factors:
        _assert_orthonormal(f)
    assert _err(_recon(core, factors), ct_block) <= 1e-5 * np.linalg.norm(ct_block.astype(np.float64))


def test_decompositions_are_deterministic(ct_block):
    a = hooi(ct_block, (5, 5, 5), n_iter=30)
    b = hooi(np.array(ct_block), (5, 5, 5), n_iter=30)
    for u, v in zip(a[1], b[1]):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@settings(max_examples=4, deadline=None)
@given(
    shape=st.tuples(*[st.integers(2, 7)] * 3),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_hooi_properties_small_shapes(shape, data, seed):
    """One jitted call per example (compiles dominate): HOOI vs an independent float64 HOSVD."""
    ranks = tuple(data.draw(st.integers(1, n), label=f"rank{m}") for m, n in enumerate(shape))
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    xd = x.astype(np.float64)
    norm = float(np.linalg.norm(xd))
    core, factors = hooi(x, ranks, n_iter=4)
    assert tuple(core.shape) == ranks
    for f in factors:
        _assert_orthonormal(f)
    e_hooi = _err(_recon(core, factors), xd)
    e_hosvd = _err(_project_reconstruct(xd, _np_hosvd_factors(xd, ranks)), xd)
    assert e_hooi <= e_hosvd + 1e-5 * norm
    # HOSVD quasi-optimality: error² ≤ Σ_m (energy discarded in mode m).
    tails = sum(float(np.sum(np.linalg.svd(_unfold(xd, m), compute_uv=False)[r:] ** 2)) for m, r in enumerate(ranks))
    assert e_hosvd**2 <= tails * (1 + 1e-9) + 1e-12
    # Energy identity for orthonormal factors: ||x||² = ||core||² + ||x − x̂||².
    assert float(np.sum(np.asarray(core, np.float64) ** 2)) + e_hooi**2 == pytest.approx(norm**2, rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Blockwise Tucker
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,b", [((17, 9, 5), 8), ((19, 1, 3), 4), ((1, 1, 1), 8), ((13, 21, 11), 2), ((16, 16, 8), 8)])
def test_block_tucker_full_rank_round_trip(shape, b):
    x = np.random.default_rng(sum(shape) + b).normal(size=shape).astype(np.float32) * 100
    core, factors = block_tucker(x, b)
    grid = tuple(-(-n // b) for n in shape)
    assert tuple(core.shape) == (*grid, b, b, b)
    for f in factors:
        assert tuple(f.shape) == (b, b)
        _assert_orthonormal(f)
    r = np.asarray(block_tucker_to_tensor(core, factors, shape))
    assert r.shape == shape
    np.testing.assert_allclose(r, x, atol=1e-4 * np.abs(x).max())


def test_block_tucker_real_volume_round_trip(ct_block):
    core, factors = block_tucker(ct_block, 8)
    r = np.asarray(block_tucker_to_tensor(core, factors, ct_block.shape))
    np.testing.assert_allclose(r, ct_block, atol=1e-5 * np.abs(ct_block).max())


@pytest.mark.parametrize("shape,b", [((17, 9, 5), 4), ((40, 40, 30), 8), ((5, 6, 7), 8)])
def test_to_blocks_is_edge_padded_block_view(shape, b):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    blocks = np.asarray(to_blocks(x, b))
    np.testing.assert_array_equal(blocks, _edge_pad_blocks(x, b))
    np.testing.assert_array_equal(np.asarray(from_blocks(blocks, shape)), x)


@pytest.mark.parametrize("ranks,n_iter", [(None, 0), ((4, 5, 3), 0), ((4, 5, 3), 3)])
def test_block_projection_matches_naive_einsum(ct_block, ranks, n_iter):
    b = 8
    x = ct_block[:37, :29, :30]  # odd sizes → the last blocks are padded
    core, factors = block_tucker(x, b, ranks=ranks, n_iter=n_iter)
    u = [np.asarray(f, np.float64) for f in factors]
    expect_r = ranks or (b, b, b)
    assert [f.shape for f in u] == [(b, r) for r in expect_r]
    for f in u:
        _assert_orthonormal(f)
    blocks = _edge_pad_blocks(x.astype(np.float64), b)
    core = np.asarray(core, np.float64)
    assert core.shape == (*blocks.shape[:3], *expect_r)
    gx, gy, gz = blocks.shape[:3]
    for idx in [(0, 0, 0), (gx - 1, gy - 1, gz - 1), (gx // 2, 1, gz - 1), (1, gy - 1, 0)]:
        naive = np.einsum("ijk,ia,jb,kc->abc", blocks[idx], *u)
        np.testing.assert_allclose(core[idx], naive, rtol=1e-4, atol=1e-5 * np.abs(naive).max())


def test_block_bases_are_the_stack_hosvd(ct_block):
    """Mode-m basis = leading eigenvectors of the mode-m Gram matrix of the whole block stack."""
    b = 4
    x = ct_block[:24, :20, :16].astype(np.float64)
    _, factors = block_tucker(x, b, ranks=(2, 3, 4))
    blocks = _edge_pad_blocks(x, b).reshape(-1, b, b, b)
    for m, (f, r) in enumerate(zip(factors, (2, 3, 4))):
        stacked = np.moveaxis(blocks, m + 1, 0).reshape(b, -1)
        ref = np.linalg.svd(stacked, full_matrices=False)[0][:, :r]
        # Same subspace (signs/rotations within equal singular values aside).
        np.testing.assert_allclose(np.abs(np.asarray(f, np.float64).T @ ref), np.eye(r), atol=2e-3)


def test_block_hooi_refinement_does_not_hurt(ct_block):
    x = ct_block.astype(np.float64)
    errs = []
    for n_iter in (0, 4):
        core, factors = block_tucker(ct_block, 8, ranks=(3, 3, 3), n_iter=n_iter)
        errs.append(_err(np.asarray(block_tucker_to_tensor(core, factors, x.shape)), x))
    assert errs[1] <= errs[0] * (1 + 1e-5)


@settings(max_examples=6, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 12)] * 3),
    b=st.sampled_from([2, 3, 4, 8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_tucker_round_trip_property(shape, b, seed):
    x = np.random.default_rng(seed).uniform(-1000, 3000, size=shape).astype(np.float32)
    core, factors = block_tucker(x, b)
    r = np.asarray(block_tucker_to_tensor(core, factors, shape))
    assert r.shape == shape
    np.testing.assert_allclose(r, x, atol=3e-4 * np.abs(x).max())


# ------------------------------------------------------------------------------------------------
# Rank selection
# ------------------------------------------------------------------------------------------------


def _hosvd_error(x: np.ndarray, ranks, full_factors=None) -> float:
    """HOSVD truncation error at ``ranks`` in float64 numpy (full factors may be precomputed)."""
    xd = np.asarray(x, np.float64)
    full = full_factors or _np_hosvd_factors(xd, xd.shape)
    return _err(_project_reconstruct(xd, [u[:, :r] for u, r in zip(full, ranks)]), xd)


def _mode_energy(x: np.ndarray) -> list[np.ndarray]:
    xd = np.asarray(x, np.float64)
    return [np.linalg.svd(_unfold(xd, m), compute_uv=False) ** 2 for m in range(3)]


@pytest.mark.parametrize("which", ["ct_block", "low_rank"])
def test_ranks_for_energy(request, which):
    x = _data(request, which)
    spectra = _mode_energy(x)
    previous = (0, 0, 0)
    for energy in (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0):
        ranks = ranks_for_energy(x, energy)
        assert len(ranks) == 3
        assert all(1 <= r <= n for r, n in zip(ranks, x.shape))
        assert all(r >= p for r, p in zip(ranks, previous)), (energy, ranks, previous)
        previous = ranks
        for s, r in zip(spectra, ranks):
            kept = s[:r].sum() / s.sum()
            assert kept >= energy - 1e-5  # enough energy…
            if r > 1:  # …and the smallest such rank
                assert s[: r - 1].sum() / s.sum() < energy + 1e-5


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.01, float("nan")])
def test_ranks_for_energy_rejects_bad_targets(ct_block, energy):
    with pytest.raises(ValueError):
        ranks_for_energy(ct_block, energy)


@pytest.mark.parametrize("which", ["ct_block", "low_rank"])
def test_ranks_for_error(request, which):
    x = _data(request, which)
    xd = x.astype(np.float64)
    norm = float(np.linalg.norm(xd))
    full = _np_hosvd_factors(xd, xd.shape)
    previous = None
    for rel in (0.9, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01):
        ranks = ranks_for_error(x, rel)
        assert all(1 <= r <= n for r, n in zip(ranks, x.shape))
        if previous is not None:  # a tighter target never needs smaller ranks
            assert all(r >= p for r, p in zip(ranks, previous)), (rel, ranks, previous)
        previous = ranks
        e = _hosvd_error(xd, ranks, full)
        assert e <= rel * norm + 1e-6 * norm, (rel, ranks, e / norm)
    # …and the library's own (float32, jitted) HOSVD agrees at one of them.
    ranks = ranks_for_error(x, 0.1)
    assert _err(_recon(*hosvd(x, ranks)), xd) <= 0.1 * norm + 1e-5 * norm


def test_ranks_for_error_extremes(low_rank):
    assert ranks_for_error(low_rank, 0.0) == low_rank.shape
    assert ranks_for_error(low_rank, 10.0) == (1, 1, 1)
    with pytest.raises(ValueError):
        ranks_for_error(low_rank, -0.5)
    # A clean low-rank tensor needs no more than its true ranks at a loose-but-above-noise target.
    x = _low_rank_plus_noise((22, 18, 15), (4, 3, 5), noise=0.0, seed=7)
    assert all(r <= t for r, t in zip(ranks_for_error(x, 1e-3), (4, 3, 5)))


@settings(max_examples=10, deadline=None)
@given(
    shape=st.tuples(*[st.integers(2, 9)] * 3),
    rel=st.floats(0.01, 0.95),
    rel2=st.floats(0.01, 0.95),
    seed=st.integers(0, 2**31 - 1),
)
def test_ranks_for_error_property(shape, rel, rel2, seed):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    norm = float(np.linalg.norm(x.astype(np.float64)))
    ranks = ranks_for_error(x, rel)
    assert _hosvd_error(x, ranks) <= rel * norm + 1e-5 * norm
    lo, hi = sorted((rel, rel2))
    assert all(a >= b for a, b in zip(ranks_for_error(x, lo), ranks_for_error(x, hi)))
    e_lo, e_hi = sorted((rel, rel2))
    r_lo, r_hi = ranks_for_energy(x, 1 - e_hi**2 / 2), ranks_for_energy(x, 1 - e_lo**2 / 2)
    assert all(a <= b for a, b in zip(r_lo, r_hi))


def test_ranks_beyond_a_dimension_and_nan_targets_are_refused():
    x = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    for ranks in [(6, 6, 6), (0, 2, 2), (2, 2)]:
        with pytest.raises(ValueError, match="one integer in \\[1, n\\] per mode"):
            hosvd(x, ranks)
        with pytest.raises(ValueError, match="one integer in \\[1, n\\] per mode"):
            hooi(x, ranks)
    with pytest.raises(ValueError, match="rel_error"):
        ranks_for_error(x, float("nan"))
    with pytest.raises(ValueError, match="energy"):
        ranks_for_energy(x, float("nan"))


def test_a_constant_tensor_keeps_rank_one_at_full_energy():
    """Rounding leaves tiny negative eigenvalues; read as energy they made cumulative sums fall."""
    x = np.full((7, 9, 5), 3.0, np.float32)
    assert ranks_for_energy(x, 1.0) == (1, 1, 1)
    assert all(float(np.min(s)) >= 0 for s in mode_spectra(x))


@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_decompositions_do_not_depend_on_the_scale(scale):
    """float32 Gram matrices overflow near 1e19 (NaN factors) and underflow near 1e-19 (meaningless
    bases): the bases come from the tensor scaled to a unit peak."""
    x = np.random.default_rng(0).normal(size=(12, 10, 8)).astype(np.float32)
    y = x * np.float32(scale)

    def rel(fn, *args):
        core, factors = fn(*args)
        got = np.asarray(tucker_to_tensor(core, factors) if fn is not block_tucker
                         else block_tucker_to_tensor(core, factors, args[0].shape), np.float64)
        ref = np.asarray(args[0], np.float64)
        return np.linalg.norm(got - ref) / np.linalg.norm(ref)

    for fn, args in [(hosvd, (4, 4, 4)), (hooi, (4, 4, 4))]:
        assert rel(fn, y, args) == pytest.approx(rel(fn, x, args), rel=1e-4)
    assert rel(block_tucker, y, 4, (2, 2, 2)) == pytest.approx(rel(block_tucker, x, 4, (2, 2, 2)), rel=1e-4)
    assert ranks_for_error(y, 0.5) == ranks_for_error(x, 0.5)


def test_an_exactly_low_rank_tensor_is_recovered_to_float32_precision():
    """Bases from float32 Gram matrices lost every singular value below ~3e-4 of the largest (relative
    error 3.3e-4 here, HOOI worse than its HOSVD start); from a QR of the unfolding they match
    tensorly's float32 Tucker (2.6e-7)."""
    rng = np.random.default_rng(1)
    n = (48, 44, 40)
    g = [np.linspace(0, 1, k) for k in n]
    x = sum(np.exp(-0.5 * j) * np.einsum("i,j,k->ijk", np.cos(j * np.pi * g[0] + rng.uniform()),
                                        np.cos(j * np.pi * g[1] + rng.uniform()), np.cos(j * np.pi * g[2]))
            for j in range(20)).astype(np.float32)
    ref = x.astype(np.float64)
    errors = {}
    for fn in (hosvd, hooi):
        core, factors = fn(x, (20, 20, 20))
        got = np.asarray(tucker_to_tensor(core, factors), np.float64)
        errors[fn.__name__] = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert errors["hosvd"] < 1e-5 and errors["hooi"] < 1e-5, errors


def test_long_thin_tensors_hold_no_side_by_side_matrix():
    """hosvd/hooi on a 1 × 2 × n tensor: no n × n array in the program (a full SVD's V and HOOI's
    identity took 1.1 GB for n = 16384, for a 131 kB tensor)."""
    n = 4096
    x = np.random.default_rng(0).standard_normal((1, 2, n)).astype(np.float32)
    for fn, kw in ((hosvd, {}), (hooi, {"n_iter": 2})):
        assert f"{n}x{n}" not in fn.lower(x, (1, 2, 2), **kw).as_text(), fn.__name__
    core, factors = hooi(x, (1, 2, 2), n_iter=2)
    np.testing.assert_allclose(np.asarray(tucker_to_tensor(core, factors)), x, atol=1e-4)
