"""The ``.ftz`` codec: block-Tucker transform coding (and the paper's global OMLSVD), exact modes."""

from fedtensor.codec.api import CODECS, compress, decompress, read_info

__all__ = ["CODECS", "compress", "decompress", "read_info"]
