#!/usr/bin/env python
"""Federated vs central training of the restoration net: the held-out PSNR gain of both.

Same codec pairs, same net and initial weights (seed), same validation patches, and the same number
of training patches ("epochs-equivalent"): central training (:func:`fedtensor.nn.train`) sees
``--total-patches`` fresh augmented patches in ``--epochs`` epochs; each federated run
(:func:`fedtensor.federated.restoration.federate`) sees the same total as rounds × clients × local
steps × batch. Both keep their best validated model. Reported per run: the validation PSNR gain on the
held-out volume's fixed patches (the training loops' own figure) and the gain of full-volume restoration
of the held-out volume compressed at ``--test-target`` dB (tiled inference, :func:`fedtensor.nn.evaluate`).
Target: federated within 0.2 dB of central.

    python benchmarks/federated_vs_central.py --fed iid:8 by-volume:3

Runs are written under ``--out`` (resumable: an existing run with the same settings is continued / reused).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="sample data directory (default: FEDTENSOR_DATA or ../shared/data)")
    p.add_argument("--out", type=Path, default=C.REPO_ROOT / "results" / "federated_vs_central")
    p.add_argument("--train", nargs="+", default=["ct_chest.nii.gz", "ct_head_uint8.nii.gz", "mr_brain_gd.nii.gz"])
    p.add_argument("--held-out", default="ct_abdomen.nii.gz", help="validation and test volume (never trained on)")
    p.add_argument("--fed", nargs="+", default=["iid:8", "by-volume:3"], help="federated runs as PARTITION:CLIENTS")
    p.add_argument("--total-patches", type=int, default=4800)
    p.add_argument("--epochs", type=int, default=6, help="central epochs (the total split evenly)")
    p.add_argument("--local-steps", type=int, default=15)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--channels", default="8,16")
    p.add_argument("--lr", type=float, default=5e-4, help="central peak rate and the clients' Adam rate")
    p.add_argument("--server-opt", default="fedavg")
    p.add_argument("--server-lr", type=float, default=None, help="default: 1 for fedavg, 0.001 for fedadam")
    p.add_argument("--targets", nargs="+", type=float, default=[38.0])
    p.add_argument("--test-target", type=float, default=38.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax

    from fedtensor.codec import compress
    from fedtensor.federated.restoration import FederateConfig, federate
    from fedtensor.io import read_volume
    from fedtensor.nn import TrainConfig, evaluate, load_model, train
    from fedtensor.nn.data import make_pairs

    data_dir = args.data or C.default_data_dir()
    channels = tuple(int(v) for v in args.channels.split(","))
    cache = args.out / "cache"
    t0 = time.perf_counter()
    srcs = make_pairs([data_dir / v for v in [*args.train, args.held_out]], targets=tuple(args.targets), blocks=("8",),
                      cache_dir=cache)
    train_src, val_src = srcs[:-1], srcs[-1:]
    print(f"backend {jax.default_backend()}; pairs ready in {time.perf_counter() - t0:.0f} s: train "
          f"{', '.join(s.label for s in train_src)}; held out {val_src[0].label}", flush=True)

    held = read_volume(data_dir / args.held_out)
    stream = compress(held, psnr=args.test_target, codec="block-tucker", block=8)

    common = dict(batch=args.batch, patch=args.patch, lr=args.lr, channels=channels, targets=tuple(args.targets),
                  blocks=("8",), val_patches=64, seed=args.seed)
    rows = []

    def report(name, out_dir, summary_gain, seconds, extra):
        ev = evaluate(held.data, stream, load_model(out_dir))
        row = {"run": name, "val_gain_db": summary_gain, "volume_gain_db": ev["delta_psnr_db"],
               "psnr_decoded_db": ev["psnr_db"], "seconds": seconds, **extra}
        rows.append(row)
        print(f"{name:>16}: val patches {summary_gain:+.3f} dB, held-out volume {ev['delta_psnr_db']:+.3f} dB "
              f"(decoded {ev['psnr_db']:.2f} dB), {seconds:.0f} s", flush=True)

    per_epoch = args.total_patches // args.epochs
    tcfg = TrainConfig(epochs=args.epochs, patches_per_epoch=per_epoch, patience=args.epochs, min_epochs=args.epochs,
                       **common)
    t = time.perf_counter()
    cs = train(None, args.out / "central", tcfg, sources=train_src, val_sources=val_src)
    best = next(r for r in cs["history"] if r["epoch"] == cs["best_epoch"])
    report("central", args.out / "central", best["val_gain_db"], time.perf_counter() - t,
           {"patches": args.epochs * tcfg.steps_per_epoch * args.batch, "steps": args.epochs * tcfg.steps_per_epoch})

    for spec in args.fed:
        part, k = spec.rsplit(":", 1)
        k = int(k)
        per_round = k * args.local_steps * args.batch
        rounds = max(1, math.ceil(args.total_patches / per_round))
        fcfg = FederateConfig(clients=k, rounds=rounds, local_steps=args.local_steps, partition=part,
                              server_optimizer=args.server_opt, server_lr=args.server_lr, **common)
        t = time.perf_counter()
        fs = federate(None, args.out / f"fed-{part.replace(':', '')}-{k}", fcfg, sources=train_src, val_sources=val_src)
        report(f"fed {spec}", fs["out"], fs["best_val_gain_db"], time.perf_counter() - t,
               {"patches": rounds * per_round, "rounds": rounds, "clients": k, "local_steps": args.local_steps})

    central = rows[0]
    print(f"\n{'run':>16} {'patches':>8} {'val gain dB':>12} {'volume gain dB':>15} {'Δ vs central':>13}")
    for r in rows:
        print(f"{r['run']:>16} {r['patches']:>8} {r['val_gain_db']:>+12.3f} {r['volume_gain_db']:>+15.3f} "
              f"{r['volume_gain_db'] - central['volume_gain_db']:>+13.3f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
