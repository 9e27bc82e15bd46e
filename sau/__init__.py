"""SAU: Sparsity-Aware Unlearning for pruned language models.

The public entry points are imported lazily so that `import sau` (and `sau --help`)
does not pull in transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "compute_saliency": "sau.saliency",
    "contrast_score": "sau.saliency",
    "Saliency": "sau.saliency",
    "plan_selection": "sau.plan",
    "SelectionPlan": "sau.plan",
    "LayerPlan": "sau.plan",
    "SAUAdamW": "sau.optim",
    "SAUError": "sau.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sau' has no attribute {name!r}")
