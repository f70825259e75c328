"""``fedtensor federate DATA... --out DIR --clients K --rounds R``: federated training of the
restoration model by the vmapped simulation (see :mod:`fedtensor.federated.restoration`).

Wired into the app by ``register(app)``. DATA is expanded as for ``fedtensor train``; the model
directory written at the end is the same format, so ``fedtensor decompress --model DIR`` uses it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from fedtensor_cli import render
from fedtensor_cli.errors import UsageFailure, cli_errors
from fedtensor_cli.train_cmd import (DataArgument, ModelDirOption, PhaseProgress, _floats, _ints, curve_files,
                                     removed_if_failed, run_inputs)


def register(app: typer.Typer) -> None:
    """Add the ``federate`` command to ``app``."""

    @app.command("federate")
    @cli_errors
    def federate(
        data: DataArgument,
        out: ModelDirOption,
        clients: Annotated[int, typer.Option("--clients", "-k", help="Number of simulated clients (hospitals).")] = 8,
        rounds: Annotated[int, typer.Option("--rounds", "-r", help="Federated rounds.")] = 10,
        local_steps: Annotated[int, typer.Option("--local-steps", help="Local optimiser steps per client and round.")] = 10,
        sample_fraction: Annotated[float, typer.Option("--sample-fraction", help="Share of clients sampled each round.")] = 1.0,
        secure_agg: Annotated[bool, typer.Option("--secure-agg", help="Aggregate by secure aggregation (Bonawitz et al.).")] = False,
        partition: Annotated[str, typer.Option("--partition", metavar="iid|by-volume|dirichlet:α",
                                               help="How the training volumes are shared among the clients.")] = "iid",
        val: Annotated[Optional[list[Path]], typer.Option("--val", metavar="PATH",
                                                          help="Validation-only volume (repeatable); default: --val-fraction of DATA.")] = None,
        val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of volumes held out for validation.")] = 0.2,
        batch: Annotated[int, typer.Option("--batch", help="Patches per local step.")] = 4,
        patch: Annotated[int, typer.Option("--patch", help="Patch side (a multiple of 4, ≥ 16).")] = 16,
        patches_per_client: Annotated[int, typer.Option("--patches-per-client", help="Fresh patches per client and round (0: local steps × batch).")] = 0,
        lr: Annotated[float, typer.Option("--lr", help="Clients' Adam learning rate.")] = 2e-3,
        server_opt: Annotated[str, typer.Option("--server-opt", metavar="fedavg|fedadam", help="Server optimiser.")] = "fedavg",
        server_lr: Annotated[Optional[float], typer.Option(
            "--server-lr", help="Server learning rate (default: 1 for fedavg, 0.001 for fedadam).")] = None,
        prox_mu: Annotated[float, typer.Option("--prox-mu", help="FedProx proximal weight (0: FedAvg).")] = 0.0,
        channels: Annotated[str, typer.Option("--channels", metavar="C1,C2", help="Channels at ½ and ¼ resolution.")] = "16,32",
        targets: Annotated[str, typer.Option("--targets", metavar="DB,...", help="PSNR targets of the training pairs.")] = "36,38,40,42,44",
        blocks: Annotated[str, typer.Option("--blocks", metavar="B,...", help="Block shapes for block-tucker pairs.")] = "auto,8",
        seed: Annotated[int, typer.Option("--seed", help="Seed of the split, partition, initialisation and patches.")] = 0,
        cache: Annotated[Optional[Path], typer.Option("--cache", metavar="DIR", help="Cache of decoded volumes (default DIR/cache).")] = None,
        publish: Annotated[Optional[Path], typer.Option("--publish", metavar="STORE", help="Also publish every round's global model to this model store (the 'fedtensor serve --data' directory).")] = None,
        force: Annotated[bool, typer.Option("--force", "-f", help="Start over instead of resuming a run in DIR.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")] = False,
    ) -> None:
        """Train a restoration model federated over simulated clients (all clients' local training in one
        jitted vmap per round; FedAvg weighted by sample counts, optionally by secure aggregation).

        Writes DIR/model.safetensors + model.json (same format as fedtensor train), history.csv, loss.png,
        and a checkpoint after every round: an interrupted run resumes when started again (--rounds may grow).
        """
        from fedtensor.federated.restoration import FederateConfig
        from fedtensor.federated.restoration import federate as run_federation
        from fedtensor.federated.simulation import FederationError
        from fedtensor.nn.model import check_channels

        if clients < 1 or rounds < 1 or local_steps < 1 or batch < 1:
            raise UsageFailure("--clients, --rounds, --local-steps and --batch must be ≥ 1")
        if not 0 < sample_fraction <= 1:
            raise UsageFailure(f"--sample-fraction must be in (0, 1], got {sample_fraction}")
        if patch % 4 or patch < 16:
            raise UsageFailure(f"--patch must be a multiple of 4, at least 16, got {patch}")
        ch = _ints(channels, "--channels")
        try:
            check_channels(ch)
        except ValueError as err:
            raise UsageFailure(f"--{err}") from None
        cfg = FederateConfig(clients=clients, rounds=rounds, local_steps=local_steps, batch=batch, patch=patch,
                             patches_per_client=patches_per_client, sample_fraction=sample_fraction,
                             partition=partition.strip().lower(), secure_agg=secure_agg, lr=lr, prox_mu=prox_mu,
                             server_optimizer=server_opt.strip().lower(), server_lr=server_lr,
                             val_fraction=val_fraction, seed=seed, channels=ch, targets=_floats(targets, "--targets"),
                             blocks=tuple(b.strip() for b in blocks.split(",") if b.strip()))
        try:
            cfg.check()
        except FederationError as err:
            raise UsageFailure(str(err)) from None
        volumes, val_volumes = run_inputs(list(data), list(val) if val else None, out, cache)
        show = render.interactive(json_out)
        published: list[dict] = []
        # a store this run creates goes with a failed run that published nothing into it, as --out does
        with removed_if_failed(out), removed_if_failed(publish) if publish else contextlib.nullcontext():
            on_version = _publisher(publish, published) if publish is not None else None
            with _Progress(show) as prog:
                summary = run_federation(volumes, out, cfg, val_paths=val_volumes, cache_dir=cache,
                                         resume=not force, progress=prog, on_version=on_version)
        summary = {**summary, **curve_files(out), **({"published": published} if publish is not None else {})}
        if json_out:
            render.emit_json({"command": "federate", **summary})
        else:
            render.out_console().print(_table(summary, cfg))


def _publisher(store_dir: Path, published: list[dict]):
    """An ``on_version`` hook publishing each round's global model to a :class:`ModelStore` (each version
    published is appended to ``published`` as ``{"round", "version", "sha256"}``)."""
    from fedtensor.serve.store import ModelStore, sha256_hex

    store = ModelStore(store_dir)

    def publish(rnd: int, blob: bytes, manifest: dict, rec: dict) -> None:
        latest = store.latest()
        if latest is not None and latest.sha256 == sha256_hex(blob):  # published before the run was cut off
            v = latest
        else:
            meta = {"round": rnd, "source": "fedtensor federate", "n_clients": rec.get("clients"),
                    "loss": rec.get("train_loss"), "val_loss": rec.get("val_loss"),
                    "val_gain_db": rec.get("val_gain_db")}
            v = store.publish(blob, manifest, meta)
        published.append({"round": rnd, "version": v.version, "sha256": v.sha256})

    return publish


class _Progress(PhaseProgress):
    """Codec pairs, then rounds."""

    eta = False

    def on(self, event: str, info: dict, p) -> None:
        if event == "start":
            self.tasks["fed"] = p.add_task("rounds", total=info["rounds"], completed=info["start_round"] - 1,
                                           info=f"{info['clients']} clients")
        elif event == "round":
            gain = info.get("val_gain_db")
            val = f" · val {info['val_loss']:.4g} ({gain:+.2f} dB)" if gain is not None else ""
            p.update(self.tasks["fed"], completed=info["round"], info=f"loss {info['train_loss']:.4g}{val}")


def _table(s: dict, cfg):
    from rich.table import Table

    from fedtensor.federated.simulation import sampled_count

    t = Table(title="fedtensor federate", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    rows = [
        ("model id", s["model_id"]),
        ("model dir", s["out"]),
        ("clients", f"{cfg.clients} ({cfg.partition}, {sampled_count(cfg.clients, cfg.sample_fraction)} sampled per "
                    f"round{', secure aggregation' if cfg.secure_agg else ''})"),
        ("train volumes", ", ".join(s["train_volumes"])),
        ("val volumes", ", ".join(s["val_volumes"]) or "-"),
        ("rounds run", str(s["rounds_run"])),
        ("best round", str(s["best_round"])),
        ("best val loss", render.num(s.get("best_val_loss"))),
        ("val PSNR gain", render.num(s.get("best_val_gain_db"), "+.2f", " dB")),
        ("throughput", render.num(s.get("updates_per_s"), ".3g", " client updates/s")),
        ("curves", ", ".join(x for x in (s["history_csv"], s["loss_png"]) if x)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t
