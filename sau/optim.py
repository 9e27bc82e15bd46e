"""SAUAdamW: the drop-in optimizer that updates only each layer's selected survivors G.

The class is a thin loop over functional cores, as torch.optim.AdamW is:
`sau_kernels.adamw.masked_adamw_unchecked_` for planned parameters (compact float32 state at G
only; the checks ran once, at construction) and `sau._adamw_dense.dense_adamw_` for
everything else (plain AdamW).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch

from sau._adamw_dense import dense_adamw_
from sau._dtensor import local as _local
from sau._optim_checks import check_saliency_plan, checked_plan_entry, segments
from sau._optim_state import load_sau_state_dict, optimizer_state_bytes, tensor_bytes
from sau.names import AMPLIFY_MODES, BACKENDS
from sau_kernels.adamw import check_hyperparameters, masked_adamw_unchecked_

__all__ = ["SAUAdamW", "optimizer_state_bytes"]

_AMPLIFY = AMPLIFY_MODES
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class SAUAdamW(torch.optim.Optimizer):
    """AdamW restricted to the selected survivors of each planned weight (DESIGN.md 1, 3).

    A parameter found in `plan` (by identity: the plan's LayerPlan.param *is* the
    parameter) is updated only at its selection index, with its amplification w applied
    to the gradient (amplify="grad": c_g = w, the paper's grad * G * W) or to the update
    (amplify="update": c_u = w), or per entry (amplify="saliency": c_u,i = clamp(s_i /
    mean_G s, 1/w_max, w_max) from the plan's uint8 codes, no layer scalar; issue 15: under
    Adam a constant-in-time scale of the gradient cancels, a per-entry scale of the update
    does not). Every other entry of it is bitwise unchanged, weight decay
    included, and has no optimizer state. Any other parameter gets plain dense AdamW with
    torch.optim.AdamW's math (float32 moments; see sau/_adamw_dense.py).

    Finding to keep in mind: Adam's m / sqrt(v) is invariant to a gradient scale that is
    constant over time, so amplify="grad" changes the result only through eps (with
    eps = 0 it equals w = 1 to rounding). amplify="update" is the form in which the
    redistribution actually acts under Adam.

    State per planned parameter (created on its first step): step (0-d float32 CPU tensor,
    as torch keeps it), index (1-D int32 flat indices of G; int64 past 2**31 entries),
    exp_avg and exp_avg_sq (float32, one entry per index entry) and amplification (float;
    for a fused experts tensor ((stop, w), ...): expert e owns index[stop_{e-1}:stop_e] and
    steps with its own w, see sau.plan); with amplify="saliency" also entry_scale (uint8,
    one code per index entry: 1 byte, so 13 bytes per selected entry) and entry_scale_max
    (float).
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

    FSDP2 (`fully_shard`, DTensor parameters sharded on dim 0): every parameter is
    stepped on its local shard (`param.to_local()`, `grad.to_local()`), planned ones with
    the plan's local index (sau_kernels.distributed), dense ones with dense AdamW; no
    collective runs inside `step`, and the state (so `state_nbytes()`) is this rank's.

    Gradient release (in_backward=True): each parameter is stepped by a
    post-accumulate-grad hook the moment autograd has finished its gradient, and the
    gradient is freed at once, so at most one parameter's gradient is alive during
    backward instead of all of them. Results are bitwise those of the normal mode (the
    same update on the same gradient). `step()` then updates nothing: it runs the closure
    if given and closes the step (schedulers and step hooks see the usual call order).
    Rules:
      - exactly one backward per step(): a second backward before step() (gradient
        accumulation) raises RuntimeError, as does a .grad found at step() time (a
        gradient the hooks never saw, e.g. one assigned by hand);
      - global gradient clipping (clip_grad_norm_ over all parameters) cannot work: the
        norm needs every gradient, and each is consumed and freed before the next exists;
      - every backward through these parameters steps them, so compute saliency before
        building the optimizer;
      - memory is saved only when each parameter is used once per backward. A loss of
        two forward passes (GradDiff's forget and retain terms) uses every weight twice:
        autograd runs the second pass's whole backward first, and its partial gradients
        of every weight stay buffered inside the engine until the first pass's backward
        reaches that weight (measured: no saving). Compute such a loss from one forward
        over the concatenated rows (UnlearnConfig.joint_forward, --joint-forward);
      - DDP all-reduces after the hook has already stepped on the local gradient: not
        supported. FSDP2 calls the hook on the reduce-scattered shard, which is correct.

    Args:
        params: iterable of parameters or of param-group dicts (own lr, weight_decay, ...).
            float32 | float16 | bfloat16, contiguous.
        plan: a SelectionPlan (or any Mapping of LayerPlan) from sau.plan_selection.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled weight decay).
        amplify: "grad", "update" or "saliency" (where w acts, or per-entry scales;
            stored per param group).
        backend: kernel backend for masked_adamw_ ("triton" | "torch" | None = automatic).
        in_backward: step each parameter inside backward and free its gradient (above).
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
        in_backward: bool = False,
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
            raise ValueError(f"amplify must be one of {_AMPLIFY}, got {amplify!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f'backend must be "triton", "torch" or None, got {backend!r}')
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amplify=amplify
        )
        # Set before super().__init__, which registers the groups through add_param_group.
        self.in_backward = bool(in_backward)
        self._reset_hooks()
        super().__init__(params, defaults)
        self.backend = backend
        self._warned_nonfinite = False
        # Keyed by the parameter tensor itself (tensors hash by identity), so deepcopy
        # maps these keys to the same copies as the param groups.
        self._plan: dict[torch.Tensor, tuple] = {}
        if plan:
            ours = {p for g in self.param_groups for p in g["params"]}
            # Per-entry codes (1 B per selected entry) are kept only where a group uses
            # them, so a plan dropped after construction frees them in the other modes.
            scaled = {
                p for g in self.param_groups if g["amplify"] == "saliency" for p in g["params"]
            }
            w_max = float(getattr(plan, "w_max", 10.0))
            for name, layer in plan.items():
                if layer.param in ours:  # checked once here, so no step re-checks it
                    index, w = checked_plan_entry(name, layer)
                    codes = getattr(layer, "entry_scale", None) if layer.param in scaled else None
                    self._plan[layer.param] = (index, w, codes, w_max)
            if not self._plan:
                raise ValueError(
                    f"plan has {len(plan)} layers but none is a parameter of this optimizer; "
                    "plans match by identity: build the plan from the same model object"
                )
        check_saliency_plan(self.param_groups, self._plan)

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, plus hyper-parameter, dtype and amplify checks.

        Every group is checked here, once: `step` runs the unchecked kernel core.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["amplify"] not in _AMPLIFY:
            raise ValueError(f"amplify must be one of {_AMPLIFY}, got {group['amplify']!r}")
        beta1, beta2 = group["betas"]
        check_hyperparameters(
            step=1,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        for p in group["params"]:
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(f"SAUAdamW needs float32/float16/bfloat16 params, got {p.dtype}")
        self._register_hooks(len(self.param_groups) - 1)

    def __getstate__(self) -> dict:
        # torch's __getstate__ keeps only defaults/state/param_groups; deepcopy and pickle
        # must also carry the plan lookup and the counters. Hooks are not carried (a
        # deepcopied tensor has none): __setstate__ registers fresh ones.
        state = super().__getstate__()
        for key in ("backend", "_warned_nonfinite", "_plan", "in_backward"):
            state[key] = self.__dict__[key]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # torch's load_state_dict also lands here, with the hooks already in place.
        if "_hook_handles" not in self.__dict__:
            self.in_backward = self.__dict__.get("in_backward", False)
            self._reset_hooks()
            for i in range(len(self.param_groups)):
                self._register_hooks(i)

    def _reset_hooks(self) -> None:
        self._hook_handles: list = []
        self._group_of: dict[torch.Tensor, int] = {}  # param -> index of its group
        self._stepped: set[torch.Tensor] = set()  # params stepped since the last step()

    def _register_hooks(self, group_index: int) -> None:
        if not self.in_backward:
            return
        for p in self.param_groups[group_index]["params"]:
            self._group_of[p] = group_index
            self._hook_handles.append(p.register_post_accumulate_grad_hook(self._hook))

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        """in_backward: step `p` on its finished gradient, then free the gradient."""
        if p.grad is None:  # another hook (e.g. compute_saliency's) consumed it first
            return
        if p in self._stepped:
            raise RuntimeError(
                "SAUAdamW(in_backward=True): a parameter got a second gradient before "
                "optimizer.step(); gradient accumulation cannot work when each parameter "
                "steps inside backward. Call step() after every backward, or use "
                "in_backward=False"
            )
        self._step_param(p, self.param_groups[self._group_of[p]])
        self._stepped.add(p)
        p.grad = None  # the point of the mode: this gradient dies now

    def _init_state(self, p: torch.Tensor, state: dict, amplify: str = "grad") -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["nonfinite"] = torch.zeros((), dtype=torch.int64, device=p.device)
        planned = self._plan.get(p)
        p = _local(p)  # FSDP2: state covers this rank's shard only
        if planned is None:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            return
        index, w, codes, w_max = planned
        state["index"] = index
        state["exp_avg"] = torch.zeros(index.numel(), dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(index.numel(), dtype=torch.float32, device=p.device)
        state["amplification"] = w
        if amplify == "saliency":  # only this mode pays the byte per entry
            if codes is None:  # the group's amplify was changed after construction
                raise ValueError(
                    'amplify="saliency" set on a group after SAUAdamW was built: its plan '
                    "entries kept no per-entry scales; build the optimizer with it"
                )
            state["entry_scale"] = codes.to(device=p.device).contiguous()
            state["entry_scale_max"] = w_max

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns closure() (run with grad enabled) or None.

        With in_backward=True the parameters were already stepped during backward: this
        only runs the closure (whose backward steps them) and closes the step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.in_backward:
            for group in self.param_groups:
                if any(p.grad is not None for p in group["params"]):
                    raise RuntimeError(
                        "SAUAdamW(in_backward=True): a parameter has a .grad at step() that "
                        "its backward hook never consumed (assigned by hand, or produced "
                        "with the hooks removed); this mode updates only inside backward"
                    )
            self._stepped.clear()
            return loss
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:  # every check of the group before any update
                self._check_and_init(p, group)
            for p in params:
                self._step_param(p, group)
        return loss

    def _check_and_init(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("SAUAdamW does not support sparse gradients")
        if not self.state[p]:
            self._init_state(p, self.state[p], group["amplify"])

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        """Step one parameter on its current .grad (both modes go through here)."""
        self._check_and_init(p, group)
        state = self.state[p]
        beta1, beta2 = group["betas"]
        hyper = dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        # Counted only once the update went through: a refused step (e.g. a
        # non-contiguous param) must leave the state as it was.
        step = int(state["step"].item()) + 1
        param, grad = _local(p), _local(p.grad)
        if "index" not in state:
            dense_adamw_(
                param,
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                step=step,
                **hyper,
                nonfinite_count=state["nonfinite"],
            )
            state["step"] += 1
            return
        if not param.is_contiguous():  # the one check a step needs: p.data can change
            raise ValueError(
                "SAUAdamW: a planned parameter must be contiguous (it is updated in place "
                "by flat index)"
            )
        on_grad = group["amplify"] == "grad"
        saliency_mode = group["amplify"] == "saliency"
        if saliency_mode and "entry_scale" not in state:
            raise RuntimeError(
                'amplify="saliency" but this parameter\'s state has no entry_scale '
                "(a checkpoint made with another amplify mode)"
            )
        # One call per segment: a matrix has one, a fused experts tensor one per expert
        # with that expert's w (sau.plan); slices are views, so the moments update in place.
        for start, stop, w in segments(state):
            if start == stop:
                continue
            entry = {}
            if saliency_mode:  # the per-entry scales replace the layer scalar
                w = 1.0
                entry = dict(
                    entry_scale=state["entry_scale"][start:stop],
                    entry_scale_max=state["entry_scale_max"],
                )
            masked_adamw_unchecked_(
                param,
                grad,
                state["exp_avg"][start:stop],
                state["exp_avg_sq"][start:stop],
                state["index"][start:stop],
                step=step,
                grad_scale=w if on_grad else 1.0,
                update_scale=1.0 if on_grad else w,
                backend=self.backend,
                nonfinite_count=state["nonfinite"],
                **entry,
                **hyper,
            )
        state["step"] += 1

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
        `check_loaded_entry`), and a state_dict that is not a SAUAdamW one (e.g. a plain
        torch.optim.AdamW's) is refused: on error the optimizer keeps its state.

        Raises:
            ValueError / TypeError / IndexError: naming the parameter and what is wrong.
        """
        load_sau_state_dict(self, state_dict)

    def state_nbytes(self) -> int:
        """Bytes held by all state tensors (moments, indices, step counters).

        Under FSDP2 this is this rank's bytes: the state covers the local shards only."""
        return tensor_bytes(self.state)
