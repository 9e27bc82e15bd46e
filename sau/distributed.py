"""Data parallelism with FSDP2: process group, sharding, rank slices of global batches.

torchrun runs one process per rank (N ranks); each builds the same model, then
`shard_model` applies `fully_shard` to every decoder layer and the root (parameters
become DTensors sharded on dim 0). Every global batch (its size unchanged by N) is split
into contiguous rank slices; each slice carries the global batch's loss denominators
divided by N (``loss_tokens``, ``loss_rows``; see sau.unlearn.objectives), so FSDP2's
averaged gradient is exactly the global batch's and results do not depend on N beyond
float summation order.

A rank whose slice is empty (a short last batch) runs one row of the batch with weight 0
(``loss_weight``; the batch's own terms only): FSDP2 needs every rank in every forward and
backward.

Parameters of a sharded model are DTensors sharded on dim 0, and so are their gradients.
SAU works on the local shards (saliency accumulation, the optimizer step: `local`) and
hands DTensors back where a user sees a per-parameter tensor (saliency: `like_param`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from sau.batching import IGNORE_INDEX, collate
from sau.errors import SAUError

__all__ = [
    "DataParallel",
    "GroupError",
    "from_env",
    "gather_full_model",
    "launched_by_torchrun",
    "like_param",
    "local",
    "shard_model",
]


class GroupError(SAUError):
    """A refusal that every rank of the group raises alike, decided by one collective
    (`DataParallel.on_main`, `raise_first`, `agree`): every rank is still in the group,
    so they can meet once more before exiting (rank 0 reports it first)."""


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


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass
class DataParallel:
    """This process's place in the group: rank, world size, the device it computes on."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 prints and writes; the others compute and stay quiet."""
        return self.rank == 0

    def rows(self, global_rows: Sequence[int]) -> tuple[list[int], float]:
        """This rank's contiguous slice of a global batch's row ids and its loss weight.

        Slices are as even as possible (torch.tensor_split). An empty slice becomes the
        batch's first row with weight 0, so the rank still runs forward and backward.
        """
        n = len(global_rows)
        lo = self.rank * (n // self.world) + min(self.rank, n % self.world)
        hi = lo + n // self.world + (1 if self.rank < n % self.world else 0)
        mine = list(global_rows[lo:hi])
        return (mine, 1.0) if mine else (list(global_rows[:1]), 0.0)

    def batch(self, encoded: Sequence, global_rows: Sequence[int], pad: int) -> tuple[dict, float]:
        """(this rank's loss batch of a global batch, its weight), with the global batch's
        token and row counts divided by the world size as the loss denominators. An empty
        slice's placeholder row also carries ``loss_weight`` 0.0, which
        `sau.unlearn.objectives.objective_loss` applies to that batch's terms only (a
        forget placeholder must not zero the rank's retain term)."""
        whole = collate([encoded[i] for i in global_rows], pad)
        n_tokens = int((whole["labels"][:, 1:] != IGNORE_INDEX).sum().clamp(min=1))
        mine, weight = self.rows(global_rows)
        local = collate([encoded[i] for i in mine], pad)
        local["loss_tokens"] = n_tokens / self.world
        local["loss_rows"] = len(global_rows) / self.world
        if not weight:  # objective_loss multiplies only this batch's own terms by it
            local["loss_weight"] = 0.0
        return local, weight

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (one all-reduce)."""
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def max(self, values: Sequence[float]) -> list[float]:
        """The elementwise maximum over ranks of `values` (one all-reduce)."""
        t = torch.tensor([float(v) for v in values], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def mean(self, value: torch.Tensor) -> float:
        """The mean over ranks of a 0-d tensor (one all-reduce): the global batch's loss
        when every rank's loss is its slice's share (see the module docstring)."""
        t = value.detach().float().reshape(1).to(self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def barrier(self) -> None:
        dist.barrier()

    def on_main(self, fn) -> None:
        """fn() on rank 0 only; a SAUError (or OSError) there is raised on every rank as
        a GroupError (one broadcast), so the other ranks do not wait forever for a rank
        that gave up."""
        error = None
        if self.is_main:
            try:
                fn()
            except (SAUError, OSError) as err:
                error = str(err)
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise GroupError(box[0])

    def raise_first(self, error: str | None) -> None:
        """Collective: when any rank passes an error message, every rank raises
        GroupError with the lowest such rank's (rank 0's when it has one); else returns.
        Lets a step that may fail on some ranks only (a truncated file, a full disk) end
        every rank with the same one line instead of a hang or a collective's traceback."""
        seen: list = [None] * self.world
        dist.all_gather_object(seen, error)
        errors = [e for e in seen if e is not None]
        if errors:
            raise GroupError(errors[0])

    def run_all(self, fn):
        """fn() on every rank; a SAUError (or OSError) on any rank is raised on every
        rank (`raise_first`). Returns fn()'s result."""
        error, result = None, None
        try:
            result = fn()
        except (SAUError, OSError) as err:
            error = str(err)
        self.raise_first(error)
        return result

    def agree(self, text: str, what: str) -> None:
        """Raise GroupError on every rank unless every rank passed the same `text`."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        seen: list = [None] * self.world
        dist.all_gather_object(seen, digest)
        odd = [r for r, d in enumerate(seen) if d != seen[0]]
        if odd:
            raise GroupError(f"ranks {odd} loaded different {what} than rank 0")


def from_env() -> DataParallel:
    """Join the torchrun group: NCCL with one GPU per local rank when CUDA exists, else
    gloo on the CPU. Idempotent."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return DataParallel(dist.get_rank(), dist.get_world_size(), device)


def _decoder_layers(model) -> list:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList) and len(obj):
            return list(obj)
    return []


def shard_model(model, dp: DataParallel):
    """fully_shard every decoder layer, then the root (FSDP2), on dp's device; in place.

    Raises SAUError when no decoder-layer list is found or fully_shard refuses the model.
    """
    layers = _decoder_layers(model)
    if not layers:
        raise SAUError(
            "cannot shard this model: no decoder-layer list (model.layers, "
            "model.decoder.layers, transformer.h) found for fully_shard"
        )
    model.to(dp.device)
    try:
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:
        raise SAUError(f"cannot shard this model with FSDP2: {err}") from None
    return model


def gather_full_model(sharded, template, dp: DataParallel):
    """The unsharded weights of `sharded`, loaded into `template` on rank 0.

    Collective (every rank must call it). Returns `template` (a plain model with the
    same parameter names) on rank 0 and None elsewhere.
    """
    full = get_model_state_dict(
        sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not dp.is_main:
        return None
    template.load_state_dict(full, strict=False)
    return template
