"""Wanda's calibration statistic: the L2 norm of every input channel of every layer.

For a Linear or Conv1D weight the input is the module's first positional argument. For a
fused experts tensor each expert is its own layer and sees only the tokens routed to it:
the experts module is called as ``experts(hidden [N, H], top_k_index [N, K], weights)``
(transformers 5.x), so a forward pre-hook takes expert e's rows of ``hidden`` for
``gate_up_proj`` / ``up_proj`` and recomputes its intermediate activation
(``module._apply_gate`` of the up projection) for ``down_proj``. Padding positions
(attention mask 0) are left out everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from sau.weights import PlannableWeight

__all__ = ["input_channel_norms"]

_EXPERT_INPUT = ("gate_up_proj", "up_proj")  # read the hidden state
_EXPERT_INNER = ("down_proj",)  # reads act(gate) * up of the same expert


def unpack_batch(batch) -> tuple[tuple, dict, torch.Tensor | None]:
    """A calibration batch as (args, kwargs, attention_mask or None).

    A batch is input_ids [B, T], (input_ids, attention_mask), or a dict for model(**batch).
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, dict):
        return (), dict(batch), batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        ids, attn = batch
        return (ids,), ({"attention_mask": attn} if attn is not None else {}), attn
    raise TypeError(
        "calib_batches must yield input_ids tensors, (input_ids, attention_mask) pairs "
        f"or dicts, got {type(batch).__name__}"
    )


def _real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x as [rows, features] float32 with padding rows zeroed (mask [B, T] or None)."""
    x = x.detach().float()
    if mask is not None:
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x * mask.to(x.device, x.dtype).unsqueeze(-1)
        elif x.dim() == 2 and x.shape[0] == mask.numel():  # MoE blocks flatten [B*T, H]
            x = x * mask.reshape(-1, 1).to(x.device, x.dtype)
    return x.reshape(-1, x.shape[-1])


def _check_experts(weight: PlannableWeight) -> str:
    attr = weight.name.rpartition(".")[2]
    if attr in _EXPERT_INPUT:
        return "input"
    if attr in _EXPERT_INNER and hasattr(weight.module, "_apply_gate"):
        up = getattr(weight.module, "gate_up_proj", None)  # _apply_gate splits gate | up
        if isinstance(up, torch.Tensor) and up.dim() == 3:
            return "inner"
    raise ValueError(
        f"Wanda cannot calibrate the fused experts tensor {weight.name}: only "
        "gate_up_proj / up_proj / down_proj of transformers' experts modules are known; "
        "use --method magnitude"
    )


def _expert_hook(weight: PlannableWeight, role: str, sq: torch.Tensor, current: dict):
    module = weight.module

    def hook(_mod, args):
        hidden, top_k_index = args[0], args[1]
        x = _real_rows(hidden, current["mask"])
        for e in range(sq.shape[0]):
            rows = x[(top_k_index == e).any(-1).to(x.device)]
            if rows.shape[0] == 0:
                continue
            if role == "inner":
                up = module.gate_up_proj.detach()[e].float()
                up = up.t() if weight.transposed else up  # [out, in]
                proj = rows @ up.t()
                bias = getattr(module, "gate_up_proj_bias", None)
                if getattr(module, "has_bias", False) and bias is not None:
                    proj = proj + bias.detach()[e].float()
                rows = module._apply_gate(proj).float()
            sq[e] += rows.pow(2).sum(0).to(sq.device)

    return hook


def _hooks(weights: list[PlannableWeight], sq: dict, current: dict) -> list:
    handles = []
    for w in weights:
        acc = sq[w.name]
        if w.kind == "experts":
            hook = _expert_hook(w, _check_experts(w), acc, current)
        else:

            def hook(_mod, args, acc=acc):
                acc[0] += _real_rows(args[0], current["mask"]).pow(2).sum(0).to(acc.device)

        handles.append(w.module.register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def input_channel_norms(
    model: nn.Module,
    weights: list[PlannableWeight],
    calib_batches: Iterable,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` per input channel of each layer, over all real calibration tokens.

    Args:
        model: the model the weights belong to.
        weights: from `sau.weights.plannable_weights`.
        calib_batches: input_ids [B, T], (input_ids, attention_mask) pairs or dicts.
    Returns:
        name -> float32 tensor [n_layers, in_features] on the weight's device (n_layers
        is the expert count of a fused experts tensor, else 1). An expert that no
        calibration token reached has all-zero norms.
    Raises:
        ValueError: no batches; TypeError: a batch of another form.
    """
    device = next(model.parameters()).device
    # Kept on each weight's device: a .cpu() per hook call would sync the GPU every layer.
    sq = {
        w.name: torch.zeros(w.n_layers, w.in_features, dtype=torch.float32, device=w.param.device)
        for w in weights
    }
    current: dict[str, torch.Tensor | None] = {"mask": None}
    handles = _hooks(weights, sq, current)
    was_training = model.training
    model.eval()
    n_batches = 0
    try:
        for batch in tqdm(calib_batches, desc="calibrate", disable=not progress, leave=False):
            args, kwargs, mask = unpack_batch(batch)
            current["mask"] = mask
            args = tuple(a.to(device) for a in args)
            kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}
            model(*args, **kwargs)
            n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calib_batches is empty: Wanda needs at least one batch")
    return {name: v.sqrt() for name, v in sq.items()}
