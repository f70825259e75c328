"""Vmapped federated simulation against the per-client reference loop, and secure vs plain FedAvg."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedtensor.errors import FedtensorError
from fedtensor.federated.simulation import (
    ClientData, FedConfig, Server, local_updates_vmapped, run_round, run_round_looped, weighted_mean_delta,
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
    p_secure, _ = _run(run_round, data, params, cfg, rounds=2, secure=True)
    for a, b in zip(jax.tree.leaves(p_plain), jax.tree.leaves(p_secure)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_simulated_secure_rounds_never_reuse_masks(monkeypatch):
    """Each round's masks come from fresh randomness: seeded ones could be recomputed from the (public)
    configuration, and masks reused across rounds reveal the difference of a client's updates."""
    from fedtensor.federated import secagg

    masked = []
    real = secagg.secure_aggregate

    def spy(updates, **kw):
        transcript = []
        res = real(updates, **{**kw, "transcript": transcript})
        masked.append([m for d, m in transcript if d == "to_server" and type(m).__name__ == "MaskedInput"])
        return res

    monkeypatch.setattr(secagg.simulation, "secure_aggregate", spy)
    data, params = _problem(n_clients=3)
    cfg = FedConfig(local_steps=2, batch_size=4, learning_rate=1e-2)
    server = Server(params, cfg)
    same_updates = jax.tree.map(lambda p: jnp.stack([p + 0.01] * 3), server.params)
    from fedtensor.federated.simulation import secure_mean_delta

    a = secure_mean_delta(server.params, same_updates, np.array([1, 2, 3]), round_id=1)
    b = secure_mean_delta(server.params, same_updates, np.array([1, 2, 3]), round_id=1)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the result does not depend on the masks
    assert len(masked) == 2 and len(masked[0]) == 3
    for m0, m1 in zip(*masked):  # the same client input, masked twice: nothing alike
        assert m0.round_id == m1.round_id == 1 and m0.sender == m1.sender
        w0, w1 = np.frombuffer(m0.data, "<u4"), np.frombuffer(m1.data, "<u4")
        assert np.mean(w0 == w1) < 0.01


def test_bad_inputs():
    with pytest.raises(FedtensorError):
        ClientData.from_lists([np.zeros((0, 2))], [np.zeros((0, 1))])
    data, params = _problem(n_clients=2)
    with pytest.raises(FedtensorError):
        Server(params, FedConfig(server_optimizer="sgd-magic"))


# ------------------------------------------------------------------------------- restoration net


from flax import nnx  # noqa: E402

from fedtensor.federated.restoration import (  # noqa: E402
    FederateConfig, as_client_data, client_batch, client_update, parse_partition, partition, restoration_loss,
)
from fedtensor.federated.simulation import FederationError  # noqa: E402
from fedtensor.nn.data import PatchSampler, make_pairs  # noqa: E402
from fedtensor.nn.model import NetConfig, new_net  # noqa: E402

TINY = NetConfig(channels=(8, 16))


@pytest.fixture(scope="module")
def head_sources(head_crop_paths, tmp_path_factory):
    """Three small crops of the real head CT through the real codec (one target, 8³ blocks)."""
    cache = tmp_path_factory.mktemp("fed_head") / "cache"
    return head_crop_paths, make_pairs(head_crop_paths, targets=(36.0,), blocks=("8",), cache_dir=cache)


def test_partitions():
    iid = partition("iid", 4, 3, 10, seed=0)
    assert iid.shape == (4, 3) and (iid.sum(1) == 10).all() and iid.min() >= 3
    bv = partition("by-volume", 2, 3, 10, seed=0)
    assert (np.count_nonzero(bv, axis=0) == 1).all() and bv.sum() == 30  # every volume has one owner
    bv = partition("by-volume", 5, 2, 10, seed=0)
    assert (np.count_nonzero(bv, axis=1) == 1).all()  # more clients than volumes: one volume each
    skew = partition("dirichlet:0.1", 8, 3, 20, seed=1)
    flat = partition("dirichlet:100", 8, 3, 20, seed=1)
    assert (skew.sum(1) > 0).all() and (flat.sum(1) > 0).all()
    assert skew.sum(1).std() > flat.sum(1).std()  # small α: unequal clients
    assert parse_partition("Dirichlet:0.5") == ("dirichlet", 0.5)
    for bad in ("random", "dirichlet:", "dirichlet:-1", "dirichlet:nan"):
        with pytest.raises(FederationError):
            parse_partition(bad)


@pytest.mark.slow  # > 20 s: compiles the net's round both ways (125 s on a loaded 2-core machine)
def test_restoration_vmapped_equals_looped(head_sources):
    """The restoration net's round on real patches: one vmapped program (chunked, per-client convs)
    gives the same global model as the per-client loop."""
    _, sources = head_sources
    samplers = [PatchSampler([s], 16) for s in sources]
    alloc = partition("dirichlet:1", 4, len(sources), 6, seed=0)  # unequal clients → padding and masks
    data = as_client_data([client_batch(samplers, alloc[k], 0, 1, k) for k in range(4)])
    assert len(set(data.counts.tolist())) > 1
    loss = restoration_loss(TINY)
    params = nnx.state(new_net(TINY, seed=0), nnx.Param)
    cfg = FedConfig(local_steps=3, batch_size=2, learning_rate=3e-3, clip=1.0, client_chunk=2)
    key = jax.random.PRNGKey(3)
    s_vmap, s_loop = Server(params, cfg), Server(params, cfg)
    m_vmap = run_round(loss, s_vmap, data, key, np.random.default_rng(0))
    m_loop = run_round_looped(loss, s_loop, data, key, np.random.default_rng(0))
    np.testing.assert_allclose(m_vmap["client_losses"], m_loop["client_losses"], rtol=1e-4)
    moved = 0.0
    for a, b, p0 in zip(jax.tree.leaves(s_vmap.params), jax.tree.leaves(s_loop.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
        moved = max(moved, float(jnp.max(jnp.abs(a - p0))))
    assert moved > 1e-4  # the round did train


@pytest.mark.slow
def test_client_update_is_the_simulated_client(head_sources):
    _, sources = head_sources
    cfg = FederateConfig(clients=2, local_steps=2, batch=2, patch=16, channels=(8, 16), lr=3e-3)
    batch = client_batch([PatchSampler([s], 16) for s in sources], np.array([2, 1, 1]), 0, 1, 0)
    params = nnx.state(new_net(cfg.net_config(), seed=0), nnx.Param)
    new, metrics = client_update(params, batch, cfg, jax.random.PRNGKey(0))
    assert metrics["count"] == 4 and np.isfinite(metrics["loss"])
    data = as_client_data([batch])
    loss = restoration_loss(cfg.net_config())
    sim, _ = local_updates_vmapped(loss, cfg.fed_config(), params, data.inputs, data.targets,
                                   jnp.asarray(data.counts), jax.random.PRNGKey(0)[None])
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(sim)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("field", ["prox_mu", "server_learning_rate", "learning_rate", "clip"])
def test_fed_config_refuses_non_finite_settings(field):
    from fedtensor.federated.simulation import FedConfig

    with pytest.raises(FederationError, match="must be (finite|> 0)"):
        FedConfig(**{field: float("nan")}).check()
    with pytest.raises(FederationError, match="must be finite"):
        FedConfig(**{field: float("inf")}).check()


def test_secure_aggregation_with_fewer_than_two_sampled_clients_is_refused_up_front():
    from fedtensor.federated.restoration import FederateConfig

    with pytest.raises(FederationError, match="at least 2 clients per round"):
        FederateConfig(clients=3, sample_fraction=0.2, secure_agg=True).check()
    FederateConfig(clients=3, sample_fraction=0.5, secure_agg=True).check()


def _linear_loss(p, x, y):
    return jnp.mean(jnp.square(x @ p["w"] - y))


def test_padded_rows_are_never_trained_on():
    """Unequal clients are padded to one length: each client's vmapped update equals its update on its
    own unpadded data (vmapped and looped both pad, so comparing them could not see padding used)."""
    from fedtensor.federated.simulation import local_update_single

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((40, 3)).astype(np.float32)]
    ys = [np.ones((2, 1), np.float32), np.ones((40, 1), np.float32)]
    data = ClientData.from_lists(xs, ys)
    cfg = FedConfig(local_steps=4, batch_size=4, learning_rate=1e-2)
    params = {"w": jnp.zeros((3, 1))}
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    stacked, _ = local_updates_vmapped(_linear_loss, cfg, params, data.inputs, data.targets,
                                       jnp.asarray(data.counts), keys)
    for k in range(2):
        x, y, n = data.client(k)
        ref, _ = local_update_single(_linear_loss, cfg, params, x, y, jnp.int32(n), keys[k])
        np.testing.assert_allclose(np.asarray(stacked["w"][k]), np.asarray(ref["w"]), rtol=1e-5, atol=1e-6)


def test_a_server_keeps_the_optimizer_state_it_is_given():
    cfg = FedConfig(server_optimizer="fedadam", server_learning_rate=1e-2)
    s = Server({"w": jnp.zeros(3)}, cfg)
    s.apply({"w": jnp.ones(3)})
    assert Server(s.params, cfg, opt_state=s.opt_state).opt_state is s.opt_state
