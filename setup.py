"""Package list for setuptools (all other metadata lives in pyproject.toml).

`kernels/` is installed as `fedtensor_kernels` (see `[tool.setuptools.package-dir]` in pyproject.toml);
a single `packages.find` cannot both discover `fedtensor*` and rename a directory, so the list is built here.
"""

import sys

from setuptools import Extension, find_packages, setup

packages = find_packages(include=["fedtensor", "fedtensor.*", "fedtensor_cli", "fedtensor_cli.*"])
packages += ["fedtensor_kernels"] + [f"fedtensor_kernels.{p}" for p in find_packages(where="kernels")]

# The entropy coder's compiled chunk models. Optional: without a C compiler the numpy code computes
# the same models. No fused multiply-adds: the models must equal numpy's (and constriction's) bit for bit.
flags = ["/fp:strict"] if sys.platform == "win32" else ["-O2", "-ffp-contract=off"]
contexts = Extension("fedtensor.codec._contexts", ["fedtensor/codec/_contexts.c"], optional=True,
                     extra_compile_args=flags)
# The range coder that writes and reads constriction's streams without holding the GIL (optional as
# well: without it constriction codes them, word for word the same).
range_coder = Extension("fedtensor.codec._range", ["fedtensor/codec/_range.c"], optional=True,
                        extra_compile_args=flags)

setup(packages=packages, ext_modules=[contexts, range_coder])
