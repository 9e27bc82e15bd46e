"""The names `sau` accepts for each choice, spelled once.

Every module, command-line option and config check that offers one of these choices
imports it from here, so adding a method means editing one tuple (and its implementation).
"""

from __future__ import annotations

# Kernel backends, ("triton", "torch"): spelled in sau_kernels (which never imports sau).
from sau_kernels._common import BACKENDS

__all__ = [
    "AMPLIFY_MODES",
    "BACKENDS",
    "LAYER_AMPLIFY_MODES",
    "METHODS",
    "PRUNE_CHOICES",
    "PRUNE_METHODS",
    "SCOPES",
    "SCORES",
]

# Unlearning objectives (sau.unlearn.objectives): gradient ascent, gradient difference,
# NPO, SimNPO.
METHODS = ("ga", "graddiff", "npo", "simnpo")

# Pruning methods (sau.prune.prune_model).
PRUNE_METHODS = ("magnitude", "wanda")
# The pruning choices of a run: a method, or "none" to take the model as already pruned.
PRUNE_CHOICES = (*PRUNE_METHODS, "none")

# What plan_selection ranks survivors by (the forget saliency, or forget over retain
# Fisher), and over what it takes the top k (each layer, or all planned weights at once).
SCORES = ("forget", "contrast")
SCOPES = ("layer", "global")

# Where SAUAdamW applies the amplification (docs/method.md, "The update").
AMPLIFY_MODES = ("grad", "update", "saliency")
# The modes with one scalar w per layer ("saliency" needs the plan's per-entry codes).
LAYER_AMPLIFY_MODES = AMPLIFY_MODES[:2]
