"""The ``.ftz`` codec: block-Tucker transform coding (and the paper's global OMLSVD), exact modes."""

__all__ = ["CODECS", "compress", "decompress", "read_info"]


def __getattr__(name: str):
    # Lazy, so that the entropy coder's worker processes (fedtensor.codec.parallel) import the codec
    # package without JAX.
    if name in __all__:
        from fedtensor.codec import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
