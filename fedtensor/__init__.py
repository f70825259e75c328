"""fedtensor: tensor-decomposition compression of 3D medical volumes, with federated learned restoration."""

__version__ = "0.1.0"
