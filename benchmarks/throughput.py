#!/usr/bin/env python
"""Throughput / memory benchmark of the block-Tucker codec on large CT volumes, next to OpenJPEG.

For each volume shape (default 256³ and 512³; e.g. ``--shapes 512x512x1000`` for the streaming
figure) an int16 CT is made by mirrored tiling of a real sample (``--source``, default ct_abdomen),
and, in one run:

* fedtensor ``compress(psnr=T)`` and ``decompress``: GVoxel/s, peak extra resident memory relative to
  the input array's bytes, bits per voxel, PSNR of the decoded volume, and the share of the wall time
  spent in each codec stage (``fedtensor.codec.stream.profiled``): block choice, bases, the rate search
  (its transform+quantise+inverse passes and error measurement), the final transform+quantisation
  (fused; the Pallas kernel on GPU/TPU), entropy coding, normalisation;
* OpenJPEG slice by slice along the last axis (``fedtensor.baselines.jpeg2000.Jpeg2kSlicewise``,
  irreversible 9/7) on the same volume, its level bisected until the PSNR reaches the same target
  (``--j2k-steps``), then compress/decompress timed at that level.

Both codecs are timed alike: the fastest of ``--repeat`` calls (default 1), run without the memory
sampler, whose thread would take the GIL every 5 ms from a codec's Python; memory is measured in one more
call of each.

fedtensor's first timed call starts its entropy-coder worker processes, as a process's first call does;
later calls find them idle (``fedtensor.codec.parallel.IDLE_SECONDS``). Both the fastest call and the
first are reported. JIT compilation is kept out of the figures by a warm-up on the first slab of the volume with the same
block shape (same static shapes). Runs on any JAX backend; the backend is printed with the results.
Not a test. ``python benchmarks/throughput.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from fedtensor.baselines.jpeg2000 import Jpeg2kSlicewise  # noqa: E402
from fedtensor.bench.memory import measure_peak_rss  # noqa: E402
from fedtensor.codec import compress, decompress, parallel, stream  # noqa: E402
from fedtensor.codec.api import auto_block  # noqa: E402
from fedtensor.codec.container import unpack  # noqa: E402
from fedtensor.io.volume import Volume  # noqa: E402
from fedtensor_kernels.block_transform import default_impl, impl_for  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_shape(s: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(n) for n in s.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape must look like 256x256x256, got {s!r}")
    return shape


def gvox(n: int, seconds: float) -> float:
    return n / seconds / 1e9


def profiled_best(repeat: int, fn) -> tuple[float, dict, object, float]:
    """``(seconds, stage seconds, result, first call's seconds)`` of the fastest of ``repeat`` calls of
    ``fn`` (``C.time_best``, no warm-up), with that call's codec stages (``stream.profiled``). The first
    call starts its entropy-coder workers, as a process's first call does; later ones find them idle
    (``parallel.IDLE_SECONDS``). Timed calls run without the memory sampler, whose thread reads /proc of
    every worker process every 5 ms."""
    parallel.end_idle_workers(wait=True)
    stages = []

    def call():
        with stream.profiled() as seconds:
            result = fn()
        stages.append(dict(seconds))
        return result

    t = C.time_best(call, repeat, warmup=0)
    return t.best_s, stages[t.all_s.index(t.best_s)], t.result, t.all_s[0]


def run_fedtensor(x: np.ndarray, psnr: float, warmup: bool, repeat: int = 1) -> dict:
    vol = Volume(x, (1.0, 1.0, 1.0), np.eye(4), {})
    t0 = time.perf_counter()
    block = auto_block(x, psnr)
    depth = stream.slab_depth(x.shape, block, stream.slab_voxels(x))
    log(f"    fedtensor: block {block} ({impl_for(block)} transform), slab depth {depth} ({-(-x.shape[0] // depth)} slabs), "
        f"choice {time.perf_counter() - t0:.1f} s")
    if warmup:  # same block and slab shape: every jitted function compiles here, not in the timed calls
        t0 = time.perf_counter()
        crop = Volume(np.ascontiguousarray(x[:depth]), vol.spacing, vol.affine, {})
        chosen, stream.slab_voxels = stream.slab_voxels, lambda a, v=stream.slab_voxels(x): v  # the volume's slabs
        try:
            decompress(compress(crop, psnr=psnr, block=block))
        finally:
            stream.slab_voxels = chosen
        log(f"    fedtensor: warm-up on the first slab {time.perf_counter() - t0:.1f} s")
    t_enc, enc_stages, blob, first_enc = profiled_best(repeat, lambda: compress(vol, psnr=psnr))
    t_dec, dec_stages, _, first_dec = profiled_best(repeat, lambda: decompress(blob))
    enc = measure_peak_rss(lambda: compress(vol, psnr=psnr), interval_s=0.005)
    dec = measure_peak_rss(lambda: decompress(blob), interval_s=0.005)
    h = unpack(blob)[0]
    reached = C.psnr(x, dec.result.data)
    res = {
        "block": list(h["params"]["block"]), "transform_impl": impl_for(block), "slab": h["params"]["slab"], "slabs": len(h["sections"]) - 1,
        "bytes": len(blob), "bpv": C.bits_per_voxel(len(blob), x.size), "psnr": reached,
        "compress_s": t_enc, "decompress_s": t_dec, "compress_first_s": first_enc, "decompress_first_s": first_dec,
        "compress_gvox_s": gvox(x.size, t_enc), "decompress_gvox_s": gvox(x.size, t_dec),
        "compress_peak_over_input": enc.extra_bytes / x.nbytes, "decompress_peak_over_input": dec.extra_bytes / x.nbytes,
        "compress_memory": enc.to_dict(x.nbytes), "decompress_memory": dec.to_dict(x.nbytes),
        "compress_stages_s": dict(enc_stages), "decompress_stages_s": dict(dec_stages),
    }
    log(f"    fedtensor: {res['bpv']:.4f} bpv, {reached:.3f} dB, compress {t_enc:.3f} s "
        f"(peak {res['compress_peak_over_input']:.2f}× input), decompress {t_dec:.3f} s "
        f"(peak {res['decompress_peak_over_input']:.2f}×); first calls, their workers started: "
        f"compress {first_enc:.2f} s, decompress {first_dec:.2f} s")
    return res


def run_jpeg2k(x: np.ndarray, psnr: float, steps: int, threads: int | None, level: float | None = None,
               repeat: int = 1) -> dict:
    codec = Jpeg2kSlicewise(x, numthreads=threads)
    peak = C.value_range(x)
    cache: dict = {}

    def ev(level: float) -> tuple[float, int]:
        level = round(level, 4)
        if level not in cache:
            streams = codec.compress(x, level)
            cache[level] = (C.psnr(x, codec.decompress(streams), peak), sum(map(len, streams)))
            log(f"    jpeg2000: level {level:.3f} -> {cache[level][0]:.3f} dB")
        return cache[level]

    # OpenJPEG's level is a PSNR against its own peak (2^bits − 1): start from the matching guess.
    if level is None:
        shift = 20 * np.log10(((1 << codec.bitspersample) - 1) / max(peak, 1.0))
        lo, hi = psnr + shift - 4, psnr + shift + 4
        while ev(lo)[0] >= psnr and lo > 1:
            lo -= 8
        while ev(hi)[0] < psnr and hi < 200:
            hi += 8
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if ev(mid)[0] >= psnr else (mid, hi)
        level = round(hi, 4)  # as ev() measured it
        if ev(level)[0] < psnr:  # the bracket never closed (OpenJPEG's levels stop short of the target)
            raise SystemExit(f"OpenJPEG did not reach {psnr} dB (level {level:g} gives {ev(level)[0]:.3f} dB)")
    enc_timing = C.time_best(lambda: codec.compress(x, level), repeat, warmup=0)
    t_enc, streams = enc_timing.best_s, enc_timing.result
    t_dec = C.time_best(lambda: codec.decompress(streams), repeat, warmup=0).best_s
    enc = measure_peak_rss(lambda: codec.compress(x, level), interval_s=0.005)
    dec = measure_peak_rss(lambda: codec.decompress(streams), interval_s=0.005)
    nbytes = sum(map(len, streams))
    return {
        "level": level, "numthreads": threads, "bytes": nbytes, "bpv": C.bits_per_voxel(nbytes, x.size),
        "psnr": C.psnr(x, dec.result, peak), "evaluations": len(cache),
        "compress_s": t_enc, "decompress_s": t_dec,
        "compress_gvox_s": gvox(x.size, t_enc), "decompress_gvox_s": gvox(x.size, t_dec),
        "compress_peak_over_input": enc.extra_bytes / x.nbytes, "decompress_peak_over_input": dec.extra_bytes / x.nbytes,
    }


_STAGES = (("block choice", ("block choice",)), ("bases", ("bases",)),
           ("rate search", ("search: first guess", "search: estimate", "search: transform+quantize+inverse", "search: error")),
           ("normalise", ("normalize",)), ("transform+quantise", ("transform+quantize",)),
           ("entropy coding", ("entropy",)))
_DEC_STAGES = (("entropy decoding", ("entropy",)), ("dequantise+inverse", ("dequantize+inverse",)),
               ("denormalise", ("denormalize",)))


def shares(stages: dict, total: float, groups) -> dict:
    out = {name: sum(stages.get(k, 0.0) for k in keys) / total for name, keys in groups}
    out["other"] = max(0.0, 1 - sum(out.values()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[(256, 256, 256), (512, 512, 512)],
                    help="volume shapes, e.g. 256x256x256 512x512x1000")
    ap.add_argument("--psnr", type=float, default=45.0, help="target PSNR (dB) for both codecs")
    ap.add_argument("--source", default="ct_abdomen.nii.gz", help="real CT tiled to each shape")
    ap.add_argument("--data", type=Path, default=None, help="sample data directory")
    ap.add_argument("--j2k-steps", type=int, default=8,
                    help="bisection steps on OpenJPEG's level (8: within 0.03 of the smallest level reaching the "
                         "target; 5 left OpenJPEG ~0.09 dB above it, ~1 %% more bits)")
    ap.add_argument("--j2k-threads", type=int, default=1, help="OpenJPEG threads per slice")
    ap.add_argument("--j2k-levels", type=float, nargs="+", default=None,
                    help="OpenJPEG levels, one per shape, found by an earlier run (skips the bisection; the "
                         "volumes are deterministic, so a CPU run can find them for a short GPU run)")
    ap.add_argument("--no-j2k", action="store_true", help="skip OpenJPEG")
    ap.add_argument("--no-fedtensor", action="store_true", help="skip fedtensor (e.g. to find OpenJPEG's levels)")
    ap.add_argument("--no-warmup", action="store_true", help="include JIT compilation in the figures")
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed calls per codec (the fastest counts); memory is measured in one more call each")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    data_dir = args.data or C.default_data_dir()
    source = np.asarray(C.load_volume(C.resolve_volume_path(args.source, data_dir)).data)
    env = C.environment()
    log(f"backend {env.get('jax_backend')} ({default_impl()} kernels), {env.get('cpu_count')} CPUs")
    results = []
    if args.j2k_levels is not None and len(args.j2k_levels) != len(args.shapes):
        ap.error("--j2k-levels needs one level per shape")
    for i, shape in enumerate(args.shapes):
        x = C.tiled_ct(source, shape)
        label = "×".join(map(str, shape))
        log(f"{label} int16 ({x.nbytes / 1e6:.0f} MB)")
        r = {"shape": list(shape), "voxels": x.size, "input_bytes": x.nbytes}
        if not args.no_fedtensor:
            f = r["fedtensor"] = run_fedtensor(x, args.psnr, not args.no_warmup, args.repeat)
            f["compress_shares"] = shares(f["compress_stages_s"], f["compress_s"], _STAGES)
            f["decompress_shares"] = shares(f["decompress_stages_s"], f["decompress_s"], _DEC_STAGES)
        if not args.no_j2k:
            r["jpeg2000"] = run_jpeg2k(x, args.psnr, args.j2k_steps, args.j2k_threads,
                                       None if args.j2k_levels is None else args.j2k_levels[i], args.repeat)
            log(f"    jpeg2000: level {r['jpeg2000']['level']:.4f}, {r['jpeg2000']['bpv']:.4f} bpv, "
                f"{r['jpeg2000']['psnr']:.3f} dB, compress {r['jpeg2000']['compress_s']:.1f} s")
        results.append(r)
        del x

    rows = []
    for r in results:
        label = "×".join(map(str, r["shape"]))
        for name in ("fedtensor", "jpeg2000"):
            if name in r:
                c = r[name]
                rows.append([label, name, C.fmt(c["bpv"], ".4f"), C.fmt(c["psnr"], ".2f"),
                             C.fmt(c["compress_gvox_s"], ".5f"), C.fmt(c["decompress_gvox_s"], ".5f"),
                             C.fmt(c["compress_peak_over_input"], ".2f"), C.fmt(c["decompress_peak_over_input"], ".2f")])
        if "jpeg2000" in r and "fedtensor" in r:
            f, j = r["fedtensor"], r["jpeg2000"]
            rows.append([label, "ratio fedtensor/OpenJPEG", C.fmt(f["bpv"] / j["bpv"], ".3f"), "",
                         C.fmt(f["compress_gvox_s"] / j["compress_gvox_s"], ".2f"),
                         C.fmt(f["decompress_gvox_s"] / j["decompress_gvox_s"], ".2f"), "", ""])
            rows.append([label, "ratio, fedtensor's first call", "", "",
                         C.fmt(j["compress_s"] / f["compress_first_s"], ".2f"),
                         C.fmt(j["decompress_s"] / f["decompress_first_s"], ".2f"), "", ""])
    C.print_table(f"Throughput at {args.psnr:g} dB — backend {env.get('jax_backend')}, {default_impl()} kernels",
                  ["volume (int16)", "codec", "bpv", "PSNR", "compress GVox/s", "decompress GVox/s",
                   "compress peak ×in", "decompress peak ×in"], rows,
                  caption="peak = peak extra resident memory over the input array's bytes (the decoded "
                          "output itself counts for decompress)")
    share_rows = []
    for r in results:
        if "fedtensor" not in r:
            continue
        f = r["fedtensor"]
        share_rows.append(["×".join(map(str, r["shape"])), "compress", C.fmt(f["compress_s"], ".3f"),
                           "  ".join(f"{k} {100 * v:.0f}%" for k, v in f["compress_shares"].items())])
        share_rows.append(["", "decompress", C.fmt(f["decompress_s"], ".3f"),
                           "  ".join(f"{k} {100 * v:.0f}%" for k, v in f["decompress_shares"].items())])
    C.print_table("fedtensor: share of wall time per stage", ["volume", "call", "seconds", "stages"], share_rows)
    if args.json:
        C.write_json(args.json, {"benchmark": "throughput", "psnr": args.psnr, "environment": env, "results": results})
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
