"""SAUAdamW's checks of what it is given: plan entries at construction, state on load.

Each runs once (construction, load_state_dict), never per step: the step itself calls
the unchecked kernel core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from sau._dtensor import local as _local
from sau_kernels._common import check_index_tensor, check_index_values

__all__ = [
    "check_loaded_entry",
    "check_saliency_plan",
    "checked_plan_entry",
    "load_value",
    "segments",
]

# Moments are float32 whatever the param dtype (torch's load would cast them to it).
FP32_STATE = ("exp_avg", "exp_avg_sq")


def check_loaded_entry(param: torch.Tensor, entry: dict, where: str) -> None:
    """Validate one parameter's loaded state once, so every step may skip the index check.

    A planned entry needs a 1-D int32/int64 index inside the parameter, strictly
    increasing, and float moments with one entry per index entry; a dense entry needs
    moments shaped like the parameter. Anything else would make the unchecked step read
    and write outside the tensor (on the GPU: silently corrupt other tensors).
    """
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a dict of state, got {type(entry).__name__}")
    param = _local(param)
    missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    moments = [entry["exp_avg"], entry["exp_avg_sq"]]
    if not all(isinstance(m, torch.Tensor) and m.is_floating_point() for m in moments):
        raise TypeError(f"{where}: exp_avg and exp_avg_sq must be float tensors")
    if "index" not in entry:
        if any(m.numel() != param.numel() for m in moments):
            raise ValueError(
                f"{where}: dense moments must have the parameter's {param.numel()} entries"
            )
        return
    index = entry["index"]
    check_index_tensor(index, name=f"{where}: index")
    if not check_index_values(index, param.numel(), name=f"{where}: index"):
        raise ValueError(f"{where}: index must be strictly increasing")
    if any(m.dim() != 1 or m.numel() != index.numel() for m in moments):
        raise ValueError(
            f"{where}: moments must be 1-D with one entry per index entry ({index.numel()})"
        )
    _check_amplification(entry.get("amplification"), index.numel(), where)
    if "entry_scale" in entry:  # amplify="saliency": one uint8 code per index entry
        code, w_max = entry["entry_scale"], entry.get("entry_scale_max")
        if not isinstance(code, torch.Tensor) or code.dtype != torch.uint8:
            raise TypeError(f"{where}: entry_scale must be a uint8 tensor")
        if code.dim() != 1 or code.numel() != index.numel():
            raise ValueError(f"{where}: entry_scale must be 1-D with one code per index entry")
        if not isinstance(w_max, (int, float)) or not math.isfinite(w_max) or w_max < 1:
            raise ValueError(f"{where}: entry_scale_max must be a finite number >= 1")


def _plan_amplification(layer):
    """A LayerPlan's w for the step: a float, or ((stop, w), ...) per expert segment."""
    if not getattr(layer, "experts", ()):
        return float(layer.amplification)
    return tuple((stop, w) for _, stop, w in layer.segments())


def _check_amplification(w, n_index: int, where: str) -> None:
    """w is a finite number >= 0, or per-segment ((stop, w), ...) with stops rising to
    n_index (a fused experts tensor: one segment per expert)."""

    def bad_number(x) -> bool:
        return (
            isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0
        )

    if isinstance(w, (tuple, list)):
        stops = [seg[0] if isinstance(seg, (tuple, list)) and len(seg) == 2 else None for seg in w]
        ok = all(isinstance(s, int) and not isinstance(s, bool) for s in stops)
        ok = (
            ok
            and stops == sorted(stops)
            and (not stops or (stops[0] >= 0 and stops[-1] == n_index))
        )
        if ok and not any(bad_number(seg[1]) for seg in w):
            return
        raise ValueError(
            f"{where}: per-expert amplification must be ((stop, w), ...) with rising stops "
            f"ending at {n_index} and finite w >= 0, got {w!r}"
        )
    if bad_number(w):
        raise ValueError(f"{where}: amplification must be a finite number >= 0, got {w!r}")


def checked_plan_entry(name: str, layer) -> tuple[torch.Tensor, object]:
    """(index on the param's device, amplification) of one plan layer, validated.

    A bad plan (index dtype, shape, range, order; amplification) fails here, at
    construction, not at the first step.
    """
    param, index = _local(layer.param), layer.selection.index  # FSDP2: a local index
    where = f"plan[{name!r}]"
    check_index_tensor(index, name=f"{where}: index")
    w = _plan_amplification(layer)  # a float, or per-expert ((stop, w), ...)
    _check_amplification(w, index.numel(), where)
    index = index.to(device=param.device).contiguous()
    if not check_index_values(index, param.numel(), name=f"{where}: index"):
        raise ValueError(f"{where}: index must be strictly increasing")
    return index, w


def segments(state: dict) -> list[tuple[int, int, float]]:
    """(start, stop, w) slices of a planned state's index, from its amplification."""
    w = state["amplification"]
    if not isinstance(w, (tuple, list)):
        return [(0, state["index"].numel(), float(w))]
    out, start = [], 0
    for stop, w_e in w:
        out.append((start, int(stop), float(w_e)))
        start = int(stop)
    return out


def load_value(param: torch.Tensor, name: str, value):
    """One loaded state value: moved to param's device, float32 moments kept float32."""
    if not isinstance(value, torch.Tensor):
        return value
    if name == "step":  # a CPU float32 counter, as torch keeps it
        return value.to(dtype=torch.float32)
    if name == "index":
        if value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"loaded state 'index' must be int32/int64, got {value.dtype}")
        return value.to(device=param.device)
    if name in FP32_STATE:
        return value.to(device=param.device, dtype=torch.float32)
    return value.to(device=param.device)


def check_saliency_plan(param_groups, plan: dict) -> None:
    """amplify="saliency" needs the plan's per-entry codes: fail at construction.

    plan: SAUAdamW's lookup param -> (index, w, codes, w_max)."""
    for group in param_groups:
        if group["amplify"] != "saliency":
            continue
        for p in group["params"]:
            if p not in plan:
                continue
            index, _, codes, _ = plan[p]
            if codes is None:
                raise ValueError(
                    'amplify="saliency" needs per-entry scales in the plan '
                    "(LayerPlan.entry_scale, made by plan_selection)"
                )
            if codes.dtype != torch.uint8 or codes.numel() != index.numel():
                raise ValueError(
                    "plan entry_scale must be uint8 with one code per index entry "
                    f"({index.numel()}), got {codes.dtype} with {codes.numel()}"
                )
