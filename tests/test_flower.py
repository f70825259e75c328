"""The Flower deployment of federated training (fedtensor.federated.flower, examples/federation).

Fast tests: parameter conversion, run-config/node-config parsing, and one real ClientApp training call
through Flower's Message API, in process, on crops of a real CT volume. Slow test: a real deployment on
127.0.0.1 — a SuperLink, three SuperNode processes, ``flwr run`` of two SecAgg+ rounds — whose global
models must load and equal plain FedAvg of the clients' own (audited) updates within SecAgg+'s
fixed-point tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Message, Metadata, RecordDict  # noqa: E402
from flwr.app.message_type import MessageType  # noqa: E402
import flwr.compat.common.recorddict_compat as compat  # noqa: E402
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402

from fedtensor.federated.flower import task  # noqa: E402
from fedtensor.nn.model import NetConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CT_HEAD = REPO / "examples" / "data" / "ct_head_uint8.nii.gz"
TINY = NetConfig(channels=(8, 16), cond_hidden=16)
# tiny model, short local training, one codec operating point: small enough for a CI check
TINY_RUN = {"local-steps": 3, "batch": 2, "patch": 16, "channels": "8,16", "cond-hidden": 16, "targets": "40",
            "blocks": "8", "max-weight": 64.0, "clipping-range": 0.5}
CROPS = [(slice(40, 88), slice(60, 108), slice(5, 53)), (slice(90, 138), slice(120, 168), slice(5, 53)),
         (slice(60, 108), slice(150, 198), slice(5, 53))]


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> list[Path]:
    """Three 48³ crops of the real head CT (different anatomy), one per hospital."""
    import nibabel as nib

    vol = np.asarray(nib.load(CT_HEAD).dataobj)
    d = tmp_path_factory.mktemp("crops")
    out = []
    for i, sl in enumerate(CROPS):
        p = d / f"hospital{i}.npy"
        np.save(p, np.ascontiguousarray(vol[sl]))
        out.append(p)
    return out


def _params(seed: int = 0):
    from flax import nnx

    from fedtensor.nn.model import new_net

    return nnx.state(new_net(TINY, seed=seed), nnx.Param)


# ------------------------------------------------------------------------------ conversion & config


def test_ndarrays_round_trip_keeps_every_array_at_least_1d():
    params = _params()
    arrays = task.to_ndarrays(params)
    assert all(a.ndim >= 1 and a.dtype == np.float32 for a in arrays)
    back = task.from_ndarrays([a.astype(np.float64) for a in arrays], TINY)  # SecAgg+ returns float64
    for a, b in zip(arrays, task.to_ndarrays(back)):
        np.testing.assert_array_equal(a, b)
    # a scalar leaf travels as shape (1,) and comes back 0-d
    import jax

    scalar_tree = {"s": np.float32(3.5), "v": np.ones(2, np.float32)}
    assert [a.shape for a in task.to_ndarrays(scalar_tree)] == [(1,), (2,)]
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)


def test_array_record_round_trip_and_mismatch_errors():
    params = _params()
    rec = task.to_array_record(params)
    back = task.from_array_record(rec, TINY)
    for a, b in zip(task.to_ndarrays(params), task.to_ndarrays(back)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(task.FederationError, match="values, expected shape"):
        task.from_array_record(rec, NetConfig((4, 8), 16))  # same names, other widths
    rec.pop(next(iter(rec.keys())))
    with pytest.raises(task.FederationError, match="does not match this architecture"):
        task.from_array_record(rec, TINY)
    arrays = task.to_ndarrays(params)
    with pytest.raises(task.FederationError, match="expected 26 parameter arrays"):
        task.from_ndarrays(arrays[:-1], TINY)
    with pytest.raises(task.FederationError, match="values, expected shape"):
        task.from_ndarrays([*arrays[:-1], np.zeros(3, np.float32)], TINY)


def test_run_config_parsing_and_errors():
    s = task.FedSettings.from_run_config({"num-server-rounds": 2, "channels": "8,16", "targets": "38, 42",
                                           "secure": "false", "min-clients": 1})
    assert (s.rounds, s.channels, s.targets, s.secure) == (2, (8, 16), (38.0, 42.0), False)
    assert s.secagg_workflow_args()["num_shares"] == 1.0
    with pytest.raises(task.FederationError, match="unknown run config key"):
        task.FedSettings.from_run_config({"rounds": 2})
    with pytest.raises(task.FederationError, match="patch must be a multiple of 4"):
        task.FedSettings.from_run_config({"patch": 18})
    with pytest.raises(task.FederationError, match="min-clients ≥ 3"):
        task.FedSettings.from_run_config({"min-clients": 1})


def test_node_volumes_by_list_and_by_partition(tmp_path, crops):
    assert task.node_volumes({"data": f"{crops[0]}, {crops[1]}"}) == [crops[0], crops[1]]
    d = tmp_path / "site"
    d.mkdir()
    for i in range(5):
        shutil.copy(crops[0], d / f"v{i}.npy")
    (d / "notes.txt").write_text("not a volume")
    got = task.node_volumes({"data-dir": str(d), "partition-id": 1, "num-partitions": 2})
    assert [p.name for p in got] == ["v1.npy", "v3.npy"]
    with pytest.raises(task.FederationError, match="partition-id must be in"):
        task.node_volumes({"data-dir": str(d), "partition-id": 2, "num-partitions": 2})
    with pytest.raises(task.FederationError, match="volume not found"):
        task.node_volumes({"data": str(tmp_path / "missing.nii.gz")})
    with pytest.raises(task.FederationError, match="node config needs"):
        task.node_volumes({})


# ------------------------------------------------------------------------------ ClientApp, in process


def _train_message(arrays, rnd: int = 1) -> Message:
    content = compat.fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(arrays), {"round": rnd, "net": task.net_config_to_str(TINY)}), True)
    md = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id=str(rnd),
                  created_at=time.time(), ttl=3600.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=md)


def test_client_app_trains_on_real_data_through_the_message_api(tmp_path, crops):
    from fedtensor.federated.flower.client_app import app

    arrays = task.to_ndarrays(_params())
    node = {"data": str(crops[0]), "cache-dir": str(tmp_path / "cache"), "audit-dir": str(tmp_path / "audit"),
            "allow-plain-updates": True}
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={**TINY_RUN, "min-clients": 4})
    reply = app(_train_message(arrays), ctx)
    assert not reply.has_error(), reply.error
    res = compat.recorddict_to_fitres(reply.content, False)
    delta = parameters_to_ndarrays(res.parameters)
    assert res.num_examples == 27  # 48³ voxels in 16³ patches
    assert [d.shape for d in delta] == [a.shape for a in arrays]
    assert 0 < max(float(np.abs(d).max()) for d in delta) < TINY_RUN["clipping-range"]
    assert np.isfinite(res.metrics["train_loss"]) and res.metrics["train_loss"] > 0
    # the node's audit copy holds exactly the update it sent
    import safetensors.numpy as stn

    saved = stn.load_file(str(tmp_path / "audit" / "run-1-round-0001.safetensors"))
    _, paths, _ = task._template(TINY)
    for p, d in zip(paths, delta):
        np.testing.assert_array_equal(saved[p], d)
    # a node refuses to send its update in the clear unless its own config allows it
    strict = Context(run_id=1, node_id=7, node_config={k: v for k, v in node.items() if k != "allow-plain-updates"},
                     state=RecordDict(), run_config={**TINY_RUN, "min-clients": 4})
    with pytest.raises(task.FederationError, match="only inside secure aggregation"):
        app(_train_message(arrays), strict)


@pytest.mark.parametrize("secure", [True, False])
def test_fit_metrics_say_nothing_of_the_delta_under_secure_aggregation(monkeypatch, secure):
    """SecAgg+ masks the arrays only; a node's metrics reach the server in the clear."""
    from fedtensor.federated.flower import client_app as ca

    secret = np.array([0.0123, -0.4567], np.float32)
    for name, stub in {"node_volumes": lambda nc: ["volume"], "load_sources": lambda *a: None,
                       "_persistent_compilation_cache": lambda d: None, "from_ndarrays": lambda a, cfg: a,
                       "to_ndarrays": lambda p: p, "num_examples": lambda s, patch: 7,
                       "net_config_from_str": lambda s: None,
                       "local_update": lambda g, *a: ([g[0] + secret], [1.0, 0.5])}.items():
        monkeypatch.setattr(ca, name, stub)  # the training itself is tested above
    client = ca.RestorationClient.__new__(ca.RestorationClient)
    client.settings, client.node_config, client.run_id = task.FedSettings(secure=secure), {}, 1
    delta, n, metrics = client.fit([np.zeros(2, np.float32)], {"net": "", "round": 1})
    np.testing.assert_array_equal(delta[0], secret)
    assert metrics["train_loss"] == 0.75 and n == 7
    assert ("max_abs_delta" in metrics) is not secure
    if secure:
        assert not any(np.isclose(v, abs(secret).max()) for v in metrics.values())


def test_server_strategy_applies_weighted_mean_delta_and_writes_versions(tmp_path):
    """DeltaFedAvg + GlobalModelWriter without a network: plain FedAvg of two fake clients' deltas."""
    from flwr.common import Code, FitRes, Status

    from fedtensor.federated.flower.server_app import DeltaFedAvg, GlobalModelWriter
    from fedtensor.nn import load_model
    from fedtensor.serve.store import ModelStore

    g0 = task.to_ndarrays(_params())
    rng = np.random.default_rng(0)
    deltas = [[rng.normal(0, 1e-3, a.shape).astype(np.float32) for a in g0] for _ in range(2)]
    settings = task.FedSettings.from_run_config({**TINY_RUN, "store-dir": str(tmp_path / "store")})
    writer = GlobalModelWriter(tmp_path / "out", TINY, settings, run_id=5)
    writer.write(0, g0, {})
    strat = DeltaFedAvg(g0, TINY, 2, writer.write)

    class Proxy:
        def __init__(self, cid):
            self.cid = cid

    results = [(Proxy(str(i)), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(d), n, {"train_loss": 1.0 + i}))
               for i, (d, n) in enumerate(zip(deltas, (1, 3)))]
    strat.aggregate_fit(1, results, [])
    want = [g + (1 * a + 3 * b) / 4 for g, a, b in zip(g0, deltas[0], deltas[1])]
    model = load_model(tmp_path / "out" / "round-0001")
    from flax import nnx

    got = task.to_ndarrays(nnx.state(model.net, nnx.Param))
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-7)
    latest = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert latest["round"] == 1 and latest["loss"] == pytest.approx(1.75) and latest["store_version"] == 1
    store = ModelStore(tmp_path / "store")
    assert store.latest().meta["n_clients"] == 2 and store.latest().sha256 == latest["model_id"]
    with pytest.raises(task.FederationError, match="already holds"):
        GlobalModelWriter(tmp_path / "out", TINY, settings, run_id=6)


@pytest.mark.parametrize("config,why", [
    ({"reconstruction-threshold": 0.5}, "with 4 nodes, .* a threshold of 2 of 4 shares"),
    ({"reconstruction-threshold": 0.51, "min-clients": 5}, "with 6 nodes, .* a threshold of 3 of 6 shares"),
    ({"reconstruction-threshold": 1.5}, "whole number of nodes"),
    ({"reconstruction-threshold": 3, "num-shares": 6}, "a threshold of 3 of 6 shares"),
    ({"num-shares": 0}, "num-shares must be"),
    ({"min-clients": 2}, "min-clients ≥ 3"),
    ({"min-clients": 3}, "with 3 nodes, .* a threshold of 2 of 3 shares"),  # 0.67 · 3 rounds to 2
])
def test_secure_settings_that_would_expose_a_node_are_refused(config, why):
    """Refused at start, for every node count a run may see, rather than by every node at run time."""
    with pytest.raises(task.FederationError, match=why):
        task.FedSettings.from_run_config(config)


def test_the_threshold_resolution_follows_flower():
    """The per-round resolution of fractions in Flower 1.42's SecAggPlusWorkflow.setup_stage."""
    assert task.secaggplus_shares(1.0, 0.67, 3) == (3, 2)
    assert task.secaggplus_shares(1.0, 0.67, 4) == (4, 3)
    assert task.secaggplus_shares(0.5, 0.67, 10) == (5, 3)  # 5 shares: odd already
    assert task.secaggplus_shares(0.4, 0.67, 10) == (5, 3)  # 4 shares, even and below 10: made 5
    assert task.secaggplus_shares(1.0, 1.0, 3) == (3, 3)
    task.FedSettings.from_run_config({"min-clients": 3, "reconstruction-threshold": 1.0})
    task.FedSettings.from_run_config({})  # the defaults: 4 nodes or more at 0.67


def test_a_node_refuses_a_secagg_setup_that_would_expose_it_or_wrap_the_sum():
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    from fedtensor.federated.flower.client_app import check_secagg_setup

    ok = {Key.STAGE: Stage.SETUP, Key.SHARE_NUMBER: 10, Key.THRESHOLD: 7, Key.SAMPLE_NUMBER: 10,
          Key.TARGET_RANGE: 1 << 22, Key.MOD_RANGE: 1 << 32, Key.MAX_WEIGHT: 16384.0}
    check_secagg_setup(ok, 16384.0)
    with pytest.raises(task.FederationError, match="max-weight 1 from the server is not this run's 16384"):
        check_secagg_setup({**ok, Key.MAX_WEIGHT: 1.0}, 16384.0)
    check_secagg_setup({Key.STAGE: Stage.UNMASK})  # only the setup carries the parameters
    for change, why in [({Key.THRESHOLD: 5}, "needs more than half"),
                        ({Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2, Key.SAMPLE_NUMBER: 3}, "at least 3 survivors"),
                        ({Key.SAMPLE_NUMBER: 1024, Key.SHARE_NUMBER: 1024, Key.THRESHOLD: 700}, "overflows the modulus"),
                        ({Key.THRESHOLD: "x"}, "malformed SecAgg\\+ setup")]:
        with pytest.raises(task.FederationError, match=why):
            check_secagg_setup({**ok, **change})


# ------------------------------------------------------------------------------ real deployment


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # each was started in its own process group: take its app children down with it
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _delta_files(audit: Path, rnd: int):
    import safetensors.numpy as stn
    from safetensors import safe_open

    _, paths, _ = task._template(TINY)
    out = []
    for node in sorted(audit.iterdir()):
        f = next(node.glob(f"run-*-round-{rnd:04d}.safetensors"))
        with safe_open(str(f), "np") as fh:
            n = int(fh.metadata()["num_examples"])
        arrays = stn.load_file(str(f))
        out.append(([arrays[p] for p in paths], n))
    return out


@pytest.mark.slow
def test_deployment_on_localhost_with_secagg_plus(tmp_path, crops):
    """SuperLink + 3 SuperNodes on 127.0.0.1, ``flwr run`` 2 rounds with SecAgg+: every global version is
    written and published, loads, and equals plain FedAvg of the nodes' updates (fixed-point tolerance)."""
    from flax import nnx

    from fedtensor.nn import load_model
    from fedtensor.serve.store import ModelStore

    bindir = Path(sys.executable).parent
    link_port, *node_ports = _free_ports(4)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedtest"\n\n[superlink.fedtest]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "JAX_PLATFORMS": "cpu"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        f = open(logs / f"{name}.log", "wb")
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
        procs.append(p)
        return p

    out, store, audit = tmp_path / "global", tmp_path / "store", tmp_path / "audit"
    t0 = time.time()
    try:
        link = start("superlink", [str(bindir / "flower-superlink"), "--insecure",
                                   "--disable-runtime-dependency-installation", "--port", str(link_port)])
        _wait_http(f"http://127.0.0.1:{link_port}/health", 60, link)
        for i, (port, crop) in enumerate(zip(node_ports, crops)):
            cfg = f'data="{crop}" cache-dir="{tmp_path / f"cache{i}"}" audit-dir="{audit / f"node{i}"}"'
            start(f"supernode{i}", [str(bindir / "flower-supernode"), "--insecure", "--superlink",
                                    f"127.0.0.1:{link_port}", "--port", str(port), "--node-config", cfg])
        run_cfg = {**TINY_RUN, "num-server-rounds": 2, "min-clients": 3, "reconstruction-threshold": 1.0,
                   "out-dir": str(out),
                   "store-dir": str(store), "secure": True}
        rc_str = " ".join(f"{k}={json.dumps(v)}" for k, v in run_cfg.items())
        run = subprocess.run([str(bindir / "flwr"), "run", str(REPO / "examples" / "federation"), "fedtest",
                              "--run-config", rc_str, "--stream"], env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=540)
        (logs / "flwr-run.log").write_text(run.stdout + run.stderr)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        # the stream ends with the run; the ServerApp wrote its last version before finishing
        latest = json.loads((out / "latest.json").read_text())
        assert latest["round"] == 2 and latest["n_clients"] == 3 and latest["secure_aggregation"], latest
    except BaseException:
        for f in sorted(logs.glob("*.log")):
            print(f"---- {f.name}\n{f.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        _stop(procs)
    wall = time.time() - t0
    print(f"deployment: 3 SuperNodes, 2 SecAgg+ rounds, {wall:.1f} s wall")

    # every version loads; the store has rounds 1 and 2 with their meta
    versions = {r: task.to_ndarrays(nnx.state(load_model(out / f"round-{r:04d}").net, nnx.Param)) for r in (0, 1, 2)}
    st = ModelStore(store)
    assert [v.meta["round"] for v in st.versions()] == [1, 2]
    assert st.latest().sha256 == latest["model_id"] and st.latest().meta["n_clients"] == 3
    stored = task.to_ndarrays(nnx.state(load_model(store / "versions" / "v000002").net, nnx.Param))
    for a, b in zip(stored, versions[2]):
        np.testing.assert_array_equal(a, b)
    # SecAgg+ result == plain FedAvg of the updates the nodes themselves recorded (tolerance: 2²² levels
    # over ±clipping-range, divided by the summed weight ratio, plus float64→float32 rounding)
    for r in (1, 2):
        updates = _delta_files(audit, r)
        assert len(updates) == 3
        total = sum(n for _, n in updates)
        mean = [sum(n * d[i] for d, n in updates) / total for i in range(len(versions[0]))]
        want = [g + m for g, m in zip(versions[r - 1], mean)]
        assert max(float(np.abs(m).max()) for m in mean) > 1e-4  # the round really moved the model
        for w, g in zip(want, versions[r]):
            np.testing.assert_allclose(g, w, rtol=0, atol=2e-6)


def test_a_node_refuses_a_weight_above_max_weight(tmp_path, crops):
    """SecAgg+'s fixed-point bound assumes every weight within max-weight (this node has 27 patches)."""
    from fedtensor.federated.flower.client_app import app

    node = {"data": str(crops[0]), "cache-dir": str(tmp_path / "c"), "allow-plain-updates": True}
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                  run_config={**TINY_RUN, "min-clients": 4, "max-weight": 10.0})
    with pytest.raises(task.FederationError, match="exceeds max-weight"):
        app(_train_message(task.to_ndarrays(_params())), ctx)


def test_the_update_a_node_sends_is_local_minus_global(tmp_path, crops):
    """Recomputed from the node's own seed: the delta is new − global (the deployment test compares with
    the node's audit copy, which would hold a flipped delta too)."""
    import zlib

    from fedtensor.federated.flower.client_app import app, load_sources
    from fedtensor.federated.flower.task import FedSettings, local_update, node_volumes

    arrays = task.to_ndarrays(_params())
    node = {"data": str(crops[0]), "cache-dir": str(tmp_path / "c"), "allow-plain-updates": True}
    run_config = {**TINY_RUN, "min-clients": 4}
    ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)
    delta = parameters_to_ndarrays(compat.recorddict_to_fitres(app(_train_message(arrays), ctx).content,
                                                               False).parameters)
    s = FedSettings.from_run_config(run_config)
    paths = node_volumes(node)
    rng = np.random.default_rng([s.seed, 1, zlib.crc32(",".join(map(str, paths)).encode())])
    new, _ = local_update(_params(), load_sources(paths, s, tmp_path / "c"), TINY, s, rng)
    for d, a, g in zip(delta, task.to_ndarrays(new), arrays):
        np.testing.assert_allclose(d, a - g, rtol=1e-5, atol=1e-6)
