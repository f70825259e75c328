#!/usr/bin/env python
"""Training throughput and inference speed of the restoration net, on whatever backend JAX has.

The quality figures (leave-one-out ΔPSNR, bits saved) are ``benchmarks/restoration.py``'s; this script
measures only speed, in a minute, on one real (decoded, original) pair — the bundled sample, coded at
``--target`` dB — so it can run inside a short GPU lease:

* training: ``nn.train.Trainer``'s jitted step (AdamW, clipping) for each ``--batch``; patches/s of the
  step alone (batches prepared and on the device beforehand), of the host-side patch sampler
  (``nn.data.PatchSampler``: crops, augmentation) on one thread, of both one after the other, and of
  what ``fedtensor train`` runs: batches sampled ahead on ``--workers`` threads while the step runs;
* inference: ``nn.infer.restore_array`` (tiled, blended) on the decoded sample mirrored out to
  ``--infer-shape``, plain and with 8-fold TTA, MVoxel/s after a compiling call.

    python benchmarks/restoration_speed.py --batch 8 32 --json speed.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from fedtensor.io import read_volume  # noqa: E402
from fedtensor.nn.data import (  # noqa: E402
    PatchSampler, Source, data_hash, default_workers, encode_decode, pair_from, prefetched_batches)
from fedtensor.nn.infer import DEFAULT_TILE, model_from_bytes, restore_array  # noqa: E402
from fedtensor.nn.train import TrainConfig, Trainer, model_bytes  # noqa: E402

SAMPLE = C.REPO_ROOT / "examples" / "data" / "ct_head_uint8.nii.gz"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--volume", type=Path, default=SAMPLE)
    ap.add_argument("--target", type=float, default=40.0, help="PSNR of the decoded training pair (dB)")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--patch", type=int, default=24)
    ap.add_argument("--channels", type=int, nargs=2, default=[16, 32])
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per batch size")
    ap.add_argument("--infer-shape", type=lambda s: tuple(int(v) for v in s.split("x")), default=(256, 256, 256))
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE)
    ap.add_argument("--workers", type=int, default=None, help="sampler threads (default: one per core, ≤ 8)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    vol = read_volume(args.volume)
    decoded, info = encode_decode(vol, "block-tucker", args.target, None, None, "sample")
    source = Source("sample", vol.data, [pair_from(decoded, info, args.target)], data_hash(vol.data))
    sampler = PatchSampler([source], args.patch)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); pair {vol.data.shape} at "
          f"{info['stats']['psnr']:.2f} dB", flush=True)
    out = {"benchmark": "restoration_speed", "environment": C.environment(), "train": [], "infer": {}}
    rng = np.random.default_rng(0)
    for batch in args.batch:
        cfg = TrainConfig(batch=batch, patch=args.patch, channels=tuple(args.channels))
        trainer = Trainer(cfg)
        t0 = time.perf_counter()
        batches = [sampler.sample(rng, batch) for _ in range(args.steps)]
        sample_s = time.perf_counter() - t0
        dev = [jax.device_put((b.x, b.cond, b.target, b.mask)) for b in batches]
        params, opt = trainer.init_state()
        lr = np.float32(cfg.lr)
        params, opt, loss = trainer.step(params, opt, lr, *dev[0])  # compiles
        jax.block_until_ready(loss)
        t0 = time.perf_counter()
        for d in dev:
            params, opt, loss = trainer.step(params, opt, lr, *d)
        jax.block_until_ready(loss)
        step_s = time.perf_counter() - t0
        r = {"batch": batch, "patch": args.patch, "channels": list(args.channels),
             "step_patches_s": batch * args.steps / step_s, "sampler_patches_s": batch * args.steps / sample_s}
        r["end_to_end_patches_s"] = 1 / (1 / r["step_patches_s"] + 1 / r["sampler_patches_s"])
        # what `fedtensor train` runs: batches sampled ahead on a thread pool while the step runs
        t0 = time.perf_counter()
        for b in prefetched_batches(sampler, (1, batch), batch, args.steps, args.workers):
            params, opt, loss = trainer.step(params, opt, lr, b.x, b.cond, b.target, b.mask)
            float(loss)  # as the training loop does (progress needs the loss)
        r["prefetched_patches_s"] = batch * args.steps / (time.perf_counter() - t0)
        r["workers"] = args.workers or default_workers()
        out["train"].append(r)
        print(f"  train batch {batch:3d} ({args.patch}³): step {r['step_patches_s']:9.1f} patches/s, host sampler "
              f"{r['sampler_patches_s']:8.1f} patches/s, both in turn {r['end_to_end_patches_s']:8.1f}, "
              f"prefetched on {r['workers']} threads {r['prefetched_patches_s']:8.1f} patches/s", flush=True)

    model = model_from_bytes(model_bytes(params, trainer.net_config))
    big = C.tiled_ct(decoded, args.infer_shape).astype(decoded.dtype)
    for tta in (False, True):
        restore_array(big, info, model, tile=args.tile, tta=tta)  # compiles
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            restore_array(big, info, model, tile=args.tile, tta=tta)
            times.append(time.perf_counter() - t0)
        mvox = big.size / statistics.median(times) / 1e6
        out["infer"]["tta" if tta else "plain"] = {"shape": list(big.shape), "tile": args.tile, "mvox_s": mvox}
        print(f"  inference {'TTA ×8' if tta else 'plain '} on {'×'.join(map(str, big.shape))} (tile {args.tile}): "
              f"{mvox:8.2f} MVoxel/s", flush=True)
    if args.json:
        C.write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
