#!/usr/bin/env python
"""Cost of one secure-aggregation round (Bonawitz et al. 2017, ``fedtensor.federated.secagg``) against
plain aggregation, at K clients (default 32) and m parameters (default 1,000,000).

What is timed (wall clock, best of ``--repeat`` after one warm-up, one process, one core):

* **plain (bare)** — the server's ``np.sum`` over the K float32 update vectors (already stacked, as they
  would be after arriving in one buffer);
* **plain + fixed point** — the same with the encoding the secure round uses: each client encodes its
  update to uint32 (``FixedPoint.encode``), the server sums mod 2^32 and decodes;
* **secure** — the full protocol through ``SecAggClient`` / ``SecAggServer`` (no transport, messages are
  passed in memory), each call timed on its own. Client-side figures are per client (mean and max over
  the K clients, all four rounds); server-side figures are the server's calls. "Round, sequential" is
  everything one after the other in this process; "round, parallel clients" is the critical path if the
  K clients run concurrently: Σ over rounds of (slowest client + server).

Bytes on the wire are the canonical encoding (``secagg.encode``) of every message, client → server
(upload) and server → client (download); the plain round uploads 4·m bytes per client (float32).

The issue's target is "secure round ≤ 2× the plain round". A plain round also contains local training,
which this script leaves out (``benchmarks/federated.py --secure`` times whole rounds, training
included), so this prints (a) the ratio against bare aggregation — necessarily huge,
since that is a single memory-bound sum — and (b) the per-client overhead in milliseconds, the figure to
compare with one client's local-training time once it exists.

This is a benchmark, not a test. ``python benchmarks/secagg.py --help`` for the options.
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

from fedtensor.federated.secagg import (  # noqa: E402
    FixedPoint,
    RandomSource,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    wire_size,
)
from fedtensor.federated.secagg import primitives as P  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# one secure round, every call timed
# --------------------------------------------------------------------------------------------------


def secure_round(updates, threshold: int, drops: set[int], clip: float, seed=None) -> dict:
    k, m = len(updates), updates[0].size
    fp = FixedPoint.auto(clip, k)
    params = SecAggParams(round_id=1, num_clients=k, threshold=threshold, vector_length=m, fixed_point=fp)
    ids = list(range(1, k + 1))
    server = SecAggServer(params, ids)
    clients = [SecAggClient(i, params, rng=RandomSource(seed, str(i)) if seed is not None else None) for i in ids]
    ct = {i: [0.0, 0.0, 0.0, 0.0] for i in ids}  # per client, per round
    st = [0.0, 0.0, 0.0, 0.0]
    up = {i: 0 for i in ids}
    down = {i: 0 for i in ids}
    clock = time.perf_counter

    def timed(bucket, idx, fn, *a):
        t0 = clock()
        r = fn(*a)
        bucket[idx] += clock() - t0
        return r

    for c in clients:
        msg = timed(ct[c.id], 0, c.advertise_keys)
        up[c.id] += wire_size(msg)
        timed(st, 0, server.receive_advertise, msg)
    keys = timed(st, 0, server.broadcast_keys)
    for c in clients:
        down[c.id] += wire_size(keys)
        msg = timed(ct[c.id], 1, c.share_keys, keys)
        up[c.id] += wire_size(msg)
        timed(st, 1, server.receive_shares, msg)
    fwd = timed(st, 1, server.forward_shares)
    for c, x in zip(clients, updates):
        down[c.id] += wire_size(fwd[c.id])
        if c.id - 1 in drops:
            continue
        msg = timed(ct[c.id], 2, c.mask_input, fwd[c.id], x)
        up[c.id] += wire_size(msg)
        timed(st, 2, server.receive_masked_input, msg)
    req = timed(st, 2, server.unmask_request)
    for c in clients:
        if c.id - 1 in drops:
            continue
        down[c.id] += wire_size(req)
        msg = timed(ct[c.id], 3, c.unmask, req)
        up[c.id] += wire_size(msg)
        timed(st, 3, server.receive_unmask, msg)
    res = timed(st, 3, server.finalize)

    alive = [i for i in ids if i - 1 not in drops]
    ref = np.sum(np.stack([updates[i - 1] for i in alive]).astype(np.float64), axis=0)
    err = float(np.max(np.abs(res.sum - ref)))
    per_client = [sum(ct[i]) for i in alive]
    return {
        "client_s_mean": statistics.fmean(per_client),
        "client_s_max": max(per_client),
        "client_round_s_mean": [statistics.fmean(ct[i][r] for i in alive) for r in range(4)],
        "server_s": sum(st),
        "server_round_s": st,
        "sequential_s": sum(sum(v) for v in ct.values()) + sum(st),
        "parallel_s": sum(max(ct[i][r] for i in ids) + st[r] for r in range(4)),
        "upload_bytes_per_client": statistics.fmean(up[i] for i in alive),
        "download_bytes_per_client": statistics.fmean(down[i] for i in alive),
        "total_bytes": sum(up.values()) + sum(down.values()),
        "max_abs_error": err,
        "tolerance": res.tolerance,
        "survivors": len(res.survivors),
        "scale": fp.scale,
    }


def best_of(fn, repeat: int) -> dict:
    fn()  # warm-up
    runs = [fn() for _ in range(repeat)]
    return min(runs, key=lambda r: r["sequential_s"])


# --------------------------------------------------------------------------------------------------
# plain baselines and PRG micro-benchmark
# --------------------------------------------------------------------------------------------------


def plain_rounds(updates, clip: float, repeat: int) -> dict:
    k = len(updates)
    stacked = np.stack(updates)
    bare = C.time_best(lambda: np.sum(stacked, axis=0), repeat=repeat)
    fp = FixedPoint.auto(clip, k)
    enc_t = C.time_best(lambda: [fp.encode(u) for u in updates], repeat=repeat)
    enc = np.stack(enc_t.result)
    sum_t = C.time_best(lambda: fp.decode_sum(np.sum(enc, axis=0, dtype=np.uint32)), repeat=repeat)
    return {
        "bare_sum_s": bare.best_s,
        "encode_per_client_s": enc_t.best_s / k,
        "fixed_point_server_s": sum_t.best_s,
        "fixed_point_round_s": enc_t.best_s + sum_t.best_s,
        "fixed_point_parallel_s": enc_t.best_s / k + sum_t.best_s,
        "upload_bytes_per_client": updates[0].nbytes,
    }


def prg_micro(m: int, n_streams: int, repeat: int) -> dict:
    """Throughput of mask expansion: keystream only (three ciphers) and the full add_masks hot path."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    out = {}
    ch = min(P.CHUNK_WORDS, m)
    zeros, buf = bytes(4 * ch), bytearray(4 * ch + 15)
    m = ch * (m // ch)  # whole chunks only
    makers = {
        "AES-128-CTR": lambda: Cipher(algorithms.AES(bytes(range(16))), modes.CTR(bytes(16))).encryptor(),
        "AES-256-CTR": lambda: Cipher(algorithms.AES(bytes(range(32))), modes.CTR(bytes(16))).encryptor(),
        "ChaCha20": lambda: Cipher(algorithms.ChaCha20(bytes(range(32)), bytes(16)), None).encryptor(),
    }
    for name, mk in makers.items():
        def run(mk=mk):
            encs = [mk() for _ in range(n_streams)]
            for _ in range(0, m, ch):
                for e in encs:
                    e.update_into(zeros, buf)

        t = C.time_best(run, repeat=repeat)
        out[name] = 4 * m * n_streams / t.best_s / 1e9
    acc = np.zeros(m, dtype=P.WORD)
    seeds = [bytes([i]) * 16 for i in range(n_streams)]
    t = C.time_best(lambda: P.add_masks(acc, seeds[: n_streams // 2], seeds[n_streams // 2 :]), repeat=repeat)
    out["add_masks"] = 4 * m * n_streams / t.best_s / 1e9
    out["add_masks_ms_per_expansion"] = t.best_s / n_streams * 1e3
    return out


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32, help="K (default 32)")
    ap.add_argument("--params", type=int, default=1_000_000, help="m, coordinates per update (default 1,000,000)")
    ap.add_argument("--threshold", type=int, default=None, help="t (default ⌊2K/3⌋ + 1)")
    ap.add_argument("--dropouts", type=int, nargs="*", default=[0, 3], help="dropouts after masking to run (default 0 3)")
    ap.add_argument("--clip", type=float, default=1.0, help="fixed-point clip range (default 1.0)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per figure, best kept (default 2)")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure as JSON")
    args = ap.parse_args(argv)

    k, m = args.clients, args.params
    t = args.threshold or (2 * k) // 3 + 1
    rng = np.random.default_rng(0)
    updates = [rng.uniform(-args.clip, args.clip, m).astype(np.float32) for _ in range(k)]
    log(f"K={k} clients, m={m:,} parameters, threshold t={t}, repeat={args.repeat}")

    log("plain baselines ...")
    plain = plain_rounds(updates, args.clip, args.repeat)
    log("PRG micro-benchmark ...")
    prg = prg_micro(m, 8, args.repeat)
    secure = {}
    for d in args.dropouts:
        if d > k - t:
            log(f"skipping {d} dropouts: more than K − t = {k - t}, the round would abort")
            continue
        log(f"secure round, {d} dropouts after masking ...")
        secure[d] = best_of(lambda d=d: secure_round(updates, t, set(range(1, 1 + d)), args.clip), args.repeat)

    ms = lambda s: C.fmt(1e3 * s, ".1f")  # noqa: E731
    mb = lambda b: C.fmt(b / 1e6, ".3f")  # noqa: E731
    rows = [
        ["plain: np.sum of K float32 vectors", "—", ms(plain["bare_sum_s"]), ms(plain["bare_sum_s"]), ms(plain["bare_sum_s"]), mb(plain["upload_bytes_per_client"]), "—"],
        ["plain + fixed-point encode/sum/decode", ms(plain["encode_per_client_s"]), ms(plain["fixed_point_server_s"]),
         ms(plain["fixed_point_round_s"]), ms(plain["fixed_point_parallel_s"]), mb(4 * m), "—"],
    ]  # fmt: skip
    for d, r in secure.items():
        rows.append([
            f"secure, {d} dropouts after masking",
            f"{ms(r['client_s_mean'])} (max {ms(r['client_s_max'])})",
            ms(r["server_s"]), ms(r["sequential_s"]), ms(r["parallel_s"]),
            mb(r["upload_bytes_per_client"]), mb(r["download_bytes_per_client"]),
        ])  # fmt: skip
    C.print_table(
        f"Secure aggregation vs plain, K={k}, m={m:,}, t={t} (ms; MB per client)",
        ["round", "client ms", "server ms", "round ms, sequential", "round ms, parallel clients", "upload MB", "download MB"],
        rows,
        caption="client = one client's compute over all rounds (mean over clients); parallel = Σ_rounds (slowest client + server).",
    )
    rrows = []
    for d, r in secure.items():
        rrows.append([
            f"{d} drop",
            C.fmt(r["parallel_s"] / plain["bare_sum_s"], ".0f") + "×",
            C.fmt(r["parallel_s"] / plain["fixed_point_parallel_s"], ".1f") + "×",
            C.fmt(r["sequential_s"] / plain["bare_sum_s"], ".0f") + "×",
            ms(r["client_s_mean"] - plain["encode_per_client_s"]),
            ms(r["server_s"] - plain["bare_sum_s"]),
            C.fmt(r["upload_bytes_per_client"] / plain["upload_bytes_per_client"], ".4f") + "×",
            f"{r['max_abs_error']:.2e} ≤ {r['tolerance']:.2e}",
        ])  # fmt: skip
    C.print_table(
        "Ratios",
        ["secure", "(a) par / bare", "par / fixed-pt", "seq / bare", "(b) client +ms", "server +ms", "upload ×", "max |err| ≤ tol"],
        rrows,
        caption="par = parallel clients, seq = sequential, bare = np.sum only, fixed-pt = plain round with the same encoding; "
        "client/server +ms = overhead over the plain+fixed-point client / bare server. Whole rounds, local training "
        "included: benchmarks/federated.py --secure.",
    )  # fmt: skip
    prow = [[name, C.fmt(v, ".2f")] for name, v in prg.items() if name != "add_masks_ms_per_expansion"]
    C.print_table("Mask expansion throughput, 8 streams × m words, chunked", ["PRG", "GB/s keystream"], prow)
    print(
        f"add_masks (AES-128-CTR keystream + uint32 add/sub, the hot path): {prg['add_masks_ms_per_expansion']:.2f} ms per "
        f"m-word expansion; a client does K = {k} (1 self + K − 1 pairwise), the server |U3| + |U3|·dropouts."
    )
    if args.json:
        C.write_json(args.json, {
            "config": {"clients": k, "params": m, "threshold": t, "clip": args.clip, "repeat": args.repeat},
            "plain": plain, "secure": {str(d): r for d, r in secure.items()}, "prg_gbps": prg, "environment": C.environment(),
        })  # fmt: skip
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
