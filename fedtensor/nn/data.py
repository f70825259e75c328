"""Training data: (decoded, original) pairs made by fedtensor's own codec, cached on disk, split by
volume, and sampled as augmented patches.

* :func:`make_pairs` encodes and decodes every volume at several PSNR targets (and block shapes:
  ``"auto"`` = the codec's own per-volume choice, or a side such as ``8``), once: each decoded volume
  is cached as ``<cache>/<label>-<sha>-<codec>-b<block>-<target>.npz`` (the decoded array in its
  original dtype plus the stream's header), keyed by the SHA-256 of the original voxels and of the
  codec's source code, so later runs and other folds reuse it and a changed codec regenerates it.
* :func:`split_by_volume` puts whole volumes on either side (never patches of one volume on both).
* :class:`PatchSampler` draws ``P³`` patches at random origins, adds the block-phase channels of their
  absolute position, applies one of the 48 flips/axis permutations to all of it, and returns the net's
  input, conditioning, target (the error in units of the quantiser step) and a mask of real voxels.
* :func:`prefetched_batches` samples the batches of an epoch ahead, on a thread pool.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import warnings
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from fedtensor import __version__
from fedtensor.cores import usable_cores
from fedtensor.io.atomic import atomic_write_bytes
from fedtensor.nn.checkpoint import ModelError
from fedtensor.nn.model import ALIGN, IN_CHANNELS
from fedtensor.nn.normalize import (
    N_FEATURES,
    RESTORABLE_CODECS,
    Normaliser,
    assemble_input,
    block_phases,
    block_shape,
    normaliser_for,
    operating_point,
)
from fedtensor.tensor.block import parse_block



@dataclass
class Pair:
    """One decoded version of a volume, with the operating point the codec chose for it."""

    codec: str
    block: tuple  # per-axis block shape used by the codec ((0, 0, 0) for omlsvd-global)
    target: float  # requested PSNR
    decoded: np.ndarray  # original dtype
    params: dict
    psnr: float
    bpv: float
    norm: Normaliser = field(init=False)
    s: float = field(init=False)
    cond: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.norm = normaliser_for(self.decoded)
        self.s, self.cond, _ = operating_point(self.codec, self.params, self.norm)


@dataclass
class Source:
    """A volume with all its decoded versions."""

    label: str
    original: np.ndarray
    pairs: list[Pair]
    digest: str = ""


def volume_label(path: Path) -> str:
    n = Path(path).name
    for suf in (".nii.gz", ".nii", ".npy"):
        if n.endswith(suf):
            return n[: -len(suf)]
    return n


def sha256_text(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def data_hash(a: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(a.shape), a.dtype.str]).encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def codec_fingerprint() -> str:
    """SHA-256 (hex) of the codec's, tensor core's and kernels' source files (read once per process):
    part of every cache key. ``$FEDTENSOR_NN_CODEC_KEY`` replaces it (to reuse a cache across codec edits
    that do not change the decoded output)."""
    if os.environ.get("FEDTENSOR_NN_CODEC_KEY"):
        return hashlib.sha256(os.environ["FEDTENSOR_NN_CODEC_KEY"].encode()).hexdigest()
    import fedtensor.codec
    import fedtensor.tensor
    import fedtensor_kernels

    h = hashlib.sha256(__version__.encode())
    for pkg in (fedtensor.codec, fedtensor.tensor, fedtensor_kernels):
        for f in sorted(Path(pkg.__file__).parent.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _block_tag(block) -> str:
    if block is None:
        return "auto"
    return str(block) if isinstance(block, int) else "x".join(str(v) for v in block)


def encode_decode(volume, codec: str, target: float, block, cache_dir: Path | None,
                  label: str = "volume", digest: str | None = None) -> tuple[np.ndarray, dict]:
    """``(decoded array, header)`` of ``compress(volume, psnr=target, codec=codec, block=block)``,
    from the cache when present. The header is :func:`fedtensor.codec.read_info`'s (plus nothing)."""
    from fedtensor.codec import compress, decompress, read_info

    path = None
    if cache_dir is not None:
        digest = digest or data_hash(volume.data)
        key = sha256_text(digest + codec_fingerprint())[:16]
        path = Path(cache_dir) / f"{label}-{key}-{codec}-b{_block_tag(block)}-{target:g}.npz"
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as z:
                    info = json.loads(str(z["info"]))
                    decoded = z["decoded"]
                    if (isinstance(info, dict) and info.get("cache_library") == __version__
                            and decoded.shape == volume.data.shape and decoded.dtype == volume.data.dtype):
                        return decoded, info
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                pass  # unreadable or foreign cache entry: regenerate it
    blob = compress(volume, psnr=target, codec=codec, block=block if codec == "block-tucker" else None)
    info = read_info(blob)
    decoded = decompress(blob).data
    info = {k: v for k, v in info.items() if k not in ("affine",)}
    info["cache_library"] = __version__
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, decoded=decoded, info=np.array(json.dumps(info)))
        # A temp file of its own: runs sharing a cache (parallel folds) may write one entry at once.
        atomic_write_bytes(path, buf.getvalue(), force=True)
    return decoded, info


def pair_from(decoded: np.ndarray, info: dict, target: float) -> Pair:
    p = info["params"]
    return Pair(info["codec"], block_shape(info["codec"], p), float(target),
                decoded, p, float(info["stats"]["psnr"]), float(info["bits_per_voxel"]))


def volume_labels(paths: Sequence[Path]) -> list[str]:
    """A unique label per volume: its name, qualified by its directory where two share a name
    (``a/scan.nii.gz``, ``b/scan.nii.gz`` → ``a-scan``, ``b-scan``), whatever their order."""
    names = [volume_label(Path(p)) for p in paths]
    labels = [f"{Path(p).resolve().parent.name}-{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
    seen: set[str] = set()
    for i, label in enumerate(labels):  # still alike (same name in same-named directories): numbered
        while labels[i] in seen:
            labels[i] += "_"
        seen.add(labels[i])
    return labels


def make_pairs(paths: Sequence[Path], *, codecs: Sequence[str] = ("block-tucker",),
               targets: Sequence[float] = (36, 38, 40, 42, 44), blocks: Sequence = ("auto", 8),
               cache_dir: Path | None = None,
               progress: Callable[[int, int, str], None] | None = None) -> list[Source]:
    """Read every volume and produce its (decoded, original) pairs (cached)."""
    from fedtensor.io import read_volume

    jobs = [(c, parse_block(b), t) for c in codecs for b in (blocks if c == "block-tucker" else (None,))
            for t in targets]
    total, done = len(paths) * len(jobs), 0
    sources: list[Source] = []
    for path, label in zip(paths, volume_labels(paths)):
        vol = read_volume(path)
        if vol.data.min() == vol.data.max():  # coded exactly as its value: no (decoded, original) difference
            raise ModelError(f"{path} is a constant volume: nothing to learn from it; leave it out")
        digest = data_hash(vol.data)
        pairs, exact = [], []
        for codec, block, target in jobs:
            if progress:
                progress(done, total, f"{label} {codec} block {_block_tag(block) if codec == 'block-tucker' else '-'} {target:g} dB")
            decoded, info = encode_decode(vol, codec, target, block, cache_dir, label, digest)
            done += 1
            if info["codec"] not in RESTORABLE_CODECS:  # the exact stream was smaller: nothing to restore
                exact.append(f"{target:g} dB")
                continue
            pairs.append(pair_from(decoded, info, target))
        if not pairs:
            raise ModelError(f"{path}: the codec stores it exactly at every target (it is too small or too simple "
                             "for lossy coding), so it gives no pairs to learn from; leave it out")
        if exact:
            warnings.warn(f"{label}: no training pair at {', '.join(dict.fromkeys(exact))} (the exact stream was smaller)",
                          stacklevel=2)
        sources.append(Source(label, vol.data, pairs, digest))
    if progress:
        progress(done, total, "done")
    return sources


def training_sources(paths: Sequence[Path] | None, val_paths: Sequence[Path] | None,
                     sources: Sequence[Source] | None, val_sources: Sequence[Source] | None, cfg,
                     cache_dir: Path, progress: Callable[[str, dict], None]) -> tuple[list[Source], list[Source]]:
    """``(train, validation)`` sources of a training or federated run.

    Pairs are made from ``paths``/``val_paths`` (cached in ``cache_dir``) unless prepared ``sources``/
    ``val_sources`` are given. Validation volumes given explicitly are used for validation only;
    otherwise ``cfg.val_fraction`` of the training volumes is split off by volume (seeded by
    ``cfg.seed``). ``cfg`` also gives the codecs, targets and blocks of the pairs.
    """
    if sources is None and val_sources is None:
        all_paths = [*(paths or []), *(val_paths or [])]
        if all_paths:
            made = make_pairs(all_paths, codecs=cfg.codecs, targets=cfg.targets, blocks=cfg.blocks,
                              cache_dir=cache_dir,
                              progress=lambda d, t, what: progress("data", {"done": d, "total": t, "what": what}))
            sources, val_sources = made[:len(paths or [])], (made[len(paths or []):] or None)
    sources = list(sources or [])
    if not sources:
        raise ModelError("no training volumes given")
    seen: dict[str, str] = {}
    for s in [*sources, *(val_sources or [])]:
        digest = s.digest or data_hash(s.original)  # sources built by hand may carry none
        if digest in seen:
            raise ModelError(f"the same volume is given twice ({seen[digest]} and {s.label}): a volume is either "
                             "trained on or validated on, once")
        seen[digest] = s.label
    if val_sources:
        clash = {s.label for s in sources} & {s.label for s in val_sources}
        if clash:
            raise ModelError(f"a volume cannot be used for both training and validation: {sorted(clash)}")
        # in a fixed order (the split's): the run's fingerprint is order-free, so must be the run
        return sorted(sources, key=lambda s: s.label), sorted(val_sources, key=lambda s: s.label)
    train_labels, val_labels = split_by_volume([s.label for s in sources], cfg.val_fraction, cfg.seed)
    by_label = {s.label: s for s in sources}
    return [by_label[x] for x in train_labels], [by_label[x] for x in val_labels]


def intensity_kinds(sources: Sequence[Source]) -> list[str]:
    """The normalisations (``ct``, ``u8``, ``mr``: :func:`~fedtensor.nn.normalize.normaliser_for`) of the
    decoded volumes in ``sources`` — recorded in a model's manifest, checked when it restores."""
    return sorted({p.norm.kind for s in sources for p in s.pairs})


def split_by_volume(labels: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train, val)`` labels: a seeded shuffle, ``round(val_fraction·n)`` volumes (at least one when
    ``val_fraction > 0`` and there are ≥ 2 volumes; none otherwise) for validation."""
    labels = sorted(labels)
    n = len(labels)
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(labels[i] for i in order[:n_val])
    return [x for x in labels if x not in val], val


# ------------------------------------------------------------------------------------------ patches


@dataclass
class Batch:
    x: np.ndarray  # (N, P, P, P, IN_CHANNELS) net input
    cond: np.ndarray  # (N, 4)
    target: np.ndarray  # (N, P, P, P, 1): (original − decoded) / s, normalised units
    mask: np.ndarray  # (N, P, P, P, 1): 1 on real voxels, 0 on padding
    s: np.ndarray  # (N,)


def _crop(a: np.ndarray, origin, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``a[origin : origin+size]`` per axis, edge-padded at the far end when the volume is smaller."""
    sl = tuple(slice(o, o + size) for o in origin)
    c = a[sl]
    pad = [(0, size - n) for n in c.shape]
    mask = np.zeros((size,) * 3, np.float32)
    mask[tuple(slice(0, n) for n in c.shape)] = 1
    if any(p for _, p in pad):
        c = np.pad(c, pad, mode="edge")
    return c, mask


class PatchSampler:
    """Random (or fixed, for validation) patches from a list of :class:`Source`."""

    def __init__(self, sources: Sequence[Source], patch: int = 32, augment: bool = True):
        if patch % ALIGN or patch < 16:
            raise ValueError(f"patch size must be a multiple of {ALIGN}, at least 16, got {patch}")
        if not sources or not any(s.pairs for s in sources):
            raise ValueError("no training pairs")
        self.sources = list(sources)
        self.patch = patch
        self.augment = augment
        self.index = [(i, j) for i, s in enumerate(self.sources) for j in range(len(s.pairs))]

    def _origin(self, rng: np.random.Generator, shape) -> tuple[int, ...]:
        return tuple(int(rng.integers(0, max(0, n - self.patch) + 1)) for n in shape)

    def sample(self, rng: np.random.Generator, n: int) -> Batch:
        p = self.patch
        xs = np.empty((n, p, p, p, IN_CHANNELS), np.float32)
        ts = np.empty((n, p, p, p, 1), np.float32)
        ms = np.empty((n, p, p, p, 1), np.float32)
        conds = np.empty((n, 4), np.float32)
        ss = np.empty((n,), np.float32)
        for k in range(n):
            si, pj = self.index[int(rng.integers(len(self.index)))]
            src = self.sources[si]
            pair = src.pairs[pj]
            origin = self._origin(rng, src.original.shape)
            dec, mask = _crop(pair.decoded, origin, p)
            org, _ = _crop(src.original, origin, p)
            # the phase channels mark the codec's block grid at the patch's absolute position; they are
            # flipped and permuted with the data (channel F+k always describes spatial axis k)
            x = assemble_input(pair.norm.net_input(dec, pair.s), block_phases(dec.shape, pair.block, origin))
            t = (pair.norm.forward(org) - pair.norm.forward(dec)) / np.float32(pair.s)
            if self.augment:
                perm = rng.permutation(3)
                flips = rng.integers(0, 2, 3).astype(bool)
                chans = [*range(N_FEATURES), *(N_FEATURES + int(i) for i in perm)]
                x = augment(x[..., chans], perm, flips)
                t, mask = augment(t, perm, flips), augment(mask, perm, flips)
            xs[k] = x
            ts[k, ..., 0] = t
            ms[k, ..., 0] = mask
            conds[k] = pair.cond
            ss[k] = pair.s
        return Batch(xs, conds, ts, ms, ss)


def default_workers() -> int:
    """Sampler threads: one per core, at most 8."""
    return min(8, usable_cores())


def prefetched_batches(sampler: PatchSampler, seed: Sequence[int], batch: int, n: int,
                       workers: int | None = None) -> Iterator[Batch]:
    """Batch ``k`` (``k < n``) is ``sampler.sample(default_rng([*seed, k]), batch)``; yielded in order while
    the next ones are sampled on ``workers`` threads.

    Patch sampling is numpy and scipy.ndimage work that mostly releases the GIL (measured: 1.8× the
    patches/s on two threads of a 2-core machine), so it scales with cores and overlaps the device's
    training step (on an H200 the step ran ~20× faster than one sampling thread). Each batch has its
    own seed, so the batches do not depend on the number of threads or their timing.
    """
    workers = workers or default_workers()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedtensor-sampler")
    pending: deque = deque()

    def submit(k: int) -> None:
        pending.append(pool.submit(sampler.sample, np.random.default_rng([*seed, k]), batch))

    try:
        for k in range(min(n, 2 * workers)):
            submit(k)
        for k in range(n):
            b = pending.popleft().result()
            if k + 1 + len(pending) < n:
                submit(k + 1 + len(pending))
            yield b
    finally:  # also when the consumer stops early
        pool.shutdown(wait=True, cancel_futures=True)


def augment(a: np.ndarray, perm, flips) -> np.ndarray:
    """Permute the three spatial axes of ``a`` (trailing axes kept) and flip the chosen ones."""
    a = np.transpose(a, (*perm, *range(3, a.ndim)))
    for ax in range(3):
        if flips[ax]:
            a = np.flip(a, ax)
    return np.ascontiguousarray(a)
