"""Rate–distortion benchmark of fedtensor against every rival codec (:mod:`fedtensor.baselines`).

>>> from fedtensor.bench import BenchConfig, run_bench               # doctest: +SKIP
>>> summary = run_bench(BenchConfig(["ct.nii.gz"], targets=[40, 45, 50], out="results"))

Writes into ``out``: ``cells.jsonl`` (the resumable per-cell record), ``results.csv``,
``results.json``, ``bd_rate.md``, ``summary.md``, and the figures ``rd_<volume>.png``,
``storage_<T>dB.png`` and ``panel_<volume>.png``. The command line is ``fedtensor bench``.
"""

from fedtensor.bench.bdrate import bd_psnr, bd_rate
from fedtensor.bench.harness import BenchConfig, load_cells, run_bench, run_cells

__all__ = ["BenchConfig", "run_bench", "run_cells", "load_cells", "bd_rate", "bd_psnr"]
