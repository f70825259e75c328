"""The ``.ftz`` codec: block-Tucker transform coding (and the paper's global OMLSVD), exact modes."""

import importlib

__all__ = ["CODECS", "compress", "decompress", "read_info"]
_HOME = {"read_info": "header"}  # JAX-free (the others are in api)


def __getattr__(name: str):
    # Lazy, so that the entropy coder's worker processes (fedtensor.codec.parallel) import the codec
    # package without JAX; a submodule (``fedtensor.codec.stream``) is imported on first use too.
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.{_HOME.get(name, 'api')}"), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":  # the submodule exists; something it imports does not
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
