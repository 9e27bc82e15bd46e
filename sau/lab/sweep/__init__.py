"""`sau sweep` in Python: the paper's experiments as one resumable grid.

    from sau.lab.sweep import PRESETS, Settings, Source, run_sweep
    res = run_sweep(PRESETS["quick"], "runs/sweep-quick", source=Source(corpus="quick"))

Modules: `grid` (cells, axes, presets over `sau.lab.variants`), `run` (one cell: shared
starting models, unlearning, evaluation, quantized evaluation), `core` (the resumable
loop and output directory), `analysis` (durability columns, seed aggregates, Pareto
fronts), `plots` and `report` (results.csv/json, report.md, PNGs).
"""

from __future__ import annotations

from sau.lab.sweep.core import Source, SweepResult, estimate_memory_bytes, run_sweep
from sau.lab.sweep.grid import AXES, PRESETS, Cell, expand
from sau.lab.sweep.settings import Settings

__all__ = [
    "AXES",
    "PRESETS",
    "Cell",
    "Settings",
    "Source",
    "SweepResult",
    "estimate_memory_bytes",
    "expand",
    "run_sweep",
]
