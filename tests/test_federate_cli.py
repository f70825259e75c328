"""``fedtensor federate``: a tiny federation end to end on crops of the real head CT, resumed after an
interruption, publishing every global version; one-line errors for bad arguments."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
import typer
from typer.testing import CliRunner

from fedtensor.federated.restoration import FederateConfig, federate
from fedtensor.nn import load_model, model_id
from fedtensor.nn.checkpoint import ModelError
from fedtensor_cli.federate_cmd import register

SMALL = ["--clients", "3", "--local-steps", "2", "--batch", "2", "--patch", "16", "--channels", "8,16",
         "--targets", "36", "--blocks", "8", "--val-fraction", "0.34"]


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    register(a)

    @a.command("noop")
    def _noop() -> None:  # a second command keeps "federate" a named sub-command
        pass

    return a


def _run(app, *args):
    return CliRunner().invoke(app, ["federate", *map(str, args)])


@pytest.mark.slow  # > 20 s: codec pairs, compiling the round, three federations (99 s on a loaded 2-core machine)
def test_cli_federates_and_resumes(app, head_crop_paths, tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a", tmp_path / "b"
    r = _run(app, *head_crop_paths, "--out", a, "--rounds", "2", "--cache", cache, *SMALL, "--json",
             "--publish", tmp_path / "store")
    assert r.exit_code == 0, r.output
    full = json.loads(r.stdout.strip().splitlines()[-1])
    from fedtensor.serve.store import ModelStore

    versions = ModelStore(tmp_path / "store").versions()  # every round's global model, in order
    assert [v.meta["round"] for v in versions] == [1, 2] and all(v.meta["n_clients"] == 3 for v in versions)
    assert full["published"] == [{"round": v.meta["round"], "version": v.version, "sha256": v.sha256}
                                 for v in versions]
    assert load_model(ModelStore(tmp_path / "store").export(2, tmp_path / "v2")).config.channels == (8, 16)
    assert full["rounds_run"] == 2 and full["model_id"] == model_id(a)
    assert len(full["train_volumes"]) == 2 and len(full["val_volumes"]) == 1
    assert full["best_val_gain_db"] is not None
    lines = (a / "history.csv").read_text().splitlines()
    assert lines[0].startswith("round,clients,patches,train_loss,val_loss,val_gain_db") and len(lines) == 3
    assert (a / "loss.png").stat().st_size > 1000
    model = load_model(a)  # the format `fedtensor decompress --model` reads
    assert model.config.channels == (8, 16)

    # stopped after one round, then continued: the same model as the uninterrupted run
    r1 = _run(app, *head_crop_paths, "--out", b, "--rounds", "1", "--cache", cache, *SMALL, "--json")
    assert r1.exit_code == 0, r1.output
    assert json.loads(r1.stdout.strip().splitlines()[-1])["rounds_run"] == 1
    r2 = _run(app, *head_crop_paths, "--out", b, "--rounds", "2", "--cache", cache, *SMALL, "--json")
    assert r2.exit_code == 0, r2.output
    resumed = json.loads(r2.stdout.strip().splitlines()[-1])
    assert resumed["rounds_run"] == 2 and resumed["model_id"] == full["model_id"]

    # fewer rounds than already ran: refused, one line (it ended with the 2 rounds, as if asked for them)
    fewer = _run(app, *head_crop_paths, "--out", b, "--rounds", "1", "--cache", cache, *SMALL)
    assert fewer.exit_code == 1 and "already ran 2 rounds" in fewer.output, fewer.output
    assert len(fewer.output.strip().splitlines()) == 1

    # other settings in an existing run directory: refused, one line; --force starts over
    other = _run(app, *head_crop_paths, "--out", b, "--rounds", "2", "--cache", cache, *SMALL, "--lr", "1e-3")
    assert other.exit_code == 1 and "other settings" in other.output and len(other.output.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("server_optimizer", ["fedavg", "fedadam"])  # FedAdam's state must survive a resume
def test_library_resume_and_versions(head_crop_paths, tmp_path, server_optimizer):
    cfg = FederateConfig(clients=3, rounds=2, local_steps=2, batch=2, patch=16, channels=(8, 16), targets=(36.0,),
                         blocks=("8",), val_fraction=0.34, partition="by-volume", sample_fraction=0.67,
                         server_optimizer=server_optimizer)
    versions = []

    def on_version(rnd, blob, manifest, meta):
        assert manifest["model_id"] == hashlib.sha256(blob).hexdigest() and meta["round"] == rnd
        versions.append(rnd)

    full = federate(head_crop_paths, tmp_path / "a", cfg, cache_dir=tmp_path / "cache", on_version=on_version)
    assert versions == [1, 2] and [r["clients"] for r in full["history"]] == [2, 2]

    class Stop(Exception):
        pass

    def interrupt(event, info):
        if event == "round" and info["round"] == 1:
            raise Stop

    with pytest.raises(Stop):
        federate(head_crop_paths, tmp_path / "b", cfg, cache_dir=tmp_path / "cache", progress=interrupt)
    resumed = federate(head_crop_paths, tmp_path / "b", cfg, cache_dir=tmp_path / "cache")
    assert resumed["model_id"] == full["model_id"] and resumed["rounds_run"] == 2
    # secure aggregation: the same global model up to the fixed-point encoding
    sec = federate(head_crop_paths, tmp_path / "c", replace(cfg, rounds=1, secure_agg=True), cache_dir=tmp_path / "cache")
    a1, s1 = full["history"][0], sec["history"][0]
    assert s1["val_loss"] == pytest.approx(a1["val_loss"], rel=1e-3)
    state = tmp_path / "b" / "checkpoint" / "state-00002.safetensors"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(ModelError, match="corrupted federation checkpoint"):
        federate(head_crop_paths, tmp_path / "b", cfg, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("extra, needle", [
    (["--partition", "stripes"], "partition"),
    (["--partition", "dirichlet:-2"], "α"),
    (["--clients", "0"], "--clients"),
    (["--sample-fraction", "1.5"], "--sample-fraction"),
    (["--patch", "18"], "--patch"),
    (["--server-opt", "sgd-magic"], "server optimizer"),
])
def test_bad_arguments_give_one_line(app, head_crop_paths, tmp_path, extra, needle):
    r = _run(app, *head_crop_paths, "--out", tmp_path / "x", "--rounds", "1", *extra)
    assert r.exit_code == 2, r.output
    assert r.output.strip().startswith("error:") and needle in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_missing_input_is_an_error(app, tmp_path):
    r = _run(app, tmp_path / "nope.nii.gz", "--out", tmp_path / "x")
    assert r.exit_code == 1 and r.output.strip().startswith("error:")


def test_a_failed_run_leaves_no_store_it_created(app, head_crop_paths, tmp_path):
    """--publish STORE: a store this run created goes with a run that failed before publishing, as --out does."""
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    r = _run(app, head_crop_paths[0], bad, "--out", tmp_path / "x", "--publish", tmp_path / "store", *SMALL)
    assert r.exit_code == 1 and "bad.nii.gz" in r.output
    assert not (tmp_path / "store").exists()
