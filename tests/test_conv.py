"""fedtensor.nn.conv: the CPU path's 2D convolution against lax's, with its gradients, batching rules
and the canonical convolutions it exists for."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtensor.nn.conv import conv2d_same


def lax_same(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def objective(conv):
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w)))


def arrays(rng, *shapes):
    return [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes]


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), cin=st.integers(1, 4),
       cout=st.integers(1, 4), k=st.sampled_from([1, 3, 5]), seed=st.integers(0, 2**16))
def test_values_and_gradients_match_lax(n, h, w, cin, cout, k, seed):
    x, kern = arrays(np.random.default_rng(seed), (n, h, w, cin), (k, k, cin, cout))
    np.testing.assert_array_equal(np.asarray(conv2d_same(x, kern)), np.asarray(lax_same(x, kern)))
    got = jax.grad(objective(conv2d_same), (0, 1))(x, kern)
    ref = jax.grad(objective(lax_same), (0, 1))(x, kern)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_axes", [(0, 0), (0, None), (None, 0)], ids=["per-client", "shared-kernel", "shared-data"])
def test_gradients_under_vmap_are_each_clients(in_axes):
    x, kern = arrays(np.random.default_rng(1), (3, 2, 6, 7, 4), (3, 3, 3, 4, 5))
    grad = jax.jit(jax.vmap(jax.value_and_grad(objective(conv2d_same), (0, 1)), in_axes))(
        x if in_axes[0] == 0 else x[0], kern if in_axes[1] == 0 else kern[0])
    for c in range(3):
        xc, kc = x[c] if in_axes[0] == 0 else x[0], kern[c] if in_axes[1] == 0 else kern[0]
        value, (gx, gw) = jax.value_and_grad(objective(lax_same), (0, 1))(xc, kc)
        np.testing.assert_allclose(float(grad[0][c]), float(value), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad[1][0][c]), np.asarray(gx), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(grad[1][1][c]), np.asarray(gw), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("in_axes", [(0, None), (None, 0)], ids=["shared-kernel", "shared-data"])
def test_gradient_of_a_vmapped_sum(in_axes):
    """grad outside vmap: the per-entry gradients of the shared operand must be summed."""
    x, kern = arrays(np.random.default_rng(5), (3, 2, 6, 5, 2), (3, 3, 3, 2, 4))
    xs, ks = (x, kern[0]) if in_axes == (0, None) else (x[0], kern)

    def total(conv):
        return lambda x, w: jnp.sum(jax.vmap(objective(conv), in_axes)(x, w))

    got = jax.jit(jax.grad(total(conv2d_same), (0, 1)))(xs, ks)
    ref = jax.grad(total(lax_same), (0, 1))(xs, ks)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_nested_vmap():
    x, kern = arrays(np.random.default_rng(2), (2, 3, 2, 5, 5, 2), (2, 3, 3, 3, 2, 3))
    got = jax.vmap(jax.vmap(jax.grad(objective(conv2d_same), 1)))(x, kern)
    ref = jax.vmap(jax.vmap(jax.grad(objective(lax_same), 1)))(x, kern)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_rejects_even_or_non_square_kernels():
    x, kern = arrays(np.random.default_rng(3), (1, 4, 4, 1), (2, 2, 1, 1))
    with pytest.raises(ValueError, match="odd size"):
        conv2d_same(x, kern)
    with pytest.raises(ValueError, match="odd size"):
        jax.grad(objective(conv2d_same), 1)(x, jnp.zeros((3, 1, 1, 1)))


def _conv_ops(hlo: str) -> list[str]:
    return re.findall(r"= f32\[[^\]]*\]\{[^}]*\} convolution\([^\n]*", hlo)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the canonical forms are what XLA:CPU runs fast")
def test_training_loops_compile_to_canonical_ungrouped_convolutions():
    """The reason the module exists: the gradients of local steps in ``lax.scan``, vmapped over
    clients with their own kernels, compile to canonical NHWC/HWIO convolutions, none grouped."""
    x, kern = arrays(np.random.default_rng(4), (4, 2, 8, 8, 3), (4, 3, 3, 3, 3))

    def local_steps(x, w):
        def step(carry, _):  # both gradients are used, so neither convolution is dead code
            x, w = carry
            gx, gw = jax.grad(objective(conv2d_same), (0, 1))(x, w)
            return (x - 0.1 * gx, w - 0.1 * gw), None
        return jax.lax.scan(step, (x, w), None, length=3)[0]

    hlo = jax.jit(jax.vmap(local_steps)).lower(x, kern).compile().as_text()
    convs = _conv_ops(hlo)
    assert len(convs) >= 3 * 4, "forward, input and kernel gradient per client"
    for op in convs:
        assert "dim_labels=b01f_01io->b01f" in op, op
        assert "feature_group_count" not in op and "batch_group_count" not in op, op
