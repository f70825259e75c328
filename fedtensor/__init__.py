"""fedtensor: tensor-decomposition compression of 3D medical volumes, with federated learned restoration."""

from fedtensor.reproducible import request_deterministic_gpu_ops

__version__ = "0.1.0"

request_deterministic_gpu_ops()  # before any JAX backend starts: see fedtensor.reproducible
