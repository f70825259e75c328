#!/usr/bin/env python
"""Is the encoder bit-reproducible across processes? Not a test.

Encodes each volume at each PSNR target in ``--processes`` fresh Python processes (one after the
other, each encoding every point) and compares the streams' SHA-256 digests point by point. On a CPU
the streams agree; on a GPU XLA may pick kernels by timing them, or sum with atomics, so two
processes can differ — run it once as is and once under ``XLA_FLAGS=--xla_gpu_deterministic_ops=true``
to see whether that flag makes the GPU encoder reproducible::

    python benchmarks/reproducibility.py --volumes ct_chest.nii.gz ct_head_uint8.nii.gz --targets 38 40 42

Prints one row per point (the digests' prefixes, the sizes, and whether all processes agree) and the
backend; ``--json`` keeps them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def encode_points(volumes: list[str], targets: list[float], data_dir: Path) -> dict:
    """In this process: ``{"backend", "seconds", "points": {"vol@target": [sha256, bytes]}}``."""
    import jax

    from fedtensor.codec import compress

    t0, points = time.perf_counter(), {}
    for name in volumes:
        volume = C.load_volume(C.resolve_volume_path(name, data_dir))
        for target in targets:
            blob = compress(volume, psnr=target)
            points[f"{C.volume_label(Path(name))}@{target:g}"] = [hashlib.sha256(blob).hexdigest(), len(blob)]
    return {"backend": jax.default_backend(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "seconds": time.perf_counter() - t0, "points": points}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", nargs="+", default=list(C.CT_VOLUMES))
    ap.add_argument("--targets", nargs="+", type=float, default=[38.0, 40.0, 42.0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    data_dir = args.data or C.default_data_dir()
    if args.worker:
        print(json.dumps(encode_points(args.volumes, args.targets, data_dir)))
        return 0

    runs = []
    for i in range(args.processes):
        cmd = [sys.executable, __file__, "--worker", "--data", str(data_dir), "--volumes", *args.volumes,
               "--targets", *map(str, args.targets)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout  # stderr passes through
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(f"process {i + 1}: {runs[-1]['seconds']:.1f} s on {runs[-1]['backend']}", file=sys.stderr, flush=True)
    rows, agree = [], 0
    for point in runs[0]["points"]:
        digests = [r["points"][point] for r in runs]
        same = len({d[0] for d in digests}) == 1
        agree += same
        rows.append([point, " ".join(d[0][:10] for d in digests), " ".join(str(d[1]) for d in digests),
                     "yes" if same else "NO"])
    C.print_table(f"Stream digests over {args.processes} processes (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})",
                  ["point", "sha256 prefixes", "bytes", "identical"], rows,
                  caption=f"{agree} / {len(rows)} points identical; backend {runs[0]['backend']}")
    if args.json:
        C.write_json(args.json, {"environment": C.environment(), "runs": runs, "identical": agree,
                                 "points": len(rows)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
