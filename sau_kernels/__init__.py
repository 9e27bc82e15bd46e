"""SAU kernels: saliency accumulation, exact top-k selection over survivors, masked AdamW.

Every function takes `backend=None` ("triton" | "torch"); None picks Triton for CUDA
tensors and PyTorch otherwise, and the SAU_BACKEND environment variable overrides that
default (`TRITON_INTERPRET=1 SAU_BACKEND=triton` runs the Triton kernels on the CPU).
`sau_kernels.reference` holds the plain PyTorch oracle of each.
"""

from sau_kernels import reference
from sau_kernels._common import resolve_backend
from sau_kernels.accumulate import accumulate_sq_grad_
from sau_kernels.adamw import masked_adamw_, masked_adamw_multi_
from sau_kernels.entry_scale import decode_entry_scale, encode_entry_scale
from sau_kernels.select import select_topk
from sau_kernels.select_global import select_global
from sau_kernels.select_mass import select_mass
from sau_kernels.selection import Selection

__all__ = [
    "Selection",
    "accumulate_sq_grad_",
    "decode_entry_scale",
    "encode_entry_scale",
    "masked_adamw_",
    "masked_adamw_multi_",
    "reference",
    "resolve_backend",
    "select_global",
    "select_mass",
    "select_topk",
]
