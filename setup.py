"""Package list for setuptools (all other metadata lives in pyproject.toml).

`kernels/` is installed as `fedtensor_kernels` (see `[tool.setuptools.package-dir]` in pyproject.toml);
a single `packages.find` cannot both discover `fedtensor*` and rename a directory, so the list is built here.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["fedtensor", "fedtensor.*", "fedtensor_cli", "fedtensor_cli.*"])
packages += ["fedtensor_kernels"] + [f"fedtensor_kernels.{p}" for p in find_packages(where="kernels")]

setup(packages=packages)
