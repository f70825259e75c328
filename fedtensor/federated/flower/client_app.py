"""The Flower ``ClientApp``: one hospital's local training of the restoration net.

Its SuperNode's ``--node-config`` names the data (see :func:`~fedtensor.federated.flower.task.node_volumes`)::

    data="/data/ct1.nii.gz,/data/ct2.nii.gz"            # these volumes, or
    data-dir="/data/ct" partition-id=0 num-partitions=3 # every third volume file of a directory
    cache-dir="/var/cache/fedtensor"                    # decoded training pairs (default ~/.cache/fedtensor/flower)
    audit-dir="/var/log/fedtensor/updates"              # optional: keep a copy of every update sent
    allow-plain-updates=true                            # optional: also answer rounds without SecAgg+

Each round the node receives the global weights, trains ``local-steps`` steps on its own patches and
answers with its delta (local − global) and its FedAvg weight (voxels in units of one patch). With
SecAgg+ the delta leaves the node only fixed-point encoded and masked (``secaggplus_mod``); by default a
node refuses to answer a training round that is not securely aggregated.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedtensor.federated.flower.task import (
    FedSettings,
    MIN_SURVIVORS,
    FederationError,
    from_ndarrays,
    local_update,
    net_config_from_str,
    node_volumes,
    num_examples,
    to_ndarrays,
)

log = logging.getLogger(__name__)


def _flag(node_config, key: str) -> bool:
    return str(node_config.get(key, "false")).strip().lower() in ("1", "true", "yes", "on")


def load_sources(paths, settings: FedSettings, cache_dir: Path):
    """The node's (decoded, original) training pairs, made by fedtensor's codec (cached on disk: every
    message of a run starts a fresh ClientApp process)."""
    from fedtensor.nn.data import make_pairs

    cache_dir.mkdir(parents=True, exist_ok=True)
    return make_pairs(paths, codecs=settings.codecs, targets=settings.targets, blocks=settings.blocks,
                      cache_dir=cache_dir)


class RestorationClient(NumPyClient):
    """``fit``: global weights in, (delta, num_examples, metrics) out."""

    def __init__(self, context: Context):
        self.settings = FedSettings.from_run_config(context.run_config)
        self.node_config = dict(context.node_config)
        self.run_id = context.run_id

    def get_parameters(self, config):  # the ServerApp always provides the initial weights
        raise FederationError("the server must send initial parameters")

    def fit(self, parameters, config) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        s, nc = self.settings, self.node_config
        net_config = net_config_from_str(str(config["net"]))
        rnd = int(config["round"])
        paths = node_volumes(nc)
        cache = Path(str(nc.get("cache-dir") or Path.home() / ".cache" / "fedtensor" / "flower")).expanduser()
        sources = load_sources(paths, s, cache)
        _persistent_compilation_cache(cache / "jax")
        global_params = from_ndarrays(parameters, net_config)
        # seeded by (run seed, round, node): reruns reproduce, nodes draw different patches
        node_key = int(nc["partition-id"]) if "partition-id" in nc else zlib.crc32(",".join(map(str, paths)).encode())
        rng = np.random.default_rng([s.seed, rnd, node_key])
        new_params, losses = local_update(global_params, sources, net_config, s, rng)
        delta = [a - b for a, b in zip(to_ndarrays(new_params), to_ndarrays(global_params))]
        peak = max(float(np.max(np.abs(d))) for d in delta)
        if s.secure and peak > s.clipping_range:
            log.warning("update entry %.3g exceeds clipping-range %.3g: SecAgg+ will clip it (raise clipping-range)",
                        peak, s.clipping_range)
        n = num_examples(sources, s.patch)
        if n > s.max_weight:
            raise FederationError(f"this node's weight ({n} patches of data) exceeds max-weight {s.max_weight:g}; "
                                  "raise max-weight in the run config")
        if nc.get("audit-dir"):
            _audit(Path(str(nc["audit-dir"])).expanduser(), self.run_id, rnd, delta, n, net_config)
        metrics = {"train_loss": float(np.mean(losses)), "loss_first": float(losses[0]), "loss_last": float(losses[-1])}
        if not s.secure:  # SecAgg+ masks the arrays only: metrics travel in the clear, so none describes the delta
            metrics["max_abs_delta"] = peak
        return delta, n, metrics


def _persistent_compilation_cache(directory: Path) -> None:
    """Every message starts a fresh ClientApp process: keep XLA's compiled training program on disk so
    only a node's first round pays for compiling it (unless ``$JAX_COMPILATION_CACHE_DIR`` says where)."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        directory.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(directory))


def _audit(directory: Path, run_id: int, rnd: int, delta, n: int, net_config) -> None:
    """Keep this node's own update (it never leaves the node in the clear): ``run-R-round-NNNN.safetensors``."""
    import safetensors.numpy as stn

    from fedtensor.federated.flower.task import _template
    from fedtensor.io.atomic import atomic_write_bytes

    directory.mkdir(parents=True, exist_ok=True)
    _, paths, _ = _template(net_config)
    data = stn.save(dict(zip(paths, delta)), metadata={"num_examples": str(n), "round": str(rnd),
                                                       "net": json.dumps(net_config.to_dict())})
    atomic_write_bytes(directory / f"run-{run_id}-round-{rnd:04d}.safetensors", data, force=True)


def check_secagg_setup(config, max_weight: float | None = None) -> None:
    """Refuse a SecAgg+ setup that would expose this node or wrap the sum; Flower's mod takes whatever
    the server sends. ``max_weight``: the run's, which this node's weight is checked against (a smaller
    one from the server would scale this node's entries past the quantisation levels)."""
    if config.get(Key.STAGE) != Stage.SETUP:
        return
    try:
        shares, threshold = int(config[Key.SHARE_NUMBER]), int(config[Key.THRESHOLD])
        nodes, levels = int(config[Key.SAMPLE_NUMBER]), int(config[Key.TARGET_RANGE])
        modulus = int(config[Key.MOD_RANGE])
        server_max_weight = float(config[Key.MAX_WEIGHT])
    except (KeyError, TypeError, ValueError):
        raise FederationError("malformed SecAgg+ setup from the server") from None
    if max_weight is not None and server_max_weight != max_weight:
        raise FederationError(f"SecAgg+ max-weight {server_max_weight:g} from the server is not this run's "
                              f"{max_weight:g}")
    if 2 * threshold <= shares:  # two halves of the neighbours could reveal both of this node's secrets
        raise FederationError(f"SecAgg+ threshold {threshold} of {shares} shares: this node needs more than half")
    if threshold < MIN_SURVIVORS:  # the sum of two survivors gives each the other's delta
        raise FederationError(f"SecAgg+ threshold {threshold}: this node needs at least {MIN_SURVIVORS} survivors")
    if nodes * levels >= modulus:  # every node's quantised entries reach `levels`: their sum would wrap
        raise FederationError(f"SecAgg+ round of {nodes} nodes × {levels} levels overflows the modulus {modulus}")


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """SecAgg+ for training rounds that use it; other training rounds are refused unless the node config
    says ``allow-plain-updates=true`` (a node decides itself whether its update may leave unmasked)."""
    if msg.metadata.message_type == MessageType.TRAIN:
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            check_secagg_setup(msg.content.config_records[RECORD_KEY_CONFIGS],
                               FedSettings.from_run_config(ctxt.run_config).max_weight)
            return secaggplus_mod(msg, ctxt, call_next)
        if not _flag(ctxt.node_config, "allow-plain-updates"):
            raise FederationError("this node sends its update only inside secure aggregation "
                                  "(node config allow-plain-updates=true to allow plain rounds)")
    return call_next(msg, ctxt)


def client_fn(context: Context):
    return RestorationClient(context).to_client()


app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])
