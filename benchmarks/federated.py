"""Client updates per second: the vmapped federated simulation vs the per-client Python loop.

For each K, one FedAvg round (local training of every client + aggregation) on the same data and seeds,
both ways, each compiled first (a warm-up round), then timed alternately ``--repeat`` times (best
kept), so both see the same machine load; prints the speed-up. Models:

* ``restoration`` (default): the real restoration net (:mod:`fedtensor.nn`, small config: channels
  8/16, 16³ patches, batch 4) on random patches, the same loss function both ways (on a CPU its
  convolutions run one per client under vmap, see :mod:`fedtensor.nn.conv`).
* ``mlp``: a small residual MLP on 8³ patches (~0.27 M parameters).

    python benchmarks/federated.py --model restoration --clients 8 32 128
    python benchmarks/federated.py --model mlp --clients 8 32 128

``--secure`` times instead the vmapped round with secure aggregation against the same round with plain
FedAvg (the issue's "secure round ≤ 2× the plain round"; ``benchmarks/secagg.py`` has the aggregation
alone, message by message):

    python benchmarks/federated.py --secure --clients 32 --channels 56,112   # ≈ 1 M parameters
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedtensor.federated.simulation import ClientData, FedConfig, Server, run_round, run_round_looped


def mlp_problem(k: int, seed: int = 0):
    def loss_fn(params, x, y):
        h = jax.nn.silu(x @ params["w1"] + params["b1"])
        return jnp.mean(jnp.square(x + h @ params["w2"] - y))

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(k):
        n = int(rng.integers(32, 96))
        x = rng.standard_normal((n, 512)).astype(np.float32)
        xs.append(x)
        ys.append((x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32))
    params = {"w1": jnp.asarray(rng.standard_normal((512, 256)) * 0.02, jnp.float32), "b1": jnp.zeros(256),
              "w2": jnp.zeros((256, 512), jnp.float32)}
    return ClientData.from_lists(xs, ys), params, loss_fn


def restoration_problem(k: int, args, seed: int = 0):
    from flax import nnx

    from fedtensor.federated.restoration import restoration_loss
    from fedtensor.nn.model import IN_CHANNELS, NetConfig, new_net

    net_config = NetConfig(channels=tuple(int(c) for c in args.channels.split(",")))
    loss = restoration_loss(net_config)
    params = nnx.state(new_net(net_config, seed=seed), nnx.Param)
    rng = np.random.default_rng(seed)
    p = args.patch
    n_avg = args.local_steps * args.batch_size
    xs, ys = [], []
    for _ in range(k):
        n = int(rng.integers(n_avg // 2, 3 * n_avg // 2 + 1))  # unequal clients: padding and masks
        xs.append((rng.standard_normal((n, p, p, p, IN_CHANNELS)).astype(np.float32),
                   rng.standard_normal((n, 4)).astype(np.float32)))
        ys.append((rng.standard_normal((n, p, p, p, 1)).astype(np.float32), np.ones((n, p, p, p, 1), np.float32)))
    return ClientData.from_lists(xs, ys), params, loss


def one_round(fn, loss_fn, data, params, cfg, r, secure=False):
    server = Server(params, cfg)
    t = time.perf_counter()
    kw = {"secure": secure, "round_id": r} if fn is run_round else {}
    fn(loss_fn, server, data, jax.random.PRNGKey(r), np.random.default_rng(r), **kw)
    jax.block_until_ready(server.params)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("restoration", "mlp"), default="restoration")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--channels", default="8,16")
    ap.add_argument("--chunk", type=int, default=8, help="clients per vmapped chunk")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--secure", action="store_true",
                    help="instead: the vmapped round with secure aggregation vs the same round with plain FedAvg")
    args = ap.parse_args()
    cfg = FedConfig(local_steps=args.local_steps, batch_size=args.batch_size, client_chunk=args.chunk)
    what = (f"restoration net, channels {args.channels}, {args.patch}³ patches"
            if args.model == "restoration" else "residual MLP 512-256-512")
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); {what}; local steps {cfg.local_steps}, "
          f"batch {cfg.batch_size}, chunk {cfg.client_chunk}; best of {args.repeat} alternating runs after a compile round")
    if args.secure:
        return secure_vs_plain(args, cfg)
    print(f"{'K':>5} {'vmapped s':>10} {'looped s':>10} {'vmap upd/s':>11} {'loop upd/s':>11} {'speed-up':>9}", flush=True)
    for k in args.clients:
        data, params, loss_fn = (restoration_problem(k, args) if args.model == "restoration" else mlp_problem(k))
        for fn in (run_round, run_round_looped):  # compile
            one_round(fn, loss_fn, data, params, cfg, 0)
        tv = tl = float("inf")
        for r in range(1, args.repeat + 1):
            tv = min(tv, one_round(run_round, loss_fn, data, params, cfg, r))
            tl = min(tl, one_round(run_round_looped, loss_fn, data, params, cfg, r))
        print(f"{k:>5} {tv:>10.3f} {tl:>10.3f} {k / tv:>11.2f} {k / tl:>11.2f} {tl / tv:>8.2f}x", flush=True)


def secure_vs_plain(args, cfg) -> None:
    """A whole simulated round (local training of every client + aggregation), with secure aggregation
    (every client masks its update, the server unmasks the sum; one process, so the clients' masking
    runs one after the other: the slowest case) against plain FedAvg."""
    print(f"{'K':>5} {'params':>9} {'plain s':>9} {'secure s':>9} {'secure/plain':>13}", flush=True)
    for k in args.clients:
        data, params, loss_fn = (restoration_problem(k, args) if args.model == "restoration" else mlp_problem(k))
        n_params = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(params))
        for secure in (False, True):  # compile
            one_round(run_round, loss_fn, data, params, cfg, 0, secure)
        tp = ts = float("inf")
        for r in range(1, args.repeat + 1):
            tp = min(tp, one_round(run_round, loss_fn, data, params, cfg, r, False))
            ts = min(ts, one_round(run_round, loss_fn, data, params, cfg, r, True))
        print(f"{k:>5} {n_params:>9,} {tp:>9.3f} {ts:>9.3f} {ts / tp:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
