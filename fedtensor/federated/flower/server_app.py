"""The Flower ``ServerApp``: FedAvg of the hospitals' weighted deltas, by SecAgg+ unless turned off.

Secure aggregation is **Flower's SecAgg+** (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod``
on each node), not :mod:`fedtensor.federated.secagg`: the protocol needs four message exchanges per
round between the server and every node, per-node protocol state kept across those exchanges, and
dropout handling when a node vanishes between them. Flower's workflow does all of that over its own
transport and node state (which survive the fresh ClientApp process each message starts); ours is an
in-process implementation the simulation drives directly. Both implement Bonawitz et al. with pairwise
and self masks and Shamir shares; in Flower 1.42 SecAgg+ runs only through the legacy
``DefaultWorkflow`` + ``LegacyContext`` path, which is why this app uses a legacy ``FedAvg`` strategy.

What the server learns per round: the weighted mean of the deltas (fixed-point, ``±clipping-range``
window, 2²² levels), the nodes' FedAvg weights, and each node's scalar training metrics.

Every global version (round 0 = the starting weights, then one per round) is written as a complete
model directory ``OUT/round-NNNN/`` (assembled in a hidden temporary directory, then renamed) and
``OUT/latest.json`` is replaced atomically to point at it; rounds ≥ 1 are also published to the
weights service — a :class:`fedtensor.serve.store.ModelStore` directory (``store-dir``) and/or a running
``fedtensor serve`` (``store-url``; admin token from ``$FEDTENSOR_ADMIN_TOKEN``). The ServerApp runs on
the SuperLink machine: that is where ``out-dir`` and ``store-dir`` are.
"""

from __future__ import annotations

import json
import os
import shutil
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flwr.app import Context
from flwr.common import Metrics, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.supercore import log

from fedtensor.federated.flower.task import (
    FedSettings,
    FederationError,
    from_ndarrays,
    net_config_to_str,
    to_ndarrays,
)
from fedtensor.nn.model import NetConfig

LATEST_FILE = "latest.json"


def weighted_metrics(results: list[tuple[int, Metrics]]) -> Metrics:
    """Example-weighted mean of every numeric metric the clients report (e.g. ``train_loss``)."""
    total = sum(n for n, _ in results)
    keys = set.intersection(*(set(m) for _, m in results)) if results else set()
    return {k: float(sum(n * float(m[k]) for n, m in results) / total) for k in sorted(keys)} if total else {}


class DeltaFedAvg(FedAvg):
    """FedAvg over client *deltas*: ``global ← global + Σ n_k Δ_k / Σ n_k``; calls ``on_global`` with each new
    global version. Under SecAgg+ every result already holds that mean (the workflow puts the unmasked
    aggregate in each), so the parent's weighted average returns it unchanged."""

    def __init__(self, global_arrays: list[np.ndarray], net_config: NetConfig, min_clients: int,
                 on_global: Callable[[int, list[np.ndarray], dict], None]):
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_clients,
                         min_available_clients=min_clients, initial_parameters=ndarrays_to_parameters(global_arrays),
                         on_fit_config_fn=self._fit_config, fit_metrics_aggregation_fn=weighted_metrics)
        self.global_arrays = [np.asarray(a, np.float32) for a in global_arrays]
        self.net = net_config_to_str(net_config)
        self.on_global = on_global

    def _fit_config(self, server_round: int) -> dict:
        return {"round": server_round, "net": self.net}

    def aggregate_fit(self, server_round, results, failures):
        if failures:
            log(WARNING, "round %s: %s client failure(s)/dropout(s)", server_round, len(failures))
        agg, metrics = super().aggregate_fit(server_round, results, failures)
        if agg is None:
            return None, {}
        delta = parameters_to_ndarrays(agg)
        if len(delta) != len(self.global_arrays):
            raise FederationError(f"aggregate has {len(delta)} arrays, the model {len(self.global_arrays)}")
        self.global_arrays = [(g + np.asarray(d).reshape(g.shape)).astype(np.float32)
                              for g, d in zip(self.global_arrays, delta)]
        info = {"clients": sorted(str(proxy.cid) for proxy, _ in results), "metrics": dict(metrics)}
        self.on_global(server_round, self.global_arrays, info)
        return ndarrays_to_parameters(self.global_arrays), metrics


class GlobalModelWriter:
    """Writes every global version into ``out_dir`` atomically and publishes it to the weights service."""

    def __init__(self, out_dir: Path, net_config: NetConfig, settings: FedSettings, run_id: int):
        self.out, self.net_config, self.settings, self.run_id = Path(out_dir), net_config, settings, run_id
        if (self.out / LATEST_FILE).exists() and not settings.force:
            raise FederationError(f"{self.out} already holds a federation's models (run config force=true "
                                  "to overwrite, or another out-dir)")
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = None
        if settings.store_dir:
            from fedtensor.serve.store import ModelStore

            self.store = ModelStore(Path(settings.store_dir).expanduser())
        self.token = os.environ.get("FEDTENSOR_ADMIN_TOKEN")
        if settings.store_url and not self.token:
            raise FederationError("store-url is set but $FEDTENSOR_ADMIN_TOKEN is not (the service's admin token)")

    def write(self, rnd: int, arrays: list[np.ndarray], info: dict) -> dict:
        from fedtensor.io.atomic import atomic_write_bytes
        from fedtensor.nn.train import export_model

        params = from_ndarrays(arrays, self.net_config)
        metrics = info.get("metrics", {})
        meta = {"round": rnd, "clients": info.get("clients", []), "n_clients": len(info.get("clients", [])),
                "loss": metrics.get("train_loss"), "run_id": self.run_id, "secure_aggregation": self.settings.secure}
        final = self.out / f"round-{rnd:04d}"
        tmp = self.out / f".round-{rnd:04d}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            mid = export_model(tmp, params, self.net_config, {"federation": meta})
            if final.exists():  # only reachable with force=true (checked at start)
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        record = {**meta, "model_id": mid, "path": str(final)}
        if rnd >= 1:
            record.update(self._publish(final, meta))
        atomic_write_bytes(self.out / LATEST_FILE, json.dumps(record, indent=2).encode(), force=True)
        log(INFO, "global model round %s: %s (%s)", rnd, final, mid[:12])
        return record

    def _publish(self, model_dir: Path, meta: dict) -> dict:
        out: dict[str, Any] = {}
        if self.store is not None:
            man = json.loads((model_dir / "model.json").read_text())
            out["store_version"] = self.store.publish((model_dir / "model.safetensors").read_bytes(), man, meta).version
        if self.settings.store_url:
            from fedtensor.serve.client import publish_model

            out["service_version"] = publish_model(self.settings.store_url, self.token, model_dir, meta).get("version")
        return out


def initial_params(settings: FedSettings):
    """``(net config, params)``: the model in ``model`` (a model directory) or a fresh net (seeded)."""
    from flax import nnx

    if settings.model:
        from fedtensor.nn import load_model

        m = load_model(Path(settings.model).expanduser())
        return m.config, nnx.state(m.net, nnx.Param)
    from fedtensor.nn.model import new_net

    return settings.net_config, nnx.state(new_net(settings.net_config, seed=settings.seed), nnx.Param)


def default_out_dir(run_id: int) -> Path:
    return Path.home() / ".fedtensor" / "federation" / f"run-{run_id}"


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = FedSettings.from_run_config(context.run_config)
    net_config, params = initial_params(settings)
    out = Path(settings.out_dir).expanduser() if settings.out_dir else default_out_dir(context.run_id)
    writer = GlobalModelWriter(out, net_config, settings, context.run_id)
    arrays = to_ndarrays(params)
    writer.write(0, arrays, {})
    strategy = DeltaFedAvg(arrays, net_config, settings.min_clients, writer.write)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.rounds), strategy=strategy)
    fit = SecAggPlusWorkflow(**settings.secagg_workflow_args()) if settings.secure else None
    log(INFO, "fedtensor federation: %s rounds, ≥ %s clients, secure aggregation %s, models → %s",
        settings.rounds, settings.min_clients, "SecAgg+" if settings.secure else "OFF", out)
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)
