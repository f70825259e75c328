"""``--model`` on compress, decompress and evaluate: learned restoration from the command line.

Two small models on a crop of the bundled real CT: an untrained one (its output head starts at zero, so
restoration is exactly the identity) and one with random weights everywhere (restoration changes
voxels), so the CLI's output can be checked against the library's.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from typer.testing import CliRunner

from fedtensor.codec import decompress, read_info
from fedtensor.io import read_volume
from fedtensor.metrics import psnr
from fedtensor.nn import NetConfig, load_model, new_net, restore, save_model
from fedtensor_cli.app import app

REPO_ROOT = Path(__file__).resolve().parents[1]
CT_HEAD = REPO_ROOT / "examples" / "data" / "ct_head_uint8.nii.gz"
TINY = NetConfig(channels=(8, 16), cond_hidden=8)

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def run_json(*args: object) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_error(result, contains: str) -> None:
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and contains.lower() in lines[0].lower(), result.stderr


@pytest.fixture(scope="module")
def ct_crop(tmp_path_factory) -> Path:
    vol = read_volume(CT_HEAD)
    p = tmp_path_factory.mktemp("vol") / "head_crop.npy"
    np.save(p, np.ascontiguousarray(vol.data[40:88, 60:124, 10:42]))
    return p


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models") / "identity"
    save_model(new_net(TINY, seed=0), d)
    return d


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    net = new_net(TINY, seed=1)
    params = nnx.state(net, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(1)
    nnx.update(net, jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * 0.05) for x in leaves]))
    d = tmp_path_factory.mktemp("models") / "random"
    save_model(net, d)
    return d


@pytest.fixture(scope="module")
def stream(ct_crop, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ftz") / "crop.ftz"
    assert run("compress", ct_crop, out, "--psnr", 38).exit_code == 0
    return out


def test_decompress_with_identity_model_equals_plain(stream, identity_model, tmp_path):
    rec = run_json("decompress", stream, tmp_path / "r.npy", "--model", identity_model)
    assert rec["model_id"] == load_model(identity_model).model_id and rec["warning"] is None
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), decompress(stream.read_bytes()).data)


def test_decompress_with_model_matches_library_restore(stream, random_model, tmp_path):
    run_json("decompress", stream, tmp_path / "r.npy", "--model", random_model)
    data = stream.read_bytes()
    want = restore(decompress(data), read_info(data), load_model(random_model)).data
    got = np.load(tmp_path / "r.npy")
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, decompress(data).data)  # restoration did something


def test_evaluate_reports_with_and_without_restoration(ct_crop, stream, random_model):
    rec = run_json("evaluate", ct_crop, stream, "--model", random_model)
    orig = np.load(ct_crop)
    data = stream.read_bytes()
    restored = restore(decompress(data), read_info(data), load_model(random_model)).data
    assert rec["psnr_db"] == pytest.approx(psnr(orig, decompress(data).data), abs=1e-9)
    assert rec["psnr_db_restored"] == pytest.approx(psnr(orig, restored), abs=1e-9)
    assert {"ssim_restored", "max_abs_error_restored", "model_id"} <= rec.keys()
    table = run("evaluate", ct_crop, stream, "--model", random_model)
    assert table.exit_code == 0 and "PSNR restored" in table.stdout


def test_compress_with_model_records_it_and_mismatch_warns(ct_crop, identity_model, random_model, tmp_path):
    out = tmp_path / "tuned.ftz"
    rec = run_json("compress", ct_crop, out, "--psnr", 38, "--model", identity_model)
    info = read_info(out.read_bytes())
    assert info["model"] == rec["model_id"] == load_model(identity_model).model_id
    assert rec["psnr_db_restored"] >= 38.0  # the identity model: the plain stream, which meets the target
    res = run("decompress", out, tmp_path / "d.npy", "--model", random_model)
    assert res.exit_code == 0
    warn = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(warn) == 1 and warn[0].startswith("warning: ") and "tuned for" in warn[0]
    res = run("decompress", out, tmp_path / "plain.npy")  # the plain stream met the target: nothing to say
    assert res.exit_code == 0 and not res.stderr.strip()
    # a stream that counts on its model for the PSNR it was compressed for: without --model, say so
    from fedtensor.nn import tag_stream

    data = out.read_bytes()
    counting = tmp_path / "counting.ftz"
    counting.write_bytes(tag_stream(data, rec["model_id"], {"psnr": 40.0, "target_psnr": 40.0}))
    res = run("decompress", counting, tmp_path / "below.npy")
    warn = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 0 and len(warn) == 1 and "without --model it decodes below" in warn[0]
    res = run("decompress", counting, tmp_path / "again.npy", "--json")
    assert json.loads(res.stdout)["warning"].startswith("this stream was compressed for restoration")


def test_compress_bpv_with_model_tags_the_stream(ct_crop, identity_model, random_model, tmp_path):
    out = tmp_path / "b.ftz"
    rec = run_json("compress", ct_crop, out, "--bpv", 1.0, "--model", identity_model)
    info = read_info(out.read_bytes())
    assert info["model"] == rec["model_id"] and info["restoration"]["psnr"] == pytest.approx(rec["psnr_db_restored"])
    # tagging re-packs the header only: the payload decodes to the same voxels as an untagged stream
    plain = run_json("compress", ct_crop, tmp_path / "p.ftz", "--bpv", 1.0)
    assert plain["compressed_bytes"] < rec["compressed_bytes"]
    np.testing.assert_array_equal(decompress(out.read_bytes()).data, decompress((tmp_path / "p.ftz").read_bytes()).data)
    # a model that lowers the volume's PSNR is reported, and the stream is not tied to it
    worse = run("compress", ct_crop, tmp_path / "w.ftz", "--bpv", 1.0, "--model", random_model, "--json")
    record = json.loads(worse.stdout)
    assert worse.exit_code == 0 and record["psnr_db_restored"] < record["psnr_db"]
    assert "lowers this volume's PSNR" in record["warning"] and "lowers this volume's PSNR" in worse.stderr
    assert not read_info((tmp_path / "w.ftz").read_bytes()).get("model")


def test_batch_decompress_with_model(stream, identity_model, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.ftz").write_bytes(stream.read_bytes())
    (src / "b.ftz").write_bytes(stream.read_bytes())
    rec = run_json("decompress", src, tmp_path / "out", "--model", identity_model, "--format", "npy")
    assert rec["failed"] == 0 and all(r["model_id"] for r in rec["results"])


@pytest.mark.parametrize("args, contains", [
    (("compress", "{vol}", "{out}", "--lossless", "--model", "{model}"), "--model works with --psnr or --bpv"),
    (("compress", "{vol}", "{out}", "--max-error", "2", "--model", "{model}"), "--model works with"),
    (("compress", "{vol}", "{out}", "--tta"), "--tta needs --model"),
    (("decompress", "{ftz}", "{dec}", "--tta"), "--tta needs --model"),
    (("evaluate", "{vol}", "{vol}", "--model", "{model}"), "needs DECODED to be an .ftz"),
    (("decompress", "{ftz}", "{dec}", "--model", "{missing}"), "missing"),
    (("decompress", "{ftz}", "{dec}", "--model", "http://127.0.0.1:9/#x"), "positive integer"),
    (("decompress", "{ftz}", "{dec}", "--model", "http://127.0.0.1:9/#\u00b3"), "positive integer"),  # a digit int() refuses
])
def test_model_option_errors(args, contains, ct_crop, stream, identity_model, tmp_path):
    fill = {"vol": ct_crop, "out": tmp_path / "o.ftz", "model": identity_model, "ftz": stream,
            "dec": tmp_path / "d.npy", "missing": tmp_path / "missing"}
    one_error(run(*(a.format(**fill) for a in args)), contains)
    assert not (tmp_path / "o.ftz").exists() and not (tmp_path / "d.npy").exists()


def test_corrupted_model_is_a_one_line_error(stream, identity_model, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in identity_model.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    blob = bytearray((bad / "model.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(blob))
    one_error(run("decompress", stream, tmp_path / "d.npy", "--model", bad), "")
    assert not (tmp_path / "d.npy").exists()


def test_a_stream_with_a_fitted_layer_is_restored_with_it(ct_crop, stream, random_model, tmp_path):
    """decompress/evaluate --model use the output layer the encoder fitted (fedtensor.nn.adapt); info
    summarises it instead of printing its base64."""
    from fedtensor.nn import tag_stream
    from fedtensor.nn.adapt import encode_adaptation, fit, fit_adaptation

    data, model = stream.read_bytes(), load_model(random_model)
    decoded, orig = decompress(data), np.load(ct_crop)
    coef = fit_adaptation(model, decoded.data, read_info(data), orig, inputs=True)
    tagged = tmp_path / "adapted.ftz"
    tagged.write_bytes(tag_stream(data, model.model_id, adaptation=coef))
    run_json("decompress", tagged, tmp_path / "r.npy", "--model", random_model)
    want = restore(decoded, read_info(tagged.read_bytes()), model).data
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), want)
    plain = restore(decoded, read_info(data), model).data
    assert psnr(orig, want) > max(psnr(orig, plain), psnr(orig, decoded.data))
    rec = run_json("evaluate", ct_crop, tagged, "--model", random_model)
    assert rec["psnr_db_restored"] == pytest.approx(psnr(orig, want), abs=1e-9)
    shown = run("info", tagged)
    coded = len(base64.b64decode(encode_adaptation(coef)["layer"]))
    assert shown.exit_code == 0 and f"output layer fitted to this stream: {coded} bytes" in shown.stdout
    assert encode_adaptation(coef)["layer"][:24] not in shown.stdout
    # a layer in intensity classes: used by decompress, summarised by info
    layers = fit(model, decoded.data, read_info(data), orig).layers
    name = max((k for k in layers if k.startswith("small/")), key=lambda k: int(k.split("/")[1]))
    classed = layers[name][0]
    tagged.write_bytes(tag_stream(data, model.model_id, adaptation=classed))
    run_json("decompress", tagged, tmp_path / "c.npy", "--model", random_model)
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), restore(decoded, read_info(tagged.read_bytes()), model).data)
    assert psnr(orig, np.load(tmp_path / "c.npy")) > psnr(orig, decoded.data)
    shown = run("info", tagged)
    assert f"in {classed.coef.shape[0]} intensity classes" in shown.stdout


def test_an_exact_stream_is_neither_restored_nor_tied_to_the_model(ct_crop, identity_model, tmp_path):
    """--model on a lossless stream (compress refuses --lossless with --model outright): one warning that it
    is ignored; no model id in the figures, nothing called "restored"."""
    out = tmp_path / "ll.ftz"
    run_json("compress", ct_crop, out, "--lossless")
    res = run("decompress", out, tmp_path / "d.npy", "--model", identity_model)
    warn = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 0 and len(warn) == 1 and "lossless stream is exact as decoded" in warn[0]
    assert "restored by" not in res.stdout
    ev = run_json("evaluate", ct_crop, out, "--model", identity_model)
    assert "model_id" not in ev and "psnr_db_restored" not in ev and "not restored" in ev["warning"]
