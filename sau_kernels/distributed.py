"""Exact top-k selection over weights sharded across ranks (docs/method.md).

Each rank holds a contiguous flat range of every weight (FSDP2 shards on dim 0, so the
local shard of a row-major tensor is the flat range [offset, offset + local numel)). The
radix select of `sau_kernels.radix` needs only histograms and key ranges, and those merge:
each pass's local rows (histogram, counts, min and max key), of ALL layers at once, are
all-gathered ONCE and merged, so every rank picks the same digit, the same window and the
same tau for every layer, exactly as one process would on the gathered tensor. Candidate
buffers and bit words stay local. Then each rank emits its local selected indices, and one
all-gather of per-layer partials [n_selected, I_P, I_S, I_G] gives the global stats,
summed in rank order on every rank (bitwise the same everywhere).

Collectives per call: 1 (header: layer count, k and input checks agree) + 4 (first pass,
split pass, one refining pass, the tau of early-stopped windows) + 1 (stats) = 6,
whatever the number of layers and the data.

Layering: imports torch and torch.distributed (and `sau_kernels.radix`); never `sau`,
`transformers` or `nn`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import torch
import torch.distributed as dist

from sau_kernels import radix
from sau_kernels._common import check_fraction, check_layer, num_selected, resolve_backend
from sau_kernels.select import select_topk
from sau_kernels.selection import Selection

__all__ = ["local_shard", "select_topk_many", "select_topk_sharded"]


def local_shard(t: torch.Tensor):
    """(local tensor, flat offset, process group or None) of a tensor.

    A plain tensor, or a DTensor replicated on its mesh, is whole on this rank:
    (t or its local copy, 0, None). A DTensor sharded on dim 0 over a 1-D mesh (FSDP2)
    gives its local shard, the flat position of the shard's first entry in the full
    tensor and the mesh's process group. Other layouts raise ValueError: their local
    entries are not one contiguous flat range of the full tensor.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return t, 0, None
    mesh, placements = t.device_mesh, tuple(t.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return t.to_local(), 0, None
    if mesh.ndim != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise ValueError(
            f"only DTensors sharded on dim 0 over a 1-D mesh (FSDP2) are supported, got "
            f"placements {placements} on a {mesh.ndim}-D mesh"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, global_offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    row = math.prod(t.shape[1:])
    return t.to_local(), int(global_offset[0]) * row if t.dim() else 0, mesh.get_group(0)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local_error(scores, weights) -> str | None:
    """The ValueError/TypeError message of this rank's first invalid layer, or None."""
    for i, (s, w) in enumerate(zip(scores, weights)):
        try:
            check_layer(s, w)
            if not (s.is_contiguous() and w.is_contiguous()):
                raise ValueError("local scores and weight shards must be contiguous")
        except (TypeError, ValueError) as err:
            return f"layer {i}: {err}"
    return None


def _comm_device(group) -> torch.device:
    # NCCL moves CUDA tensors only; gloo (the CPU backend) is happiest with CPU tensors.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _header(n_layers: int, k: float, error: str | None, group, device) -> None:
    """One all-gather so that every rank fails together (a lone failure would hang the
    others in the next collective): same layer count, same k, valid inputs everywhere."""
    k_bits = struct.unpack("<q", struct.pack("<d", float(k)))[0]
    mine = torch.tensor([n_layers, k_bits, int(error is not None)], device=device)
    world = dist.get_world_size(group)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).cpu()
    if error is not None:
        raise ValueError(error)
    bad = [r for r in range(world) if table[r, 2]]
    if bad:
        raise ValueError(f"select_topk_sharded: invalid input on rank(s) {bad}")
    if (table[:, 0] != n_layers).any() or (table[:, 1] != k_bits).any():
        raise ValueError(
            "select_topk_sharded: ranks disagree on the number of layers or on k "
            f"(layers per rank {table[:, 0].tolist()}); every rank must pass the same plan"
        )


def _check_arguments(scores, weights, offsets, k) -> float:
    """The checks made before any collective (k, one entry per layer); returns k."""
    k = check_fraction("k", k)
    if not len(scores) == len(weights) == len(offsets):
        raise ValueError(
            f"scores, weights and offsets must have one entry per layer, got "
            f"{len(scores)}, {len(weights)}, {len(offsets)}"
        )
    return k


def _select_layers(layers, k: float, group, device):
    """Every layer's tau key (None: nothing to select), global |S| and local emit.

    One search per layer; each pass's rows of all layers are all-gathered once and merged
    (`radix.combine_ranks`), so every rank sees the whole tensors' histograms and key
    ranges and takes the same steps. The number of passes is fixed (4), so the number of
    collectives depends neither on the data nor on the number of layers.
    """
    world = dist.get_world_size(group)

    def reduce(table: torch.Tensor) -> torch.Tensor:
        mine = table.to(device)
        rows = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(rows, mine, group=group)
        return radix.combine_ranks(torch.stack(rows))

    def targets(n_survivors):
        return [num_selected(k, n) for n in n_survivors]

    groups = [[i] for i in range(len(layers))]
    return radix.select_searches(layers, groups, targets, reduce=reduce, fixed_rounds=True)


@torch.no_grad()
def select_topk_sharded(
    scores: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    offsets: Sequence[int],
    k: float,
    *,
    group=None,
    backend: str | None = None,
) -> list[Selection]:
    """select_topk of many layers, each sharded across the ranks of `group`, exactly.

    Collective: every rank of `group` must call it with the same number of layers, in
    the same order, and the same k. Layer i's full tensor is the concatenation, in flat
    order, of every rank's local shard (as dim-0 sharding gives). The result is the
    selection of docs/method.md on the full tensor: r = ceil(k * |S|) over its
    survivors, tau the r-th largest survivor score, G = {i in S: s_i >= tau, s_i > 0}.

    Args:
        scores: per layer, this rank's float32 saliency shard (finite, >= 0, contiguous).
        weights: per layer, this rank's weight shard (float32 | float16 | bfloat16, same
            numel and device as its scores; pruned entries are exact zeros).
        offsets: per layer, the flat position of this shard's first entry in the full
            tensor (Selection.offset).
        k: fraction in (0, 1].
        group: the process group (None: the default group).
        backend: "triton" | "torch" | None, for the local histogram and emit passes.

    Returns:
        One Selection per layer: index = this shard's selected flat indices (1-D, sorted,
        int32 below 2**31 local entries), offset = offsets[i]; threshold, n_survivors,
        n_selected and the float64 importances are the full tensor's, identical on every
        rank (summed across ranks in rank order).

    Raises:
        ValueError / TypeError (on every rank together): bad k, mismatched list lengths,
        invalid shards on any rank, ranks passing different layer counts or k.
    """
    k = _check_arguments(scores, weights, offsets, k)
    device = _comm_device(group)
    _header(len(scores), k, _local_error(scores, weights), group, device)
    layers = [(s, w, resolve_backend(backend, s, w)) for s, w in zip(scores, weights)]
    tau_keys, n_survivors, emitted = _select_layers(layers, k, group, device)
    total = _global_stats(emitted, group, device)
    return [
        _global_selection(index, total[i], tau_keys[i], n_survivors[i], scores[i], offsets[i])
        for i, (index, _) in enumerate(emitted)
    ]


def _global_stats(emitted, group, device) -> torch.Tensor:
    """[layers, 4] float64 on the CPU: |G|, I_P, I_S, I_G summed over ranks in rank order
    (on every rank, so every rank holds the same bits)."""
    stats = torch.zeros((len(emitted), 4), dtype=torch.float64, device=device)
    for i, (index, sums) in enumerate(emitted):
        stats[i, 0] = index.numel()  # exact in float64 below 2**53
        stats[i, 1:].copy_(sums)
    rows = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, stats, group=group)
    total = rows[0].clone()
    for r in rows[1:]:
        total += r
    return total.cpu()


def _global_selection(index, total, tau_key, n_survivors, scores, offset) -> Selection:
    """This shard's Selection with the full tensor's threshold and stats."""
    n_selected = int(total[0])
    dev = scores.device
    i_p, i_s, i_g = (total[j].to(dev) for j in (1, 2, 3))
    return Selection(
        index=index,
        threshold=radix.threshold(tau_key, n_selected, dev),
        n_survivors=n_survivors,
        n_selected=n_selected,
        importance_pruned=i_p,
        importance_survivors=i_s,
        importance_selected=i_g,
        offset=int(offset),
    )


def select_topk_many(scores, weights, k: float, *, backend: str | None = None) -> list[Selection]:
    """select_topk for a list of layers given as plain tensors and/or DTensors.

    Plain tensors (and replicated DTensors) go through `select_topk`; dim-0 sharded
    DTensors (FSDP2) through `select_topk_sharded`, batched per process group so the
    collectives do not grow with the number of layers. The scores of a sharded weight
    are a DTensor sharded alike, or the full plain tensor (this rank's range is used).
    Every rank must pass the same layers in the same order. Returns one Selection per
    layer, in order.
    """
    out: list[Selection | None] = [None] * len(scores)
    groups: dict[int, tuple[object, list[int], list, list, list]] = {}
    for i, (s, w) in enumerate(zip(scores, weights)):
        w_local, w_off, w_group = local_shard(w)
        if w_group is not None and not _is_dtensor(s) and s.numel() == w.numel():
            # full saliency beside a sharded weight: this rank's flat range of it
            s = s.reshape(-1)[w_off : w_off + w_local.numel()].view(w_local.shape)
            s_local, s_off, s_group = s, w_off, w_group
        else:
            s_local, s_off, s_group = local_shard(s)
        if (s_off, s_group) != (w_off, w_group) or s_local.shape != w_local.shape:
            raise ValueError(
                f"layer {i}: saliency and weight must be sharded alike (same mesh, "
                "placements and local shape)"
            )
        if w_group is None:
            out[i] = select_topk(s_local, w_local, k, backend=backend)
            continue
        entry = groups.setdefault(id(w_group), (w_group, [], [], [], []))
        entry[1].append(i)
        entry[2].append(s_local.contiguous().view(-1))
        entry[3].append(w_local.contiguous().view(-1))
        entry[4].append(w_off)
    for group, positions, s_list, w_list, offs in groups.values():
        sels = select_topk_sharded(s_list, w_list, offs, k, group=group, backend=backend)
        for i, sel in zip(positions, sels):
            out[i] = sel
    return out  # type: ignore[return-value]
