"""Pure, jitted JAX Tucker decompositions: HOSVD, HOOI (OMLSVD), blockwise Tucker, rank selection."""

from fedtensor.tensor.block import block_bases, block_tucker, block_tucker_to_tensor, expand, from_blocks, project, to_blocks
from fedtensor.tensor.rank import ranks_for_energy, ranks_for_error
from fedtensor.tensor.tucker import hooi, hosvd, mode_dot, multi_mode_dot, tucker_to_tensor

__all__ = [
    "block_bases", "block_tucker", "block_tucker_to_tensor", "expand", "from_blocks", "hooi", "hosvd",
    "mode_dot", "multi_mode_dot", "project", "ranks_for_energy", "ranks_for_error", "to_blocks", "tucker_to_tensor",
]
