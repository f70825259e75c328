"""fedtensor's own codecs behind the baseline interface, so the harness treats every codec alike.

``fedtensor`` (block Tucker) and ``omlsvd-global`` (the paper's global truncated OMLSVD) use the
codec's own PSNR mode, which already returns the largest quantiser step whose decoded PSNR is ≥ the
target, so no outer search is needed; ``fedtensor-lossless`` is its exact mode (integer-valued volumes).
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

import numpy as np

from fedtensor.baselines.base import Baseline
from fedtensor.io.volume import integer_valued


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 (12 hex digits) of the source a fedtensor cell depends on: ``fedtensor.codec``,
    ``fedtensor.tensor`` and the kernels (``.py`` and ``.c`` files, not the compiled extension, whose
    bytes vary between builds), the metrics, the volume type and this module. Read once, with the code
    (:func:`fedtensor.bench.harness` workers ask for it as they import the codec): a tree edited during
    a run must not stamp the cells the loaded code measures."""
    import fedtensor.codec
    import fedtensor.io.volume
    import fedtensor.metrics
    import fedtensor.tensor
    import fedtensor_kernels

    files = [(f"{pkg.__name__}/{f.name}", f) for pkg in (fedtensor.codec, fedtensor.tensor, fedtensor_kernels)
             for f in sorted(p for p in Path(pkg.__file__).parent.iterdir() if p.suffix in (".py", ".c"))]
    files += [(m.__name__, Path(m.__file__)) for m in (fedtensor.metrics, fedtensor.io.volume, sys.modules[__name__])]
    h = hashlib.sha256()
    for name, f in files:
        h.update(f"{name}\0".encode() + f.read_bytes())
    return h.hexdigest()[:12]


class _Fedtensor(Baseline):
    kind = "3D"
    is_fedtensor = True
    module_needs = ("fedtensor.codec",)
    codec = "block-tucker"

    @classmethod
    def version(cls) -> str:
        """The release and a digest of the codec's source: a benchmark's cells from other code are stale
        (the release number alone stayed the same through many changes of the codec)."""
        import fedtensor

        return f"fedtensor {fedtensor.__version__} (codec {source_digest()})"

    def decode(self, blob: bytes) -> np.ndarray:
        from fedtensor.codec import decompress

        return np.asarray(decompress(blob).data)


class Fedtensor(_Fedtensor):
    name = "fedtensor"
    label = "fedtensor (block Tucker)"
    direct_psnr = True
    allow_exact = True  # what `fedtensor compress` writes: the exact stream where it is smaller

    def encode_psnr(self, volume, target: float) -> bytes:
        from fedtensor.codec import compress

        return compress(volume, psnr=float(target), codec=self.codec, allow_exact=self.allow_exact)


class OmlsvdGlobal(Fedtensor):
    name = "omlsvd-global"
    label = "global OMLSVD (paper)"
    codec = "omlsvd-global"
    allow_exact = False  # the paper's method itself, never fedtensor's exact coder in its place


class FedtensorLossless(_Fedtensor):
    name = "fedtensor-lossless"
    label = "fedtensor lossless"
    lossless = True

    def not_applicable_reason(self, volume):
        from fedtensor.io.scaling import stored_integers  # floats of scaled integers: coded as those

        exact = integer_valued(np.asarray(volume.data)) or stored_integers(volume) is not None
        return None if exact else "needs integer-valued voxels"

    def encode_lossless(self, volume) -> bytes:
        from fedtensor.codec import compress

        return compress(volume, lossless=True)
