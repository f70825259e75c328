"""What the Flower ServerApp and ClientApp share: parameter conversion, run settings, node data, and
the local update.

Parameters travel as a list of float32 NDArrays in the order of ``jax.tree_util`` leaves of the net's
``nnx.Param`` state (or as an ``ArrayRecord`` keyed by their ``keystr`` paths). Every array is at least
1-d: Flower's SecAgg+ loses the offset of 0-d arrays when it unmasks, so scalars travel as shape (1,).

Clients send their *delta* (local weights − the global weights they received), not their weights: a
delta is small, so SecAgg+'s fixed-point window (``±clipping-range``) can be narrow and its rounding
error correspondingly small; the server adds the (securely) averaged delta to the global weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from fedtensor.errors import FedtensorError

if TYPE_CHECKING:
    from fedtensor.nn.model import NetConfig

# JAX, Flax and the net are imported inside the functions that need them: SecAgg+'s key-exchange and
# unmasking messages each start a fresh ClientApp process that needs none of them.

#: Volume files a node picks up from ``data-dir`` (a sub-directory counts as a DICOM series).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npy")


class FederationError(FedtensorError):
    """A federation setting, node configuration or exchanged parameter list is unusable."""


# ------------------------------------------------------------------------------ parameters


@lru_cache(maxsize=8)
def _template(net_config: "NetConfig"):
    """``(treedef, leaf paths, leaf shapes)`` of the net's parameter state (no values computed)."""
    import jax

    from fedtensor.nn.model import abstract_net

    _, state = abstract_net(net_config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    return treedef, [jax.tree_util.keystr(p) for p, _ in leaves], [tuple(v.shape) for _, v in leaves]


def to_ndarrays(params: Any) -> list[np.ndarray]:
    """Parameter pytree → list of float32 arrays, each at least 1-d (see the module docstring)."""
    import jax

    return [np.atleast_1d(np.asarray(leaf, np.float32)) for leaf in jax.tree_util.tree_leaves(params)]


def from_ndarrays(arrays: Sequence[np.ndarray], net_config: NetConfig) -> Any:
    """List of arrays (any float dtype; SecAgg+ returns float64) → the net's parameter state (float32)."""
    import jax
    import jax.numpy as jnp

    treedef, paths, shapes = _template(net_config)
    if len(arrays) != len(shapes):
        raise FederationError(f"expected {len(shapes)} parameter arrays for this architecture, got {len(arrays)}")
    out = []
    for path, shape, a in zip(paths, shapes, arrays):
        a = np.asarray(a)
        if a.size != math.prod(shape):
            raise FederationError(f"parameter {path}: {a.size} values, expected shape {shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise FederationError(f"parameter {path}: expected floats, got {a.dtype}")
        out.append(jnp.asarray(a.reshape(shape), jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def to_array_record(params: Any):
    """Parameter pytree → ``flwr.app.ArrayRecord`` keyed by parameter path (Message API)."""
    import jax
    from flwr.app import Array, ArrayRecord

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return ArrayRecord(array_dict={jax.tree_util.keystr(p): Array(np.atleast_1d(np.asarray(v, np.float32)))
                                   for p, v in leaves})


def from_array_record(record, net_config: NetConfig) -> Any:
    """``ArrayRecord`` → parameter state; the keys must be exactly this architecture's parameter paths."""
    _, paths, _ = _template(net_config)
    if list(record.keys()) != paths:
        missing = sorted(set(paths) - set(record.keys()))
        raise FederationError(f"parameter record does not match this architecture (missing {missing[:3]}…)"
                              if missing else "parameter record has unexpected or reordered entries")
    return from_ndarrays(record.to_numpy_ndarrays(), net_config)


def net_config_to_str(cfg: NetConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def net_config_from_str(text: str) -> "NetConfig":
    from fedtensor.nn.model import NetConfig

    try:
        return NetConfig.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as err:
        raise FederationError(f"bad network configuration {text!r}: {err}") from None


# ------------------------------------------------------------------------------ settings


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in str(text).replace(",", " ").split())


def _bool(v: Any) -> bool:
    if isinstance(v, str):
        if v.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if v.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {v!r}")
    return bool(v)


def _words(text: str) -> tuple[str, ...]:
    return tuple(v for v in str(text).replace(",", " ").split())


#: The fewest nodes whose sum a secure round may reveal: with two, each reads the other's delta off
#: the mean and its own. The threshold (the survivors a round needs) is at least this.
MIN_SURVIVORS = 3
#: Nodes whose quantised entries (2²² levels each) SecAgg+ sums without wrapping its 2³² modulus.
MAX_SECAGG_NODES = (1 << 32) // (1 << 22) - 1


def secaggplus_shares(num_shares: float, threshold: float, nodes: int) -> tuple[int, int]:
    """``(shares, threshold)`` as Flower 1.42's SecAggPlusWorkflow resolves them for ``nodes`` sampled
    nodes (fractions of the nodes, then of the shares; an even share count below all nodes made odd)."""
    if num_shares <= 1:
        shares = round(num_shares * nodes)
        if shares < nodes and shares % 2 == 0:
            shares += 1
        if shares <= 2:
            shares = nodes
    else:
        shares = int(num_shares)
    t = max(round(threshold * shares), 2) if threshold <= 1 else int(threshold)
    return shares, t


@dataclass(frozen=True)
class FedSettings:
    """A federation's settings: the ``[tool.flwr.app.config]`` run config (``--run-config`` overrides)."""

    rounds: int = 3
    local_steps: int = 20
    batch: int = 4
    patch: int = 24
    lr: float = 1e-3
    channels: tuple[int, int] = (16, 32)
    cond_hidden: int = 32
    codecs: tuple[str, ...] = ("block-tucker",)
    targets: tuple[float, ...] = (38.0, 42.0)
    blocks: tuple[str, ...] = ("auto",)
    seed: int = 0
    min_clients: int = 4
    secure: bool = True
    num_shares: float = 1.0  # ≤ 1: a fraction of the sampled clients (1.0 = everyone shares with everyone)
    threshold: float = 0.67  # ≤ 1: a fraction of num_shares
    clipping_range: float = 0.5  # SecAgg+ fixed-point window for every delta entry: ±this
    max_weight: float = 16384.0  # largest num_examples a client may report (SecAgg+ weight scaling)
    timeout: float = 0.0  # seconds to wait for replies in each SecAgg+ stage (0: no limit)
    out_dir: str = ""
    store_dir: str = ""
    store_url: str = ""
    model: str = ""  # start from this model directory (on the SuperLink machine) instead of a fresh net
    force: bool = False

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> "FedSettings":
        known = {"num-server-rounds", "local-steps", "batch", "patch", "lr", "channels", "cond-hidden", "codecs",
                 "targets", "blocks", "seed", "min-clients", "secure", "num-shares", "reconstruction-threshold",
                 "clipping-range", "max-weight", "timeout", "out-dir", "store-dir", "store-url", "model", "force"}
        unknown = sorted(set(rc) - known)
        if unknown:
            raise FederationError(f"unknown run config key(s): {', '.join(unknown)}")
        d = cls()
        g = rc.get
        try:
            s = cls(rounds=int(g("num-server-rounds", d.rounds)), local_steps=int(g("local-steps", d.local_steps)),
                    batch=int(g("batch", d.batch)), patch=int(g("patch", d.patch)), lr=float(g("lr", d.lr)),
                    channels=tuple(int(v) for v in _floats(g("channels", "16,32"))),
                    cond_hidden=int(g("cond-hidden", d.cond_hidden)),
                    codecs=_words(g("codecs", ",".join(d.codecs))), targets=_floats(g("targets", "38,42")),
                    blocks=_words(g("blocks", ",".join(d.blocks))), seed=int(g("seed", d.seed)),
                    min_clients=int(g("min-clients", d.min_clients)), secure=_bool(g("secure", d.secure)),
                    num_shares=float(g("num-shares", d.num_shares)),
                    threshold=float(g("reconstruction-threshold", d.threshold)),
                    clipping_range=float(g("clipping-range", d.clipping_range)),
                    max_weight=float(g("max-weight", d.max_weight)), timeout=float(g("timeout", d.timeout)),
                    out_dir=str(g("out-dir", "")), store_dir=str(g("store-dir", "")), store_url=str(g("store-url", "")),
                    model=str(g("model", "")), force=_bool(g("force", False)))
        except (TypeError, ValueError) as err:
            raise FederationError(f"bad run config value: {err}") from None
        return s.check()

    def check(self) -> "FedSettings":
        if self.rounds < 1 or self.local_steps < 1 or self.batch < 1:
            raise FederationError("num-server-rounds, local-steps and batch must be ≥ 1")
        if self.patch % 4 or self.patch < 16:
            raise FederationError(f"patch must be a multiple of 4, at least 16, got {self.patch}")
        from fedtensor.nn.model import check_channels

        try:
            check_channels(self.channels)
        except ValueError as err:
            raise FederationError(f"{err}, e.g. \"16,32\"") from None
        if not self.lr > 0 or not self.clipping_range > 0 or not self.max_weight > 0:
            raise FederationError("lr, clipping-range and max-weight must be > 0")
        if self.secure:
            self._check_secure()
        if not self.targets:
            raise FederationError("targets must list at least one PSNR (dB)")
        return self

    def _check_secure(self) -> None:
        """Refuse settings under which a node would refuse some round's SecAgg+ setup
        (:func:`~fedtensor.federated.flower.client_app.check_secagg_setup`), at any node count from
        ``min-clients`` up to what the fixed-point modulus sums."""
        ns, th = self.num_shares, self.threshold
        if not (0 < ns <= 1 or (ns.is_integer() and ns >= 3)):
            raise FederationError(f"num-shares must be a fraction in (0, 1] or a whole number ≥ 3, got {ns:g}")
        if th > 1 and not th.is_integer():
            raise FederationError(f"reconstruction-threshold above 1 must be a whole number of nodes, got {th:g}")
        if self.min_clients < MIN_SURVIVORS:
            raise FederationError(f"secure aggregation needs min-clients ≥ {MIN_SURVIVORS}")
        for nodes in range(self.min_clients, MAX_SECAGG_NODES + 1):
            shares, threshold = secaggplus_shares(ns, th, nodes)
            if not (MIN_SURVIVORS <= threshold <= shares and 2 * threshold > shares):
                raise FederationError(
                    f"with {nodes} nodes, num-shares {ns:g} and reconstruction-threshold {th:g} give a threshold of "
                    f"{threshold} of {shares} shares; it must be at least {MIN_SURVIVORS} and more than half "
                    "(raise reconstruction-threshold or min-clients)")

    @property
    def net_config(self) -> "NetConfig":
        from fedtensor.nn.model import NetConfig

        return NetConfig(channels=self.channels, cond_hidden=self.cond_hidden)

    def train_config(self, net_config: NetConfig):
        """The nn :class:`~fedtensor.nn.train.TrainConfig` of the local update (optimiser, patches, data)."""
        from fedtensor.nn.train import TrainConfig

        cfg = TrainConfig(batch=self.batch, patch=self.patch, lr=self.lr, seed=self.seed, channels=net_config.channels,
                          codecs=self.codecs, targets=self.targets, blocks=self.blocks)
        try:
            return cfg.check()
        except ValueError as err:
            raise FederationError(str(err)) from None

    def secagg_workflow_args(self) -> dict:
        """Arguments of ``flwr.server.workflow.SecAggPlusWorkflow`` (fractions stay floats: resolved per round)."""
        ns = self.num_shares if self.num_shares <= 1 else int(self.num_shares)
        th = self.threshold if self.threshold <= 1 else int(self.threshold)
        return {"num_shares": float(ns) if isinstance(ns, float) else ns,
                "reconstruction_threshold": float(th) if isinstance(th, float) else th,
                "clipping_range": self.clipping_range, "max_weight": self.max_weight,
                "timeout": self.timeout or None}


# ------------------------------------------------------------------------------ node data


def _is_volume(p: Path) -> bool:
    return p.is_dir() or any(p.name.endswith(s) for s in VOLUME_SUFFIXES)


def node_volumes(node_config: Mapping[str, Any]) -> list[Path]:
    """This node's volumes: ``data="a.nii.gz,b.nii.gz"``, or ``data-dir=DIR`` (its volume files, sorted)
    split round-robin by ``partition-id`` / ``num-partitions``."""
    if node_config.get("data"):
        paths = [Path(p.strip()).expanduser() for p in str(node_config["data"]).split(",") if p.strip()]
    elif node_config.get("data-dir"):
        root = Path(str(node_config["data-dir"])).expanduser()
        if not root.is_dir():
            raise FederationError(f"data-dir is not a directory: {root}")
        files = sorted(p for p in root.iterdir() if not p.name.startswith(".") and _is_volume(p))
        pid, n = int(node_config.get("partition-id", 0)), int(node_config.get("num-partitions", 1))
        if not 0 <= pid < n:
            raise FederationError(f"partition-id must be in [0, num-partitions), got {pid} of {n}")
        paths = files[pid::n]
    else:
        raise FederationError("node config needs data=PATH[,PATH…] or data-dir=DIR (with partition-id, num-partitions)")
    if not paths:
        raise FederationError("this node has no volumes to train on")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FederationError(f"volume not found: {missing[0]}")
    return paths


def num_examples(sources, patch: int) -> int:
    """FedAvg weight of a node: its voxels in units of one training patch (``patch³``), at least 1."""
    return max(1, sum(math.ceil(s.original.size / patch ** 3) for s in sources))


# ------------------------------------------------------------------------------ local update


@lru_cache(maxsize=4)
def _local_program(net_config: NetConfig, clip: float, weight_decay: float):
    """Jitted ``(params, lr, xs, conds, ts, ms) → (params, losses)``: the nn trainer's step (the same
    jitted function central training uses) ``lax.scan``-ned over the round's stacked batches, from a
    fresh optimiser state (FedAvg clients do not carry optimiser state across rounds)."""
    import jax

    from fedtensor.nn.train import TrainConfig, _compiled

    tx, step, _ = _compiled(net_config, TrainConfig(clip=clip, weight_decay=weight_decay))

    def run(params, lr, xs, conds, ts, ms):
        def body(carry, batch):
            p, o = carry
            p, o, loss = step(p, o, lr, *batch)
            return (p, o), loss

        (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), (xs, conds, ts, ms))
        return params, losses

    return jax.jit(run)


def local_update(params: Any, sources, net_config: NetConfig, settings: FedSettings,
                 rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    """``local-steps`` AdamW steps on random augmented patches of this node's ``sources``; returns
    ``(new params, per-step losses)``. Patches are drawn up front (numpy) so the steps run as one scan."""
    import jax.numpy as jnp

    from fedtensor.nn.data import PatchSampler

    cfg = settings.train_config(net_config)
    sampler = PatchSampler(sources, cfg.patch, augment=True)
    batches = [sampler.sample(rng, cfg.batch) for _ in range(settings.local_steps)]
    stack = [np.stack([getattr(b, f) for b in batches]) for f in ("x", "cond", "target", "mask")]
    run = _local_program(net_config, cfg.clip, cfg.weight_decay)
    new, losses = run(params, jnp.float32(cfg.lr), *stack)
    return new, np.asarray(losses)
