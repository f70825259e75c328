"""Federated simulation: every sampled client's local training in one jitted ``vmap``.

Client parameters live stacked on a leading axis; local SGD steps run in ``lax.scan``; clients with
unequal data are padded to a common length and draw their minibatches only from their own valid
samples (``index = floor(u · n_k)``), so one compiled program serves any partition. The server step is
FedAvg weighted by sample counts (optionally FedProx on the client side, FedAdam on the server side),
with the aggregate computed in the clear or by secure aggregation (:mod:`fedtensor.federated.secagg`).

The model is abstract: a parameter pytree and ``loss_fn(params, inputs, targets) -> scalar``. The
restoration network plugs in through :func:`flax.nnx.split`. :func:`run_round_looped` is the plain
per-client loop kept as the reference the tests and the benchmark compare with.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedtensor.errors import FedtensorError

Params = Any
LossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]


@dataclass(frozen=True)
class ClientData:
    """All clients' data, padded: ``inputs``/``targets`` are ``(K, N_max, ...)``, ``counts`` ``(K,)``."""

    inputs: np.ndarray
    targets: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_lists(cls, inputs: list[np.ndarray], targets: list[np.ndarray]) -> "ClientData":
        if not inputs or len(inputs) != len(targets) or any(len(a) == 0 for a in inputs):
            raise FedtensorError("every client needs at least one (input, target) sample")
        n_max = max(len(a) for a in inputs)

        def pad(a):
            return np.concatenate([a, np.zeros((n_max - len(a), *a.shape[1:]), a.dtype)])

        return cls(np.stack([pad(a) for a in inputs]), np.stack([pad(t) for t in targets]),
                   np.array([len(a) for a in inputs], np.int32))

    @property
    def n_clients(self) -> int:
        return len(self.counts)


@dataclass(frozen=True)
class FedConfig:
    local_steps: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-3
    prox_mu: float = 0.0  # FedProx proximal weight (0: plain FedAvg local objective)
    server_optimizer: str = "fedavg"  # or "fedadam"
    server_learning_rate: float = 1.0
    sample_fraction: float = 1.0


def _local_update(loss_fn: LossFn, cfg: FedConfig, params: Params, inputs, targets, count, key):
    """One client's local training from the global ``params``; returns (new params, mean loss)."""
    opt = optax.adam(cfg.learning_rate)
    global_params = params

    def objective(p, x, y):
        loss = loss_fn(p, x, y)
        if cfg.prox_mu:
            sq = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(global_params)))
            loss = loss + 0.5 * cfg.prox_mu * sq
        return loss

    def step(carry, k):
        p, state = carry
        idx = jnp.floor(jax.random.uniform(k, (cfg.batch_size,)) * count).astype(jnp.int32)
        loss, grads = jax.value_and_grad(objective)(p, inputs[idx], targets[idx])
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    keys = jax.random.split(key, cfg.local_steps)
    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), keys)
    return params, jnp.mean(losses)


@partial(jax.jit, static_argnames=("loss_fn", "cfg"))
def local_updates_vmapped(loss_fn: LossFn, cfg: FedConfig, params: Params, inputs, targets, counts, keys):
    """All clients at once: ``vmap`` over the stacked client axis, global params broadcast."""
    fn = partial(_local_update, loss_fn, cfg)
    return jax.vmap(fn, in_axes=(None, 0, 0, 0, 0))(params, inputs, targets, counts, keys)


@partial(jax.jit, static_argnames=("loss_fn", "cfg"))
def local_update_single(loss_fn: LossFn, cfg: FedConfig, params: Params, inputs, targets, count, key):
    return _local_update(loss_fn, cfg, params, inputs, targets, count, key)


def weighted_mean_delta(global_params: Params, client_params: Params, counts: np.ndarray) -> Params:
    """FedAvg: Σ_k n_k (w_k − w) / Σ_k n_k, leaf by leaf (client params stacked on axis 0)."""
    w = jnp.asarray(counts, jnp.float32) / float(np.sum(counts))
    return jax.tree.map(lambda g, c: jnp.tensordot(w, c - g[None], axes=1), global_params, client_params)


def secure_mean_delta(global_params: Params, client_params: Params, counts: np.ndarray, *,
                      threshold: int | None = None, clip: float = 8.0, seed: int | None = None) -> Params:
    """The same weighted mean, computed by secure aggregation: the server only ever sees masked vectors."""
    from fedtensor.federated.secagg import secure_sum

    deltas = jax.tree.map(lambda g, c: c - g[None], global_params, client_params)
    leaves, treedef = jax.tree.flatten(deltas)
    flat = np.concatenate([np.asarray(leaf).reshape(len(counts), -1) for leaf in leaves], axis=1)
    n = len(counts)
    mean = secure_sum(list(flat.astype(np.float32)), threshold=threshold or max(2, (2 * n) // 3 + 1),
                      weights=[int(c) for c in counts], clip=clip, seed=seed)
    out, pos = [], 0
    for leaf in leaves:
        size = int(np.prod(leaf.shape[1:]))
        out.append(jnp.asarray(mean[pos:pos + size].reshape(leaf.shape[1:])))
        pos += size
    return jax.tree.unflatten(treedef, out)


class Server:
    """Holds the global model and the server optimiser; one call per round."""

    def __init__(self, params: Params, cfg: FedConfig):
        self.params, self.cfg = params, cfg
        if cfg.server_optimizer == "fedadam":
            self._opt = optax.adam(cfg.server_learning_rate)
        elif cfg.server_optimizer == "fedavg":
            self._opt = optax.sgd(cfg.server_learning_rate)
        else:
            raise FedtensorError(f"unknown server optimizer {cfg.server_optimizer!r}; use fedavg or fedadam")
        self._state = self._opt.init(params)

    def apply(self, mean_delta: Params) -> Params:
        # The averaged client delta is a descent direction: feed its negative as the "gradient".
        grads = jax.tree.map(jnp.negative, mean_delta)
        updates, self._state = self._opt.update(grads, self._state, self.params)
        self.params = optax.apply_updates(self.params, updates)
        return self.params


def sample_clients(n_clients: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    k = max(1, int(round(fraction * n_clients)))
    return np.sort(rng.choice(n_clients, size=k, replace=False))


def run_round(loss_fn: LossFn, server: Server, data: ClientData, key, rng: np.random.Generator, *,
              secure: bool = False, seed: int | None = None) -> dict:
    """One FedAvg round over the sampled clients, local training vmapped; returns round metrics."""
    chosen = sample_clients(data.n_clients, server.cfg.sample_fraction, rng)
    keys = jax.random.split(key, data.n_clients)[chosen]
    client_params, losses = local_updates_vmapped(
        loss_fn, server.cfg, server.params, jnp.asarray(data.inputs[chosen]), jnp.asarray(data.targets[chosen]),
        jnp.asarray(data.counts[chosen]), keys)
    counts = data.counts[chosen]
    if secure:
        delta = secure_mean_delta(server.params, client_params, counts, seed=seed)
    else:
        delta = weighted_mean_delta(server.params, client_params, counts)
    server.apply(delta)
    return {"clients": chosen.tolist(), "train_loss": float(np.average(np.asarray(losses), weights=counts))}


def run_round_looped(loss_fn: LossFn, server: Server, data: ClientData, key, rng: np.random.Generator) -> dict:
    """Reference: the same round with a Python loop over clients (one jitted call each)."""
    chosen = sample_clients(data.n_clients, server.cfg.sample_fraction, rng)
    keys = jax.random.split(key, data.n_clients)[chosen]
    results = [local_update_single(loss_fn, server.cfg, server.params, jnp.asarray(data.inputs[k]),
                                   jnp.asarray(data.targets[k]), jnp.asarray(data.counts[k]), kk)
               for k, kk in zip(chosen, keys)]
    client_params = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[r[0] for r in results])
    counts = data.counts[chosen]
    server.apply(weighted_mean_delta(server.params, client_params, counts))
    losses = np.array([float(r[1]) for r in results])
    return {"clients": chosen.tolist(), "train_loss": float(np.average(losses, weights=counts))}
