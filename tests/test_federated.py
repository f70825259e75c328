"""Vmapped federated simulation against the per-client reference loop, and secure vs plain FedAvg."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedtensor.errors import FedtensorError
from fedtensor.federated.simulation import (
    ClientData, FedConfig, Server, run_round, run_round_looped, weighted_mean_delta,
)


def mse_loss(params, x, y):
    pred = jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
    return jnp.mean(jnp.square(pred - y))


def _problem(n_clients=6, seed=0):
    rng = np.random.default_rng(seed)
    true_w = rng.standard_normal((5, 1)).astype(np.float32)
    xs, ys = [], []
    for k in range(n_clients):
        n = int(rng.integers(5, 40))  # unequal client sizes: exercised through padding
        x = rng.standard_normal((n, 5)).astype(np.float32) + 0.3 * k  # non-iid shift
        xs.append(x)
        ys.append(np.tanh(x @ true_w).astype(np.float32))
    params = {"w1": jnp.asarray(rng.standard_normal((5, 8)) * 0.3, jnp.float32),
              "b1": jnp.zeros(8, jnp.float32), "w2": jnp.asarray(rng.standard_normal((8, 1)) * 0.3, jnp.float32)}
    return ClientData.from_lists(xs, ys), params


def _run(fn, data, params, cfg, rounds=3, **kw):
    server = Server(params, cfg)
    rng = np.random.default_rng(1)
    key = jax.random.PRNGKey(2)
    metrics = []
    for _ in range(rounds):
        key, sub = jax.random.split(key)
        metrics.append(fn(mse_loss, server, data, sub, rng, **kw))
    return server.params, metrics


@pytest.mark.parametrize("cfg", [FedConfig(local_steps=5, batch_size=4, learning_rate=1e-2),
                                 FedConfig(local_steps=3, batch_size=4, sample_fraction=0.5, prox_mu=0.1),
                                 FedConfig(local_steps=3, batch_size=4, server_optimizer="fedadam",
                                           server_learning_rate=1e-2)])
def test_vmapped_equals_looped(cfg):
    data, params = _problem()
    p_vmap, m_vmap = _run(run_round, data, params, cfg)
    p_loop, m_loop = _run(run_round_looped, data, params, cfg)
    for a, b in zip(jax.tree.leaves(p_vmap), jax.tree.leaves(p_loop)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert [m["clients"] for m in m_vmap] == [m["clients"] for m in m_loop]


def test_fedavg_lowers_the_loss():
    data, params = _problem()
    _, metrics = _run(run_round, data, params, FedConfig(local_steps=10, batch_size=8, learning_rate=2e-2), rounds=8)
    assert metrics[-1]["train_loss"] < 0.5 * metrics[0]["train_loss"]


def test_weighted_mean_is_fedavg():
    g = {"a": jnp.zeros(3)}
    c = {"a": jnp.asarray([[1.0, 1, 1], [4.0, 4, 4]])}
    out = weighted_mean_delta(g, c, np.array([1, 3]))
    np.testing.assert_allclose(out["a"], [3.25, 3.25, 3.25])


def test_secure_aggregation_matches_plain():
    data, params = _problem(n_clients=5)
    cfg = FedConfig(local_steps=4, batch_size=4, learning_rate=1e-2)
    p_plain, _ = _run(run_round, data, params, cfg, rounds=2)
    p_secure, _ = _run(run_round, data, params, cfg, rounds=2, secure=True, seed=7)
    for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(p_secure)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_bad_inputs():
    with pytest.raises(FedtensorError):
        ClientData.from_lists([np.zeros((0, 2))], [np.zeros((0, 1))])
    data, params = _problem(n_clients=2)
    with pytest.raises(FedtensorError):
        Server(params, FedConfig(server_optimizer="sgd-magic"))
