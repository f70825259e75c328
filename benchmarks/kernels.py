#!/usr/bin/env python
"""Transform+quantise (and dequantise+inverse) throughput of the codec's block kernels, on device data.

What the codec's per-slab jit runs (``fedtensor.codec.stream._forward`` / ``_inverse``: the block view of
a normalised float32 slab → int32 quantisation indices, and back), timed on a volume already resident
on the device, so the figures are the kernels' own (no host transfers, no entropy coding):

* ``reference``: the separable ``einsum`` (three small contractions, XLA);
* ``kron-xla``: one ``N×B @ B×B`` product with the Kronecker basis (XLA's matmul, fp32);
* ``pallas``: the fused Pallas kernel (``fedtensor_kernels.block_transform``) for each tile / warp
  setting of ``--configs`` (GPU only, unless ``--interpret`` asks for a slow CPU check), and
  the best setting again with ``tf32x3`` in-kernel precision.

Each line reports GVoxel/s (median of ``--repeat`` timed calls after a compiling one) and, for the
Pallas and Kronecker paths, how many quantisation indices differ from the reference (summation order
differs; a coefficient on a bin edge may round either way). Not a test.

    python benchmarks/kernels.py --shape 512x512x512 --blocks 8x8x8 8x8x16 16x16x8 --json k.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from fedtensor.codec.quantize import RECON_OFFSET, ROUNDING  # noqa: E402
from fedtensor.codec.stream import _forward, _inverse  # noqa: E402
from fedtensor.tensor.block import _to_blocks  # noqa: E402
from fedtensor_kernels import block_transform as bt  # noqa: E402

DEFAULT_CONFIGS = ("64,64,64,4", "64,64,32,4", "32,64,64,4", "64,64,64,8", "64,64,128,4")


def parse_triple(s: str) -> tuple[int, int, int]:
    t = tuple(int(v) for v in s.lower().split("x"))
    if len(t) != 3:
        raise argparse.ArgumentTypeError(f"expected AxBxC, got {s!r}")
    return t


def parse_config(s: str) -> tuple[tuple[int, int, int], int | None]:
    v = [int(x) for x in s.split(",")]
    if len(v) not in (3, 4):
        raise argparse.ArgumentTypeError(f"config is ROWS,COLS,K[,WARPS], got {s!r}")
    return tuple(v[:3]), (v[3] if len(v) == 4 else None)


def timed(fn, repeat: int) -> tuple[float, object]:
    out = jax.block_until_ready(fn())  # compiles
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def random_bases(b, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(np.linalg.qr(rng.standard_normal((n, n)))[0], jnp.float32) for n in b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shape", type=parse_triple, default=(512, 512, 512), help="volume shape (one slab)")
    ap.add_argument("--blocks", type=parse_triple, nargs="+", default=[(8, 8, 8), (8, 8, 16), (16, 16, 8)])
    ap.add_argument("--source", default="ct_abdomen.nii.gz", help="real CT tiled to the shape")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--step", type=float, default=0.01, help="quantiser step (normalised units)")
    ap.add_argument("--configs", type=parse_config, nargs="+", default=[parse_config(c) for c in DEFAULT_CONFIGS],
                    help="Pallas settings ROWS,COLS,K[,WARPS] swept on the first block shape")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--interpret", action="store_true", help="run the Pallas paths in interpret mode (a CPU check)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
    src = np.asarray(C.load_volume(C.resolve_volume_path(args.source, args.data or C.default_data_dir())).data)
    x = C.tiled_ct(src, args.shape).astype(np.float32)
    x = jnp.asarray((x - x.mean()) / max(float(np.ptp(x)), 1.0))
    n = x.size
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), volume {args.shape}", flush=True)
    results = []

    def record(block, name, fwd_s, inv_s, mismatch=None, config=None):
        r = {"block": list(block), "impl": name, "config": config, "forward_gvox_s": n / fwd_s / 1e9,
             "inverse_gvox_s": n / inv_s / 1e9, "index_mismatch_fraction": mismatch}
        results.append(r)
        mm = "" if mismatch is None else f"  indices ≠ reference: {100 * mismatch:.4f} %"
        print(f"  {'x'.join(map(str, block)):8s} {name:28s} transform+quantise {r['forward_gvox_s']:8.3f} GVox/s   "
              f"dequantise+inverse {r['inverse_gvox_s']:8.3f} GVox/s{mm}", flush=True)
        return r

    best_config = None  # the fastest Pallas setting on the first block shape, reused on the others
    for b in args.blocks:
        bases = random_bases(b)
        step = jnp.float32(args.step)
        fwd_s, q_ref = timed(lambda: _forward(x, bases, step, b, "reference"), args.repeat)
        inv_s, _ = timed(lambda: _inverse(q_ref, bases, step, args.shape, "reference"), args.repeat)
        record(b, "reference (separable einsum)", fwd_s, inv_s)

        k = bt.kron_basis(bases)
        flat = q_ref.reshape(-1, int(np.prod(b)))

        fwd_s, q = timed(lambda: _kron_forward(x, k, step, b), args.repeat)
        inv_s, _ = timed(lambda: bt.dequantize_inverse_reference(flat, k, step, RECON_OFFSET), args.repeat)
        record(b, "kron-xla (one fp32 matmul)", fwd_s, inv_s, float(jnp.mean(q != flat)))
        if not (gpu or args.interpret):
            continue
        configs = [(t, w, "highest") for t, w in (args.configs if best_config is None else [best_config])]
        best = None
        for tiles, warps, precision in configs + [(None, None, None)]:
            if tiles is None:  # after the sweep: the best setting once more, with TF32x3 products
                if best is None:
                    break
                (tiles, warps), precision = best[1], "tf32x3"
            label = f"pallas {precision} {','.join(map(str, tiles))} w{warps or '-'}"
            kw = (('tiles', tiles), ('num_warps', warps), ('precision', precision), ('interpret', args.interpret))
            try:
                fwd_s, q = timed(lambda: _pallas_forward(x, k, step, b, kw), args.repeat)
                inv_s, _ = timed(lambda: bt.dequantize_inverse_pallas(flat, k, step, RECON_OFFSET, **dict(kw)), args.repeat)
            except Exception as e:  # a setting Triton cannot compile is reported, not fatal
                print(f"  {'x'.join(map(str, b)):8s} {label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            r = record(b, label, fwd_s, inv_s, float(jnp.mean(q.reshape(flat.shape) != flat)), [*tiles, warps, precision])
            if precision == "highest" and (best is None or r["forward_gvox_s"] > best[0]):
                best = (r["forward_gvox_s"], (tiles, warps))
        if best is not None:
            best_config = best[1]
    if args.json:
        C.write_json(args.json, {"benchmark": "kernels", "shape": list(args.shape), "step": args.step,
                                 "environment": C.environment(), "results": results})
        print(f"wrote {args.json}")
    return 0


@partial(jax.jit, static_argnames="b")
def _kron_forward(x, k, step, b):
    return bt.transform_quantize_reference(_to_blocks(x, b).reshape(-1, k.shape[0]), k, step, ROUNDING)


@partial(jax.jit, static_argnames=("b", "kw"))
def _pallas_forward(x, k, step, b, kw):
    """The codec's forward path (block view, then the fused kernel) with explicit kernel settings."""
    flat = _to_blocks(x, b).reshape(-1, k.shape[0])
    return bt.transform_quantize_pallas(flat, k, step, ROUNDING, **dict(kw))


if __name__ == "__main__":
    sys.exit(main())
