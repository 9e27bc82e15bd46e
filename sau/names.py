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
    "ROUNDINGS",
    "SCOPES",
    "SCORES",
    "STATE_BITS",
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

# How SAUAdamW stores a step into a float16/bfloat16 parameter (docs/optimizer.md,
# "16-bit parameters"); the first is the default. float32 parameters ignore it.
ROUNDINGS = ("kahan", "stochastic", "nearest")
# Bits per stored moment entry: float32 moments, or 8-bit block-scaled codes.
STATE_BITS = (32, 8)
