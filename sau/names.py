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
]

# Unlearning objectives (sau.unlearn.objectives): gradient ascent, gradient difference,
# NPO, SimNPO.
METHODS = ("ga", "graddiff", "npo", "simnpo")

# Pruning methods (sau.prune.prune_model).
PRUNE_METHODS = ("magnitude", "wanda")
# What the pipeline and the command line accept: "none" takes the model as already pruned.
PRUNE_CHOICES = (*PRUNE_METHODS, "none")

# Where SAUAdamW applies the amplification (docs/method.md, "The update").
AMPLIFY_MODES = ("grad", "update", "saliency")
# The modes with one scalar w per layer: what `--amplify` and PipelineConfig.amplify offer
# ("saliency" needs per-entry codes in the plan; the pipeline runs it as sau-saliency-amp).
LAYER_AMPLIFY_MODES = AMPLIFY_MODES[:2]
