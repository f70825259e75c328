#!/usr/bin/env python
"""Leave-one-out benchmark of the learned restoration (fedtensor.nn) on the CT samples.

For each codec (block-tucker, and the paper's omlsvd-global) and each held-out CT volume:

1. train a restoration model on the *other* CT volumes (their (decoded, original) pairs at
   ``--train-targets`` dB and ``--blocks`` shapes), resumably, into ``OUT/models/<codec>/<held-out>``.
   Validation (every epoch, early stopping) uses ``--val-volumes`` — by default the MR volume, which is
   never a test volume, so all three other CTs are used for training; with ``--val-volumes`` empty the
   80:20 split by volume of the training CTs is used instead;
2. compress the held-out volume with the codec's own PSNR rate control at each ``--targets`` dB, decode
   it, restore it (tiled inference) and report PSNR / 3D SSIM before and after;
3. bits saved at equal PSNR: the codec is asked (``compress(psnr=restored PSNR)``) for the rate it needs
   *without* restoration to reach the restored PSNR; saved = 1 − bpv(with restoration) / bpv(needed).

Every figure is given for plain restoration and (``--tta``, default) for test-time augmentation: the
mean correction over the 8 mirrored versions of the volume (8× the inference time); and (``--adapted``,
default) with the output layer the encoder fits to the stream (:mod:`fedtensor.nn.adapt`): of the small
and the large one, each also in intensity classes, whichever saves more bits, without and with
test-time augmentation; its header bytes
are counted in that mode's bpv. It also reports the
training throughput (patches/s, steady state, first step excluded) and the inference speed (MVoxel/s
of ``restore`` on the held-out volume, after a warm-up call, so compilation is excluded).
Acceptance (per held-out CT and target): ΔPSNR ≥ +0.7 dB and SSIM not lower; goal ≥ 15 % bits saved.

Decoded volumes are cached in ``OUT/cache`` (keyed by the volume and the codec's source), models are
resumed from ``OUT/models`` (``--retrain`` starts them over), so the script can be re-run cheaply.
This is a benchmark, not a test. ``python benchmarks/restoration.py --help`` lists the options.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MIN_GAIN_DB = 0.7
GOAL_SAVED = 0.15


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="sample data directory (default: FEDTENSOR_DATA or ../shared/data)")
    p.add_argument("--out", type=Path, default=C.REPO_ROOT / "results" / "restoration", help="models, cache and results")
    p.add_argument("--volumes", nargs="+", default=list(C.CT_VOLUMES), help="the CT volumes of the leave-one-out")
    p.add_argument("--folds", nargs="+", default=None, help="held-out volumes to run (default: all)")
    p.add_argument("--codecs", nargs="+", default=["block-tucker", "omlsvd-global"])
    p.add_argument("--targets", nargs="+", type=float, default=[38.0, 40.0, 42.0], help="test PSNR targets (dB)")
    p.add_argument("--train-targets", nargs="+", type=float, default=[36.0, 38.0, 40.0, 42.0, 44.0])
    p.add_argument("--blocks", nargs="+", default=["auto", "8"], help="block shapes of the block-tucker training pairs")
    p.add_argument("--val-volumes", nargs="*", default=["mr_brain_gd.nii.gz"],
                   help="validation-only volumes (early stopping); none: --val-fraction of the training CTs")
    p.add_argument("--extra-train", nargs="*", type=Path, default=[],
                   help="volumes added to every fold's training set (one whose file name starts with the "
                        "held-out volume's label is left out of that fold: it is derived from it)")
    p.add_argument("--u8-window", nargs="+", type=float, default=None, metavar="HU",
                   help="also train on 8-bit copies of the HU CTs, windowed LO…HI HU onto 0…255, one copy per "
                        "LO HI pair given (written to OUT/synthetic_u8; each fold leaves out the copies of "
                        "its held-out volume)")
    p.add_argument("--cache", type=Path, default=None, help="cache of decoded volumes (default OUT/cache)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--patches-per-epoch", type=int, default=3200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patch", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--channels", type=int, nargs=2, default=[16, 32])
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--val-patches", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=160, help="inference tile side")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate test-time augmentation (mean over the 8 mirrored volumes)")
    p.add_argument("--adapted", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the encoder-fitted output layer (fedtensor.nn.adapt), its header bytes "
                        "counted in bpv")
    p.add_argument("--modes", nargs="+", choices=["plain", "tta", "adapted", "adapted-tta"], default=None,
                   help="evaluate only these of the modes --tta / --adapted enable (e.g. after a change to one)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the models already in OUT/models as they are (no training, whatever settings "
                        "they were trained with)")
    p.add_argument("--retrain", action="store_true", help="start the models over instead of resuming them")
    p.add_argument("--pairs-only", action="store_true",
                   help="only fill the cache with the training pairs of --volumes and --val-volumes, then stop "
                        "(one such process per volume fills a cache that parallel --folds runs then share)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write every figure to this JSON file (a relative path is taken inside --out, "
                        "unless it already starts with --out)")
    args = p.parse_args(argv)
    if args.json is not None and not args.json.is_absolute() and not args.json.is_relative_to(args.out):
        args.json = args.out / args.json  # next to the models and logs it describes, never the checkout's root
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_fold(args, codec: str, held: Path, others: list[Path], val: list[Path]) -> dict:
    from fedtensor.io import Volume, read_volume
    from fedtensor.metrics import psnr, psnr_from_sse, ssim3d
    from fedtensor.codec import compress, decompress, read_info
    from fedtensor.nn import TrainConfig, load_model, restore, tag_stream, train
    from fedtensor.nn.adapt import fit
    from fedtensor.nn.data import encode_decode, volume_label

    cache = args.cache or args.out / "cache"
    label = volume_label(held)
    mdir = args.out / "models" / codec / label
    cfg = TrainConfig(epochs=args.epochs, patches_per_epoch=args.patches_per_epoch, batch=args.batch, patch=args.patch,
                      lr=args.lr, channels=tuple(args.channels), patience=args.patience, val_fraction=args.val_fraction,
                      val_patches=args.val_patches, seed=args.seed, codecs=(codec,), targets=tuple(args.train_targets),
                      blocks=tuple(args.blocks))
    last = [0.0]

    def progress(event, info):
        if event == "data" and time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            log(f"  pairs {info['done']}/{info['total']} {info['what']}")
        elif event == "start":
            log(f"  train on {info['train_volumes']} (val {info['val_volumes']}), {info['pairs']} pairs, "
                f"{info['params']} params, from epoch {info['start_epoch']}")
        elif event == "epoch":
            g = info["val_gain_db"]
            log(f"  epoch {info['epoch']:2d} train {info['train_loss']:.5f} val {info['val_loss'] if info['val_loss'] is None else round(info['val_loss'], 5)}"
                f" gain {'-' if g is None else f'{g:+.3f} dB'} {info['patches_per_s'] or 0:.1f} patches/s {info['seconds']:.0f}s")

    if args.eval_only:
        summary = trained_summary(mdir)
    else:
        summary = train(others, mdir, cfg, val_paths=val or None, cache_dir=cache, resume=not args.retrain,
                        progress=progress)
    train_s = sum(r["seconds"] for r in summary["history"])  # this run's and any resumed epochs'
    model = load_model(mdir)
    vol = read_volume(held)
    orig = vol.data
    modes = ["plain", "tta"] if args.tta else ["plain"]
    if args.adapted:
        modes += ["adapted", "adapted-tta"] if args.tta else ["adapted"]
    modes = [m for m in modes if args.modes is None or m in args.modes]
    rows, speed = [], {}
    adapted_modes = [m for m in modes if m.startswith("adapted")]
    for t in args.targets:
        decoded, info = encode_decode(vol, codec, t, None, cache, label)
        if adapted_modes:  # the stream itself, to which the layer's header is added
            blob = compress(vol, psnr=t, codec=codec)
            fresh = read_info(blob)
            if fresh["bits_per_voxel"] != info["bits_per_voxel"]:
                # Another process's encoding: on a GPU the rate search can land on a neighbouring step from
                # one process to the next (docs/bench/gpu_h100.md). Evaluate this stream throughout.
                log(f"  {label} @ {t} dB: the cached decoded volume is not this encoding's; using this one")
                info = {k: v for k, v in fresh.items() if k != "affine"}
                decoded = decompress(blob).data
        dvol = Volume(decoded, vol.spacing, vol.affine, {})
        p0, s0 = psnr(orig, decoded), float(ssim3d(orig, decoded))
        row = {"target_db": t, "block": info["params"].get("block"), "bpv": info["bits_per_voxel"], "psnr": p0, "ssim": s0}
        adapted_runs = {}  # mode → (layer name, stream info, bpv with header, fit seconds)
        for mode in adapted_modes:
            # The encoder's fit of the output layer, sent in the header (its bytes counted), and its
            # choice of layer as compress_for_quality makes it: the one that saves more bits at equal PSNR
            # (read off the fit's predicted error).
            tta = mode == "adapted-tta"
            t1 = time.perf_counter()
            found = fit(model, decoded, info, orig, tile=args.tile, tta=tta)
            fit_s = time.perf_counter() - t1
            layers = []
            for name, (coef, sse) in found.layers.items():
                tagged = tag_stream(blob, model.model_id, adaptation=coef, adaptation_tta=tta)
                bpv = C.bits_per_voxel(len(tagged), orig.size)
                predicted = psnr_from_sse(sse, orig.size, C.value_range(orig))
                need = encode_decode(vol, codec, round(predicted, 3), None, cache, label)[1]["bits_per_voxel"]
                layers.append((1 - bpv / need, name, tagged, bpv))
            _, layer, tagged, bpv = max(layers)
            adapted_runs[mode] = (layer, read_info(tagged), bpv, fit_s)
        for mode in modes:
            adapted = mode in adapted_runs
            tta = mode.endswith("tta")
            layer, minfo, adapted_bpv, fit_s = adapted_runs.get(mode, (None, info, None, None))
            if mode not in speed:  # warm-up call: the first one compiles
                restore(dvol, minfo, model, tile=args.tile, tta=tta)
            t1 = time.perf_counter()
            res = restore(dvol, minfo, model, tile=args.tile, tta=tta)
            dt = time.perf_counter() - t1
            speed.setdefault(mode, orig.size / dt / 1e6)
            p1, s1 = psnr(orig, res.data), float(ssim3d(orig, res.data))
            # the codec's own rate for the restored PSNR, without restoration
            need_dec, need_info = encode_decode(vol, codec, round(p1, 3), None, cache, label)
            m = {"psnr": p1, "delta_psnr": p1 - p0, "ssim": s1, "bpv_equal_psnr": need_info["bits_per_voxel"],
                 "psnr_equal": psnr(orig, need_dec), "restore_s": dt,
                 "bpv": adapted_bpv if adapted else row["bpv"],
                 **({"fit_s": fit_s, "layer": layer} if adapted else {})}
            m["bits_saved"] = 1 - m["bpv"] / m["bpv_equal_psnr"]
            m["pass"] = m["delta_psnr"] >= MIN_GAIN_DB and s1 >= s0
            row[mode] = m
            log(f"  {label} {t:g} dB [{mode}{'/' + layer if adapted else ''}]: bpv {m['bpv']:.4f} PSNR {p0:.2f} → {p1:.2f} ({p1 - p0:+.2f} dB) "
                f"SSIM {s0:.4f} → {s1:.4f}; codec needs {m['bpv_equal_psnr']:.4f} bpv for {p1:.2f} dB → "
                f"{100 * m['bits_saved']:.1f} % saved ({dt:.1f} s)")
        rows.append(row)
    return {"codec": codec, "held_out": label, "model_id": summary["model_id"], "train_volumes": summary["train_volumes"],
            "val_volumes": summary["val_volumes"], "epochs_run": summary["epochs_run"], "best_epoch": summary["best_epoch"],
            "train_seconds": train_s, "patches_per_s": summary["patches_per_s"],
            "infer_mvox_s": speed, "voxels": int(orig.size), "modes": modes, "rows": rows}


def trained_summary(mdir: Path) -> dict:
    """What ``train`` reports, read from a finished model directory's ``model.json`` (``--eval-only``)."""
    import json

    try:
        manifest = json.loads((mdir / "model.json").read_text())
        t = manifest["training"]
        history = t["history"]
        speeds = [h["patches_per_s"] for h in history if h.get("patches_per_s")]
        return {"model_id": manifest["model_id"], "train_volumes": t["train_volumes"], "val_volumes": t["val_volumes"],
                "epochs_run": len(history), "best_epoch": t["best_epoch"], "history": history,
                "patches_per_s": statistics.median(speeds) if speeds else None}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--eval-only: no finished model in {mdir} ({exc})") from None


def print_tables(results: list[dict]) -> None:
    for codec in dict.fromkeys(r["codec"] for r in results):
        rs = [r for r in results if r["codec"] == codec]
        for mode in rs[0]["modes"]:
            head = ["held-out", "target", "bpv", "PSNR → restored", "SSIM → restored", "bpv @ equal PSNR", "bits saved", "check"]
            body = []
            for r in rs:
                for x in r["rows"]:
                    m = x[mode]
                    body.append([r["held_out"], f"{x['target_db']:g} dB", f"{m.get('bpv', x['bpv']):.4f}",
                                 f"{x['psnr']:.2f} → {m['psnr']:.2f} ({m['delta_psnr']:+.2f})",
                                 f"{x['ssim']:.4f} → {m['ssim']:.4f}" + (f" ({m['layer']})" if "layer" in m else ""),
                                 f"{m['bpv_equal_psnr']:.4f}",
                                 f"{100 * m['bits_saved']:.1f} %", "PASS" if m["pass"] else "MISS"])
            what = {"plain": "plain restoration", "tta": "restoration + test-time augmentation (8 flips)",
                    "adapted": "restoration with the encoder-fitted output layer (header bytes in bpv)",
                    "adapted-tta": "encoder-fitted output layer on test-time augmentation (header bytes in bpv)"}[mode]
            C.print_table(f"Leave-one-out, {codec}: {what}", head, body,
                          caption=f"check: ΔPSNR ≥ {MIN_GAIN_DB} dB and SSIM not lower; goal ≥ {100 * GOAL_SAVED:.0f} % bits saved")
            allrows = [x[mode] for r in rs for x in r["rows"]]
            speeds = [r["infer_mvox_s"][mode] for r in rs]
            print(f"{codec} [{mode}]: mean ΔPSNR {statistics.mean(m['delta_psnr'] for m in allrows):+.3f} dB, "
                  f"mean bits saved {100 * statistics.mean(m['bits_saved'] for m in allrows):.1f} %, "
                  f"{sum(m['pass'] for m in allrows)}/{len(allrows)} PASS; inference "
                  f"{statistics.median(speeds):.3f} MVoxel/s (median over held-out volumes)")
        tp = [r["patches_per_s"] for r in rs if r["patches_per_s"]]
        print(f"{codec}: training {statistics.median(tp) if tp else float('nan'):.1f} patches/s (median over folds)")
        for r in rs:
            print(f"  {r['held_out']}: trained on {', '.join(r['train_volumes'])} (val {', '.join(r['val_volumes']) or '-'}), "
                  f"{r['epochs_run']} epochs (best {r['best_epoch']}), {r['train_seconds'] / 60:.1f} min, model {r['model_id'][:12]}")


def fill_pair_cache(args, paths: list[Path]) -> int:
    """``--pairs-only``: the (decoded, original) pairs that training on ``paths`` would make, cached."""
    from fedtensor.nn.data import make_pairs

    cache = args.cache or args.out / "cache"
    for codec in args.codecs:
        for path in paths:
            t0 = time.perf_counter()
            make_pairs([path], codecs=(codec,), targets=args.train_targets, blocks=args.blocks, cache_dir=cache)
            log(f"pairs of {C.volume_label(path)} ({codec}) cached in {time.perf_counter() - t0:.0f} s")
    return 0


def u8_windowed(paths, lo: float, hi: float, out_dir: Path) -> list[Path]:
    """8-bit copies of the HU CTs among ``paths``: ``lo…hi`` HU mapped linearly onto 0…255, clipped."""
    from fedtensor.io import Volume, read_volume, write_volume

    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for p in paths:
        v = read_volume(p)
        if v.data.dtype == np.uint8:
            continue
        u8 = np.clip(np.rint((v.data.astype(np.float64) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
        name = f"{C.volume_label(p)}_u8window{lo:g}_{hi:g}.nii.gz"
        made.append(write_volume(Volume(u8, v.spacing, v.affine, {}), out_dir / name, force=True))
    return made


def main(argv=None) -> int:
    args = parse_args(argv)
    data_dir = args.data or C.default_data_dir()
    vols = [C.resolve_volume_path(v, data_dir) for v in args.volumes]
    val = [C.resolve_volume_path(v, data_dir) for v in args.val_volumes]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.u8_window:
        w = args.u8_window
        if len(w) % 2 or any(lo >= hi for lo, hi in zip(w[::2], w[1::2])):
            raise SystemExit("--u8-window takes LO HI pairs with LO < HI")
        for lo, hi in zip(w[::2], w[1::2]):
            args.extra_train = [*args.extra_train, *u8_windowed(vols, lo, hi, args.out / "synthetic_u8")]
    if args.pairs_only:
        return fill_pair_cache(args, vols + val)
    import jax

    log(f"restoration benchmark: {len(vols)} CT volumes, codecs {args.codecs}, targets {args.targets}, "
        f"{args.epochs} epochs × {args.patches_per_epoch} patches of {args.patch}³, backend {jax.default_backend()}")
    results = []
    for codec in args.codecs:
        for held in vols:
            label = C.volume_label(held)
            if args.folds and label not in args.folds and held.name not in args.folds:
                continue
            log(f"{codec}: hold out {label}")
            extra = [e for e in args.extra_train if not e.name.startswith(label)]
            results.append(run_fold(args, codec, held, [v for v in vols if v != held] + extra, val))
            if args.json:
                C.write_json(args.json, {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                         "environment": C.environment(), "results": results})
    print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
