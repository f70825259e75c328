#!/usr/bin/env python
"""Entropy-coder benchmark: the current coefficient coder vs a reference revision's, side by side.

For each CT sample this computes the block-Tucker coefficients (block shape as the codec picks it
today, or ``--block``), quantises them with the codec's dead-zone rule at the step that gives
``--psnr`` dB in the coefficient domain, and then, for the reference coder (``entropy.py``,
``grid.py`` and ``blockcoef.py`` loaded from git revision ``--reference``) and the working tree's:

* bytes of the coefficient stream (the reference's and the relative change),
* encode and decode speed of ``code_block_coefficients`` in MVoxel/s of the volume (best of
  ``--repeat``; wall time and this process's CPU time — on a shared machine CPU time is steadier),
* that the decoded coefficients equal the input.

Only the entropy stage is timed; the transform and rate control are not. This is a benchmark, not a
test: ``python benchmarks/entropy.py --help``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# The block shape compress() picks at 45 dB for each sample (fedtensor.codec.api.AUTO_BLOCKS).
AUTO_BLOCK = {"ct_abdomen": (4, 4, 8), "ct_chest": (4, 4, 4), "ct_head_uint8": (16, 16, 8),
              "ct_series_dicom": (8, 8, 16)}
DEFAULT_REFERENCE = "755050d"  # the last commit with the binarised (one call per decision) coder
_MODULES = ("entropy", "grid", "blockcoef")


def load_reference(rev: str) -> tuple[types.ModuleType, types.ModuleType]:
    """The reference revision's ``blockcoef`` and ``entropy`` modules (its own ``grid`` behind them)."""
    root = types.ModuleType("_ref_codec")
    root.__path__ = []
    sys.modules["_ref_codec"] = root
    for name in _MODULES:
        src = subprocess.run(["git", "show", f"{rev}:fedtensor/codec/{name}.py"], cwd=C.REPO_ROOT,
                             check=True, capture_output=True, text=True).stdout
        for other in _MODULES:
            src = src.replace(f"fedtensor.codec.{other}", f"_ref_codec.{other}")
        spec = importlib.util.spec_from_loader(f"_ref_codec.{name}", loader=None)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        exec(compile(src, f"{rev}:fedtensor/codec/{name}.py", "exec"), mod.__dict__)
    return sys.modules["_ref_codec.blockcoef"], sys.modules["_ref_codec.entropy"]


def coefficients(x: np.ndarray, b, psnr: float) -> tuple[np.ndarray, tuple]:
    """Dead-zone quantised block-Tucker coefficients of ``x`` at ``psnr`` (coefficient domain), rounded
    band by band as the codec rounds them."""
    import jax.numpy as jnp

    from fedtensor.codec.quantize import band_rounding
    from fedtensor.tensor.block import block_bases, block_grid, project, to_blocks

    x = x.astype(np.float32)
    x = (x - x.mean()) / (float(x.max()) - float(x.min()))
    blocks = to_blocks(jnp.asarray(x), b)
    c = np.asarray(project(blocks, block_bases(blocks, b)), np.float64)
    rounding = band_rounding(tuple(b))
    max_sse = x.size * 10 ** (-psnr / 10)
    lo, hi = 1e-6, 1.0
    for _ in range(40):  # geometric bisection on the step: error grows with it
        step = (lo * hi) ** 0.5
        q = np.sign(c) * np.floor(np.abs(c) / step + rounding)
        sse = float(np.sum((c - q * step) ** 2))
        lo, hi = (step, hi) if sse <= max_sse else (lo, step)
    q = (np.sign(c) * np.floor(np.abs(c) / lo + rounding)).astype(np.int32)
    return q, block_grid(x.shape, b)


def best_of(fn, repeat: int) -> tuple[float, float, object]:
    """(best wall s, best CPU s, last result) over ``repeat`` calls after one warm-up."""
    out = fn()
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu), out


def run_coder(blockcoef, entropy, q, grid, b, repeat: int) -> dict:
    def encode():
        s = entropy.BinaryStream()
        blockcoef.code_block_coefficients(s, grid, b, q)
        return s.finish()

    ew, ec, payload = best_of(encode, repeat)
    words = np.frombuffer(payload, np.uint32)
    dw, dc, out = best_of(lambda: blockcoef.code_block_coefficients(entropy.BinaryStream(words), grid, b), repeat)
    if not np.array_equal(out, q):
        raise SystemExit("decoded coefficients differ from the input")
    return {"bytes": len(payload), "enc_wall_s": ew, "enc_cpu_s": ec, "dec_wall_s": dw, "dec_cpu_s": dc}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", nargs="+", default=list(C.CT_VOLUMES), metavar="NAME")
    ap.add_argument("--data", type=Path, default=C.default_data_dir())
    ap.add_argument("--psnr", type=float, default=45.0, help="target PSNR of the quantisation (default 45)")
    ap.add_argument("--block", type=int, nargs=3, help="block shape (default: the codec's choice per sample)")
    ap.add_argument("--reference", default=DEFAULT_REFERENCE,
                    help=f"git revision holding the old coder (default {DEFAULT_REFERENCE})")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement, best kept (default 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)

    from fedtensor.codec import blockcoef, entropy

    ref_blockcoef, ref_entropy = load_reference(args.reference)
    rows, results = [], []
    for name in args.volumes:
        path = C.resolve_volume_path(name, args.data)
        label = C.volume_label(path)
        vol = C.load_volume(path)
        b = tuple(args.block) if args.block else AUTO_BLOCK.get(label, (8, 8, 8))
        q, grid = coefficients(np.asarray(vol.data), b, args.psnr)
        n = int(np.prod(vol.data.shape))
        old = run_coder(ref_blockcoef, ref_entropy, q, grid, b, args.repeat)
        new = run_coder(blockcoef, entropy, q, grid, b, args.repeat)
        r = {"volume": label, "block": b, "voxels": n, "nonzero": int(np.count_nonzero(q)), "old": old, "new": new}
        results.append(r)
        mv = lambda s: C.mvoxels_per_s(n, s)  # noqa: E731
        speed = lambda key: f"{mv(old[key]):.1f} → {mv(new[key]):.1f}"  # noqa: E731
        rows.append([label, "×".join(map(str, b)), f"{8 * new['bytes'] / n:.4f}",
                     f"{new['bytes'] / old['bytes'] - 1:+.3%}",
                     speed("enc_cpu_s"), f"{old['enc_cpu_s'] / new['enc_cpu_s']:.1f}×",
                     speed("dec_cpu_s"), f"{old['dec_cpu_s'] / new['dec_cpu_s']:.1f}×",
                     speed("enc_wall_s"), speed("dec_wall_s")])
        print(f"{label}: " + "  ".join(rows[-1][2:]), flush=True)
    C.print_table(
        f"Coefficient entropy coder at {args.psnr:g} dB: reference {args.reference} → working tree "
        f"(best of {args.repeat})",
        ["volume", "block", "bpv (coef.)", "bytes vs ref", "enc CPU MVox/s", "enc ×", "dec CPU MVox/s", "dec ×",
         "enc wall MVox/s", "dec wall MVox/s"],
        rows,
        caption="MVoxel/s of the volume through code_block_coefficients alone; CPU = this process's CPU time.",
    )
    if args.json:
        C.write_json(args.json, {"environment": C.environment(), "psnr": args.psnr, "reference": args.reference,
                                 "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
