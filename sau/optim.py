"""SAUAdamW: the drop-in optimizer that updates only each layer's selected survivors G.

The class is a thin loop over functional cores, as torch.optim.AdamW is:
`sau_kernels.masked_adamw_` for planned parameters (compact float32 state at G only) and
`sau._adamw_dense.dense_adamw_` for everything else (plain AdamW).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch

from sau._adamw_dense import dense_adamw_
from sau_kernels import masked_adamw_
from sau_kernels._common import check_index_tensor, check_index_values

__all__ = ["SAUAdamW"]

_AMPLIFY = ("grad", "update")
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Moments are float32 whatever the param dtype (torch's load would cast them to it).
_FP32_STATE = ("exp_avg", "exp_avg_sq")


def _check_loaded_entry(param: torch.Tensor, entry: dict, where: str) -> None:
    """Validate one parameter's loaded state once, so every step may skip the index check.

    A planned entry needs a 1-D int32/int64 index inside the parameter, strictly
    increasing, and float moments with one entry per index entry; a dense entry needs
    moments shaped like the parameter. Anything else would make the unchecked step read
    and write outside the tensor (on the GPU: silently corrupt other tensors).
    """
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a dict of state, got {type(entry).__name__}")
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
    w = entry.get("amplification")
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"{where}: amplification must be a finite number >= 0, got {w!r}")


def _load_value(param: torch.Tensor, name: str, value):
    """One loaded state value: moved to param's device, float32 moments kept float32."""
    if not isinstance(value, torch.Tensor):
        return value
    if name == "step":  # a CPU float32 counter, as torch keeps it
        return value.to(dtype=torch.float32)
    if name == "index":
        if value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"loaded state 'index' must be int32/int64, got {value.dtype}")
        return value.to(device=param.device)
    if name in _FP32_STATE:
        return value.to(device=param.device, dtype=torch.float32)
    return value.to(device=param.device)


class SAUAdamW(torch.optim.Optimizer):
    """AdamW restricted to the selected survivors of each planned weight (DESIGN.md 1, 3).

    A parameter found in `plan` (by identity: the plan's LayerPlan.param *is* the
    parameter) is updated only at its selection index, with its amplification w applied
    to the gradient (amplify="grad": c_g = w, the paper's grad * G * W) or to the update
    (amplify="update": c_u = w). Every other entry of it is bitwise unchanged, weight decay
    included, and has no optimizer state. Any other parameter gets plain dense AdamW with
    torch.optim.AdamW's math (float32 moments; see sau/_adamw_dense.py).

    Finding to keep in mind: Adam's m / sqrt(v) is invariant to a gradient scale that is
    constant over time, so amplify="grad" changes the result only through eps (with
    eps = 0 it equals w = 1 to rounding). amplify="update" is the form in which the
    redistribution actually acts under Adam.

    State per planned parameter (created on its first step): step (0-d float32 CPU tensor,
    as torch keeps it), index (1-D int32 flat indices of G; int64 past 2**31 entries),
    exp_avg and exp_avg_sq (float32, one entry per index entry) and amplification (float).
    A checkpoint therefore resumes without the plan or the saliency. Dense parameters hold
    step, exp_avg and exp_avg_sq (float32, shaped like the parameter).

    Non-finite gradients: an entry whose gradient (times the amplification, in "grad"
    mode) is NaN or inf is skipped inside the update itself: its parameter and moments keep
    their values, the other entries step normally. A NaN never enters the moments or the
    parameters. Skipped entries are counted per parameter on its device (state
    "nonfinite", int64), with no device sync in `step`; `nonfinite_count()` returns the
    total and warns (once) when it is non-zero. A separate check before the update would
    cost a second read of the gradient and a sync per group: on an H200 it doubled the
    step time (benchmarks/results/gpu-h200-run1), which is why the skip is per entry.

    Args:
        params: iterable of parameters or of param-group dicts (own lr, weight_decay, ...).
            float32 | float16 | bfloat16, contiguous.
        plan: a SelectionPlan (or any Mapping of LayerPlan) from sau.plan_selection.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        amplify: "grad" or "update" (where w acts; stored per param group).
        backend: kernel backend for masked_adamw_ ("triton" | "torch" | None = automatic).
    """

    def __init__(
        self,
        params: Iterable,
        *,
        plan: Mapping | None = None,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amplify: str = "grad",
        backend: str | None = None,
    ) -> None:
        if not 0.0 <= lr or not math.isfinite(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps or not math.isfinite(eps):
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= weight_decay or not math.isfinite(weight_decay):
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if amplify not in _AMPLIFY:
            raise ValueError(f'amplify must be "grad" or "update", got {amplify!r}')
        if backend not in (None, "triton", "torch"):
            raise ValueError(f'backend must be "triton", "torch" or None, got {backend!r}')
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amplify=amplify
        )
        super().__init__(params, defaults)
        self.backend = backend
        self._warned_nonfinite = False
        # Keyed by the parameter tensor itself (tensors hash by identity), so deepcopy
        # maps these keys to the same copies as the param groups.
        self._plan: dict[torch.Tensor, tuple[torch.Tensor, float]] = {}
        if plan:
            for layer in plan.values():
                self._plan[layer.param] = (layer.selection.index, float(layer.amplification))
            ours = [p for g in self.param_groups for p in g["params"]]
            if not any(p in self._plan for p in ours):
                raise ValueError(
                    f"plan has {len(plan)} layers but none is a parameter of this optimizer; "
                    "plans match by identity: build the plan from the same model object"
                )

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, plus dtype and amplify checks."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["amplify"] not in _AMPLIFY:
            raise ValueError(f'amplify must be "grad" or "update", got {group["amplify"]!r}')
        for p in group["params"]:
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(f"SAUAdamW needs float32/float16/bfloat16 params, got {p.dtype}")

    def __getstate__(self) -> dict:
        # torch's __getstate__ keeps only defaults/state/param_groups; deepcopy and pickle
        # must also carry the plan lookup and the counters.
        state = super().__getstate__()
        for key in ("backend", "_warned_nonfinite", "_plan"):
            state[key] = self.__dict__[key]
        return state

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["nonfinite"] = torch.zeros((), dtype=torch.int64, device=p.device)
        planned = self._plan.get(p)
        if planned is None:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            return
        index, w = planned
        if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
            raise TypeError(
                f"plan index must be 1-D int32/int64, got {index.dtype} with {index.dim()} dims"
            )
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"plan amplification must be finite and >= 0, got {w}")
        index = index.to(device=p.device).contiguous()
        # Validated once here, so every step can skip masked_adamw_'s range check (a sync).
        if not check_index_values(index, p.numel(), name="plan index"):
            raise ValueError("plan index must be strictly increasing")
        state["index"] = index
        state["exp_avg"] = torch.zeros(index.numel(), dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(index.numel(), dtype=torch.float32, device=p.device)
        state["amplification"] = w

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns closure() (run with grad enabled) or None."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("SAUAdamW does not support sparse gradients")
                if not self.state[p]:
                    self._init_state(p, self.state[p])
            beta1, beta2 = group["betas"]
            hyper = dict(
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
            for p in params:
                state = self.state[p]
                # Counted only once the update went through: a refused step (e.g. a
                # non-contiguous param) must leave the state as it was.
                step = int(state["step"].item()) + 1
                if "index" not in state:
                    dense_adamw_(
                        p,
                        p.grad,
                        state["exp_avg"],
                        state["exp_avg_sq"],
                        step=step,
                        **hyper,
                        nonfinite_count=state["nonfinite"],
                    )
                    state["step"] += 1
                    continue
                w = state["amplification"]
                on_grad = group["amplify"] == "grad"
                masked_adamw_(
                    p,
                    p.grad,
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state["index"],
                    step=step,
                    grad_scale=w if on_grad else 1.0,
                    update_scale=1.0 if on_grad else w,
                    backend=self.backend,
                    check_index=False,
                    nonfinite_count=state["nonfinite"],
                    **hyper,
                )
                state["step"] += 1
        return loss

    def nonfinite_count(self) -> int:
        """Gradient entries skipped so far for being NaN or inf (one device sync).

        Warns once (RuntimeWarning) when the count is non-zero.
        """
        counts = [st["nonfinite"] for st in self.state.values() if "nonfinite" in st]
        total = int(sum(int(c) for c in counts)) if counts else 0
        if total and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"SAUAdamW: {total} gradient entries were NaN or inf and were skipped "
                "(their params and moments kept their values)",
                RuntimeWarning,
                stacklevel=2,
            )
        return total

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, except that state tensors keep their dtypes.

        torch casts every state tensor of a floating parameter to the parameter's dtype:
        float32 moments would come back as bf16 for bf16 params and the int32 index as
        float. Here torch restores the param groups (and validates them) from a copy
        without per-parameter state, and the state is then only moved to each parameter's
        device: moments stay float32, the index stays int32. As in torch, tensors already
        on the right device are not copied.

        Every entry is validated first (index dtype, range, order, moment lengths; see
        `_check_loaded_entry`), and a state_dict that is not a SAUAdamW one (e.g. a plain
        torch.optim.AdamW's) is refused: on error the optimizer keeps its state.

        Raises:
            ValueError / TypeError / IndexError: naming the parameter and what is wrong.
        """
        if not isinstance(state_dict, Mapping) or not all(
            isinstance(g, Mapping) and "amplify" in g for g in state_dict.get("param_groups", [])
        ):
            raise ValueError(
                "not a SAUAdamW state_dict (its param groups have no 'amplify'; a plain "
                "torch.optim.AdamW state_dict has no selection index and cannot be loaded)"
            )
        state_dict = dict(state_dict)
        saved_state = state_dict["state"]
        state_dict["state"] = {}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        ours = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(saved_ids, ours))
        for key, entry in saved_state.items():
            if key in id_map:  # before anything changes: a refused load keeps our state
                _check_loaded_entry(id_map[key], entry, f"loaded state of parameter {key}")
        super().load_state_dict(state_dict)
        for key, entry in saved_state.items():
            param = id_map.get(key)
            if param is None:  # torch keeps state of unknown ids as is; so do we
                self.state[key] = entry
                continue
            self.state[param] = {name: _load_value(param, name, v) for name, v in entry.items()}
            # Older checkpoints had no skip counter; every step expects one.
            self.state[param].setdefault(
                "nonfinite", torch.zeros((), dtype=torch.int64, device=param.device)
            )

    def state_nbytes(self) -> int:
        """Bytes held by all state tensors (moments, indices, step counters)."""
        return sum(
            v.numel() * v.element_size()
            for entry in self.state.values()
            for v in entry.values()
            if isinstance(v, torch.Tensor)
        )
