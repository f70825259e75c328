"""Tests of the learned restoration (fedtensor.nn): model, tiling, training, checkpoints, CLI.

Everything runs on small synthetic CT-like phantoms and a tiny net (channels 8/16) so the whole file
takes well under a minute on two CPU cores; the real-data figures come from benchmarks/restoration.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import importlib
import math
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedtensor.io import Volume
from fedtensor.nn import (
    ModelError,
    ModelMismatchWarning,
    NetConfig,
    TrainConfig,
    compress_for_quality,
    decompress_restored,
    load_model,
    model_id,
    model_mismatch,
    new_net,
    restore,
    restore_array,
    save_model,
    tag_stream,
    train,
)
from fedtensor.nn.data import PatchSampler, Source, make_pairs, prefetched_batches, split_by_volume
from fedtensor.nn.infer import RestorationModel, correction_map, model_from_bytes, to_dtype
from fedtensor.nn.model import RECEPTIVE_RADIUS, OutputLayer, conv3d, half_resolution_kernel, space_to_depth
from fedtensor.nn.normalize import assemble_input, block_phases, normaliser_for, operating_point
from fedtensor.errors import FedtensorError
from fedtensor.nn.train import Trainer

TINY = NetConfig(channels=(8, 16), cond_hidden=8)


def phantom(shape=(48, 48, 32), seed=0) -> np.ndarray:
    """A CT-like int16 volume: air, a soft-tissue ellipsoid with smooth texture, two bone spheres."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.95) ** 2 < 1
    tex = rng.normal(size=shape)
    for ax in range(3):  # smooth the texture a little
        tex = (np.roll(tex, 1, ax) + tex + np.roll(tex, -1, ax)) / 3
    v = np.where(body, 40 + 60 * tex, -1000.0)
    for c in ((0.3, 0.2, 0.1), (-0.4, -0.1, 0.3)):
        v = np.where((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < 0.05, 1200.0, v)
    return np.rint(v + rng.normal(scale=5, size=shape)).astype(np.int16)


def random_model(config=TINY, seed=1, scale=0.2) -> RestorationModel:
    """A model with random (non-zero) weights everywhere, including the zero-initialised head."""
    net = new_net(config, seed=seed)
    params = nnx.state(net, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(size=x.shape).astype(np.float32) * scale) for x in leaves]
    nnx.update(net, jax.tree_util.tree_unflatten(treedef, leaves))
    return RestorationModel(net, "0" * 64, config)


INFO_BT = {"codec": "block-tucker", "params": {"block": [8, 8, 16], "step": 300.0, "offset": 0.0}}


def net_features(data: np.ndarray):
    """``(features, block, cond)`` of a volume decoded from an INFO_BT stream."""
    norm = normaliser_for(data)
    s, cond, block = operating_point("block-tucker", INFO_BT["params"], norm)
    return norm.net_input(data, s), block, cond


@pytest.fixture(scope="module")
def rmodel() -> RestorationModel:
    return random_model()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Source]:
    """Two phantoms through the real codec (one target, 8³ blocks), cached."""
    d = tmp_path_factory.mktemp("nn_data")
    paths = []
    for i in range(2):
        p = d / f"ph{i}.npy"
        np.save(p, phantom(seed=i))
        paths.append(p)
    return make_pairs(paths, targets=(34.0,), blocks=("8",), cache_dir=d / "cache")


@pytest.fixture(scope="module")
def volume_files(sources, tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("nn_vols")
    out = []
    for s in sources:
        p = d / f"{s.label}.npy"
        np.save(p, s.original)
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------ model


def test_conv_implementations_agree():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 12, 16, 5)).astype(np.float32)
    w = rng.normal(size=(3, 3, 3, 5, 7)).astype(np.float32)
    a, b = jax.jit(lambda x, w: (conv3d(x, w, "2d"), conv3d(x, w, "3d")))(x, w)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["2d", "3d"])  # the CPU path and the accelerators' native 3D convolution
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_half_resolution_kernel_is_the_full_resolution_convolution(k, impl):
    """The net runs its full-resolution linear path on space_to_depth input: same function, borders
    included, for even sizes that are not multiples of 4."""
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.normal(size=(2, 6, 10, 4, 3)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(k, k, k, 3, 2)).astype(np.float32))
    full = space_to_depth(conv3d(x, w, impl))
    half = conv3d(space_to_depth(x), half_resolution_kernel(w), impl)
    np.testing.assert_allclose(np.asarray(half), np.asarray(full), rtol=1e-5, atol=1e-4)
    g_full = jax.grad(lambda w: jnp.sum(jnp.sin(space_to_depth(conv3d(x, w, impl)))))(w)
    g_half = jax.grad(lambda w: jnp.sum(jnp.sin(conv3d(space_to_depth(x), half_resolution_kernel(w), impl))))(w)
    np.testing.assert_allclose(np.asarray(g_half), np.asarray(g_full), rtol=1e-4, atol=1e-3)


def test_untrained_model_is_identity():
    vol = phantom((40, 36, 20))
    model = RestorationModel(new_net(TINY), "0" * 64, TINY)
    out = restore_array(vol, INFO_BT, model)
    np.testing.assert_array_equal(out, vol.astype(np.float64))


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32", "int32"])
def test_restore_preserves_shape_dtype_geometry(rmodel, dtype):
    base = phantom((40, 36, 20))
    if dtype == "uint8":
        data = np.clip((base + 1000) / 10, 0, 255).astype(np.uint8)
    elif dtype == "float32":
        data = np.clip(base + 1000, 0, None).astype(np.float32) / 3  # MR-like, percentile-normalised
    else:
        data = base.astype(dtype)
    vol = Volume(data, (0.8, 0.9, 2.5), np.diag([0.8, 0.9, 2.5, 1.0]), {"format": "ftz"})
    for info in (INFO_BT, {"codec": "omlsvd-global", "params": {"ranks": [4, 4, 4], "step": 25.0, "offset": 0.0}}):
        out = restore(vol, info, rmodel)
        assert out.data.shape == data.shape and out.data.dtype == data.dtype
        assert out.spacing == vol.spacing and np.array_equal(out.affine, vol.affine)
        assert not np.array_equal(out.data, data)  # a random model does change the volume
        if data.dtype.kind in "iu":
            info_ = np.iinfo(data.dtype)
            assert out.data.min() >= info_.min and out.data.max() <= info_.max


def test_exact_codecs_are_not_restored(rmodel):
    vol = Volume(phantom((24, 24, 16)))
    for codec in ("lossless", "max-error"):
        assert restore(vol, {"codec": codec, "params": {"step": 3}}, rmodel) is vol


def test_tiled_equals_whole_volume(rmodel):
    data = phantom((72, 64, 40), seed=3)
    x, block, cond = net_features(data)
    whole = correction_map(rmodel, x, block, cond, tile=None)
    tiled = correction_map(rmodel, x, block, cond, tile=64)  # 4 × 3 × 1 overlapping tiles
    assert whole.shape == data.shape
    assert float(np.abs(whole).max()) > 1e-2  # a non-trivial correction
    np.testing.assert_allclose(tiled, whole, atol=2e-5 * float(np.abs(whole).max()), rtol=0)


def test_test_time_augmentation_is_flip_equivariant(rmodel):
    # sides that are multiples of the block: mirroring the volume keeps the block grid, so the mean over
    # the 8 mirrored passes must commute with a mirror
    data = phantom((48, 48, 32), seed=4)
    info = {"codec": "block-tucker", "params": {"block": [8, 8, 16], "step": 300.0}}
    a = restore_array(data, info, rmodel, tile=None, tta=True)
    b = restore_array(np.ascontiguousarray(data[::-1]), info, rmodel, tile=None, tta=True)
    scale = float(np.abs(a - data).max())  # float32 rounding, relative to the size of the correction
    np.testing.assert_allclose(b[::-1], a, atol=1e-4 * scale, rtol=0)
    plain = restore_array(data, info, rmodel, tile=None)
    assert float(np.abs(plain - a).max()) > 1e-2 * scale  # the average differs from a single pass


def test_receptive_field_is_bounded(rmodel):
    x = np.zeros((1, 64, 64, 56, 5), np.float32)  # the tile shape of test_tiled_equals_whole_volume
    c = np.zeros((1, 4), np.float32)
    y0 = rmodel.apply(x, c)[0]
    for offset in range(4):  # every phase of the space-to-depth grid
        x1 = x.copy()
        p = 28 + offset
        x1[0, p, p, p, 0] = 10.0
        changed = np.argwhere(np.abs(rmodel.apply(x1, c)[0] - y0) > 0)
        assert len(changed) and np.abs(changed - p).max() <= RECEPTIVE_RADIUS


# ------------------------------------------------------------------------------------------ data


def test_split_by_volume_is_disjoint_and_seeded():
    labels = [f"v{i}" for i in range(10)]
    tr, va = split_by_volume(labels, 0.2, seed=3)
    assert len(va) == 2 and set(tr) | set(va) == set(labels) and not set(tr) & set(va)
    assert split_by_volume(labels, 0.2, seed=3) == (tr, va)
    assert split_by_volume(labels[:3], 0.2, 0)[1] and split_by_volume(labels[:1], 0.2, 0)[1] == []
    assert split_by_volume(labels, 0.0, 0)[1] == []


def test_pairs_and_patches(sources):
    assert [len(s.pairs) for s in sources] == [1, 1]
    pair = sources[0].pairs[0]
    assert pair.decoded.dtype == np.int16 and pair.block == (8, 8, 8) and pair.psnr >= 34
    b = PatchSampler(sources, patch=32).sample(np.random.default_rng(0), 3)
    assert b.x.shape == (3, 32, 32, 32, 5) and b.target.shape == b.mask.shape == (3, 32, 32, 32, 1)
    # the depth-32 phantom fits one patch; the phase channels are those of the block grid
    ph = assemble_input(np.zeros((32, 32, 32, 2), np.float32), block_phases((32, 32, 32), (8, 8, 8)))[..., 2:]
    assert all(np.array_equal(np.sort(np.unique(b.x[k, ..., 2:])), np.sort(np.unique(ph))) for k in range(3))
    # the target is the codec's error in units of its quantiser step: O(0.1), whatever the volume's units
    s = sources[0]
    t = (pair.norm.forward(s.original) - pair.norm.forward(pair.decoded)) / pair.s
    assert 0.01 < float(np.sqrt(np.mean(t ** 2))) < 1.0
    assert abs(float(np.sqrt(np.mean(t ** 2))) - float(np.sqrt(np.mean(b.target ** 2)))) < 0.5


def test_prefetched_batches_do_not_depend_on_threads(sources):
    """Batch k is the sampler's draw from its own seed, whatever the number of sampling threads."""
    sampler = PatchSampler(sources, patch=16)
    expected = [sampler.sample(np.random.default_rng([7, 2, k]), 3) for k in range(5)]
    for workers in (1, 3):
        got = list(prefetched_batches(sampler, (7, 2), 3, 5, workers))
        assert len(got) == 5
        for e, g in zip(expected, got):
            for field in ("x", "cond", "target", "mask", "s"):
                np.testing.assert_array_equal(getattr(g, field), getattr(e, field))
    # a consumer that stops early leaves no sampling threads behind
    batches = prefetched_batches(sampler, (7, 2), 3, 50, 2)
    next(batches)
    batches.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("fedtensor-sampler")]


# ------------------------------------------------------------------------------------------ training


def test_short_training_lowers_the_loss(sources):
    cfg = TrainConfig(epochs=1, patches_per_epoch=120, batch=4, patch=16, lr=5e-3, warmup_epochs=0.05,
                      channels=(8, 16))
    trainer = Trainer(cfg)
    batch = PatchSampler(sources, patch=16).sample(np.random.default_rng(99), 4)
    params, opt = trainer.init_state()
    before, _ = trainer.validate(params, [batch])
    losses = []
    # some steps on one batch: the jitted step must reduce its loss. (80: since the codec decodes the
    # phantom's air to exactly its most common value, what is left there is the air's own noise,
    # which no net predicts, and 40 steps gained 4.4 %.)
    for k in range(80):
        params, opt, loss = trainer.train_step(params, opt, batch, k)
        losses.append(float(loss))
    after, gain = trainer.validate(params, [batch])
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(before, rel=1e-4)  # untrained = identity: loss = mean target²
    assert after < 0.95 * before and gain > 0.2


TRAIN_CFG = dict(epochs=2, patches_per_epoch=8, batch=4, patch=16, channels=(8, 16), val_patches=8, targets=(34.0,),
                 blocks=("8",))


def test_train_writes_model_and_resumes_identically(sources, tmp_path):
    cfg = TrainConfig(**TRAIN_CFG)
    full = train(None, tmp_path / "a", cfg, sources=sources)
    out = tmp_path / "a"
    for name in ("model.safetensors", "model.json", "history.csv", "loss.png", "checkpoint/state.json",
                 "checkpoint/state-0002.safetensors", "checkpoint/best-0002.safetensors"):
        assert (out / name).is_file(), name
    assert full["model_id"] == model_id(out) == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert full["train_volumes"] and full["val_volumes"] and not set(full["train_volumes"]) & set(full["val_volumes"])
    assert json.loads((out / "model.json").read_text())["intensity_kinds"] == ["ct"]
    lines = (out / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,step,lr,train_loss,val_loss") and len(lines) == 3

    class Stop(Exception):
        pass

    def interrupt(event, info):
        if event == "step" and info["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train(None, tmp_path / "b", cfg, sources=sources, progress=interrupt)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["epoch"] == 1
    resumed = train(None, tmp_path / "b", cfg, sources=sources)
    assert resumed["model_id"] == full["model_id"]  # bit-identical to the uninterrupted run
    with pytest.raises(ModelError, match="other settings"):
        train(None, tmp_path / "b", TrainConfig(**{**TRAIN_CFG, "lr": 1e-3}), sources=sources)
    state = tmp_path / "b" / "checkpoint" / "state-0002.safetensors"
    state.write_bytes(state.read_bytes()[:-10])  # a truncated training checkpoint
    with pytest.raises(ModelError, match="corrupted training checkpoint"):
        train(None, tmp_path / "b", cfg, sources=sources)


@pytest.mark.parametrize("change, message", [
    ({"lr": math.inf}, "^learning rate must be finite, got inf$"), ({"clip": math.nan}, "^gradient clip must be finite"),
    ({"targets": (40.0, math.inf)}, "^targets must be finite"), ({"seed": -1}, "seed must be"),
    ({"seed": 2**32}, "seed must be"),
    ({"blocks": ("8x8",)}, "three sides"), ({"blocks": ()}, "at least one block shape"),
])
def test_train_config_refuses_non_finite_settings(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**TRAIN_CFG, **change}).check()


def test_a_diverged_run_stops_with_an_error_and_keeps_no_nan_model(sources, tmp_path):
    with pytest.raises(ModelError, match="training diverged: non-finite loss in epoch 1"):
        train(None, tmp_path / "d", TrainConfig(**{**TRAIN_CFG, "lr": 1e30, "clip": 1e30}), sources=sources)
    assert not (tmp_path / "d" / "model.safetensors").exists()


def test_weights_that_diverge_on_an_epochs_last_step_are_caught(sources, tmp_path, monkeypatch):
    """The losses of an epoch are measured before each update: NaN weights from its last step show only
    in the weights (and, without validation volumes, nothing else would catch them)."""
    real, calls = Trainer.train_step, []

    def last_step_diverges(self, params, opt_state, batch, step):
        params, opt_state, loss = real(self, params, opt_state, batch, step)
        calls.append(step)
        if len(calls) == self.cfg.steps_per_epoch:
            params = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), params)
        return params, opt_state, loss

    monkeypatch.setattr(Trainer, "train_step", last_step_diverges)
    with pytest.raises(ModelError, match="training diverged"):
        train(None, tmp_path / "d", TrainConfig(**{**TRAIN_CFG, "val_fraction": 0.0}), sources=sources)
    assert not (tmp_path / "d" / "model.safetensors").exists()


def test_validation_of_weights_that_give_inf_is_nan_not_an_error():
    """Infinite validation sums (a federated round with --server-lr 1e30) made log10(0) raise a math
    domain error (an internal error) before the divergence check could say what happened."""
    trainer = Trainer.__new__(Trainer)  # only its validate(): sums from an _eval that overflowed
    trainer._eval = lambda params, *batch: (jnp.float32(np.inf), jnp.float32(1), jnp.float32(1), jnp.float32(np.inf))
    batch = type("B", (), {"x": None, "cond": None, "target": None, "mask": None, "s": None})()
    loss, gain = trainer.validate(None, [batch])
    assert math.isnan(loss) and math.isnan(gain)


def test_sources_without_a_digest_are_told_apart_by_content(sources):
    from fedtensor.nn.data import training_sources

    bare = [dataclasses.replace(s, digest="") for s in sources]
    train_src, val_src = training_sources(None, None, bare, None, TrainConfig(**TRAIN_CFG), None, lambda *a: None)
    assert len(train_src) + len(val_src) == len(sources)


def test_explicit_validation_leaves_the_training_order_to_no_one(sources):
    """With validation volumes given, DATA in another order is the same run (its fingerprint sorts the
    volumes; the sampler and the partition follow this order, so a reordered resume diverged)."""
    from fedtensor.nn.data import training_sources

    cfg = TrainConfig(**TRAIN_CFG)
    other = dataclasses.replace(sources[0], label="a-third", original=sources[0].original + 1, digest="")
    train = [sources[0], other]
    orders = [training_sources(None, None, t, sources[1:2], cfg, None, lambda *a: None)[0]
              for t in (train, train[::-1])]
    assert [s.label for s in orders[0]] == [s.label for s in orders[1]]


def test_one_volume_cannot_be_trained_and_validated_on(sources, tmp_path):
    with pytest.raises(ModelError, match="the same volume is given twice"):
        train(None, tmp_path / "t", TrainConfig(**TRAIN_CFG), sources=sources[:1], val_sources=[
            dataclasses.replace(sources[0], label="renamed")])


def test_a_constant_volume_is_refused_with_its_name(tmp_path):
    p = tmp_path / "flat.npy"
    np.save(p, np.full((20, 20, 20), 7, np.int16))
    with pytest.raises(ModelError, match="flat.npy is a constant volume"):
        make_pairs([p], targets=(34.0,), blocks=("8",))


def test_exact_streams_give_no_pairs_and_a_volume_without_any_is_named(tmp_path, head_crop_paths):
    """Where the codec's exact stream is the smaller (small, simple volumes at high targets) there is
    nothing to restore: that pair is left out with a warning; a volume with no pair left is an error
    naming it (it was an internal error, "codec 'lossless' is not restorable")."""
    from fedtensor.io import read_volume

    head = read_volume(head_crop_paths[0]).data
    small = tmp_path / "small.npy"
    np.save(small, np.ascontiguousarray(head[:24, :24, :16]))
    with pytest.warns(UserWarning, match="no training pair at 60 dB"):
        (src,) = make_pairs([small], targets=(30.0, 60.0), blocks=("8",))
    assert [p.target for p in src.pairs] == [30.0] and all(p.codec == "block-tucker" for p in src.pairs)
    with pytest.raises(ModelError, match="small.npy: the codec stores it exactly at every target"):
        make_pairs([small], targets=(60.0,), blocks=("8",))


def test_volumes_sharing_a_name_are_labelled_by_their_directory(tmp_path):
    from fedtensor.nn.data import volume_labels

    a, b, c = tmp_path / "a" / "scan.nii.gz", tmp_path / "b" / "scan.nii.gz", tmp_path / "b" / "other.npy"
    assert volume_labels([a, b, c]) == ["a-scan", "b-scan", "other"]
    assert volume_labels([b, a]) == ["b-scan", "a-scan"]  # whatever the order: a resumed run finds its data


@pytest.mark.parametrize("damage", [
    lambda m: [],
    lambda m: {k: v for k, v in m.items() if k != "history"},
    lambda m: {**m, "epoch": "1"},
    lambda m: {k: v for k, v in m.items() if k != "best_sha256"},  # the best weights unverifiable
])
def test_a_damaged_checkpoint_record_is_a_clear_error(sources, tmp_path, damage):
    out = tmp_path / "r"
    cfg = TrainConfig(**{**TRAIN_CFG, "epochs": 1})
    train(None, out, cfg, sources=sources)
    state = out / "checkpoint" / "state.json"
    state.write_text(json.dumps(damage(json.loads(state.read_text()))))
    with pytest.raises(ModelError, match="corrupted training checkpoint"):
        train(None, out, cfg, sources=sources)


def test_a_run_directory_is_held_and_a_model_without_checkpoint_never_overwritten(sources, tmp_path):
    """A second run into a busy --out is refused; a directory holding a model but no checkpoint (a
    fetched or published one) is refused unless --force; a finished run's rerun writes nothing."""
    import fcntl
    import os
    import shutil

    from fedtensor.federated.restoration import FederateConfig, federate

    cfg = TrainConfig(**{**TRAIN_CFG, "epochs": 1})
    out = tmp_path / "m"
    first = train(None, out, cfg, sources=sources)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert train(None, out, cfg, sources=sources)["model_id"] == first["model_id"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamps  # nothing rewritten

    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process's run
    try:
        with pytest.raises(ModelError, match="in use by another"):
            train(None, out, cfg, sources=sources)
    finally:
        os.close(fd)

    fetched = tmp_path / "fetched"
    fetched.mkdir()
    for name in ("model.safetensors", "model.json"):
        shutil.copy(out / name, fetched / name)
    before = (fetched / "model.safetensors").read_bytes()
    with pytest.raises(ModelError, match="holds a model but no training checkpoint"):
        train(None, fetched, cfg, sources=sources)
    with pytest.raises(ModelError, match="holds a model but no training checkpoint"):
        federate(None, fetched, FederateConfig(clients=2, rounds=1, local_steps=1, batch=4, patch=16,
                                               channels=(8, 16), targets=(34.0,), blocks=("8",)), sources=sources)
    assert (fetched / "model.safetensors").read_bytes() == before
    train(None, fetched, cfg, sources=sources, resume=False)  # --force
    with pytest.raises(ModelError, match="holds a training run, not a federation run"):
        federate(None, out, FederateConfig(clients=2, rounds=1, local_steps=1, batch=4, patch=16, channels=(8, 16),
                                           targets=(34.0,), blocks=("8",)), sources=sources)


def test_a_round_whose_publishing_failed_is_published_on_resume(sources, tmp_path):
    from fedtensor.federated.restoration import FederateConfig, federate

    cfg = FederateConfig(clients=2, rounds=3, local_steps=1, batch=4, patch=16, channels=(8, 16),
                         targets=(34.0,), blocks=("8",))
    published, fail = [], {1, 3}

    def on_version(rnd, blob, manifest, meta):
        if rnd in fail:
            fail.discard(rnd)
            raise OSError("the store is unreachable")
        published.append(rnd)

    for _ in range(2):  # round 1 (cut off before the first checkpoint), then round 3, fail once each
        with pytest.raises(OSError):
            federate(None, tmp_path / "f", cfg, sources=sources, on_version=on_version)
    federate(None, tmp_path / "f", cfg, sources=sources, on_version=on_version)
    assert published == [1, 2, 3]


def test_resuming_with_other_settings_names_the_settings(sources, tmp_path):
    out = tmp_path / "r"
    train(None, out, TrainConfig(**{**TRAIN_CFG, "epochs": 1}), sources=sources)
    with pytest.raises(ModelError, match="other settings or data"):  # not "does not match this architecture"
        train(None, out, TrainConfig(**{**TRAIN_CFG, "epochs": 1, "channels": (4, 8)}), sources=sources)


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(rmodel, tmp_path):
    mid = save_model(rmodel.net, tmp_path / "m", {"note": "test"})
    loaded = load_model(tmp_path / "m")
    assert loaded.model_id == mid == model_id(tmp_path / "m")
    assert loaded.config == TINY and json.loads((tmp_path / "m" / "model.json").read_text())["note"] == "test"
    a, b = nnx.state(rmodel.net, nnx.Param), nnx.state(loaded.net, nnx.Param)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    x = np.random.default_rng(0).normal(size=(1, 56, 52, 36, 5)).astype(np.float32)
    c = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(loaded.apply(x, c), rmodel.apply(x, c))


def test_corrupted_checkpoint_gives_clear_error(rmodel, tmp_path):
    d = tmp_path / "m"
    save_model(rmodel.net, d)
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="corrupted model checkpoint.*SHA-256"):
        load_model(d)
    (d / "model.json").unlink()  # without the manifest's id the weights cannot be verified: refused
    with pytest.raises(ModelError, match="has no model.json naming its model id"):
        load_model(d)
    for damaged in (bytes(raw[:200]), b"not a checkpoint at all"):  # the parser itself refuses these
        with pytest.raises(ModelError, match="^corrupted model checkpoint"):
            model_from_bytes(damaged)
    nan = tmp_path / "nan"
    save_model(rmodel.net, nan)
    params = nnx.state(rmodel.net, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    net = new_net(TINY)
    nnx.update(net, jax.tree_util.tree_unflatten(treedef, [jnp.full(x.shape, jnp.nan) for x in leaves]))
    save_model(net, nan)  # weights of a diverged run: not loaded (they would restore to garbage)
    with pytest.raises(ModelError, match="weights are not all finite"):
        load_model(nan)
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a fedtensor model directory"):
        load_model(tmp_path / "empty")
    other = new_net(NetConfig(channels=(4, 8), cond_hidden=8))
    save_model(other, tmp_path / "o")
    assert load_model(tmp_path / "o").config.channels == (4, 8)  # the architecture travels with the weights


def test_stream_model_id_and_mismatch_warning(rmodel, tmp_path):
    from fedtensor.codec import compress, read_info

    vol = Volume(phantom((40, 36, 20)))
    data = compress(vol, psnr=34, block=8)
    d = tmp_path / "m"
    mid = save_model(rmodel.net, d)
    tagged = tag_stream(data, mid, {"psnr": 35.0})
    info = read_info(tagged)
    assert info["model"] == mid and info["restoration"]["psnr"] == 35.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decompress_restored(tagged, d)  # same model: no warning
    assert out.data.dtype == np.int16 and out.meta["restoration_model"] == mid
    with pytest.warns(ModelMismatchWarning, match="tuned for restoration model"):
        decompress_restored(tag_stream(data, "f" * 64), d)


def test_model_warns_on_an_intensity_kind_it_was_not_trained_on(rmodel):
    """A model trained on HU CTs only, restoring an 8-bit volume, says so (it can lower the quality);
    on the kind it knows, on an exact stream, or with no kinds recorded (older models), it says nothing."""
    import dataclasses

    from fedtensor.codec import compress, decompress, read_info

    ct_only = dataclasses.replace(rmodel, manifest={"intensity_kinds": ["ct"]})
    ct = compress(Volume(phantom((40, 36, 20))), psnr=34, block=8)
    u8_vol = Volume(((phantom((40, 36, 20)).astype(np.float64) + 1000) / 9).clip(0, 255).astype(np.uint8))
    u8 = compress(u8_vol, psnr=34, block=8)
    assert model_mismatch(read_info(ct), ct_only, decompress(ct).data) is None
    msg = model_mismatch(read_info(u8), ct_only, decompress(u8).data)
    assert msg and "CT (HU)" in msg and "8-bit" in msg
    with pytest.warns(ModelMismatchWarning, match="8-bit"):
        decompress_restored(u8, ct_only)
    exact = compress(u8_vol, lossless=True)  # exact streams are never restored: nothing to warn about
    assert model_mismatch(read_info(exact), ct_only, decompress(exact).data) is None
    assert model_mismatch(read_info(u8), rmodel, decompress(u8).data) is None


# ------------------------------------------------------------------------------------------ CLI


def test_cli_train(volume_files, tmp_path):
    import typer
    from typer.testing import CliRunner

    from fedtensor_cli.train_cmd import register

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps "train" a named sub-command
        pass

    out = tmp_path / "model"
    args = ["train", *map(str, volume_files), "--out", str(out), "--epochs", "1", "--patches-per-epoch", "8",
            "--batch", "4", "--patch", "16", "--channels", "8,16", "--targets", "34", "--blocks", "8", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["model_id"] == model_id(out) and summary["epochs_run"] == 1
    bad = CliRunner().invoke(app, [*args[:-3], "--blocks", "x", "--force"])
    assert bad.exit_code == 2 and "blocks" in bad.output
    missing = CliRunner().invoke(app, ["train", str(tmp_path / "nope.npy"), "--out", str(out)])
    assert missing.exit_code == 1


def test_compress_for_quality_meets_the_target_with_restoration(tmp_path):
    from fedtensor.codec import compress, read_info
    from fedtensor.metrics import psnr

    vol = Volume(phantom((40, 36, 20), seed=5))
    d = tmp_path / "identity"
    mid = save_model(new_net(TINY), d)  # untrained: restoration is the identity (but for a fitted layer)
    data = compress_for_quality(vol, d, psnr=34.0, block=8, iterations=2)
    info = read_info(data)
    assert len(data) <= len(compress(vol, psnr=34.0, block=8))
    if info.get("model") is not None:  # a cheaper stream was found: it records what it counted on
        assert info["model"] == mid and info["restoration"]["psnr"] >= 34.0
    assert psnr(vol.data, decompress_restored(data, d).data) >= 34.0


def test_model_warns_on_a_codec_it_was_not_trained_on(rmodel):
    from fedtensor.nn import model_mismatch

    bt_only = RestorationModel(rmodel.net, "0" * 64, TINY, {"codecs": ["block-tucker"]})
    warning = model_mismatch({"codec": "omlsvd-global"}, bt_only)
    assert "trained on block-tucker streams only and this one is omlsvd-global" in warning
    assert model_mismatch({"codec": "block-tucker"}, bt_only) is None


# ------------------------------------------------------------------------------- per-stream adaptation


def test_identity_adaptation_is_the_plain_net(rmodel):
    from fedtensor.nn.model import identity_adaptation

    data = phantom((32, 28, 20), seed=4)
    x, block, cond = net_features(data)
    plain = correction_map(rmodel, x, block, cond, tile=None)
    same = correction_map(rmodel, x, block, cond, tile=None, coef=identity_adaptation(TINY.channels[0]))
    np.testing.assert_allclose(same, plain, atol=1e-5 * float(np.abs(plain).max()), rtol=0)


@pytest.fixture(scope="module")
def adapted_case(rmodel):
    """A real block-tucker stream of a phantom, its decoded volume and the fitted output layer."""
    from fedtensor.codec import compress, decompress, read_info
    from fedtensor.nn.adapt import fit_adaptation

    vol = Volume(phantom((72, 64, 40), seed=6))
    data = compress(vol, psnr=34, block=8)
    info, dec = read_info(data), decompress(data)
    # each dB valued at a megabyte: the coefficients as fine as they go (this stream's own worth of a
    # dB, 2 KB, does not pay for a random net's tiny gain: see test_coefficient_precision_is_priced)
    return vol, data, info, dec, fit_adaptation(rmodel, dec.data, info, vol.data, tile=64, bytes_per_db=1e6)


def test_coded_layer_decoder_gives_a_layer_or_a_format_error_on_any_bytes():
    """Fuzzing the header's coefficient coder: bit flips, cuts and random bytes decode to a layer of the
    asked shape or raise FormatError, nothing else."""
    from fedtensor.errors import FormatError
    from fedtensor.nn.adapt import _decode_layer, _encode_layer

    rng = np.random.default_rng(1)
    blob = _encode_layer((rng.laplace(0, 30, (3, 8, 11)).round() / 64).astype(np.float32))[0]
    for i in range(600):
        b = bytearray(blob)
        if i % 3 == 0:
            for _ in range(rng.integers(1, 4)):
                b[rng.integers(len(b))] ^= 1 << rng.integers(8)
        elif i % 3 == 1:
            b = b[:rng.integers(len(b))]
        else:
            b = bytearray(rng.integers(0, 256, rng.integers(0, 200), dtype=np.uint8).tobytes())
        try:
            assert _decode_layer(bytes(b), 3, (11, 51)).shape == (3, 8, 11)
        except FormatError:
            pass


def test_fitted_adaptation_never_does_worse_than_the_plain_net(rmodel, adapted_case):
    """The least-squares space contains the plain net: the fit restores at least as well, and here (a
    random net, whose plain correction is noise) it turns a loss into a gain."""
    from fedtensor.codec import read_info
    from fedtensor.metrics import psnr

    vol, data, info, dec, coef = adapted_case
    assert coef.shape == (8, TINY.channels[0] + 3)
    tagged = tag_stream(data, rmodel.model_id, adaptation=coef)
    base = psnr(vol.data, dec.data)
    plain = psnr(vol.data, restore(dec, info, rmodel).data)
    adapted = psnr(vol.data, restore(dec, read_info(tagged), rmodel).data)
    assert plain < base < adapted
    assert len(tagged) - len(data) < 300  # 8 × 11 coded coefficients + the model id, in the header


def test_adaptation_fit_does_not_depend_on_the_tiling(rmodel, adapted_case):
    from fedtensor.nn.adapt import equations, solve

    vol, _, info, dec, _ = adapted_case
    tiled, whole = (equations(rmodel, dec.data, info, vol.data, tile=t, classes=(4,)) for t in (64, None))
    np.testing.assert_array_equal(tiled.base, whole.base)
    for t in (np.zeros(0, np.float32), tiled.splits[4]):
        got, want = (solve(e.merged(t), e.large, e.c1)[0] for e in (tiled, whole))
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * float(np.abs(want).max()))


def test_coded_coefficients_round_trip_and_quantisation_compensates(rmodel):
    """A layer whose columns are multiples of powers of two round-trips exactly through the header;
    rounding one coefficient at a time with compensation (quantise) adds less error than plain rounding
    under correlated features, and never leaves the step grid."""
    from fedtensor.nn.adapt import _decode_layer, _encode_layer, quantise, rounding_factor

    rng = np.random.default_rng(3)
    k = TINY.channels[0] + 3
    exps = rng.integers(-3, 14, k)
    coef = (rng.laplace(0, 40, (3, 8, k)).round() * 2.0 ** -exps).astype(np.float32)
    coef[:, :, 0] = 0  # an all-zero column codes nothing
    coef[:, :, 1] = 1  # a column at its centre too
    blob, sent = _encode_layer(coef)
    np.testing.assert_array_equal(sent, coef)
    np.testing.assert_array_equal(_decode_layer(blob, 3, (k, k + 40)), coef)
    # a column finer than the coder holds (more than 2¹⁴ steps from its centre) is rounded, and says so
    fine = coef.copy()
    fine[0, 0, 2] = 1 + 2.0 ** -20
    rounded, sent = _encode_layer(fine)
    np.testing.assert_array_equal(_decode_layer(rounded, 3, (k, k + 40)), sent)
    assert np.abs(sent - fine).max() > 0
    assert len(blob) < coef.size  # under a byte a coefficient: the float16 form took two
    x = rng.normal(size=(4000, 1)) + 0.1 * rng.normal(size=(4000, k))  # nearly collinear features
    a = np.broadcast_to(x.T @ x, (5, k, k))
    w = rng.normal(size=(5, k))
    step = np.full(k, 0.25)
    q = quantise(w, rounding_factor(a), step)
    np.testing.assert_array_equal(q, np.round(q / step) * step)

    def added(v):
        return sum(float((vi - wi) @ ai @ (vi - wi)) for vi, wi, ai in zip(v, w, a))

    assert added(q) < 0.5 * added(np.round(w / step) * step)
    # the fit's metrics can be ill-conditioned (~10⁷ on the 8-bit head): the factor must still hold
    x = rng.normal(size=(4000, 1)) + 1e-4 * rng.normal(size=(4000, k))
    a = np.broadcast_to(x.T @ x + 1e-9 * np.eye(k), (5, k, k))
    assert np.linalg.cond(a[0]) > 1e6
    u = rounding_factor(a)
    np.testing.assert_array_equal(u, np.triu(u))
    np.testing.assert_allclose(np.swapaxes(u, -1, -2) @ u @ a, np.broadcast_to(np.eye(k), a.shape), atol=1e-5)
    assert added(quantise(w, u, step)) < 0.5 * added(np.round(w / step) * step)


def test_adaptation_is_used_only_with_its_model_and_checked(rmodel, adapted_case):
    import base64

    from fedtensor.codec import read_info
    from fedtensor.errors import FormatError
    from fedtensor.nn.adapt import HEADER_KEY, stream_adaptation

    vol, data, info, dec, coef = adapted_case
    tagged_info = read_info(tag_stream(data, rmodel.model_id, adaptation=coef))
    got, tta = stream_adaptation(tagged_info, rmodel)
    np.testing.assert_array_equal(got.coef, coef[None])
    assert tta is False and got.thresholds.shape == (0,)
    other = read_info(tag_stream(data, "f" * 64, adaptation=coef))
    assert stream_adaptation(other, rmodel) is None  # fitted on another model's features: not applied
    np.testing.assert_array_equal(restore(dec, other, rmodel).data, restore(dec, info, rmodel).data)
    np.testing.assert_array_equal(restore_array(dec.data, tagged_info, rmodel, adapted=False),
                                  restore_array(dec.data, info, rmodel))
    # restored as the layer was fitted: without test-time augmentation here, whatever the caller asks
    np.testing.assert_array_equal(restore(dec, tagged_info, rmodel, tta=True).data, restore(dec, tagged_info, rmodel).data)
    large = np.zeros((8, coef.shape[1] + 40), np.float32)
    large_info = read_info(tag_stream(data, rmodel.model_id, adaptation=large, adaptation_tta=True))
    got, tta = stream_adaptation(large_info, rmodel)
    np.testing.assert_array_equal(got.coef, large[None])
    assert tta is True
    classed = OutputLayer(np.stack([coef, -coef, 2 * coef]), np.array([0.25, 0.5], np.float32))
    got, _ = stream_adaptation(read_info(tag_stream(data, rmodel.model_id, adaptation=classed)), rmodel)
    np.testing.assert_array_equal(got.coef, classed.coef)
    np.testing.assert_array_equal(got.thresholds, classed.thresholds)
    assert "fitted without test-time augmentation" in model_mismatch(tagged_info, rmodel, tta=True)
    assert "fitted with test-time augmentation" in model_mismatch(large_info, rmodel, tta=False)
    assert model_mismatch(tagged_info, rmodel, tta=False) is None and model_mismatch(large_info, rmodel) is None
    retagged = read_info(tag_stream(tag_stream(data, rmodel.model_id, adaptation=coef), rmodel.model_id))
    assert HEADER_KEY not in retagged  # a re-tag drops the old stream's fit
    from fedtensor.nn.adapt import _encode_layer

    def layer(raw: bytes, tta=False) -> dict:
        return {"layer": base64.b64encode(raw).decode(), "tta": tta}

    def blob(classes: int = 1, **kw) -> bytes:
        return _encode_layer(np.stack([coef] * classes) if not kw else kw["coef"])[0]

    one, side = blob(), 3 + 3 * coef.shape[1]
    bad_exponent = bytearray(one)
    bad_exponent[3] = 100
    bad_values = [
        {"layer": "not base64!", "tta": False},
        layer(b"\0" * 2),  # shorter than its side information
        layer(one[:side - 1]),
        layer(one[:1] + (coef.shape[1] + 40).to_bytes(2, "little") + one[3:]),  # the other width's K
        layer(bytes([1, 7, 0]) + one[3:]),  # a width no layer of this net has
        layer(one + b"\0" * 4),  # trailing words
        layer(one[:-1]),  # not whole words (a cut at a word is another layer: the checksum guards that)
        layer(bytes(bad_exponent)),
        layer(blob(coef=np.full((1, *coef.shape), 2.0 ** 20, np.float32))),  # out of range
        layer(one, tta="yes"),
        {"layer": 12, "tta": False},
        base64.b64encode(one).decode(),  # not an object
        12,
        {**layer(one), "classes": [0.5]},  # one class's coefficients for two
        {**layer(blob(2)), "classes": 0.5},
        {**layer(blob(2)), "classes": ["a"]},
        {**layer(blob(2)), "classes": [True]},
        {**layer(blob(2)), "classes": [0.1]},  # not float16-exact
        {**layer(blob(2)), "classes": [float("nan")]},
        {**layer(blob(3)), "classes": [0.5, 0.25]},  # not increasing
        {**layer(blob(3)), "classes": [0.5, 0.5]},
        {**layer(blob(17)), "classes": [k / 32 for k in range(16)]},  # too many
    ]
    for value in bad_values:
        with pytest.raises(FormatError, match="adaptation"):
            stream_adaptation({**tagged_info, HEADER_KEY: value}, rmodel)


def test_compress_for_quality_sends_the_fitted_layer_only_when_it_pays(rmodel, tmp_path, monkeypatch):
    """Every candidate stream is fitted once (one pass of the net gives both restored PSNRs) and the
    header bytes count: a stream is sent with a layer only when it comes out smaller, and restoration that
    saves nothing leaves the plain stream."""
    import fedtensor.nn.adapt as adapt
    from fedtensor.codec import compress, decompress, read_info
    from fedtensor.metrics import psnr

    vol = Volume(phantom((48, 44, 24), seed=7))
    d = tmp_path / "random"
    save_model(rmodel.net, d)
    real_fit, steps = adapt.fit, []

    def fit(model, decoded, info, original, **kw):
        steps.append(info["params"]["step"])
        return real_fit(model, decoded, info, original, **kw)

    monkeypatch.setattr(adapt, "fit", fit)
    plain = compress(vol, psnr=34.0, block=8)
    got = compress_for_quality(vol, d, psnr=34.0, block=8, iterations=3)
    assert 2 <= len(steps) == len(set(steps)) <= 4  # the target's stream, then at most 3 more candidates
    assert len(got) <= len(plain)
    if got != plain:  # a fitted layer that pays, header included: the restored stream reaches the target
        info, saved = read_info(got), load_model(d)
        assert info["model"] == saved.model_id and adapt.HEADER_KEY in info
        assert psnr(vol.data, restore(decompress(got), info, saved).data) >= 34.0
    # the random net alone only adds noise: nothing to save, the plain stream, untagged
    assert compress_for_quality(vol, d, psnr=34.0, block=8, iterations=3, adapt=False) == plain


def test_tiled_test_time_augmentation_equals_whole_volume(rmodel):
    """Each tile is mirrored on its own; every tile is aligned, so that is the whole volume's mirror."""
    data = phantom((72, 60, 36), seed=8)  # sides that are not multiples of the alignment or the block
    x, block, cond = net_features(data)
    whole = correction_map(rmodel, x, block, cond, tile=None, tta=True)
    tiled = correction_map(rmodel, x, block, cond, tile=64, tta=True)
    np.testing.assert_allclose(tiled, whole, atol=2e-5 * float(np.abs(whole).max()), rtol=0)


def test_a_mirrored_layer_is_the_layer_of_the_mirrored_tile(rmodel):
    """Test-time augmentation with a fitted layer: the identity layer gives plain augmentation, and a
    layer that is only an input filter (no net term) is the same on every mirrored pass."""
    from fedtensor.nn.model import identity_adaptation

    data = phantom((40, 36, 28), seed=9)
    x, block, cond = net_features(data)
    c1 = TINY.channels[0]
    plain = correction_map(rmodel, x, block, cond, tile=None, tta=True)
    same = correction_map(rmodel, x, block, cond, tile=None, tta=True, coef=identity_adaptation(c1, True))
    np.testing.assert_allclose(same, plain, atol=1e-5 * float(np.abs(plain).max()), rtol=0)
    filt = np.zeros((8, c1 + 43), np.float32)
    filt[:, c1 + 3:] = np.random.default_rng(0).normal(size=(8, 40))
    one = correction_map(rmodel, x, block, cond, tile=None, coef=filt)
    mean = correction_map(rmodel, x, block, cond, tile=None, coef=filt, tta=True)
    np.testing.assert_allclose(mean, one, atol=1e-5 * float(np.abs(one).max()), rtol=0)


def test_a_classed_layer_applies_each_class_to_its_own_voxels(rmodel):
    """Class j (intensity input at or above j thresholds) takes class j's coefficients: with the identity
    layer below the threshold and nothing above, the correction is the plain net's where the voxel's
    intensity is below it and zero elsewhere; with TTA too (a class moves with its voxel)."""
    from fedtensor.nn.model import identity_adaptation

    data = phantom((40, 36, 28), seed=10)
    x, block, cond = net_features(data)
    c1 = TINY.channels[0]
    t = np.float32(np.float16(np.median(x[..., 0])))
    below = x[..., 0] < t
    assert 0.2 < below.mean() < 0.8
    layer = OutputLayer(np.stack([identity_adaptation(c1), np.zeros((8, c1 + 3), np.float32)]), np.array([t]))
    for tta in (False, True):
        plain = correction_map(rmodel, x, block, cond, tile=None, tta=tta)
        got = correction_map(rmodel, x, block, cond, tile=None, tta=tta, coef=layer)
        np.testing.assert_allclose(got, np.where(below, plain, 0), atol=1e-5 * float(np.abs(plain).max()), rtol=0)


def test_classed_layers_are_fitted_at_the_intensity_quantiles(rmodel, adapted_case):
    from fedtensor.nn.adapt import CLASS_COUNTS, class_thresholds, equations, fit, solve

    vol, data, info, dec, coef = adapted_case
    found = fit(rmodel, dec.data, info, vol.data, tile=64)
    classed = {k: v for k, v in found.layers.items() if "/" in k}
    eq = equations(rmodel, dec.data, info, vol.data, tile=64)
    # one layer per distinct set of quantile thresholds: the phantom's air decodes to exactly its most
    # common value, the minimum, and thresholds there are dropped, so not every count is distinct
    assert len(eq.splits) >= 5 and set(eq.splits) <= set(CLASS_COUNTS)
    assert {k.split("/")[1] for k in classed} == {str(len(t) + 1) for t in eq.splits.values()}
    for name, (layer, sse) in classed.items():
        n = int(name.split("/")[1])
        assert layer.coef.shape[:2] == (n, 8) and len(layer.thresholds) == n - 1
    # more classes never fit worse (before the coefficients are quantised for the header)
    for k in (eq.small, eq.large):
        one = eq.merged(np.zeros(0, np.float32))
        sse_one = eq.sse(one, solve(one, k, eq.c1)[0])
        for t in eq.splits.values():
            assert eq.sse(eq.merged(t), solve(eq.merged(t), k, eq.c1)[0]) <= sse_one * (1 + 1e-9)
    # thresholds at quantiles; one at the minimum (an empty class) is dropped, repeated counts too
    ramp = np.concatenate([np.zeros(600), np.linspace(0, 1, 400)]).astype(np.float32)
    t = class_thresholds(ramp)
    assert all(len(v) and v.min() > 0 for v in t.values())
    assert len({tuple(v) for v in t.values()}) == len(t)
    assert 2 not in t  # the median is the minimum here
    np.testing.assert_array_equal(t[4], [np.float16(np.quantile(ramp, 0.75))])


def test_coefficient_precision_is_priced(rmodel, adapted_case):
    """The dearer a dB, the finer (and larger in the header) the coefficients and the smaller the error;
    by default a dB is worth the share of the stream it would grow by."""
    from fedtensor.nn.adapt import _GROWTH_PER_DB, encode_adaptation, fit

    vol, data, info, dec, _ = adapted_case
    fits = [fit(rmodel, dec.data, info, vol.data, tile=64, classes=(4,), bytes_per_db=v).layers
            for v in (0.0, 1e4, 1e6)]
    for name in fits[0]:
        sizes = [len(encode_adaptation(f[name][0])["layer"]) for f in fits]
        errors = [f[name][1] for f in fits]
        assert sizes == sorted(sizes) and errors == sorted(errors, reverse=True) and sizes[0] < sizes[2]
    default = fit(rmodel, dec.data, info, vol.data, tile=64, classes=(4,)).layers
    priced = fit(rmodel, dec.data, info, vol.data, tile=64, classes=(4,),
                 bytes_per_db=_GROWTH_PER_DB * len(data)).layers
    for name in default:
        np.testing.assert_array_equal(OutputLayer.of(default[name][0]).coef, OutputLayer.of(priced[name][0]).coef)


def test_fit_predicts_the_restored_errors(rmodel, adapted_case):
    """The search reads the restored PSNRs off the normal equations: they are the float restorations'.
    The large layer (with a filter of the inputs) fits at least as well as the small one."""
    from fedtensor.codec import read_info
    from fedtensor.nn.adapt import fit

    vol, data, info, dec, coef = adapted_case
    found = fit(rmodel, dec.data, info, vol.data, tile=64, bytes_per_db=1e6)
    np.testing.assert_array_equal(found.small[0], coef)
    assert found.large[0].shape == (8, TINY.channels[0] + 3 + 40)
    orig = vol.data.astype(np.float64)
    for c, sse in found.options():
        header = info if c is None else read_info(tag_stream(data, rmodel.model_id, adaptation=c))
        exact = float(np.sum((orig - restore_array(dec.data, header, rmodel, tile=64)) ** 2))
        assert sse == pytest.approx(exact, rel=1e-4)
    assert found.large[1] <= found.small[1] < found.sse_plain


@pytest.mark.slow  # (eight mirrored restorations per option: ~1 min of the default run's 12)
def test_fit_predicts_the_restored_errors_with_test_time_augmentation(rmodel, adapted_case):
    """:func:`test_fit_predicts_the_restored_errors` with the layers fitted to the mean of the 8
    mirrored passes."""
    from fedtensor.codec import read_info
    from fedtensor.nn.adapt import fit

    vol, data, info, dec, _ = adapted_case
    orig = vol.data.astype(np.float64)
    mirrored = fit(rmodel, dec.data, info, vol.data, tile=64, tta=True, bytes_per_db=1e6)
    for c, sse in mirrored.options():
        header = info if c is None else read_info(tag_stream(data, rmodel.model_id, adaptation=c,
                                                             adaptation_tta=True))
        exact = float(np.sum((orig - restore_array(dec.data, header, rmodel, tile=64, tta=c is None)) ** 2))
        assert sse == pytest.approx(exact, rel=1e-4)
    assert mirrored.large[1] <= mirrored.small[1] < mirrored.sse_plain


def test_a_runaway_compensation_still_sends_a_layer_the_decoder_takes(rmodel, adapted_case, monkeypatch):
    """Compensated rounding can move coefficients far under a badly conditioned metric; the layer sent
    must stay within the decoder's coefficient bound (plain rounding then)."""
    from fedtensor.nn import adapt

    vol, data, info, dec, _ = adapted_case
    eq = adapt.equations(rmodel, dec.data, info, vol.data, tile=64, classes=())
    t = np.zeros(0, np.float32)

    def wild(a):  # a factor whose compensation multiplies each rounding error by 10⁹
        k = a.shape[-1]
        return np.broadcast_to(np.eye(k) + 1e9 * np.triu(np.ones((k, k)), 1), a.shape).copy()

    monkeypatch.setattr(adapt, "rounding_factor", wild)
    layer, err = adapt.coded_layer(eq, t, eq.small, 1e6)
    assert np.abs(layer.coef).max() < adapt._MAX_COEF
    np.testing.assert_array_equal(adapt._decode_layer(adapt._encode_layer(layer.coef)[0], 1, adapt._widths(eq.c1)),
                                  layer.coef)
    assert np.isfinite(err)


def test_a_failed_checkpoint_write_leaves_no_temp_file(tmp_path):
    """A history or checkpoint file that cannot be replaced (here: a directory in its place) is a one-line
    error, and no temp file stays behind (one did, named .history.csv.tmpPID)."""
    from fedtensor.nn.checkpoint import write_atomic

    (tmp_path / "history.csv").mkdir()
    with pytest.raises(FedtensorError, match="history.csv"):
        write_atomic(tmp_path / "history.csv", b"round,loss\n")
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]
    write_atomic(tmp_path / "state.json", b"{}")
    write_atomic(tmp_path / "state.json", b'{"round": 2}')  # replaces, as a checkpoint must
    assert (tmp_path / "state.json").read_bytes() == b'{"round": 2}'


def test_a_forced_start_over_cut_off_before_its_first_export_keeps_the_model(sources, tmp_path, monkeypatch):
    """--force starts over, but the directory's model stays until the new run exports one: cut off before
    that (Ctrl-C), the directory used to hold only an empty checkpoint directory."""
    training = importlib.import_module("fedtensor.nn.train")  # (fedtensor.nn.train is also the function)

    out = tmp_path / "run"
    train(None, out, TrainConfig(**TRAIN_CFG), sources=sources)
    before = {name: (out / name).read_bytes() for name in ("model.safetensors", "model.json", "history.csv")}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "export_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(None, out, TrainConfig(**{**TRAIN_CFG, "seed": 5}), sources=sources, resume=False)
    assert {name: (out / name).read_bytes() for name in before} == before


# ------------------------------------------------------------------------------------------ hostile model files


def _bytes_of(config=TINY, *, meta=None, scale=1.0, dtype=np.float32):
    """``model.safetensors`` bytes of a random net, its weights × ``scale`` (as ``dtype``), the architecture
    metadata overridden by ``meta``."""
    import json

    import safetensors.numpy as stn

    from fedtensor.nn.checkpoint import safetensors_metadata
    from fedtensor.nn.train import model_bytes

    params = nnx.state(random_model(config).net, nnx.Param)
    data = model_bytes(params, config)
    tensors = {k: (v * scale).astype(dtype) for k, v in stn.load(data).items()}
    info = json.loads(safetensors_metadata(data, "x")["fedtensor_model"])
    return stn.save(tensors, metadata={"fedtensor_model": json.dumps({**info, **(meta or {})})})


@pytest.mark.parametrize("net,why", [({"channels": [1200, 1200], "cond_hidden": 8}, "architecture metadata"),
                                     ({"channels": [8, 16], "cond_hidden": -5}, "architecture metadata"),
                                     ({"channels": [1e400, 16], "cond_hidden": 8}, "architecture metadata")])
def test_a_model_declaring_an_absurd_architecture_is_refused_before_building_it(net, why):
    import time

    t = time.perf_counter()
    with pytest.raises(ModelError, match=why):
        model_from_bytes(_bytes_of(meta={"net": net}))
    assert time.perf_counter() - t < 5  # 1200 channels built ~1 GB of initial weights first


def test_a_model_of_a_newer_format_or_another_dtype_is_refused_by_name():
    with pytest.raises(ModelError, match="format version 999"):
        model_from_bytes(_bytes_of(meta={"version": 999}))
    with pytest.raises(ModelError, match="float16 vs .* float32"):
        model_from_bytes(_bytes_of(dtype=np.float16))


def test_finite_but_huge_weights_fail_restoration_instead_of_writing_garbage():
    model = model_from_bytes(_bytes_of(scale=1e30))  # every weight finite: loads
    data = phantom((24, 24, 24))
    with pytest.raises(ModelError, match="output is not finite"):
        restore_array(data, INFO_BT, model)


def test_a_stream_whose_step_underflows_is_a_format_error_for_restoration():
    from fedtensor.errors import FormatError

    with pytest.raises(FormatError, match="quantiser step in the volume's units is 0.0"):
        operating_point("block-tucker", {"step": 1e-200, "scale": 1e-200, "block": [8, 8, 8]},
                        normaliser_for(phantom((8, 8, 8))))


def test_a_damaged_or_foreign_cache_entry_is_regenerated(tmp_path):
    from fedtensor.nn.data import encode_decode
    from fedtensor.io import Volume

    v = Volume(phantom((24, 24, 24)))
    d, _ = encode_decode(v, "block-tucker", 35.0, None, tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    good = entry.read_bytes()
    with np.load(entry) as z:
        info = z["info"]
    import io

    foreign = io.BytesIO()
    np.savez(foreign, decoded=np.zeros((3, 3, 3), np.float32), info=info)
    for damaged in (good[: len(good) // 2], good[:40] + b"\0" * (len(good) - 40), foreign.getvalue()):
        entry.write_bytes(damaged)
        again, _ = encode_decode(v, "block-tucker", 35.0, None, tmp_path)
        np.testing.assert_array_equal(again, d)


def test_restoration_streams_along_the_first_axis_with_the_whole_volumes_result(rmodel):
    """Features from each tile row's own decoded rows (plus one each side for the box filter) equal the
    whole volume's; the working set is a tile row's, not the volume's (8.6× this input; 33× before)."""
    import tracemalloc

    data = phantom((600, 40, 24))
    norm = normaliser_for(data)
    s, cond, block = operating_point("block-tucker", INFO_BT["params"], norm)
    whole = correction_map(rmodel, norm.net_input(data, s), block, cond, tile=64)
    got = restore_array(data, INFO_BT, rmodel, tile=64)
    np.testing.assert_array_equal(got, data.astype(np.float64) + (s * norm.scale) * whole.astype(np.float64))
    tracemalloc.start()
    try:
        out = restore(Volume(data), INFO_BT, rmodel, tile=64).data
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, to_dtype(got, data.dtype))
    assert peak < 14 * data.nbytes, peak / data.nbytes


def test_training_refuses_widths_no_model_file_may_declare():
    from fedtensor.nn import TrainConfig

    with pytest.raises(ValueError, match="channels must be two integers from 1 to 512"):
        TrainConfig(channels=(16, 600)).check()


@pytest.mark.parametrize("net", [{"channels": "88", "cond_hidden": 16}, {"channels": [8.5, 16], "cond_hidden": 16},
                                 {"channels": [8, 16], "cond_hidden": True}, {"channels": [8, 16], "cond_hidden": 1.5},
                                 {"channels": [True, 16], "cond_hidden": 16}, {"channels": [8, 16, 32], "cond_hidden": 16}])
def test_a_model_files_architecture_must_be_whole_numbers(net):
    """A damaged model file's "88" was read as channels (8, 8), 8.5 as 8, true as a width of 1."""
    from fedtensor.nn.model import NetConfig

    with pytest.raises(ValueError):
        NetConfig.from_dict(net)
    assert NetConfig.from_dict({"channels": [np.int64(8), 16], "cond_hidden": np.int32(16)}) == NetConfig((8, 16), 16)
