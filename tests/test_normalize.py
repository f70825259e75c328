"""The normalisation maps (fedtensor.codec.normalize): the host's float64 one and the jitted DeviceMap."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtensor.codec.normalize import EXACT_F32, denormalize, device_map, from_unit, normalization, normalize, to_unit

INTEGER_DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32"]


def _volume(dtype: str, lo_fraction: float, span: int, seed: int) -> np.ndarray:
    """Integers spanning ``span`` values somewhere in ``dtype``'s range (``lo_fraction`` of the way up)."""
    info = np.iinfo(dtype)
    span = min(span, int(info.max) - int(info.min))
    lo = int(info.min) + int(lo_fraction * (int(info.max) - int(info.min) - span))
    x = np.random.default_rng(seed).integers(lo, lo + span, (5, 6, 7), endpoint=True, dtype=np.int64)
    x.flat[0], x.flat[1] = lo, lo + span  # the whole span is present
    return x.astype(dtype)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(INTEGER_DTYPES), lo_fraction=st.floats(0, 1), span=st.integers(1, EXACT_F32 - 1),
       seed=st.integers(0, 2**16))
def test_device_map_round_trips_integers_exactly_and_agrees_with_the_host(dtype, lo_fraction, span, seed):
    """Anywhere in the dtype's range (uint32 near 2**32, int32 near −2**31): the normalised values are
    the host's float64 ones to float32 accuracy, and decode(encode(x)) is x — bit for bit while float32's
    24 bits hold the range with room to spare, within one unit up to 2**24."""
    x = _volume(dtype, lo_fraction, span, seed)
    offset, scale = normalization(x)
    m = device_map(x.dtype, offset, scale)
    assert m is not None
    unit = np.asarray(to_unit(jnp.asarray(x), m))
    np.testing.assert_allclose(unit, normalize(x, offset, scale), rtol=0, atol=4e-7)
    back = np.asarray(from_unit(jnp.asarray(unit), m, x.dtype))
    assert back.dtype == x.dtype
    assert np.abs(back.astype(np.int64) - x).max() <= (0 if span <= 1 << 20 else 1)


@pytest.mark.parametrize("end", ["bottom", "top"])
@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_device_map_clips_to_the_dtype_never_wraps(dtype, end):
    """Reconstructions far outside the data (a coarse step, a forged stream) saturate at the dtype's
    limits, as the host's float64 map does, even for data at the very edge of the dtype."""
    info = np.iinfo(dtype)
    edge = int(info.min) if end == "bottom" else int(info.max) - 100
    x = (edge + np.linspace(0, 100, 24).round().astype(np.int64)).reshape(2, 3, 4).astype(dtype)
    offset, scale = normalization(x)
    m = device_map(x.dtype, offset, scale)
    wild = np.linspace(-1e4, 1e4, x.size, dtype=np.float32).reshape(x.shape)
    got = np.asarray(from_unit(jnp.asarray(wild), m, x.dtype))
    np.testing.assert_array_equal(got, denormalize(wild, x.dtype, offset, scale))
    assert (got.min() == info.min) if end == "bottom" else (got.max() == info.max)


def test_device_map_float32_matches_the_host_map():
    x = (np.random.default_rng(0).normal(size=(6, 7, 8)) * 300 + 40).astype(np.float32)
    offset, scale = normalization(x)
    m = device_map(x.dtype, offset, scale)
    unit = np.asarray(to_unit(jnp.asarray(x), m))
    np.testing.assert_allclose(unit, normalize(x, offset, scale), rtol=0, atol=1e-6)
    back = np.asarray(from_unit(jnp.asarray(unit), m, x.dtype))
    np.testing.assert_allclose(back, x, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("dtype,offset,scale", [("float64", 0.0, 1.0), ("int32", 0.0, float(EXACT_F32)),
                                                ("uint32", 3e9, 2.0**31), ("float32", 0.0, 1e-35),
                                                ("float32", 1e31, 5.0)])
def test_no_device_map_where_float32_is_not_enough(dtype, offset, scale):
    """float64 volumes, integer ranges of 2**24 or more and float32 at the edge of its range keep the
    host's float64 path."""
    assert device_map(dtype, offset, scale) is None


def test_the_offset_is_the_most_common_value_of_a_strided_sample():
    rng = np.random.default_rng(3)
    x = rng.integers(-1024, 2000, (64, 70, 90)).astype(np.int16)
    x[:20] = -2048  # padding: the most common value, neither the minimum's neighbourhood nor the mean
    offset, scale = normalization(x)
    assert offset == -2048 and scale == float(x.max()) - (-2048)
    y = rng.normal(0, 1, (7, 1, 5)).astype(np.float32)
    y[0, 0, :3] = 0.25
    assert normalization(y)[0] == 0.25
    assert normalization(np.full((3, 4, 5), 7, np.uint8)) == (7.0, 1.0)
