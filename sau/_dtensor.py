"""FSDP2 helpers: the local shard of a DTensor, and a local tensor wrapped like a param.

FSDP2 (`torch.distributed.fsdp.fully_shard`) turns parameters into DTensors sharded on
dim 0; their gradients are DTensors sharded alike. SAU works on the local shards
(saliency accumulation, the optimizer step) and hands DTensors back where a user sees
a per-parameter tensor (saliency).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (shares its storage); a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def like_param(local_tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`local_tensor` (shaped like param's local shard) as a DTensor with param's mesh,
    placements, global shape and stride; returned unchanged when param is plain."""
    if not isinstance(param, DTensor):
        return local_tensor
    return DTensor.from_local(
        local_tensor,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )
