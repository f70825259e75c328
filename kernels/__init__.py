"""fedtensor_kernels: accelerator kernels (Pallas) with pure-``jnp`` reference implementations.

Installed as the package ``fedtensor_kernels`` (the source directory is ``kernels/``; see
``[tool.setuptools.package-dir]`` in pyproject.toml) — import it as ``fedtensor_kernels``, never as a
bare ``kernels``. The library picks a kernel at run time and falls back to the ``jnp`` reference when
no accelerator is present, so nothing here is required for CPU use.
"""
