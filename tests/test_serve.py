"""Tests of the global-weights service (fedtensor.serve): store, tokens, API, secure-aggregation rounds
over HTTP, the client, and ``fedtensor serve`` itself.

Models are tiny restoration nets (channels 8/16, ~31 k parameters) with random weights; nothing is
trained. The API is exercised through Flask's test client (the real app, in process); one test starts
the real server in a subprocess and talks to it over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

flask = pytest.importorskip("flask")
pytest.importorskip("safetensors")

from fedtensor.federated.secagg import AdvertiseKeys, MaskedInput, encode  # noqa: E402
from fedtensor.errors import FedtensorError  # noqa: E402
from fedtensor.serve.app import create_app  # noqa: E402
from fedtensor.serve.auth import TokenRegistry  # noqa: E402
from fedtensor.serve.client import (  # noqa: E402
    RoundParticipant,
    ServiceError,
    fetch_model,
    publish_model,
)
from fedtensor.serve.rounds import apply_delta, flat_params, model_delta  # noqa: E402
from fedtensor.serve.store import CorruptVersionError, ModelStore, StoreError, VersionNotFound  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[tuple[bytes, dict]]:
    """Three distinct tiny models as (model.safetensors bytes, manifest), made with fedtensor.nn."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fedtensor.nn import NetConfig, new_net, save_model
    from fedtensor.nn.checkpoint import read_model_bytes

    out = []
    for seed in (1, 2, 3):
        net = new_net(NetConfig(channels=(8, 16), cond_hidden=8), seed=seed)
        leaves, treedef = jax.tree_util.tree_flatten(nnx.state(net, nnx.Param))
        rng = np.random.default_rng(seed)  # non-zero everywhere, zero-initialised layers included
        nnx.update(net, jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.1) for x in leaves]))
        d = tmp_path_factory.mktemp(f"model{seed}")
        save_model(net, d, {"note": f"seed {seed}"})
        data, _, manifest = read_model_bytes(d)
        out.append((data, manifest))
    return out


class FlaskTransport:
    """The client library's transport over Flask's test client (the real app, no sockets)."""

    def __init__(self, client, token: str | None):
        self.client, self.token = client, token

    def request(self, method, path, body=None, headers=None):
        h = dict(headers or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        r = self.client.open("/api/v1" + path, method=method, data=body, headers=h)
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.get_data()


class Service:
    """An app on a fresh data directory with four clients (a, b, c, d), an admin and version 1."""

    def __init__(self, data_dir: Path, models, config=None):
        self.dir = data_dir
        reg = TokenRegistry(data_dir)
        self.tokens = {n: reg.add_client(n)[1] for n in "abcd"}
        self.ids = {p.name: p.id for p in reg.clients()}
        self.admin = reg.set_admin()
        self.app = create_app(data_dir, config={"TESTING": True, **(config or {})})
        self.http = self.app.test_client()
        self.store: ModelStore = self.app.extensions["fedtensor_store"]
        if models:
            self.store.publish(models[0][0], models[0][1], {"source": "test"})

    def t(self, who: str | None) -> FlaskTransport:
        return FlaskTransport(self.http, None if who is None else self.admin if who == "admin" else self.tokens[who])

    def get(self, path, who="a", **kw):
        h = {"Authorization": f"Bearer {self.t(who).token}"} if who else {}
        h.update(kw.pop("headers", {}))
        return self.http.get("/api/v1" + path, headers=h, **kw)

    def post(self, path, who="a", **kw):
        h = {"Authorization": f"Bearer {self.t(who).token}"} if who else {}
        h.update(kw.pop("headers", {}))
        return self.http.post("/api/v1" + path, headers=h, **kw)

    def snapshot(self):
        """What must not change when a request is refused: the versions on disk."""
        return [v.to_dict() for v in ModelStore(self.dir).versions()]


@pytest.fixture
def svc(tmp_path, models) -> Service:
    return Service(tmp_path / "data", models)


# ------------------------------------------------------------------------------------------ store


def test_store_refuses_deep_json_cleanly(tmp_path, models):
    """A meta or manifest nested hundreds deep (valid JSON, which the parser accepts to ~990) is a
    StoreError (a 400), not a RecursionError (a 500), and leaves nothing behind; so is a model whose
    architecture metadata string is nested that deep."""
    import struct

    from fedtensor.serve.store import StoreError, check_model_bytes

    store = ModelStore(tmp_path / "s")
    deep = json.loads('{"a":' * 600 + "1" + "}" * 600)
    with pytest.raises(StoreError, match="nested deeper"):
        store.publish(models[0][0], None, deep)
    with pytest.raises(StoreError, match="nested deeper"):
        store.publish(models[0][0], {**models[0][1], "note": deep})
    assert store.publish(models[0][0], None, {"ok": [[[1]]] * 3}).version == 1  # modest nesting is fine
    assert [p.name for p in (tmp_path / "s" / "versions").iterdir()] == ["v000001"]
    header = json.dumps({"__metadata__": {"fedtensor_model": "[" * 100000 + "]" * 100000}}).encode()
    with pytest.raises(StoreError, match="not a fedtensor restoration model"):
        check_model_bytes(struct.pack("<Q", len(header)) + header)


def test_store_versions_survive_restart_and_verify(tmp_path, models):
    from fedtensor.nn import load_model

    store = ModelStore(tmp_path / "s")
    assert store.latest() is None and store.versions() == []
    infos = [store.publish(b, m, {"round": i}) for i, (b, m) in enumerate(models)]
    assert [i.version for i in infos] == [1, 2, 3]

    again = ModelStore(tmp_path / "s")  # a restarted server
    assert [v.to_dict() for v in again.versions()] == [i.to_dict() for i in infos]
    assert again.latest().version == 3
    for (data, _), info in zip(models, infos):
        assert again.model_bytes(info.version) == data
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", info.created)
        assert again.manifest(info.version)["model_id"] == info.sha256
    assert again.get(2).meta == {"round": 1}
    assert again.verify() == [1, 2, 3]
    with pytest.raises(VersionNotFound):
        again.get(4)

    exported = again.export(2, tmp_path / "export")
    model = load_model(exported)
    assert model.model_id == infos[1].sha256


def test_store_detects_a_corrupted_version(svc, models):
    svc.store.publish(models[1][0], models[1][1])
    path = svc.dir / "versions" / "v000002" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    store = ModelStore(svc.dir)
    with pytest.raises(CorruptVersionError, match="version 2 is corrupted"):
        store.model_bytes(2)
    assert store.model_bytes(1) == models[0][0]  # the others stay readable
    r = svc.get("/models/2/model.safetensors")
    assert r.status_code == 500 and "corrupted" in r.json["error"]  # JSON, never a stack trace


def test_crash_mid_publish_leaves_no_half_version(svc, models):
    before = svc.snapshot()
    # what a publisher killed before its rename leaves: a partial temporary directory
    tmp = svc.dir / "versions" / ".tmp-4242-1-2"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(models[1][0][:1000])
    store = ModelStore(svc.dir)
    assert svc.snapshot() == before and store.latest().version == 1
    assert svc.get("/models").json["latest"] == 1
    info = store.publish(models[1][0], models[1][1])
    assert info.version == 2 and not tmp.exists()  # swept by the next publisher
    assert store.model_bytes(2) == models[1][0]


def test_store_refuses_bad_models(svc, models):
    before = svc.snapshot()
    with pytest.raises(StoreError):
        svc.store.publish(b"not a model at all")
    with pytest.raises(StoreError, match="model_id"):
        svc.store.publish(models[1][0], {"model_id": "0" * 64})
    with pytest.raises(StoreError):
        svc.store.publish(models[1][0][:-10], {})  # truncated
    assert svc.snapshot() == before


# ------------------------------------------------------------------------------------------ auth / reads


PROTECTED = [("GET", "/models"), ("GET", "/models/latest"), ("GET", "/models/1"),
             ("GET", "/models/1/model.safetensors"), ("GET", "/models/1/model.json"), ("POST", "/models"),
             ("GET", "/rounds"), ("POST", "/rounds"), ("GET", "/rounds/current"), ("GET", "/whoami"),
             ("POST", "/rounds/1/advertise"), ("GET", "/rounds/1/share"), ("POST", "/rounds/1/close")]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Basic YTpi", "Bearer "])
def test_unauthenticated_requests_are_refused(svc, auth):
    for method, path in PROTECTED:
        h = {"Authorization": auth} if auth else {}
        r = svc.http.open("/api/v1" + path, method=method, headers=h, data=b"x")
        assert r.status_code == 401, (method, path)
        assert r.is_json and r.json["status"] == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert svc.get("/health", who=None).status_code == 200


def test_revoked_token_is_refused_and_tokens_are_stored_hashed(svc):
    assert svc.get("/whoami", who="b").json == {"name": "b", "id": svc.ids["b"], "role": "client"}
    stored = (svc.dir / "clients.json").read_text()
    assert all(tok not in stored for tok in [*svc.tokens.values(), svc.admin])
    assert (svc.dir / "clients.json").stat().st_mode & 0o777 == 0o600
    assert (svc.dir / "secret_key").stat().st_mode & 0o777 == 0o600
    TokenRegistry(svc.dir).remove("b")  # e.g. `fedtensor serve --remove-client b` while serving
    assert svc.get("/whoami", who="b").status_code == 401
    assert svc.get("/whoami", who="a").status_code == 200


def test_reads_latest_and_given_versions(svc, models):
    svc.store.publish(models[1][0], models[1][1], {"round": 7})
    lst = svc.get("/models").json
    assert lst["latest"] == 2 and [v["version"] for v in lst["versions"]] == [1, 2]
    latest = svc.get("/models/latest").json
    assert latest["version"] == 2 and latest["meta"] == {"round": 7}
    r = svc.get("/models/1/model.safetensors")
    assert r.status_code == 200 and r.data == models[0][0]
    assert r.headers["X-Model-Sha256"] == svc.store.get(1).sha256 == r.headers["ETag"].strip('"')
    assert svc.get("/models/1/model.safetensors", headers={"If-None-Match": r.headers["ETag"]}).status_code == 304
    assert json.loads(svc.get("/models/2/model.json").data)["model_id"] == latest["sha256"]
    missing = svc.get("/models/9")
    assert missing.status_code == 404 and "not found" in missing.json["error"]
    assert svc.get("/no/such/route").json["status"] == 404


def test_fetched_model_loads(svc, models, tmp_path):
    from fedtensor.nn import load_model

    out = fetch_model(None, None, tmp_path / "m", transport=svc.t("c"))
    assert load_model(out).model_id == svc.store.get(1).sha256
    assert fetch_model(None, None, out, 1, transport=svc.t("c")) == out  # same model again: fine
    (out / "model.json").unlink()  # a fetch interrupted between its two files: completed, no --force
    assert load_model(fetch_model(None, None, out, 1, transport=svc.t("c"))).model_id == svc.store.get(1).sha256
    svc.store.publish(models[1][0], models[1][1])
    with pytest.raises(Exception, match="already holds another model"):
        fetch_model(None, None, out, transport=svc.t("c"))
    assert load_model(fetch_model(None, None, out, force=True, transport=svc.t("c"))).model_id == svc.store.get(2).sha256


@pytest.mark.slow
def test_fetched_model_decompresses_a_real_volume(svc, tmp_path, volume_paths):
    from fedtensor.codec import compress
    from fedtensor.io import Volume, read_volume
    from fedtensor.nn import decompress_restored, load_model

    model = load_model(fetch_model(None, None, tmp_path / "m", transport=svc.t("c")))
    full = read_volume(volume_paths["ct_head_uint8.nii.gz"])
    c = [s // 2 for s in full.shape]
    vol = Volume(np.ascontiguousarray(full.data[c[0] - 16:c[0] + 16, c[1] - 16:c[1] + 16, c[2] - 8:c[2] + 8]))
    restored = decompress_restored(compress(vol, psnr=40.0), model)
    assert restored.shape == vol.shape and restored.dtype == vol.dtype


def test_fetch_rejects_a_model_whose_hash_does_not_match(svc, tmp_path):
    class Tamper(FlaskTransport):  # a man in the middle flipping one byte of the download
        def request(self, method, path, body=None, headers=None):
            status, h, data = super().request(method, path, body, headers)
            if path.endswith("model.safetensors"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            return status, h, data

    with pytest.raises(ServiceError, match="SHA-256"):
        fetch_model(None, None, tmp_path / "m", transport=Tamper(svc.http, svc.tokens["a"]))
    assert not (tmp_path / "m" / "model.safetensors").exists()


@pytest.mark.parametrize("record,why", [({"sha256": "0" * 64}, "malformed"), ({"version": "x", "sha256": "0" * 64}, "malformed"),
                                        ({"version": 5}, "malformed"), ({"version": 5, "sha256": "0" * 64}, "answered with version 5")])
def test_fetch_refuses_a_version_record_that_is_malformed_or_of_another_version(svc, tmp_path, record, why):
    class Liar(FlaskTransport):  # a service (or a proxy) answering with another record
        def request(self, method, path, body=None, headers=None):
            if path == "/models/1":
                return 200, {"content-type": "application/json"}, json.dumps(record).encode()
            return super().request(method, path, body, headers)

    with pytest.raises(ServiceError, match=why):
        fetch_model(None, None, tmp_path / "m", 1, transport=Liar(svc.http, svc.tokens["a"]))
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------ publish


def test_publish_over_the_api(svc, models, tmp_path):
    d = tmp_path / "m2"
    d.mkdir()
    (d / "model.safetensors").write_bytes(models[1][0])
    (d / "model.json").write_text(json.dumps(models[1][1]))
    before = svc.snapshot()
    with pytest.raises(ServiceError) as e:
        publish_model(None, None, d, transport=svc.t("a"))  # a client token cannot publish
    assert e.value.status == 403 and svc.snapshot() == before
    with pytest.raises(ServiceError) as e:
        publish_model(None, None, d, {"x": 1}, base_version=0, transport=svc.t("admin"))
    assert e.value.status == 409 and "stale" in str(e.value) and svc.snapshot() == before

    info = publish_model(None, None, d, {"round": 1, "loss": 0.5}, base_version=1, transport=svc.t("admin"))
    assert info["version"] == 2 and info["meta"] == {"round": 1, "loss": 0.5}
    assert svc.store.model_bytes(2) == models[1][0]
    assert svc.store.manifest(2)["note"] == "seed 2"

    before = svc.snapshot()
    with pytest.raises(ServiceError) as e:  # replay of the same upload
        publish_model(None, None, models[1][0], transport=svc.t("admin"))
    assert e.value.status == 409 and svc.snapshot() == before


def _multipart_post(svc, fields, who="admin"):
    from fedtensor.serve.client import _multipart

    body, ctype = _multipart(fields)
    return svc.post("/models", who=who, data=body, headers={"Content-Type": ctype})


def test_publish_rejects_malformed_uploads(svc, models):
    before = svc.snapshot()
    good = models[1][0]
    sha = hashlib.sha256(good).hexdigest().encode()
    cases = {
        "wrong sha": {"model": ("m", good, "application/octet-stream"), "sha256": (None, b"0" * 64, "text/plain")},
        "no sha": {"model": ("m", good, "application/octet-stream")},
        "no file": {"sha256": (None, sha, "text/plain")},
        "not a model": {"model": ("m", b"garbage", "application/octet-stream"),
                        "sha256": (None, hashlib.sha256(b"garbage").hexdigest().encode(), "text/plain")},
        "bad meta": {"model": ("m", good, "application/octet-stream"), "sha256": (None, sha, "text/plain"),
                     "meta": (None, b"{not json", "application/json")},
    }
    for name, fields in cases.items():
        r = _multipart_post(svc, fields)
        assert r.status_code == 400, name
        assert r.is_json and r.json["error"], name
    r = svc.post("/models", who="admin", data=good, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 415
    assert svc.snapshot() == before


def test_oversized_upload_is_refused(tmp_path, models):
    s = Service(tmp_path / "d", models, config={"MAX_CONTENT_LENGTH": 64 * 1024})
    before = s.snapshot()
    r = _multipart_post(s, {"model": ("m", models[1][0], "application/octet-stream"),
                            "sha256": (None, hashlib.sha256(models[1][0]).hexdigest().encode(), "text/plain")})
    assert r.status_code == 413 and r.is_json
    assert s.snapshot() == before


# ------------------------------------------------------------------------------------------ rounds


def _participants(svc, names):
    return {n: RoundParticipant(transport=svc.t(n)) for n in names}


@pytest.mark.parametrize("body,why", [({"clients": ["a", "b"]}, "at least 3 clients"),
                                      ({"clients": ["a", "b", "c"], "threshold": 2}, "at least 3"),
                                      ({"threshold": 2}, "exceed n/2")])
def test_a_round_whose_published_sum_could_be_two_clients_is_refused(svc, models, body, why):
    r = svc.post("/rounds", who="admin", json=body)
    assert r.status_code in (400, 409) and why in r.json["error"], r.json


@pytest.mark.parametrize("threshold", [2.9, 3.5, True, "3"])
def test_the_coordinator_refuses_a_threshold_that_is_not_a_whole_number(svc, models, threshold):
    """Through the Python API too (HTTP bodies are checked before): 2.9 was truncated to 2."""
    from fedtensor.serve.rounds import RoundError

    rounds = svc.app.extensions["fedtensor_rounds"]
    with pytest.raises(RoundError, match="whole number"):
        rounds.open(clients=["a", "b", "c"], threshold=threshold)
    assert rounds.open(clients=["a", "b", "c"], threshold=np.int64(3))["params"]["threshold"] == 3


def test_a_client_refuses_to_join_a_round_of_threshold_two(svc, models):
    """A server (not this one) offering t = 2 of 3: if one client drops, each survivor could read the
    other's update off the published mean, so the client refuses before sending its keys."""
    rid = svc.post("/rounds", who="admin", json={"clients": ["a", "b", "c"]}).json["round"]
    p = RoundParticipant(transport=svc.t("a"))
    info = p.current()
    forged = {**info, "params": {**info["params"], "threshold": 2}}
    with pytest.raises(ServiceError, match="would publish the sum of two clients"):
        p.join(forged)
    assert svc.get(f"/rounds/{rid}").json["submitted"]["advertise"] == 0


def test_secure_round_over_http_with_a_dropout_publishes_fedavg(svc, models):
    """Four clients, threshold 3; d shares its keys and then drops before sending its masked update.
    The published version must be base + Σ n_k Δ_k / Σ n_k over a, b, c (plain FedAvg)."""
    r = svc.post("/rounds", who="admin", json={"threshold": 3, "clip": 0.5, "max_total_weight": 10_000})
    assert r.status_code == 201, r.json
    info = r.json
    assert info["stage"] == "advertise" and info["base_version"] == 1 and info["params"]["num_clients"] == 4

    base_vec, _, _ = flat_params(models[0][0])
    rng = np.random.default_rng(0)
    deltas = {n: rng.uniform(-0.05, 0.05, base_vec.size).astype(np.float32) for n in "abcd"}
    weights = {"a": 120, "b": 40, "c": 300, "d": 77}

    ps = _participants(svc, "abcd")
    for p in ps.values():
        assert p.join()["accepted"] == "advertise"
    assert svc.get("/rounds/current").json["stage"] == "share"  # everyone in: the stage closed at once
    for p in ps.values():
        assert p.share()
    for n in "abc":
        assert ps[n].mask(deltas[n], weights[n])
    assert svc.get("/rounds/current").json["stage"] == "masked"  # still waiting for d
    assert ps["a"].unmask() is False  # not ready yet: 202, poll again
    closed = svc.post(f"/rounds/{info['round']}/close", who="admin").json
    assert closed["stage"] == "unmask" and closed["dropped"] == ["d"]
    with pytest.raises(ServiceError) as e:  # d is too late
        ps["d"].mask(deltas["d"], weights["d"])
    assert e.value.status == 409
    for n in "abc":
        assert ps[n].unmask()

    final = svc.get(f"/rounds/{info['round']}").json
    assert final["status"] == "done" and final["result_version"] == 2, final
    v2 = svc.store.get(2)
    assert v2.meta["round"] == info["round"] and v2.meta["clients"] == ["a", "b", "c"]
    assert v2.meta["n_clients"] == 3 and v2.meta["dropped"] == ["d"] and v2.meta["base_version"] == 1
    got, _, _ = flat_params(svc.store.model_bytes(2))
    w = np.array([weights[n] for n in "abc"], np.float64)
    want = base_vec + (w[:, None] * np.stack([deltas[n] for n in "abc"])).sum(0) / w.sum()
    err = np.abs(got.astype(np.float64) - want)
    # fixed-point tolerance of the mean, plus float32 rounding of the stored weights
    assert err.max() <= v2.meta["tolerance"] + 1e-6 * np.abs(want).max(), err.max()
    assert err.max() < 1e-5
    # the published model is a real model: loadable, and its manifest says where it came from
    from fedtensor.nn.infer import model_from_bytes

    model_from_bytes(svc.store.model_bytes(2))
    assert svc.store.manifest(2)["federated"]["round"] == info["round"]


def test_concurrent_clients_run_a_whole_round(svc, models, tmp_path):
    """Three clients in threads, each calling the blocking RoundParticipant.run (fetch the base, compute
    the delta of its local model, all four stages with polling); the result is the weighted mean."""
    import threading

    rid = svc.post("/rounds", who="admin", json={"clients": ["a", "b", "c"], "threshold": 3, "clip": 2.0,
                                                 "max_total_weight": 64}).json["round"]
    local = {"a": models[1][0], "b": models[2][0], "c": models[1][0]}
    weights = {"a": 3, "b": 5, "c": 8}
    results, errors = {}, []

    def client(name):
        try:
            def update(base_dir: Path):
                return model_delta((base_dir / "model.safetensors").read_bytes(), local[name]), weights[name]

            p = RoundParticipant(transport=FlaskTransport(svc.app.test_client(), svc.tokens[name]))
            results[name] = p.run(update, tmp_path / name, poll=0.02, timeout=60)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(n,)) for n in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert all(r["round"] == rid and r["status"] == "done" for r in results.values()), results
    base = flat_params(models[0][0])[0].astype(np.float64)
    want = base + sum(weights[n] * model_delta(models[0][0], local[n]) for n in "abc") / sum(weights.values())
    got = flat_params(svc.store.model_bytes(results["a"]["result_version"]))[0]
    assert np.abs(got - want).max() <= svc.store.latest().meta["tolerance"] + 1e-7


def _public_key() -> bytes:
    """A random X25519 public key: 32 random bytes, canonical (top bit clear; ≥ 2^255 − 19 has odds 2^-250)."""
    raw = bytearray(os.urandom(32))
    raw[31] &= 0x7F
    return bytes(raw)


def test_round_submissions_are_validated_and_change_nothing(svc, models):
    rid = svc.post("/rounds", who="admin", json={"clients": ["a", "b", "c"], "threshold": 3}).json["round"]
    octet = {"Content-Type": "application/octet-stream"}
    a_keys = (_public_key(), _public_key())
    adv_a = AdvertiseKeys(rid, svc.ids["a"], *a_keys)
    assert svc.post(f"/rounds/{rid}/advertise", who="a", data=encode(adv_a), headers=octet).status_code == 202
    adv_b = AdvertiseKeys(rid, svc.ids["b"], _public_key(), _public_key())

    def state():
        return svc.get(f"/rounds/{rid}").json["submitted"], svc.snapshot()

    before = state()
    cases = [
        ("unauthenticated", None, f"/rounds/{rid}/advertise", encode(adv_b), 401),
        ("malformed", "b", f"/rounds/{rid}/advertise", b"FSA2\x01garbage", 400),
        ("not a message", "b", f"/rounds/{rid}/advertise", b"hello", 400),
        ("wrong type for the stage", "b", f"/rounds/{rid}/advertise", encode(MaskedInput(rid, svc.ids["b"], b"")), 400),
        ("oversized", "b", f"/rounds/{rid}/advertise", encode(adv_b) + b"\0" * 64, 413),
        ("sender is another client", "c", f"/rounds/{rid}/advertise", encode(adv_b), 403),
        ("not in the cohort", "d", f"/rounds/{rid}/advertise",
         encode(AdvertiseKeys(rid, svc.ids["d"], _public_key(), _public_key())), 403),
        ("admin cannot submit", "admin", f"/rounds/{rid}/advertise", encode(adv_b), 403),
        ("message for another round", "b", f"/rounds/{rid}/advertise",
         encode(AdvertiseKeys(rid + 5, svc.ids["b"], _public_key(), _public_key())), 409),
        ("stale round", "b", f"/rounds/{rid - 1}/advertise", encode(adv_b), 409),
        ("future round", "b", f"/rounds/{rid + 1}/advertise", encode(adv_b), 409),
        ("stage not open yet", "b", f"/rounds/{rid}/masked", encode(MaskedInput(rid, svc.ids["b"], b"\0" * 8)), 409),
        ("replay", "a", f"/rounds/{rid}/advertise", encode(adv_a), 409),
        ("unknown stage", "b", f"/rounds/{rid}/frobnicate", encode(adv_b), 404),
        # well-formed, but the SecAgg server refuses it: b advertises a public key a already uses
        ("reused public key", "b", f"/rounds/{rid}/advertise",
         encode(AdvertiseKeys(rid, svc.ids["b"], a_keys[0], _public_key())), 400),
    ]
    for name, who, path, body, code in cases:
        r = svc.post(path, who=who, data=body, headers=octet)
        assert r.status_code == code, (name, r.status_code, r.json)
        assert r.is_json and r.json["error"], name
        assert state() == before, name
    # and the round goes on afterwards
    assert svc.post(f"/rounds/{rid}/advertise", who="b", data=encode(adv_b), headers=octet).status_code == 202
    assert svc.post(f"/rounds/{rid}/advertise", who="b", data=encode(adv_b), headers=octet).status_code == 409


def test_round_stage_deadline_drops_late_clients(svc):
    rid = svc.post("/rounds", who="admin", json={"threshold": 3, "stage_timeout": 0.3}).json["round"]
    ps = _participants(svc, "abcd")
    for n in "abc":
        ps[n].join()
    time.sleep(0.35)
    assert ps["a"].share()  # the deadline closed the advertise stage with a, b, c
    with pytest.raises(ServiceError) as e:  # d, acting on the round status it read before the deadline
        ps["d"].join(ps["a"].info)
    assert e.value.status == 409 and "closed" in str(e.value)
    with pytest.raises(ServiceError) as e:
        ps["d"]._get("share")
    assert e.value.status == 409 and "dropped out" in str(e.value)
    assert svc.get(f"/rounds/{rid}").json["submitted"]["advertise"] == 3


def test_too_few_survivors_abort_the_round_and_publish_nothing(svc):
    rid = svc.post("/rounds", who="admin", json={"clients": ["a", "b", "c"], "threshold": 3}).json["round"]
    ps = _participants(svc, "abc")
    for p in ps.values():
        p.join()
    for p in ps.values():
        p.share()
    before = svc.snapshot()
    ps["a"].mask(np.zeros(ps["a"].sa.params.vector_length, np.float32), 1)
    info = svc.post(f"/rounds/{rid}/close", who="admin").json
    assert info["status"] == "aborted" and "threshold" in info["reason"]
    assert svc.snapshot() == before
    r = svc.post(f"/rounds/{rid}/masked", who="b", data=b"x", headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 409
    # a new round can be opened afterwards, with a new number
    assert svc.post("/rounds", who="admin", json={}).json["round"] == rid + 1


def test_secret_key_is_created_whole_and_once(tmp_path, monkeypatch):
    """A starting server links a fully written key into place: a second process that linked first wins
    and both read its key, and no temporary file or empty key is left behind."""
    from fedtensor.serve import app as app_mod

    (tmp_path / "a").mkdir()
    first = app_mod._secret_key(tmp_path / "a")
    assert app_mod._secret_key(tmp_path / "a") == first and len(first) == 64
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["secret_key"]
    assert (tmp_path / "a" / "secret_key").stat().st_mode & 0o777 == 0o600

    (tmp_path / "b").mkdir()
    real_link = os.link

    def other_process_first(src, dst):
        (tmp_path / "b" / "secret_key").write_text("f" * 64 + "\n")
        real_link(src, dst)

    monkeypatch.setattr(app_mod.os, "link", other_process_first)
    assert app_mod._secret_key(tmp_path / "b") == "f" * 64
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["secret_key"]

    import errno

    def no_hard_links(src, dst):  # vfat, some SMB mounts
        raise OSError(errno.EPERM, "Operation not permitted")

    (tmp_path / "c").mkdir()
    monkeypatch.setattr(app_mod.os, "link", no_hard_links)
    key = app_mod._secret_key(tmp_path / "c")
    assert app_mod._secret_key(tmp_path / "c") == key and [p.name for p in (tmp_path / "c").iterdir()] == ["secret_key"]


def test_restart_keeps_versions_tokens_and_round_history(svc, models):
    svc.store.publish(models[1][0], models[1][1], {"round": 1})
    rid = svc.post("/rounds", who="admin", json={}).json["round"]
    RoundParticipant(transport=svc.t("a")).join()
    before = svc.snapshot()

    app2 = create_app(svc.dir, config={"TESTING": True})  # the restarted server
    s2 = svc
    s2.app, s2.http = app2, app2.test_client()
    s2.store = app2.extensions["fedtensor_store"]
    assert s2.snapshot() == before
    assert [v["version"] for v in s2.get("/models").json["versions"]] == [1, 2]
    for v in (1, 2):
        assert s2.get(f"/models/{v}/model.safetensors").data == models[v - 1][0]
    assert s2.get("/whoami", who="c").json["name"] == "c"
    assert app2.config["SECRET_KEY"] == (svc.dir / "secret_key").read_text().strip()
    hist = s2.get("/rounds").json["rounds"]
    assert hist[-1]["round"] == rid and hist[-1]["status"] == "aborted" and "restarted" in hist[-1]["reason"]
    r = s2.post(f"/rounds/{rid}/advertise", who="b", data=b"FSA1", headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 409  # the old round is gone for good
    assert s2.post("/rounds", who="admin", json={}).json["round"] == rid + 1  # never reused


def test_apply_delta_round_trip(models):
    base, local = models[0][0], models[1][0]
    d = model_delta(base, local)
    np.testing.assert_array_equal(flat_params(apply_delta(base, d))[0], flat_params(local)[0])
    with pytest.raises(Exception, match="values"):
        apply_delta(base, d[:-1])


# ------------------------------------------------------------------------------------------ CLI / HTTP


SERVE_MAIN = ("import sys, typer; from fedtensor_cli.serve_cmd import register; "
              "app = typer.Typer(pretty_exceptions_enable=False); register(app); app(sys.argv[1:])")


def _cli(*args, timeout=120):
    """``fedtensor serve|fetch-model ...`` in a subprocess (the commands as ``register`` adds them)."""
    return subprocess.run([sys.executable, "-c", SERVE_MAIN, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture
def cli_app():
    import typer
    from typer.testing import CliRunner

    from fedtensor_cli.serve_cmd import register

    app = typer.Typer(pretty_exceptions_enable=False)
    register(app)
    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def test_cli_manages_clients_and_refuses_a_remote_host(tmp_path, cli_app):
    data = tmp_path / "srv"
    r = cli_app("serve", "--data", data, "--add-client", "hospital-a", "--add-client", "hospital-b", "--admin-token")
    assert r.exit_code == 0, r.output
    tokens = r.stdout.split()
    assert len(tokens) == 3 and all(len(t) >= 43 for t in tokens)
    reg = TokenRegistry(data)
    assert [(p.name, p.role) for p in (reg.authenticate(t) for t in tokens)] == [
        ("hospital-a", "client"), ("hospital-b", "client"), ("admin", "admin")]
    r = cli_app("serve", "--data", data, "--list-clients", "--json")
    assert [c["name"] for c in json.loads(r.stdout)["clients"]] == ["admin", "hospital-a", "hospital-b"]
    assert cli_app("serve", "--data", data, "--remove-client", "hospital-b").exit_code == 0
    assert reg.authenticate(tokens[1]) is None and reg.authenticate(tokens[0]) is not None
    r = cli_app("serve", "--data", data, "--add-client", "hospital-a")
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = cli_app("serve", "--data", data, "--add-client", "bad name!")
    assert r.exit_code == 2 and r.stderr.startswith("error: invalid client name")  # a bad command line
    r = cli_app("serve", "--data", data, "--host", "0.0.0.0")
    assert r.exit_code == 2 and "--allow-remote" in r.stderr
    r = cli_app("serve", "--data", data, "--host", "0.0.0.0", "--allow-remote", "--web")
    assert r.exit_code == 2 and r.stderr.startswith("error: --web needs a loopback --host")


@pytest.fixture
def real_server(tmp_path, models):
    """``fedtensor serve`` in a subprocess on a free port, with version 1 and a client + admin token."""
    data = tmp_path / "srv"
    reg = TokenRegistry(data)
    token, admin = reg.add_client("hospital-a")[1], reg.set_admin()
    ModelStore(data).publish(models[0][0], models[0][1], {"note": "seed"})
    proc = subprocess.Popen([sys.executable, "-c", SERVE_MAIN, "serve", "--data", str(data), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/api/v1", line)
        assert m, line
        yield f"http://127.0.0.1:{m.group(1)}", token, admin, data
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_real_server_over_http(real_server, tmp_path):
    from fedtensor.nn import load_model

    url, token, _, data = real_server
    for bad in (None, "not-a-token"):
        with pytest.raises(ServiceError) as e:
            fetch_model(url, bad, tmp_path / "x")
        assert e.value.status == 401
    out = fetch_model(url, token, tmp_path / "fetched")
    assert load_model(out).model_id == ModelStore(data).get(1).sha256
    with pytest.raises(ServiceError) as e:
        fetch_model(url, token, tmp_path / "y", version=7)
    assert e.value.status == 404 and "not found" in str(e.value)


@pytest.mark.slow
def test_cli_publish_and_fetch_model_over_http(real_server, tmp_path, models):
    url, token, admin, data = real_server
    info = publish_model(url, admin, models[1][0], {"round": 2})
    assert info["version"] == 2
    mdir = tmp_path / "m3"
    mdir.mkdir()
    (mdir / "model.safetensors").write_bytes(models[2][0])
    (mdir / "model.json").write_text(json.dumps(models[2][1]))
    r = _cli("serve", "--data", str(data), "--publish", str(mdir), "--meta", '{"note": "cli"}')
    assert r.returncode == 0, r.stderr
    tok = tmp_path / "tok"
    tok.write_text(token)
    r = _cli("fetch-model", url, str(tmp_path / "f3"), "--token-file", str(tok), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 3
    assert (tmp_path / "f3" / "model.safetensors").read_bytes() == models[2][0]
    r = _cli("serve", "--data", str(data), "--list", "--json")
    assert [v["meta"] for v in json.loads(r.stdout)["versions"]] == [{"note": "seed"}, {"round": 2}, {"note": "cli"}]


def test_a_bad_client_name_is_a_usage_error_and_writes_nothing(tmp_path):
    r = _cli("serve", "--data", str(tmp_path / "store"), "--add-client", "ok", "--add-client", "")
    assert r.returncode == 2 and r.stderr.startswith("error: invalid client name ''")
    assert not (tmp_path / "store").exists()  # not even the valid name before it


def test_listing_a_missing_store_is_an_error_and_creates_nothing(tmp_path):
    for flag in ("--list", "--list-clients"):
        r = _cli("serve", "--data", str(tmp_path / "typo" / "store"), flag, "--json")
        assert r.returncode == 1 and r.stderr.startswith("error: no weights store at") and not r.stdout
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("config", [{"FEDTENSOR_WEB": False}, {}], ids=["public-host", "wsgi-default"])
def test_web_interface_is_left_out_unless_asked_for(tmp_path, config):
    """``fedtensor serve`` on a non-loopback host passes FEDTENSOR_WEB=False, and an app made by
    ``create_app`` under a WSGI server (the documented deployment) has no web pages unless its config asks:
    the unauthenticated pages are not served, the token-protected API still is."""
    public = create_app(tmp_path / "pub", config={"TESTING": True, **config}).test_client()
    assert public.get("/").status_code == 404 and public.get("/federation").status_code == 404
    assert public.get("/api/v1/health").status_code == 200
    assert public.get("/api/v1/models").status_code == 401
    local = create_app(tmp_path / "loc", config={"TESTING": True, "FEDTENSOR_WEB": True}).test_client()
    assert local.get("/").status_code == 200


# ------------------------------------------------------------------------------------------ races and edges


def test_concurrent_publishes_on_one_base_version_one_wins(svc, models, monkeypatch):
    """Two admins publish on base_version 1 at once; validation (slowed here) runs outside the publish
    lock, so only the base check under the lock can refuse the second."""
    import threading

    from fedtensor.serve import store as store_mod

    real = store_mod.check_model_bytes
    monkeypatch.setattr(store_mod, "check_model_bytes", lambda data: (time.sleep(0.3), real(data))[1])
    statuses = []

    def post(i):
        data = models[i][0]
        statuses.append(_multipart_post(svc, {"model": ("m", data, "application/octet-stream"),
                                              "sha256": (None, hashlib.sha256(data).hexdigest().encode(), "text/plain"),
                                              "base_version": (None, b"1", "text/plain")}).status_code)

    threads = [threading.Thread(target=post, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201, 409]
    assert [v.version for v in svc.store.versions()] == [1, 2]


def test_a_round_whose_base_was_superseded_publishes_nothing(svc, models):
    """An admin publishes version 2 while a round on version 1 runs: the round's result would silently
    discard version 2, so the round fails instead."""
    rid = svc.post("/rounds", who="admin", json={"clients": ["a", "b", "c"], "threshold": 3}).json["round"]
    ps = _participants(svc, "abc")
    for p in ps.values():
        p.join()
    for p in ps.values():
        p.share()
    svc.store.publish(models[1][0], models[1][1])
    for p in ps.values():
        p.mask(np.zeros(p.sa.params.vector_length, np.float32), 1)
    for p in ps.values():
        try:
            p.unmask()
        except ServiceError:
            pass
    final = svc.get(f"/rounds/{rid}").json
    assert final["status"] == "aborted" and "stale publish" in final["reason"], final
    assert [v.version for v in svc.store.versions()] == [1, 2]
    assert svc.store.model_bytes(2) == models[1][0]


def test_latest_never_passes_off_an_older_version(svc, models):
    svc.store.publish(models[1][0], models[1][1])
    (svc.dir / "versions" / "v000002" / "version.json").write_text("{damaged")
    svc.app = create_app(svc.dir, config={"TESTING": True})  # restarted: nothing cached in memory
    svc.http = svc.app.test_client()
    r = svc.get("/models/latest")
    assert r.status_code == 500 and "version 2" in r.json["error"]
    assert svc.post("/rounds", who="admin", json={}).status_code == 500  # no round on a stale base
    assert svc.get("/models/1").status_code == 200


@pytest.mark.parametrize("body, message", [
    ({"clients": 5}, "clients must be a list"),
    ({"clients": "ab"}, "clients must be a list"),
    ({"stage_timeout": True}, "stage_timeout must be a positive number"),
    ({"stage_timeout": "default"}, "stage_timeout must be a positive number"),  # the internal marker
])
def test_malformed_round_requests_are_4xx(svc, body, message):
    r = svc.post("/rounds", who="admin", json=body)
    assert r.status_code == 400 and message in r.json["error"]
    assert svc.get("/rounds/current").status_code in (200, 404)


def test_publish_with_a_non_ascii_digit_base_version_is_400(svc, models):
    data = models[1][0]
    r = _multipart_post(svc, {"model": ("m", data, "application/octet-stream"),
                              "sha256": (None, hashlib.sha256(data).hexdigest().encode(), "text/plain"),
                              "base_version": (None, "²".encode(), "text/plain")})
    assert r.status_code == 400 and "base_version" in r.json["error"]


def test_a_revoked_client_name_can_get_a_new_token(tmp_path):
    reg = TokenRegistry(tmp_path)
    old, old_token = reg.add_client("alice")
    reg.add_client("bob")
    reg.remove("alice")
    new, token = reg.add_client("alice")
    assert new.id > max(p.id for p in reg.clients() if p.name == "bob") > old.id  # ids never reused
    assert reg.authenticate(token) == new and reg.authenticate(old_token) is None
    with pytest.raises(Exception, match="already exists"):
        reg.add_client("alice")


def test_loopback_web_interface_refuses_foreign_host_names(tmp_path):
    """DNS rebinding: a page on attacker.example resolving to 127.0.0.1 reaches the server's socket, but
    its requests carry its own Host name. The token-authenticated API answers any Host name (a proxy
    that keeps the client's, as Caddy does, must still reach it)."""
    from fedtensor_cli.serve_cmd import server_config

    config = server_config("127.0.0.1", 1 << 20, None, web=True)
    assert config["FEDTENSOR_WEB"] is True
    local = create_app(tmp_path / "d", config={"TESTING": True, **config}).test_client()
    assert local.get("/", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert local.get("/", headers={"Host": "localhost:8000"}).status_code == 200
    assert local.get("/federation", headers={"Host": "attacker.example:8000"}).status_code == 400
    assert local.get("/api/v1/health", headers={"Host": "fedtensor.example"}).status_code == 200
    v6 = create_app(tmp_path / "v6", config={"TESTING": True, **server_config("::1", 1 << 20, None, web=True)}).test_client()
    assert v6.get("/", headers={"Host": "[::1]:8000"}).status_code == 200
    assert v6.get("/", headers={"Host": "[::2]:8000"}).status_code == 400


def test_web_interface_is_asked_for_and_never_served_through_a_proxy(tmp_path):
    """A loopback server is also what a reverse proxy forwards to (nginx sends the upstream's own Host,
    127.0.0.1:8000): the unauthenticated pages are served only with --web, and never to a request a
    proxy forwarded; the API is unaffected."""
    from fedtensor_cli.errors import UsageFailure
    from fedtensor_cli.serve_cmd import server_config

    assert server_config("127.0.0.1", 1 << 20, None)["FEDTENSOR_WEB"] is False
    with pytest.raises(UsageFailure, match="--web needs a loopback"):
        server_config("0.0.0.0", 1 << 20, None, web=True)
    plain = create_app(tmp_path / "p", config={"TESTING": True, **server_config("127.0.0.1", 1 << 20, None)})
    assert plain.test_client().get("/", headers={"Host": "127.0.0.1:8000"}).status_code == 404
    web = create_app(tmp_path / "w", config={"TESTING": True, **server_config("127.0.0.1", 1 << 20, None, web=True)})
    client = web.test_client()
    for header in ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP"):
        forwarded = {"Host": "127.0.0.1:8000", header: "203.0.113.7"}
        assert client.get("/", headers=forwarded).status_code == 403
        assert client.post("/compress", headers=forwarded).status_code == 403
        assert client.get("/api/v1/health", headers=forwarded).status_code == 200


@pytest.mark.parametrize("host, name", [("[::1]:8000", "::1"), ("[::1]", "::1"), ("LocalHost:80", "localhost"),
                                        ("127.0.0.1", "127.0.0.1"), ("::1", "::1")])
def test_host_names_are_parsed_without_their_port(host, name):
    from fedtensor.serve.app import host_name

    assert host_name(host) == name


def test_a_damaged_newest_version_does_not_block_the_next_publish(svc, models):
    svc.store.publish(models[1][0], models[1][1])
    (svc.dir / "versions" / "v000002" / "version.json").write_text("{damaged")
    store = ModelStore(svc.dir)
    info = store.publish(models[2][0], models[2][1], new_model=True, base_version=2)
    assert info.version == 3 and store.latest().version == 3


@pytest.mark.parametrize("url, why", [("http://127.0.0.1:abc", "Port"), ("http://127.0.0.1:70000", "out of range"),
                                      ("http://:8000", "no host"), ("ftp://host:8000", "must start with")])
def test_bad_service_urls_are_clear_errors(url, why):
    """A mistyped URL is the user's error, named before any request (it was an internal error, exit 3)."""
    from fedtensor.serve.client import api_base

    with pytest.raises(ServiceError, match=why):
        api_base(url)
    assert api_base("http://127.0.0.1:8000/api/v1/") == "http://127.0.0.1:8000"


# ------------------------------------------------------------------------------------------ review fixes


def _with_nan(model_bytes: bytes) -> bytes:
    """The same safetensors model, metadata included, with one weight NaN."""
    import safetensors.numpy as stn
    from safetensors import safe_open

    tensors = stn.load(model_bytes)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(model_bytes)
        f.flush()
        with safe_open(f.name, "np") as g:
            meta = g.metadata()
    return stn.save(tensors, metadata=meta)


def test_publish_refuses_what_clients_could_not_load_or_parse(svc, models):
    """NaN weights (load_model refuses them), a manifest contradicting the weights' own architecture, and
    NaN/Infinity in meta (strict JSON parsers refuse the listing afterwards) are 400s that change nothing."""
    before = svc.snapshot()
    good, bad = models[1][0], _with_nan(models[1][0])

    def fields(blob, **extra):
        return {"model": ("m", blob, "application/octet-stream"),
                "sha256": (None, hashlib.sha256(blob).hexdigest().encode(), "text/plain"), **extra}

    cases = {
        "nan weights": (fields(bad), "not all finite"),
        "manifest contradicts": (fields(good, manifest=(None, b'{"net": {"channels": [999]}}', "application/json")),
                                 "contradicts"),
        "nan meta": (fields(good, meta=(None, b'{"loss": NaN}', "application/json")), "NaN"),
        "infinite meta": (fields(good, meta=(None, b'{"round": Infinity}', "application/json")), "Infinity"),
    }
    for name, (f, why) in cases.items():
        r = _multipart_post(svc, f)
        assert r.status_code == 400 and why in r.json["error"], (name, r.json)
    assert svc.snapshot() == before
    with pytest.raises(StoreError, match="not all finite"):
        svc.store.publish(bad, {}, {})
    info = svc.store.publish(good, {}, {"loss": float("nan")})  # a Python caller's NaN figure: stored as null
    assert info.meta["loss"] is None


def test_open_round_reads_a_chunked_body_and_refuses_non_finite_numbers(svc):
    """A body without Content-Length (chunked) is read, not replaced by the defaults; unusable numbers
    are 400s with a clear message."""
    body = json.dumps({"clients": ["a", "b", "c"], "threshold": 3, "stage_timeout": 30, "bogus": 1}).encode()

    def chunked(payload):
        return svc.post("/rounds", who="admin", input_stream=__import__("io").BytesIO(payload),
                        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
                        environ_overrides={"wsgi.input_terminated": True})  # as Werkzeug's server does

    r = chunked(body)
    assert r.status_code == 400 and "bogus" in r.json["error"]
    for bad, why in [(b'{"stage_timeout": Infinity}', "not valid JSON"), (b'{"clip": 1e300}', "clip must be"),
                     (b'{"clip": 1e-300}', "clip must be"), (b'{"stage_timeout": 1e300}', "stage_timeout")]:
        r = svc.post("/rounds", who="admin", data=bad, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and why in r.json["error"], (bad, r.json)
    r = chunked(json.dumps({"clients": ["a", "b", "c"], "threshold": 3, "stage_timeout": 30}).encode())
    assert r.status_code == 201, r.json
    info = svc.get("/rounds/current", who="admin").json
    assert info["params"]["threshold"] == 3 and [c["name"] for c in info["cohort"]] == ["a", "b", "c"], info
    assert 0 < info["stage_seconds_left"] <= 30


def test_a_malformed_content_length_is_400_and_opens_no_round(svc):
    """Werkzeug reads a malformed Content-Length as "no body": the round must not open with defaults."""
    body = json.dumps({"clients": ["a", "b", "c"], "threshold": 3}).encode()
    for length in ("abc", "-5"):
        r = svc.post("/rounds", who="admin", data=body, headers={"Content-Type": "application/json"},
                     environ_overrides={"CONTENT_LENGTH": length})
        assert r.status_code == 400 and "Content-Length" in r.json["error"], (length, r.json)
    assert svc.get("/rounds", who="admin").json["rounds"] == []


def test_numbers_beyond_a_double_are_refused_not_stored_as_null(svc, models):
    r = svc.post("/rounds", who="admin", data=b'{"clip": 1e999}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "beyond a double" in r.json["error"], r.json
    before = svc.snapshot()
    good = models[1][0]
    r = _multipart_post(svc, {"model": ("m", good, "application/octet-stream"),
                              "sha256": (None, hashlib.sha256(good).hexdigest().encode(), "text/plain"),
                              "meta": (None, b'{"loss": 1e999}', "application/json")})
    assert r.status_code == 400 and "meta" in r.json["error"], r.json
    assert svc.snapshot() == before


@pytest.mark.parametrize("timeout", [1e10, float("inf"), 0.0, -1.0, True])
def test_an_unusable_default_stage_timeout_is_refused_at_startup(tmp_path, timeout):
    with pytest.raises(FedtensorError, match="stage timeout"):
        create_app(tmp_path / "data", config={"FEDTENSOR_ROUND_STAGE_TIMEOUT": timeout})


def test_cli_refuses_a_stage_timeout_no_round_could_use(tmp_path, cli_app):
    r = cli_app("serve", "--data", tmp_path / "srv", "--stage-timeout", "1e10")
    assert r.exit_code == 2 and r.stderr.startswith("error: --stage-timeout must be") and "1e+10" in r.stderr


def test_a_damaged_token_file_is_a_500_that_names_no_path(svc):
    (svc.dir / "clients.json").write_text('{"clients": ')
    r = svc.get("/models", who="a")
    assert r.status_code == 500 and "token file" in r.json["error"] and str(svc.dir) not in r.json["error"]


def _add_clients(args):
    d, names, start = args
    reg = TokenRegistry(d)
    time.sleep(max(0.0, start - time.time()))  # every process at once (spawned ones start staggered)
    return [reg.add_client(n)[0].id for n in names]


def test_token_registry_is_safe_across_processes(tmp_path):
    """Parallel `serve --add-client` runs lose no registration and never share an id."""
    import multiprocessing

    d = tmp_path / "reg"
    d.mkdir()
    start = time.time() + 8
    jobs = [(d, [f"p{i}-{k}" for k in range(10)], start) for i in range(4)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = [i for got in pool.map(_add_clients, jobs) for i in got]
    names = {p.name: p.id for p in TokenRegistry(d).clients()}
    assert len(names) == 40 and sorted(names.values()) == sorted(ids) == list(range(1, 41))


def test_a_stale_rounds_error_names_the_open_round_or_none(svc):
    octet = {"Content-Type": "application/octet-stream"}
    for _ in range(2):
        rid = svc.post("/rounds", who="admin", json={"clients": ["a", "b", "c"], "threshold": 3}).json["round"]
        assert svc.post(f"/rounds/{rid}/abort", who="admin").status_code == 200
    stale = AdvertiseKeys(rid - 1, svc.ids["a"], _public_key(), _public_key())
    r = svc.post(f"/rounds/{rid - 1}/advertise", who="a", data=encode(stale), headers=octet)
    assert r.status_code == 409 and "no round is open" in r.json["error"], r.json
    now = svc.post("/rounds", who="admin", json={"clients": ["a", "b", "c"], "threshold": 3}).json["round"]
    r = svc.post(f"/rounds/{rid - 1}/advertise", who="a", data=encode(stale), headers=octet)
    assert r.status_code == 409 and f"the current round is {now}" in r.json["error"], r.json


def test_token_lookup_compares_every_entry_in_constant_time(svc, monkeypatch):
    import hmac

    from fedtensor.serve import auth

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    reg = auth.TokenRegistry(svc.dir)
    assert reg.authenticate(svc.tokens["a"]).name == "a"
    assert len(calls) == len(reg.clients())  # every entry, no early exit


def test_a_corrupted_manifest_is_detected(svc, models):
    svc.store.publish(models[1][0], models[1][1])
    path = svc.dir / "versions" / "v000002" / "model.json"
    path.write_bytes(path.read_bytes().replace(b"{", b"{ ", 1))
    with pytest.raises(CorruptVersionError, match="manifest"):
        ModelStore(svc.dir).manifest_bytes(2)


def test_a_publisher_killed_mid_write_leaves_no_visible_version(svc, models, monkeypatch):
    """A publish is assembled aside and renamed into place: a process killed mid-write (no cleanup
    handler runs) leaves no half-written version for readers."""
    from fedtensor.serve import store as store_mod

    real = store_mod._write_synced

    def dying(path, data):
        if path.name == "model.json":
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(store_mod, "_write_synced", dying)
    with pytest.raises(KeyboardInterrupt):
        svc.store.publish(models[1][0], models[1][1])
    fresh = ModelStore(svc.dir)
    assert [v.version for v in fresh.versions()] == [1] and fresh.latest().version == 1
    assert not (svc.dir / "versions" / "v000002").exists()


def test_client_never_follows_a_redirect_with_its_token(tmp_path):
    """A service answering 302 to another address (or to plain HTTP) gets a clear refusal, and the
    other address never sees the bearer token: urllib would resend it there."""
    import http.server
    import threading

    seen = []

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    sink = http.server.HTTPServer(("127.0.0.1", 0), Sink)

    class Redirect(Sink):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{sink.server_address[1]}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    redirect = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    for server in (sink, redirect):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ServiceError, match="redirected to .*not followed") as e:
            fetch_model(f"http://127.0.0.1:{redirect.server_address[1]}", "SECRET-TOKEN", tmp_path / "m")
        assert e.value.status == 302 and seen == [] and not (tmp_path / "m").exists()
    finally:
        for server in (sink, redirect):
            server.shutdown()
            server.server_close()


def test_a_bad_publication_is_refused_before_any_token_changes(tmp_path, cli_app):
    data = tmp_path / "srv"
    admin = cli_app("serve", "--data", data, "--admin-token").stdout.split()[0]
    reg = TokenRegistry(data)
    for bad in (["--publish", tmp_path / "missing"], ["--publish", tmp_path / "missing", "--meta", "[1]"]):
        r = cli_app("serve", "--data", data, "--admin-token", "--add-client", "site-c", *bad, "--json")
        assert r.exit_code != 0 and r.stdout == ""
        assert reg.authenticate(admin) is not None  # was revoked, its successor never shown
        assert "site-c" not in [p.name for p in reg.clients()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_server_stops_cleanly_on_ctrl_c_and_sigterm(tmp_path, sig):
    # Ctrl-C, the documented way to stop it, ended "error: interrupted" with exit 130 (SIGTERM: 0)
    proc = subprocess.Popen([sys.executable, "-m", "fedtensor_cli", "serve", "--data", str(tmp_path / "d"),
                             "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        assert "http://127.0.0.1:" in proc.stderr.readline()
        proc.send_signal(sig)
        rest = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopped" in rest and "error" not in rest, rest
