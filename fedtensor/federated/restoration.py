"""Federated training of the restoration net (:mod:`fedtensor.nn`) by the vmapped simulation.

:func:`federate` is the federated twin of :func:`fedtensor.nn.train`: the same codec pairs (cached),
the same split by volume for validation, the same net, initialisation, loss and validation figures,
and the same model directory at the end (``fedtensor decompress --model DIR`` uses it). The training
volumes are shared among K simulated clients by a *partition*, a fixed ``(K, V)`` matrix of how many
patches client k draws from volume v each round:

* ``iid`` — every client draws evenly from every training volume;
* ``by-volume`` — each volume belongs to one client (volume v to client v mod K; with more clients
  than volumes, client k holds volume k mod V), the realistic hospital split;
* ``dirichlet:α`` — each volume's patches are shared among the clients in proportions drawn from
  Dir(α) (small α: skewed, unequal clients), the usual non-IID benchmark split.

Every round, each sampled client draws fresh augmented patches (seeded by ``(seed, round, client)``)
from its own volumes, all clients train locally in one jitted program
(:mod:`fedtensor.federated.simulation`), and the server applies the count-weighted mean update (in the
clear or by secure aggregation). After every round: validation loss and PSNR gain on fixed held-out
patches, ``history.csv`` + ``loss.png``, the model directory (best validated global model), a
checkpoint (global weights, server optimiser state, history) written atomically — an interrupted run
started again continues after its last finished round with the same result — and ``on_version(round,
model_bytes, manifest, meta)`` with the round's global model (to publish it, e.g. to a weights service).
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedtensor import __version__
from fedtensor.federated.simulation import (
    ClientData,
    FedConfig,
    FederationError,
    Server,
    local_update_single,
    local_updates_vmapped,
    round_vmapped,
    sample_clients,
    sampled_count,
    secure_mean_delta,
)
from fedtensor.nn.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_DIR,
    STATE_JSON,
    ModelError,
    sha256_hex,
    tree_from_bytes,
    tree_to_bytes,
    write_atomic,
)
from fedtensor.nn.data import Batch, PatchSampler, Source, intensity_kinds, training_sources
from fedtensor.nn.model import NetConfig, abstract_net
from fedtensor.nn.train import (TrainConfig, Trainer, clear_run, export_model, finite_epoch, model_bytes,
                                mark_run, read_state_meta, run_directory)
from fedtensor.nn.train import plot_history as nn_plot_history
from fedtensor.nn.train import write_history as train_history

HISTORY_FIELDS = ("round", "clients", "patches", "train_loss", "val_loss", "val_gain_db", "seconds", "updates_per_s")

OnVersion = Callable[[int, bytes, dict, dict], None]


@dataclass
class FederateConfig:
    """Every setting of a federated run (all but ``rounds`` go into the run's fingerprint)."""

    clients: int = 8
    rounds: int = 10
    local_steps: int = 10
    batch: int = 4
    patch: int = 16
    patches_per_client: int = 0  # per round; 0: local_steps × batch (one local pass)
    sample_fraction: float = 1.0
    partition: str = "iid"
    secure_agg: bool = False
    lr: float = 2e-3
    clip: float = 1.0
    prox_mu: float = 0.0
    server_optimizer: str = "fedavg"
    server_lr: float | None = None  # None: the server optimiser's default (simulation.SERVER_LEARNING_RATES)
    val_fraction: float = 0.2
    val_patches: int = 64
    seed: int = 0
    channels: tuple[int, int] = (16, 32)
    codecs: tuple[str, ...] = ("block-tucker",)
    targets: tuple[float, ...] = (36.0, 38.0, 40.0, 42.0, 44.0)
    blocks: tuple[str, ...] = ("auto", "8")
    client_chunk: int = 8

    def check(self) -> "FederateConfig":
        if self.clients < 1 or self.rounds < 1:
            raise FederationError("clients and rounds must be ≥ 1")
        if self.patches_per_client < 0:
            raise FederationError("patches per client must be ≥ 0")
        parse_partition(self.partition)
        self.fed_config().check()
        if self.secure_agg and sampled_count(self.clients, self.sample_fraction) < 2:
            raise FederationError("secure aggregation needs at least 2 clients per round (raise --clients or "
                                  "--sample-fraction)")
        try:
            self.train_config().check()
        except ValueError as err:
            raise FederationError(str(err)) from None
        return self

    @property
    def patches_per_round(self) -> int:
        return self.patches_per_client or self.local_steps * self.batch

    def fed_config(self) -> FedConfig:
        return FedConfig(local_steps=self.local_steps, batch_size=self.batch, learning_rate=self.lr, clip=self.clip,
                         prox_mu=self.prox_mu, server_optimizer=self.server_optimizer,
                         server_learning_rate=self.server_lr, sample_fraction=self.sample_fraction,
                         client_chunk=self.client_chunk)

    def train_config(self) -> TrainConfig:
        """The central-training settings sharing this run's data, net, initialisation and validation."""
        return TrainConfig(batch=self.batch, patch=self.patch, lr=self.lr, clip=self.clip, val_fraction=self.val_fraction,
                           val_patches=self.val_patches, seed=self.seed, channels=tuple(self.channels),
                           codecs=tuple(self.codecs), targets=tuple(self.targets), blocks=tuple(self.blocks))

    def net_config(self) -> NetConfig:
        return NetConfig(channels=tuple(self.channels))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------------ partitions


def parse_partition(spec: str) -> tuple[str, float | None]:
    """``"iid"`` / ``"by-volume"`` / ``"dirichlet:α"`` → ``(kind, α or None)``."""
    s = str(spec).strip().lower()
    if s in ("iid", "by-volume"):
        return s, None
    if s.startswith("dirichlet:"):
        try:
            alpha = float(s.split(":", 1)[1])
        except ValueError:
            alpha = float("nan")
        if not alpha > 0 or not math.isfinite(alpha):
            raise FederationError(f"dirichlet partition needs a positive α (e.g. dirichlet:0.5), got {spec!r}")
        return "dirichlet", alpha
    raise FederationError(f"unknown partition {spec!r}; use iid, by-volume or dirichlet:α")


def partition(spec: str, n_clients: int, n_volumes: int, patches: int, seed: int) -> np.ndarray:
    """``(K, V)`` integer matrix: patches client k draws from training volume v per round (every row > 0)."""
    kind, alpha = parse_partition(spec)
    if n_volumes < 1:
        raise FederationError("no training volumes")
    rng = np.random.default_rng([seed, 77])
    a = np.zeros((n_clients, n_volumes), np.int64)
    if kind == "iid":
        for k in range(n_clients):
            a[k] = patches // n_volumes
            a[k, rng.permutation(n_volumes)[: patches % n_volumes]] += 1
    elif kind == "by-volume":
        for v in range(n_volumes):
            for k in ([v % n_clients] if n_volumes >= n_clients else range(v, n_clients, n_volumes)):
                a[k, v] = patches
    else:  # Dirichlet over clients, per volume; the whole budget is K × patches
        budget = n_clients * patches / n_volumes
        for v in range(n_volumes):
            a[:, v] = np.floor(rng.dirichlet(np.full(n_clients, alpha)) * budget).astype(np.int64)
        for k in np.flatnonzero(a.sum(1) == 0):  # no empty client: one patch of a random volume
            a[k, rng.integers(n_volumes)] = 1
    return a


def client_batch(samplers: Sequence[PatchSampler], alloc: np.ndarray, seed: int, rnd: int, client: int) -> Batch:
    """Client ``client``'s patches of round ``rnd``: ``alloc[v]`` from volume v, drawn with its own seed."""
    rng = np.random.default_rng([seed, rnd, client])
    parts = [samplers[v].sample(rng, int(n)) for v, n in enumerate(alloc) if n > 0]
    order = rng.permutation(sum(len(p.s) for p in parts))
    return Batch(*(np.concatenate([getattr(p, f) for p in parts])[order] for f in ("x", "cond", "target", "mask", "s")))


def as_client_data(batches: Sequence[Batch]) -> ClientData:
    return ClientData.from_lists([(b.x, b.cond) for b in batches], [(b.target, b.mask) for b in batches])


# ------------------------------------------------------------------------------------------ the loss


@functools.lru_cache(maxsize=None)
def restoration_loss(net_config: NetConfig) -> Callable:
    """The net's loss: masked MSE of the correction in quantiser steps (as central training). One
    function for the looped and the vmapped programs: on a CPU the net's convolutions batch one per
    client (:mod:`fedtensor.nn.conv`); elsewhere vmap turns them into one grouped convolution (on an
    H200: 2.6× the per-client loop at K = 32 with 128-client chunks). Cached per architecture, so
    jitted programs are reused across rounds."""
    graphdef, _ = abstract_net(net_config)

    def loss(params, inputs, targets):
        (x, cond), (t, m) = inputs, targets
        f = nnx.merge(graphdef, params)(x, cond)
        return jnp.sum(jnp.square(f - t) * m) / jnp.maximum(jnp.sum(m), 1.0)

    return loss


def client_update(params, data: Batch, cfg: FederateConfig, key) -> tuple[Any, dict]:
    """One client's local training (what a real hospital runs): ``cfg.local_steps`` Adam steps on
    minibatches of its patches ``data`` from the global ``params``; returns (new params, metrics)."""
    loss = restoration_loss(cfg.net_config())
    n = len(data.s)
    if n < 1:
        raise FederationError("a client needs at least one patch")
    new, mean_loss = local_update_single(loss, cfg.fed_config(), params, (jnp.asarray(data.x), jnp.asarray(data.cond)),
                                         (jnp.asarray(data.target), jnp.asarray(data.mask)), jnp.int32(n), key)
    return new, {"loss": float(mean_loss), "count": n}


def federated_round(server: Server, data: ClientData, cfg: FederateConfig, key, *, round_id: int = 0) -> np.ndarray:
    """Local training of every client in ``data`` (one jitted program) and the server step; returns the
    clients' mean local losses."""
    loss = restoration_loss(cfg.net_config())
    fc = server.cfg
    keys = jax.random.split(key, data.n_clients)
    counts = jnp.asarray(data.counts)
    if cfg.secure_agg:
        client_params, losses = local_updates_vmapped(loss, fc, server.params, data.inputs, data.targets, counts, keys)
        delta = secure_mean_delta(server.params, client_params, data.counts, round_id=round_id)
    else:
        delta, losses = round_vmapped(loss, fc, server.params, data.inputs, data.targets, counts, keys)
    server.apply(delta)
    return np.asarray(losses)


# ------------------------------------------------------------------------------------------ files


def write_history(out_dir: Path, history: list[dict]) -> None:
    """The rounds' ``history.csv`` and ``loss.png``, written as ``fedtensor train`` writes its epochs'."""
    train_history(out_dir, history, HISTORY_FIELDS, plot_history)


def plot_history(history: list[dict], path: Path) -> None:
    nn_plot_history(history, path, x="round", train_label="clients' local training",
                    val_label="validation (global model)")


def fingerprint(cfg: FederateConfig, train_src: Sequence[Source], val_src: Sequence[Source]) -> str:
    """Identity of a run: everything that shapes its trajectory (``rounds`` only says when to stop)."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in ("rounds", "client_chunk")}
    d = {"federate": config, "data": sorted((s.label, s.digest) for s in train_src),
         "val": sorted((s.label, s.digest) for s in val_src), "library": __version__}
    return sha256_hex(json.dumps(d, sort_keys=True).encode())


def _save_state(out_dir: Path, server: Server, best, meta: dict) -> None:
    """New files first, then ``state.json`` pointing at them (atomic), then older files removed."""
    sd = out_dir / STATE_DIR
    sd.mkdir(parents=True, exist_ok=True)
    rnd = meta["round"]
    data = tree_to_bytes({"params": server.params, "opt": server.opt_state})
    best_data = tree_to_bytes(best)
    files = {"state_file": f"state-{rnd:05d}.safetensors", "sha256": sha256_hex(data),
             "best_file": f"best-{rnd:05d}.safetensors", "best_sha256": sha256_hex(best_data)}
    write_atomic(sd / files["state_file"], data)
    write_atomic(sd / files["best_file"], best_data)
    write_atomic(sd / STATE_JSON, json.dumps({**meta, **files}, indent=1).encode())
    for f in sd.glob("*.safetensors"):
        if f.name not in (files["state_file"], files["best_file"]):
            f.unlink(missing_ok=True)


_META_FIELDS = {"state_file": str, "best_file": str, "sha256": str, "best_sha256": str, "round": int,
                "history": list, "best_round": int}


def _load_state(out_dir: Path, server: Server, fp: str):
    sd = out_dir / STATE_DIR
    meta = read_state_meta(sd, "federation", fp, _META_FIELDS)
    try:
        data = (sd / meta["state_file"]).read_bytes()
        best_data = (sd / meta["best_file"]).read_bytes()
    except (OSError, ValueError, TypeError):
        raise ModelError(f"corrupted federation checkpoint in {sd} (use --force to start over)") from None
    if meta.get("sha256") != sha256_hex(data) or meta.get("best_sha256") != sha256_hex(best_data):
        raise ModelError(f"corrupted federation checkpoint in {sd}: SHA-256 mismatch (use --force to start over)")
    tree = tree_from_bytes({"params": server.params, "opt": server.opt_state}, data, "federation checkpoint")
    tree = jax.tree_util.tree_map(jnp.asarray, tree)
    best = tree_from_bytes(server.params, best_data, "federation checkpoint")
    return tree["params"], tree["opt"], best, meta


def _manifest(cfg: FederateConfig, train_labels, val_labels, history, best_round, best_loss, fp, alloc,
              kinds) -> dict:
    best = next((r for r in history if r["round"] == best_round), {})
    return {"federation": {"config": cfg.to_dict(), "train_volumes": train_labels, "val_volumes": val_labels,
                           "partition": alloc.tolist(), "best_round": best_round,
                           "best_loss": best_loss if math.isfinite(best_loss) else None,
                           "best_val_gain_db": best.get("val_gain_db"), "rounds_run": len(history),
                           "fingerprint": fp, "history": history},
            "codecs": list(cfg.codecs), "targets_db": list(cfg.targets), "intensity_kinds": kinds}


def _version_manifest(params, net_config: NetConfig, cfg: FederateConfig, rnd: int, rec: dict,
                      kinds) -> tuple[bytes, dict]:
    data = model_bytes(params, net_config, {"normalisation": "ct|u8|mr (fedtensor.nn.normalize)"})
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "model_id": sha256_hex(data), "net": net_config.to_dict(),
                "library": __version__, "federation": {"round": rnd, "config": cfg.to_dict(), "metrics": rec},
                "codecs": list(cfg.codecs), "targets_db": list(cfg.targets), "intensity_kinds": kinds}
    return data, manifest


# ------------------------------------------------------------------------------------------ federate


def federate(paths: Sequence[Path] | None, out_dir: str | Path, cfg: FederateConfig = FederateConfig(), *,
             resume: bool = True, **kwargs) -> dict:
    """Train a restoration model federated over ``cfg.clients`` simulated clients into ``out_dir``.

    Data and validation as :func:`fedtensor.nn.train` (``val_paths``/``val_sources`` or
    ``cfg.val_fraction`` of the volumes, split by volume). ``resume=True`` continues a run found in
    ``out_dir`` (same settings and data, else :class:`ModelError`; ``rounds`` may grow).
    ``progress(event, info)`` receives ``"data"``, ``"start"`` and ``"round"`` events; ``on_version``
    receives every round's global model (before the round's checkpoint: a round whose publishing failed
    is run and published again on resume). Returns a summary.
    """
    cfg.check()
    out_dir = Path(out_dir)
    with run_directory(out_dir, resume):
        return _federate(paths, out_dir, cfg, resume=resume, **kwargs)


def _federate(paths: Sequence[Path] | None, out_dir: Path, cfg: FederateConfig, *,
              val_paths: Sequence[Path] | None = None, sources: Sequence[Source] | None = None,
              val_sources: Sequence[Source] | None = None, cache_dir: str | Path | None = None, resume: bool = True,
              progress: Callable[[str, dict], None] | None = None, on_version: OnVersion | None = None) -> dict:
    emit = progress or (lambda event, info: None)
    tcfg = cfg.train_config()
    cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    train_src, val_src = training_sources(paths, val_paths, sources, val_sources, cfg, cache, emit)
    train_labels, val_labels = [s.label for s in train_src], [s.label for s in val_src]
    fp = fingerprint(cfg, train_src, val_src)
    kinds = intensity_kinds(train_src)

    trainer = Trainer(tcfg)  # same initial weights and validation as central training
    samplers = [PatchSampler([s], cfg.patch, augment=True) for s in train_src]
    alloc = partition(cfg.partition, cfg.clients, len(train_src), cfg.patches_per_round, cfg.seed)
    val_batches: list[Batch] = []
    if val_src:
        vs = PatchSampler(val_src, cfg.patch, augment=False)
        vrng = np.random.default_rng([cfg.seed, 1_000_003])
        val_batches = [vs.sample(vrng, cfg.batch) for _ in range(max(1, math.ceil(cfg.val_patches / cfg.batch)))]

    server = Server(trainer.init_state()[0], cfg.fed_config())
    if not resume:
        clear_run(out_dir)
    history: list[dict] = []
    best, best_loss, best_round, start = None, math.inf, 0, 1
    if (out_dir / STATE_DIR / STATE_JSON).exists():
        params, opt_state, best, meta = _load_state(out_dir, server, fp)
        server.params, server.opt_state = params, opt_state
        history, best_round, start = meta["history"], meta["best_round"], meta["round"] + 1
        best_loss = meta["best_loss"]
        if meta["round"] > cfg.rounds:
            raise FederationError(f"{out_dir} already ran {meta['round']} rounds, more than the {cfg.rounds} asked "
                                  "(ask for at least as many to resume, or --force to start afresh)")
        if start <= cfg.rounds or not (out_dir / MODEL_FILE).exists():  # repair a torn model directory
            export_model(out_dir, best, trainer.net_config,
                         _manifest(cfg, train_labels, val_labels, history, best_round, best_loss, fp, alloc, kinds))

    emit("start", {"rounds": cfg.rounds, "start_round": start, "clients": cfg.clients, "train_volumes": train_labels,
                   "val_volumes": val_labels, "partition": alloc.tolist()})
    mark_run(out_dir)
    for rnd in range(start, cfg.rounds + 1):
        t0 = time.perf_counter()
        chosen = sample_clients(cfg.clients, cfg.sample_fraction, np.random.default_rng([cfg.seed, rnd, 1]))
        data = as_client_data([client_batch(samplers, alloc[k], cfg.seed, rnd, int(k)) for k in chosen])
        t1 = time.perf_counter()
        losses = federated_round(server, data, cfg, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), rnd),
                                 round_id=rnd)
        jax.block_until_ready(server.params)
        t_train = time.perf_counter() - t1
        rec: dict[str, Any] = {"round": rnd, "clients": len(chosen), "patches": int(data.counts.sum()),
                               "train_loss": float(np.average(losses, weights=data.counts)),
                               "val_loss": None, "val_gain_db": None}
        if val_batches:
            rec["val_loss"], rec["val_gain_db"] = trainer.validate(server.params, val_batches)
        rec["seconds"] = time.perf_counter() - t0
        rec["updates_per_s"] = len(chosen) / t_train if t_train > 0 else None
        if not finite_epoch(rec, server.params):
            raise ModelError(f"federated training diverged: non-finite loss in round {rnd} (try a lower --lr, "
                             "--server-lr or --prox-mu)")
        history.append(rec)
        score = rec["val_loss"] if rec["val_loss"] is not None else rec["train_loss"]
        if best is None or not val_batches or score < best_loss * (1 - 1e-4):
            best, best_loss, best_round = jax.tree_util.tree_map(np.asarray, server.params), score, rnd
        export_model(out_dir, best, trainer.net_config,
                     _manifest(cfg, train_labels, val_labels, history, best_round, best_loss, fp, alloc, kinds))
        write_history(out_dir, history)
        if on_version is not None:  # before the checkpoint: a failed publish is retried by the resumed run
            blob, manifest = _version_manifest(server.params, trainer.net_config, cfg, rnd, rec, kinds)
            on_version(rnd, blob, manifest, {**rec, "best_round": best_round})
        _save_state(out_dir, server, best, {"fingerprint": fp, "round": rnd, "history": history, "best_round": best_round,
                                            "best_loss": best_loss if math.isfinite(best_loss) else None})
        emit("round", {**rec, "best_round": best_round})
    if not (out_dir / MODEL_FILE).exists():
        raise ModelError(f"{out_dir} has a finished run but no {MODEL_FILE}; use --force to train again")
    man = json.loads((out_dir / MANIFEST_FILE).read_text())
    fed = man["federation"]
    return {"model_id": man["model_id"], "out": str(out_dir), "best_round": fed["best_round"],
            "rounds_run": fed["rounds_run"], "best_val_gain_db": fed["best_val_gain_db"],
            "best_val_loss": fed["best_loss"] if val_labels else None,  # else a training loss
            "train_volumes": train_labels, "val_volumes": val_labels, "partition": fed["partition"],
            "history": fed["history"],
            "updates_per_s": _median([r.get("updates_per_s") for r in fed["history"][1:]] or
                                     [r.get("updates_per_s") for r in fed["history"]])}


def _median(values) -> float | None:
    v = [x for x in values if x]
    return float(np.median(v)) if v else None


__all__ = ["FederateConfig", "client_update", "federate", "federated_round", "parse_partition", "partition",
           "restoration_loss"]
