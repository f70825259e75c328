"""Central training of the restoration net (optax AdamW, warm-up + cosine, clipping; one jitted step).

:func:`train` runs the whole pipeline: codec pairs (cached) → split by volume → epochs of random
augmented patches → validation every epoch on a fixed patch set of the held-out volumes → early
stopping → the best weights exported as a model directory (see :mod:`fedtensor.nn.checkpoint`).

The run is resumable: after every epoch the training state (weights, optimiser state, history, early
stopping counters) is written atomically to ``DIR/checkpoint``; an interrupted run started again with
the same settings continues after the last finished epoch and yields the same result as an
uninterrupted one (batch ``k`` of an epoch is drawn from a generator seeded by ``(seed, epoch, k)``).

The loss is the mean squared error of the predicted correction in units of the quantiser step
(``(original − decoded)/s`` in normalised intensities), so every operating point weighs the same; the
validation figure ``val_gain_db`` is the PSNR gain on the validation patches in original units
(``10·log10(MSE before / MSE after)``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedtensor import __version__
from fedtensor.io.atomic import locked
from fedtensor.nn.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_DIR,
    STATE_FILE,
    STATE_JSON,
    ModelError,
    finite_tree,
    sha256_hex,
    tree_from_bytes,
    tree_to_bytes,
    write_atomic,
)
from fedtensor.nn.data import (
    Batch,
    PatchSampler,
    Source,
    intensity_kinds,
    parse_block,
    prefetched_batches,
    training_sources,
)
from fedtensor.nn.model import NetConfig, check_channels, new_net

HISTORY_CSV = "history.csv"
LOSS_PNG = "loss.png"
HISTORY_FIELDS = ("epoch", "step", "lr", "train_loss", "val_loss", "val_gain_db", "seconds", "patches_per_s")


@dataclass
class TrainConfig:
    """Every setting of a training run (all of it goes into the run's fingerprint)."""

    epochs: int = 10
    patches_per_epoch: int = 3200
    batch: int = 8
    patch: int = 24
    lr: float = 2e-3
    warmup_epochs: float = 0.25
    weight_decay: float = 1e-4
    clip: float = 1.0
    patience: int = 3
    min_epochs: int = 5
    val_fraction: float = 0.2
    val_patches: int = 64
    seed: int = 0
    channels: tuple[int, int] = (16, 32)
    codecs: tuple[str, ...] = ("block-tucker",)
    targets: tuple[float, ...] = (36.0, 38.0, 40.0, 42.0, 44.0)
    blocks: tuple[str, ...] = ("auto", "8")

    def check(self) -> "TrainConfig":
        from fedtensor.nn.normalize import RESTORABLE_CODECS

        if self.epochs < 1 or self.patches_per_epoch < 1 or self.batch < 1 or self.patience < 1:
            raise ValueError("epochs, patches per epoch, batch and patience must be ≥ 1")
        named = {"learning rate": self.lr, "warm-up epochs": self.warmup_epochs, "weight decay": self.weight_decay,
                 "gradient clip": self.clip, "val fraction": self.val_fraction}
        for name, v in named.items():  # by name: the CLI sets only some of them
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
        if not all(math.isfinite(t) for t in self.targets):
            raise ValueError(f"targets must be finite, got {list(self.targets)}")
        if not 0 <= self.seed < 2**32:  # JAX's 32-bit keys: PRNGKey(2**32) is PRNGKey(0)
            raise ValueError(f"seed must be in 0 … 2**32 − 1, got {self.seed}")
        if self.patch % 4 or self.patch < 16:
            raise ValueError(f"patch must be a multiple of 4, at least 16, got {self.patch}")
        check_channels(self.channels)
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val fraction must be in [0, 1), got {self.val_fraction}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        bad = [c for c in self.codecs if c not in RESTORABLE_CODECS]
        if bad or not self.codecs:
            raise ValueError(f"codecs must be among {', '.join(RESTORABLE_CODECS)}, got {', '.join(self.codecs) or 'none'}")
        if not self.targets or any(not 0 < t < 200 for t in self.targets):
            raise ValueError("targets must be PSNR values in dB")
        try:
            specs = [parse_block(b) for b in self.blocks]
        except ValueError:
            raise ValueError(f"blocks must be 'auto', a side (e.g. 8) or a shape (e.g. 8x8x16), got {self.blocks}") from None
        if not specs:
            raise ValueError("blocks must name at least one block shape ('auto', a side, or e.g. 8x8x16)")
        if any(isinstance(b, tuple) and len(b) != 3 for b in specs):
            raise ValueError(f"a block shape has three sides (e.g. 8x8x16), got {self.blocks}")
        sides = [v for b in specs if b is not None for v in ((b,) if isinstance(b, int) else b)]
        if any(not 2 <= v <= 32 for v in sides):
            raise ValueError("block sides must be between 2 and 32")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.patches_per_epoch / self.batch))


def make_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up to ``lr`` over ``warmup_epochs``, then cosine decay to 2 % of it at the last step."""
    total = cfg.epochs * cfg.steps_per_epoch
    warm = min(total - 1, max(1, int(round(cfg.warmup_epochs * cfg.steps_per_epoch))))
    return optax.warmup_cosine_decay_schedule(init_value=cfg.lr * 0.02, peak_value=cfg.lr, warmup_steps=warm,
                                              decay_steps=max(total, warm + 1), end_value=cfg.lr * 0.02)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, *without* the learning-rate scaling: the step multiplies the
    update by the scheduled rate it is given, so one compiled step serves every schedule (and every
    resumed run). ``chain(clip, scale_by_adam, add_decayed_weights)`` × ``-lr`` is ``optax.adamw``."""
    return optax.chain(optax.clip_by_global_norm(cfg.clip), optax.scale_by_adam(),
                       optax.add_decayed_weights(cfg.weight_decay))


_COMPILED: dict[tuple, tuple] = {}


def _compiled(net_config: NetConfig, cfg: TrainConfig):
    """The jitted (train step, evaluation) pair for an architecture and optimiser, built once per process."""
    key = (net_config, cfg.clip, cfg.weight_decay)
    if key in _COMPILED:
        return _COMPILED[key]
    from fedtensor.nn.model import abstract_net

    graphdef, _ = abstract_net(net_config)
    tx = make_optimizer(cfg)

    def loss_fn(params, x, cond, t, m):
        f = nnx.merge(graphdef, params)(x, cond)
        return jnp.sum(jnp.square(f - t) * m) / jnp.maximum(jnp.sum(m), 1.0)

    def step(params, opt_state, lr, x, cond, t, m):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, cond, t, m)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree_util.tree_map(lambda u: -lr * u, updates)
        return optax.apply_updates(params, updates), opt_state, loss

    def evaluate(params, x, cond, t, m, s):
        f = nnx.merge(graphdef, params)(x, cond)
        s = s[:, None, None, None, None]
        return (jnp.sum(jnp.square(f - t) * m), jnp.sum(m), jnp.sum(jnp.square(s * t) * m),
                jnp.sum(jnp.square(s * (t - f)) * m))

    _COMPILED[key] = (tx, jax.jit(step, donate_argnums=(0, 1)), jax.jit(evaluate))
    return _COMPILED[key]


class Trainer:
    """The jitted pure functions of one architecture + optimiser, and the run's schedule."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.net_config = NetConfig(channels=tuple(cfg.channels))
        net = new_net(self.net_config, seed=cfg.seed)
        self.params0 = nnx.state(net, nnx.Param)
        self.schedule = make_schedule(cfg)
        self.tx, self.step, self._eval = _compiled(self.net_config, cfg)

    def init_state(self):
        params = jax.tree_util.tree_map(jnp.array, self.params0)
        return params, self.tx.init(params)

    def train_step(self, params, opt_state, b: Batch, step_index: int = 0):
        """One optimiser step at the scheduled rate of (0-based) step ``step_index``."""
        lr = jnp.float32(self.schedule(step_index))
        return self.step(params, opt_state, lr, b.x, b.cond, b.target, b.mask)

    def validate(self, params, batches: Sequence[Batch]) -> tuple[float, float]:
        """(mean val loss, PSNR gain in dB on the validation patches)."""
        tot = np.zeros(4)
        for b in batches:
            tot += np.array([float(v) for v in self._eval(params, b.x, b.cond, b.target, b.mask, b.s)])
        loss = tot[0] / max(tot[1], 1.0)
        if not np.isfinite(tot).all():  # a diverged model: NaN, which the callers' divergence checks catch
            return math.nan, math.nan
        gain = 10 * math.log10(tot[2] / tot[3]) if tot[3] > 0 and tot[2] > 0 else 0.0
        return float(loss), float(gain)


# ------------------------------------------------------------------------------------------ files


def model_bytes(params, net_config: NetConfig, extra: dict | None = None) -> bytes:
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "net": net_config.to_dict(), "library": __version__,
            **(extra or {})}
    return tree_to_bytes(params, {"fedtensor_model": json.dumps(meta, sort_keys=True)})


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomically, and only when ``path`` does not already hold ``data`` (a finished run's rerun writes
    nothing, so it also works on a read-only model directory)."""
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    write_atomic(path, data)


def export_model(out_dir: Path, params, net_config: NetConfig, manifest: dict) -> str:
    """Write ``model.safetensors`` + ``model.json``; return the model id (SHA-256 of the weights file)."""
    out_dir = Path(out_dir)
    data = model_bytes(params, net_config, {"normalisation": "ct|u8|mr (fedtensor.nn.normalize)"})
    mid = sha256_hex(data)
    _write_if_changed(out_dir / MODEL_FILE, data)
    full = {"format": FORMAT, "version": FORMAT_VERSION, "model_id": mid, "net": net_config.to_dict(),
            "library": __version__, **manifest}
    _write_if_changed(out_dir / MANIFEST_FILE, json.dumps(full, indent=2, sort_keys=True).encode())
    return mid


def save_model(net, out_dir: str | Path, manifest: dict | None = None) -> str:
    """Export an :class:`~fedtensor.nn.model.RestorationNet` as a model directory; returns its id."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return export_model(out_dir, nnx.state(net, nnx.Param), net.config, manifest or {})


def write_history(out_dir: Path, history: list[dict], fields: Sequence[str] = HISTORY_FIELDS,
                  plot: Callable[[list[dict], Path], None] | None = None) -> None:
    """``history.csv`` (atomically) and its ``loss.png`` (``plot``, default :func:`plot_history`)."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in history:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
    write_atomic(out_dir / HISTORY_CSV, buf.getvalue().encode())
    try:
        (plot or plot_history)(history, out_dir / LOSS_PNG)
    except Exception:  # noqa: BLE001 — a plot must never stop training
        pass


def plot_history(history: list[dict], path: Path, *, x: str = "epoch", train_label: str = "training",
                 val_label: str = "validation") -> None:
    """Loss curves (and, with validation, the validation PSNR gain) over ``x`` ("epoch", or "round")."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [r[x] for r in history]
    val = [(e, r["val_loss"]) for e, r in zip(ep, history) if r.get("val_loss") is not None]
    # without validation there is no gain to plot: one panel, not an empty second one
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(9, 3.4) if val else (4.8, 3.4), squeeze=False)
    ax1 = axes[0, 0]
    ax1.plot(ep, [r["train_loss"] for r in history], "o-", label=train_label)
    if val:
        ax1.plot(*zip(*val), "s-", label=val_label)
        ax2 = axes[0, 1]
        ax2.plot([e for e, _ in val], [r["val_gain_db"] for r in history if r.get("val_loss") is not None], "s-",
                 color="C1")
        ax2.set_xlabel(x), ax2.set_ylabel("validation PSNR gain (dB)"), ax2.grid(alpha=0.3)
    ax1.set_xlabel(x), ax1.set_ylabel("loss (MSE / step²)"), ax1.set_yscale("log"), ax1.legend()
    ax1.grid(alpha=0.3)
    for ax in axes[0]:  # epochs (rounds) are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ train


#: Settings that only decide when to stop: a run may be resumed with other values.
STOPPING_FIELDS = ("patience", "min_epochs")


def fingerprint(cfg: TrainConfig, train_src: Sequence[Source], val_src: Sequence[Source] = ()) -> str:
    """Identity of a run: everything that shapes its trajectory (not the stopping rule)."""
    config = {k: v for k, v in cfg.to_dict().items() if k not in STOPPING_FIELDS}
    d = {"config": config, "data": sorted((s.label, s.digest) for s in train_src),
         "val": sorted((s.label, s.digest) for s in val_src), "library": __version__}
    return sha256_hex(json.dumps(d, sort_keys=True).encode())


def clear_run(out_dir: Path) -> None:
    """Remove a run's checkpoint (``--force``: start over). Its exported model, history and plot stay
    until the new run's first export replaces them: a start over cut off before that leaves the
    directory's model as it was (it used to be deleted first, leaving nothing)."""
    shutil.rmtree(out_dir / STATE_DIR, ignore_errors=True)


@contextlib.contextmanager
def run_directory(out_dir: Path, resume: bool) -> Iterator[None]:
    """``out_dir`` held by this run (``train`` or ``federate``) while it runs.

    Created if needed and locked (``flock`` on the directory): a second run into it is refused while the
    first holds it, instead of both writing and reporting success. Without ``--force`` (``resume``), a
    directory that holds a model but no checkpoint directory — a fetched or published model, a
    weights-service version — is refused, never overwritten. (A run makes its checkpoint directory
    before it first exports a model: see :func:`mark_run`.)"""
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir, wait=False) as mine:  # the directory itself: no lock file is left in it
        if not mine:
            raise ModelError(f"{out_dir} is in use by another training or federated run")
        if resume and (out_dir / MODEL_FILE).exists() and not (out_dir / STATE_DIR).is_dir():
            raise ModelError(f"{out_dir} holds a model but no training checkpoint (a fetched or published model?); "
                             "use another --out, or --force to replace it")
        yield


def mark_run(out_dir: Path) -> None:
    """Make the run's checkpoint directory before its first model export: a run cut off between that
    export and its first checkpoint is still known as a run (and resumes) by :func:`run_directory`."""
    (out_dir / STATE_DIR).mkdir(exist_ok=True)


def read_state_meta(sd: Path, kind: str, fp: str, fields: dict) -> dict:
    """The checkpoint record ``state.json`` of a ``kind`` run ("training", "federation"), checked: a dict
    with ``fields`` of their types, of this run's fingerprint ``fp`` (checked before any weights are read,
    so a run with other settings is named as such, not as an architecture mismatch); its ``best_loss`` as
    a float (∞ when none was recorded)."""
    try:
        meta = json.loads((sd / STATE_JSON).read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise ModelError(f"corrupted {kind} checkpoint in {sd} (use --force to start over)")
    found = "training" if "epoch" in meta else "federation" if "round" in meta else kind
    if found != kind:
        raise ModelError(f"{sd.parent} holds a {found} run, not a {kind} run; use another --out, or --force to "
                         "replace it")
    if meta.get("fingerprint") != fp:
        raise ModelError(f"{sd.parent} holds a {kind} run with other settings or data; "
                         "use --force to start over, or another --out")
    if not all(isinstance(meta.get(k), t) and not isinstance(meta.get(k), bool) for k, t in fields.items()):
        raise ModelError(f"corrupted {kind} checkpoint in {sd} (use --force to start over)")
    best = meta.get("best_loss")  # None (JSON has no ∞) until a finite score was seen
    meta["best_loss"] = float(best) if isinstance(best, (int, float)) and not isinstance(best, bool) else math.inf
    return meta


_META_FIELDS = {"sha256": str, "epoch": int, "history": list, "best_epoch": int, "bad_epochs": int}


def _load_state(out_dir: Path, trainer: Trainer, fp: str):
    sd = out_dir / STATE_DIR
    meta = read_state_meta(sd, "training", fp, _META_FIELDS)
    try:
        data = (sd / meta.get("state_file", STATE_FILE)).read_bytes()  # (older runs: fixed names)
        best_file = meta.get("best_file") or ("best.safetensors" if (sd / "best.safetensors").is_file() else None)
        best_data = (sd / best_file).read_bytes() if best_file else None
    except (OSError, ValueError, TypeError):
        raise ModelError(f"corrupted training checkpoint in {sd} (use --force to start over)") from None
    legacy = best_file == "best.safetensors" and "best_sha256" not in meta  # older runs kept no hash of it
    if meta["sha256"] != sha256_hex(data) or not (best_data is None or legacy
                                                  or meta.get("best_sha256") == sha256_hex(best_data)):
        raise ModelError(f"corrupted training checkpoint in {sd}: SHA-256 mismatch (use --force to start over)")
    params, opt = trainer.init_state()
    tree = tree_from_bytes({"params": params, "opt": opt}, data, "training checkpoint")
    tree = jax.tree_util.tree_map(jnp.asarray, tree)
    best = tree_from_bytes(params, best_data, "training checkpoint") if best_data is not None else None
    return tree["params"], tree["opt"], best, meta


def _save_state(out_dir: Path, params, opt, best, meta: dict) -> None:
    """Write the epoch's state under new names, then point state.json at them (atomically), then
    delete older files: an interruption at any moment leaves a consistent checkpoint."""
    sd = out_dir / STATE_DIR
    sd.mkdir(parents=True, exist_ok=True)
    epoch = meta["epoch"]
    data = tree_to_bytes({"params": params, "opt": opt})
    files = {"state_file": f"state-{epoch:04d}.safetensors", "sha256": sha256_hex(data)}
    write_atomic(sd / files["state_file"], data)
    if best is not None:
        best_data = tree_to_bytes(best)
        files.update(best_file=f"best-{epoch:04d}.safetensors", best_sha256=sha256_hex(best_data))
        write_atomic(sd / files["best_file"], best_data)
    write_atomic(sd / STATE_JSON, json.dumps({**meta, **files}, indent=1).encode())
    keep = {files["state_file"], files.get("best_file"), STATE_JSON}
    for f in sd.glob("*.safetensors"):
        if f.name not in keep:
            f.unlink(missing_ok=True)


def train(paths: Sequence[Path] | None, out_dir: str | Path, cfg: TrainConfig = TrainConfig(), *,
          resume: bool = True, **kwargs) -> dict:
    """Train a restoration model on ``paths`` (volumes) — or on prepared ``sources`` — into ``out_dir``.

    Validation volumes: ``val_paths`` (or ``val_sources``) when given, used for validation only;
    otherwise ``cfg.val_fraction`` of the training volumes, split by volume (seeded).
    ``resume=True`` continues a run found in ``out_dir`` (it must have the same settings and data,
    otherwise :class:`ModelError`); ``resume=False`` starts over. ``progress(event, info)`` receives
    ``"data"`` (pair generation), ``"start"``, ``"step"`` and ``"epoch"`` events. ``workers``: patch
    sampling threads (default: one per core, at most 8; the batches do not depend on it). Returns a summary
    (model id, best epoch, validation figures, throughput, split).
    """
    cfg.check()
    out_dir = Path(out_dir)
    with run_directory(out_dir, resume):
        return _train(paths, out_dir, cfg, resume=resume, **kwargs)


def _train(paths: Sequence[Path] | None, out_dir: Path, cfg: TrainConfig, *,
           val_paths: Sequence[Path] | None = None, sources: Sequence[Source] | None = None,
           val_sources: Sequence[Source] | None = None, cache_dir: str | Path | None = None, resume: bool = True,
           progress: Callable[[str, dict], None] | None = None, workers: int | None = None) -> dict:
    emit = progress or (lambda event, info: None)
    cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    train_src, val_src = training_sources(paths, val_paths, sources, val_sources, cfg, cache, emit)
    train_labels, val_labels = [s.label for s in train_src], [s.label for s in val_src]
    fp = fingerprint(cfg, train_src, val_src)
    kinds = intensity_kinds(train_src)

    trainer = Trainer(cfg)
    sampler = PatchSampler(train_src, cfg.patch, augment=True)
    val_batches: list[Batch] = []
    if val_src:
        vs = PatchSampler(val_src, cfg.patch, augment=False)
        vrng = np.random.default_rng([cfg.seed, 1_000_003])
        val_batches = [vs.sample(vrng, cfg.batch) for _ in range(max(1, math.ceil(cfg.val_patches / cfg.batch)))]

    state_json = out_dir / STATE_DIR / STATE_JSON
    if not resume:
        clear_run(out_dir)
    history: list[dict] = []
    best, best_loss, best_epoch, bad, start_epoch, finished = None, math.inf, 0, 0, 1, False
    if state_json.exists():
        params, opt_state, best, meta = _load_state(out_dir, trainer, fp)
        history = meta["history"]
        best_loss = meta["best_loss"]
        best_epoch, bad = meta["best_epoch"], meta["bad_epochs"]
        start_epoch = meta["epoch"] + 1
        finished = _stops(cfg, meta["epoch"], bad, bool(val_batches))  # under this run's stopping rule
        if best is not None:  # repair a model.safetensors/model.json pair torn by an interruption
            export_model(out_dir, best, trainer.net_config,
                         _manifest(cfg, train_labels, val_labels, history, best_epoch, best_loss, fp, finished, kinds))
    else:
        params, opt_state = trainer.init_state()

    mark_run(out_dir)
    spe = cfg.steps_per_epoch
    emit("start", {"epochs": cfg.epochs, "steps_per_epoch": spe, "start_epoch": start_epoch,
                   "train_volumes": train_labels, "val_volumes": val_labels, "params": param_count_state(params),
                   "pairs": sum(len(s.pairs) for s in train_src)})
    for epoch in range(start_epoch, cfg.epochs + 1):
        if finished:
            break
        t_epoch = time.perf_counter()
        losses, t_steps, n_timed = [], 0.0, 0
        # closing() stops the sampling threads at once if a step (or a progress callback) raises
        with contextlib.closing(prefetched_batches(sampler, (cfg.seed, epoch), cfg.batch, spe, workers)) as batches:
            for k, b in enumerate(batches):
                t0 = time.perf_counter()
                params, opt_state, loss = trainer.train_step(params, opt_state, b, (epoch - 1) * spe + k)
                loss = float(loss)
                if k > 0 or epoch > start_epoch:  # the run's first step includes compilation
                    t_steps += time.perf_counter() - t0
                    n_timed += 1
                losses.append(loss)
                emit("step", {"epoch": epoch, "step": k + 1, "steps": spe, "loss": loss})
        step_no = epoch * spe
        rec: dict[str, Any] = {"epoch": epoch, "step": step_no, "lr": float(trainer.schedule(step_no - 1)),
                               "train_loss": float(np.mean(losses)), "val_loss": None, "val_gain_db": None}
        if val_batches:
            rec["val_loss"], rec["val_gain_db"] = trainer.validate(params, val_batches)
        rec["seconds"] = time.perf_counter() - t_epoch
        rec["patches_per_s"] = n_timed * cfg.batch / t_steps if t_steps > 0 else None
        if not finite_epoch(rec, params):
            kept = f"; the checkpoint of epoch {epoch - 1} is kept" if epoch > 1 else ""
            raise ModelError(f"training diverged: non-finite loss in epoch {epoch} (try a lower --lr){kept}")
        history.append(rec)
        score = rec["val_loss"] if rec["val_loss"] is not None else rec["train_loss"]
        if score < best_loss * (1 - 1e-4) or not val_batches:
            best, best_loss, best_epoch, bad = jax.tree_util.tree_map(np.asarray, params), score, epoch, 0
        else:
            bad += 1
        finished = _stops(cfg, epoch, bad, bool(val_batches))
        manifest = _manifest(cfg, train_labels, val_labels, history, best_epoch, best_loss, fp, finished, kinds)
        export_model(out_dir, best, trainer.net_config, manifest)
        write_history(out_dir, history)
        _save_state(out_dir, params, opt_state, best, {
            "fingerprint": fp, "epoch": epoch, "history": history, "best_loss": best_loss if math.isfinite(best_loss) else None,
            "best_epoch": best_epoch, "bad_epochs": bad, "finished": finished})
        emit("epoch", {**rec, "best_epoch": best_epoch, "finished": finished})
    if not (out_dir / MODEL_FILE).exists():  # resumed a run that had already finished, files removed
        raise ModelError(f"{out_dir} has a finished run but no {MODEL_FILE}; use --force to train again")
    man = json.loads((out_dir / MANIFEST_FILE).read_text())
    return {"model_id": man["model_id"], "out": str(out_dir), "best_epoch": man["training"]["best_epoch"],
            "epochs_run": len(man["training"]["history"]), "train_volumes": train_labels, "val_volumes": val_labels,
            "best_val_loss": man["training"]["best_loss"] if val_labels else None,  # else a training loss
            "best_val_gain_db": next((r.get("val_gain_db") for r in man["training"]["history"]
                                      if r["epoch"] == man["training"]["best_epoch"]), None),
            "history": man["training"]["history"],
            "patches_per_s": _median([r.get("patches_per_s") for r in man["training"]["history"]])}


def finite_epoch(rec: dict, params) -> bool:
    """Whether an epoch's (or round's) losses and the weights it ends with are all finite. A step's loss
    is measured before its update: only the weights show a divergence in the last step."""
    return all(math.isfinite(v) for v in (rec["train_loss"], rec["val_loss"] or 0.0)) and finite_tree(params)


def _median(values) -> float | None:
    v = [x for x in values if x]
    return float(np.median(v)) if v else None


def _stops(cfg: TrainConfig, epoch: int, bad: int, validated: bool) -> bool:
    """Last epoch reached, or (with validation) ``patience`` epochs without improvement after ``min_epochs``."""
    return epoch >= cfg.epochs or (validated and epoch >= cfg.min_epochs and bad >= cfg.patience)


def param_count_state(params) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))


def _manifest(cfg, train_labels, val_labels, history, best_epoch, best_loss, fp, finished, kinds) -> dict:
    best = next((r for r in history if r["epoch"] == best_epoch), {})
    return {"training": {"config": cfg.to_dict(), "train_volumes": train_labels, "val_volumes": val_labels,
                         "best_epoch": best_epoch, "best_loss": best_loss if math.isfinite(best_loss) else None,
                         "best_val_gain_db": best.get("val_gain_db"), "finished": finished, "fingerprint": fp,
                         "history": history},
            "codecs": list(cfg.codecs), "targets_db": list(cfg.targets), "intensity_kinds": kinds}


__all__ = ["TrainConfig", "Trainer", "train", "save_model", "export_model", "fingerprint"]
