"""SAUAdamW: the drop-in AdamW that updates only each planned weight's selected survivors G.

The class is a loop over functional cores, as torch.optim.AdamW is:
`sau_kernels.adamw.masked_adamw_grouped_unchecked_` for all planned parameters at once
(state at G only; one Triton launch per dtype combination, every layer and expert in it;
each parameter's segments gathered once and cached, so a step's host work grows with the
parameters, not the experts)
and `dense_adamw_foreach_` / `dense_adamw_` (below) for every other parameter. What the
optimizer is given is checked once, where it enters: hyper-parameters when a param group
is added, the plan at construction, a state_dict when it is loaded. `step` trusts what
was checked.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

from sau.distributed import local
from sau.names import AMPLIFY_MODES, BACKENDS, ROUNDINGS, STATE_BITS
from sau.plan import Segment
from sau.settings import INF, NON_NEGATIVE, check_number, is_number
from sau_kernels._common import check_index_tensor, check_index_values
from sau_kernels.adamw import (
    SegmentGroup,
    masked_adamw_grouped_unchecked_,
    masked_adamw_unchecked_,
    segment_group,
)
from sau_kernels.distributed import local_shard
from sau_kernels.moments8 import ZERO_CODE, num_blocks

__all__ = ["SAUAdamW", "dense_adamw_", "dense_adamw_foreach_", "optimizer_state_bytes"]

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BETA = (0, 1, False, True)  # [0, 1)
# Moments are float32 whatever the param dtype (torch's load would cast them to it).
_FP32_STATE = ("exp_avg", "exp_avg_sq")
_LEGACY_GROUP = dict(rounding="nearest", state_bits=32, seed=0)
_REWRITTEN_GROUPS = (
    "SAUAdamW: its param groups no longer hold the tensors it was built with (DeepSpeed "
    "ZeRO-1/2/3 puts flat partitions in their place, which a per-tensor plan cannot index); "
    "shard with FSDP2 (fully_shard, then plan) or use DDP or DeepSpeed ZeRO-0 instead"
)


class _PlanEntry(NamedTuple):
    """What SAUAdamW keeps of one plan layer (checked at construction)."""

    index: torch.Tensor  # flat indices of G on the param's device (FSDP2: this rank's)
    amplification: float | tuple  # as the state stores it (SAUAdamW's docstring)
    entry_scale: torch.Tensor | None  # uint8 codes, kept for amplify="saliency" groups only
    w_max: float


class SAUAdamW(torch.optim.Optimizer):
    r"""AdamW restricted to the selected survivors G of each planned weight.

    A parameter found in ``plan`` (by identity: its LayerPlan.param *is* the parameter)
    is updated only at its index G. With t its step and w its layer's amplification (a
    fused experts tensor: each expert's own w on its segment of G), every i in G steps
    as torch.optim.AdamW with decoupled weight decay, in float32::

        g_i = c_g * grad_i
        m_i = beta1 * m_i + (1 - beta1) * g_i
        v_i = beta2 * v_i + (1 - beta2) * g_i^2
        p_i = p_i * (1 - lr * weight_decay)
              - lr * c_u * c_i / (1 - beta1^t) * m_i / (sqrt(v_i) / sqrt(1 - beta2^t) + eps)

    amplify="grad": c_g = w, c_u = c_i = 1; amplify="update": c_u = w, c_g = c_i = 1;
    amplify="saliency": c_i = clamp(s_i / mean_G s, 1/w_max, w_max) from the plan's
    uint8 codes, c_g = c_u = 1. A float32 parameter stores p_i as computed; a float16 /
    bfloat16 one by `rounding` (below). Its entries outside G are bitwise unchanged (no
    weight decay) and have no state. Every
    other parameter steps as torch.optim.AdamW (`dense_adamw_`, float32 moments). What
    each mode does in practice, and the measurements: docs/optimizer.md.

    An entry whose g_i is NaN or inf is skipped (its parameter and moments keep their
    values; the other entries step) and counted on the device, with no sync in `step`
    (`nonfinite_count`).

    State, created at a parameter's first step. Planned: step (0-d float32, CPU),
    index (1-D int32 flat indices of G; int64 from 2**31 entries), exp_avg and
    exp_avg_sq (float32 [|G|]), amplification (w, a float; for a fused experts tensor
    ((stop, w), ...): expert e owns index[stop_{e-1}:stop_e], the plan's Segments as
    plain tuples), nonfinite (0-d int64, on the param's device); with amplify="saliency"
    also entry_scale (uint8 [|G|]) and entry_scale_max (w_max, a float); with kahan on a
    16-bit parameter compensation (int8 [|G|]); with state_bits=8 exp_avg and exp_avg_sq
    are uint8 codes [|G|] with exp_avg_scale and exp_avg_sq_scale (float32, one per 256
    entries of each segment). So a checkpoint resumes without the plan. A state keeps the
    moment width it was created with (changing a group's state_bits later does nothing to
    it); a group's rounding is read every step. Dense: step, nonfinite, exp_avg and
    exp_avg_sq (float32, shaped like the parameter).

    FSDP2 (`fully_shard`, DTensor parameters sharded on dim 0): every parameter steps on
    its local shard, planned ones with the plan's local index; no collective runs in
    `step`; the state (so `state_nbytes`) is this rank's.

    in_backward=True: each parameter steps inside backward, in a post-accumulate-grad
    hook, and its gradient is freed at once (results bitwise those of the normal mode).
    `step` then only runs the closure and closes the step. It needs exactly one backward
    per `step` (a second gradient before it, or a .grad found at `step`, raises
    RuntimeError); global gradient clipping and DDP cannot work; every backward through
    the parameters steps them.

    Args:
        params: iterable of parameters or of param-group dicts (each may set lr, betas,
            eps, weight_decay, amplify); float32 | float16 | bfloat16.
        plan: a SelectionPlan (or any Mapping of LayerPlan) from sau.plan_selection; its
            layers that are not parameters here are ignored. None: all params are dense.
        lr: learning rate, finite, >= 0.
        betas: (beta1, beta2), each in [0, 1).
        eps: finite, >= 0.
        weight_decay: decoupled weight decay, finite, >= 0.
        amplify: "grad" | "update" | "saliency" (above), per param group.
        backend: kernel backend of the masked step ("triton" | "torch" | None: Triton for
            CUDA tensors).
        in_backward: step each parameter inside backward and free its gradient (above).
        rounding: how p_i is stored into a float16/bfloat16 parameter, per group:
            "kahan" (default; nearest, plus an int8 code per entry carrying the rest, so
            steps below half a spacing accumulate), "stochastic" (unbiased random
            rounding from a hash of (seed, step, global position); no state) or "nearest"
            (each step rounded to nearest: at lr ~1e-5 most steps are lost). Ignored for
            float32 parameters. docs/optimizer.md has the measurements.
        state_bits: 32 (float32 moments) or 8 (block-scaled 8-bit codes, stochastically
            rounded: 2 bytes a selected entry instead of 8), per group.
        seed: int >= 0, the random stream of stochastic rounding and 8-bit codes.
        compact_grads: keep only grad[G] of each planned parameter from a backward hook
            and free its dense gradient at once; step() applies what was kept (gradient
            accumulation and clip_grad_norm_ work; excludes in_backward). remove_hooks()
            detaches either hooking mode; garbage collection does too.

    Raises:
        ValueError: a hyper-parameter out of range, an unknown amplify or backend, a plan
            of which no layer is a parameter here, a plan index that is not 1-D, not
            strictly increasing or holds an entry twice, a bad amplification, or
            amplify="saliency" without the plan's per-entry codes (one per index entry).
        TypeError: a parameter of another dtype; a plan index that is not an int32 or
            int64 tensor; per-entry codes that are not uint8.
        IndexError: a plan index outside its parameter.
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
        rounding: str = "kahan",
        state_bits: int = 32,
        seed: int = 0,
        compact_grads: bool = False,
    ) -> None:
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f'backend must be "triton", "torch" or None, got {backend!r}')
        if in_backward and compact_grads:
            raise ValueError(
                "in_backward=True and compact_grads=True exclude each other: the first steps "
                "inside backward, the second keeps grad[G] for step()"
            )
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amplify=amplify,
            rounding=rounding, state_bits=state_bits, seed=seed,
        )  # fmt: skip
        # Set before super().__init__, which adds the groups through add_param_group.
        self.in_backward = bool(in_backward)
        self.compact_grads = bool(compact_grads)
        self._reset_hooks()
        self._given: set[torch.Tensor] = set()  # every tensor add_param_group checked
        # param -> (token, its SegmentGroup of state views): `_cached_group`.
        self._views: dict[torch.Tensor, tuple] = {}
        super().__init__(params, defaults)
        self.backend = backend
        self._warned_nonfinite = False
        # Keyed by the parameter tensor itself (tensors hash by identity), so deepcopy
        # maps these keys to the same copies as the param groups.
        self._plan: dict[torch.Tensor, _PlanEntry] = (
            self._checked_plan(plan) if plan is not None else {}
        )

    def _checked_plan(self, plan: Mapping) -> dict[torch.Tensor, _PlanEntry]:
        """The plan's layers that are parameters here, each checked once (no step does)."""
        ours = {p for g in self.param_groups for p in g["params"]}
        # Per-entry codes (1 B per selected entry) are kept only where a group uses them,
        # so a plan dropped after construction frees them in the other modes.
        scaled = {p for g in self.param_groups if g["amplify"] == "saliency" for p in g["params"]}
        w_max = float(getattr(plan, "w_max", 10.0))
        if not plan:  # an empty plan is a mistake upstream, never "update everything"
            raise ValueError(
                "plan is empty: it selects no layer, so no weight would be updated "
                "sparsely; pass plan=None for a dense AdamW on every parameter"
            )
        checked = {
            layer.param: _checked_plan_entry(name, layer, layer.param in scaled, w_max)
            for name, layer in plan.items()
            if layer.param in ours
        }
        if not checked:
            raise ValueError(
                f"plan has {len(plan)} layers but none is a parameter of this optimizer; "
                "plans match by identity: build the plan from the same model object"
            )
        return checked

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group; then the group's hyper-parameters, amplify mode and
        parameter dtypes are checked, once (`step` runs the unchecked kernel core)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["amplify"] not in AMPLIFY_MODES:
            raise ValueError(f"amplify must be one of {AMPLIFY_MODES}, got {group['amplify']!r}")
        # Labels in torch.optim's wording ("Invalid learning rate: -1.0").
        beta1, beta2 = group["betas"]
        check_number("lr", group["lr"], NON_NEGATIVE, label="learning rate")
        check_number("beta1", beta1, _BETA, label="beta parameter at index 0")
        check_number("beta2", beta2, _BETA, label="beta parameter at index 1")
        check_number("eps", group["eps"], NON_NEGATIVE, label="epsilon value")
        wd = group["weight_decay"]
        check_number("weight_decay", wd, NON_NEGATIVE, label="weight_decay value")
        if group["rounding"] not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {group['rounding']!r}")
        if group["state_bits"] not in STATE_BITS or isinstance(group["state_bits"], bool):
            raise ValueError(f"state_bits must be one of {STATE_BITS}, got {group['state_bits']!r}")
        seed = group["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        for p in group["params"]:
            if p.dtype not in _PARAM_DTYPES:
                raise TypeError(f"SAUAdamW needs float32/float16/bfloat16 params, got {p.dtype}")
        self._given.update(group["params"])
        self._register_hooks(len(self.param_groups) - 1)

    def __getstate__(self) -> dict:
        # torch's __getstate__ keeps only defaults/state/param_groups; deepcopy and pickle
        # must also carry the plan lookup and the counters. Hooks are not carried (a
        # deepcopied tensor has none): __setstate__ registers fresh ones.
        state = super().__getstate__()
        for key in ("backend", "_warned_nonfinite", "_plan", "in_backward", "compact_grads"):
            state[key] = self.__dict__[key]
        state["_given"] = self._given  # a deepcopy maps it to the copies, as it does _plan
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # torch's load_state_dict also lands here, with the hooks already in place. A
        # loaded (or copied) state has new tensors: no cached view may outlive it.
        self._views = {}
        if "_hook_handles" not in self.__dict__:
            self._reset_hooks()
            for i in range(len(self.param_groups)):
                self._register_hooks(i)

    def _reset_hooks(self) -> None:
        self._hook_handles: list = []
        self._group_of: dict[torch.Tensor, int] = {}  # param -> index of its group
        self._stepped: set[torch.Tensor] = set()  # params stepped since the last step()
        self._compact: dict[torch.Tensor, torch.Tensor] = {}  # param -> its grad[G] so far
        # The hooks reach the optimizer through a weak reference, and this finalizer
        # removes them when it is collected: hooks never keep an optimizer alive.
        self._finalizer = weakref.finalize(self, _remove_handles, self._hook_handles)

    def _register_hooks(self, group_index: int) -> None:
        if not (self.in_backward or self.compact_grads):
            return
        me = weakref.ref(self)
        for p in self.param_groups[group_index]["params"]:
            owner = _hooked_by(p)
            if owner is not None and owner is not self:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is already hooked by another "
                    "SAUAdamW (in_backward or compact_grads); call remove_hooks() on it, or "
                    "delete it, before building this one"
                )
            self._group_of[p] = group_index
            self._hook_handles.append(p.register_post_accumulate_grad_hook(_weak_hook(me)))
            _HOOKED[id(p)] = (weakref.ref(p), me)

    def remove_hooks(self) -> None:
        """Detach this optimizer from backward: remove its post-accumulate-grad hooks.

        Afterwards it works in the normal mode (in_backward and compact_grads off): it
        steps on .grad in step(); gradients already kept by compact_grads are still
        applied by the next step(). Another hooking SAUAdamW can then be built on the
        same parameters. Garbage collection of the optimizer does the same.
        """
        _remove_handles(self._hook_handles)
        for p in self._group_of:
            if _hooked_by(p) is self:
                del _HOOKED[id(p)]
        self._group_of.clear()
        self.in_backward = self.compact_grads = False

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        """in_backward: step `p` on its finished gradient, then free the gradient.
        compact_grads: add its grad[G] into the compact buffer, then free the gradient."""
        if p.grad is None:  # another hook (e.g. compute_saliency's) consumed it first
            return
        if self.compact_grads:
            self._keep_compact(p)
            return
        if not self._stepped:  # the first hook of this backward
            self._check_groups()
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

    def _keep_compact(self, p: torch.Tensor) -> None:
        """compact_grads: grad[G] of a planned parameter added into its buffer (in the
        gradient's dtype, as autograd accumulates .grad); a dense parameter keeps .grad."""
        index = self._index_of(p)
        if index is None:
            return
        grad = local(p.grad).reshape(-1).index_select(0, index)
        kept = self._compact.get(p)
        self._compact[p] = grad if kept is None else kept.add_(grad)
        p.grad = None  # the point of the mode: the dense gradient dies now

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad, and the gradients kept by compact_grads are dropped too."""
        super().zero_grad(set_to_none=set_to_none)
        self._compact.clear()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Scale the gradients this optimizer will apply so that their norm is <= max_norm.

        The norm is over what step() applies: grad[G] of each planned parameter (its
        compact buffer with compact_grads) and the whole gradient of each dense one. It
        is smaller than torch.nn.utils.clip_grad_norm_ over the same parameters, which
        also counts gradient entries that are never applied. Under FSDP2 the norm is over
        all ranks (one all-reduce). norm_type: 2.0 or inf. Returns the total norm (0-d
        float32 tensor, before clipping), as torch's function does.

        Raises:
            RuntimeError: in_backward=True (each parameter already stepped in backward).
            ValueError: max_norm not a finite number >= 0, or another norm_type.
        """
        if self.in_backward:
            raise RuntimeError(
                "SAUAdamW(in_backward=True) cannot clip: each parameter steps inside "
                "backward, before a global norm exists; use compact_grads=True instead"
            )
        check_number("max_norm", max_norm, NON_NEGATIVE)
        if norm_type not in (2.0, INF):
            raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")
        pairs = list(self._applied_grads())
        total = _global_norm([applied for applied, _ in pairs], norm_type, self._any_dtensor())
        coef = max_norm / (float(total) + 1e-6)
        if coef < 1.0:
            for _, held in pairs:
                held.mul_(coef)
        return total

    def _applied_grads(self):
        """(what step() applies, the tensor holding it) per parameter with a gradient, in
        the local (FSDP2: this rank's) view: a planned .grad gives its entries at G and
        is scaled whole (the entries outside G are never read)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p in self._compact:
                    yield self._compact[p], self._compact[p]
                elif p.grad is not None:
                    grad, index = local(p.grad), self._index_of(p)
                    applied = grad if index is None else grad.reshape(-1).index_select(0, index)
                    yield applied, grad

    def _index_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The int64 flat index a planned parameter steps at (its state's, else its
        plan's); None for a dense parameter."""
        state = self.state.get(p, {})
        if "index" in state:
            return state["index"].long()
        if not state and p in self._plan:
            return self._plan[p].index.long()
        return None

    def _any_dtensor(self) -> bool:
        return any(local(p) is not p for g in self.param_groups for p in g["params"])

    def _init_state(self, p: torch.Tensor, state: dict, group: dict) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["nonfinite"] = torch.zeros((), dtype=torch.int64, device=p.device)
        planned = self._plan.get(p)
        p = local(p)  # FSDP2: state covers this rank's shard only
        if planned is None:
            _init_moments(state, p.numel(), (num_blocks(p.numel()),), group, p)
            if group["state_bits"] == 32:  # torch's layout: moments shaped like the param
                state["exp_avg"] = state["exp_avg"].view_as(p)
                state["exp_avg_sq"] = state["exp_avg_sq"].view_as(p)
            return
        state["index"] = planned.index
        state["amplification"] = planned.amplification
        blocks = tuple(num_blocks(seg.stop - seg.start) for seg in _segments(state))
        _init_moments(state, planned.index.numel(), blocks, group, p)
        if group["amplify"] == "saliency":  # only this mode pays the byte per entry
            if planned.entry_scale is None:  # the group's amplify was changed after construction
                raise ValueError(
                    'amplify="saliency" set on a group after SAUAdamW was built: its plan '
                    "entries kept no per-entry scales; build the optimizer with it"
                )
            state["entry_scale"] = planned.entry_scale.to(device=p.device).contiguous()
            state["entry_scale_max"] = planned.w_max

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns closure() (run with grad enabled) or None.

        With in_backward=True the parameters were already stepped during backward: this
        only runs the closure (whose backward steps them) and closes the step.

        Raises:
            RuntimeError: a sparse gradient; in_backward=True and a .grad its hook never
                consumed; amplify="saliency" on a state without per-entry codes; param
                groups rewritten (e.g. by DeepSpeed ZeRO-1/2/3) to hold tensors this
                optimizer did not check or to lack its planned ones (before any update).
            ValueError: a planned parameter that is no longer contiguous (nothing steps
                and its step count stays).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_groups()
        if self.in_backward:
            if any(p.grad is not None for g in self.param_groups for p in g["params"]):
                raise RuntimeError(
                    "SAUAdamW(in_backward=True): a parameter has a .grad at step() that "
                    "its backward hook never consumed (assigned by hand, or produced "
                    "with the hooks removed); this mode updates only inside backward"
                )
            self._stepped.clear()
            return loss
        stepped = [
            (p, group)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None or p in self._compact
        ]
        for p, group in stepped:  # every check before any update
            self._check_and_init(p, group)
        planned = [(p, group) for p, group in stepped if "index" in self.state[p]]
        groups = [self._grouped_call(p, group) for p, group in planned]
        # Every segment of every planned parameter in one call: one launch per dtype
        # combination on Triton (sau_kernels.adamw, masked_adamw_multi_).
        masked_adamw_grouped_unchecked_(groups, backend=self.backend)
        self._dense_steps([(p, group) for p, group in stepped if "index" not in self.state[p]])
        for p, _ in stepped:
            self.state[p]["step"] += 1
        self._compact.clear()
        return loss

    def _check_groups(self) -> None:
        """Refuse param groups rewritten to hold other tensors than the ones this optimizer
        checked, or without its planned ones (DeepSpeed ZeRO-1/2/3 replaces each group's
        list with one flat partition after construction). O(#groups) while every group
        keeps the list object and length it had at the last check."""
        lists = [g["params"] for g in self.param_groups]
        seen = self.__dict__.get("_checked_lists", ())
        if len(seen) == len(lists) and all(
            a is b and len(a) == n for a, (b, n) in zip(lists, seen)
        ):
            return
        held = {p for params in lists for p in params}
        if not held <= self._given or any(p not in held for p in self._plan):
            raise RuntimeError(_REWRITTEN_GROUPS)
        self._checked_lists = [(params, len(params)) for params in lists]

    def _check_and_init(self, p: torch.Tensor, group: dict) -> None:
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError("SAUAdamW does not support sparse gradients")
        if p.grad is not None and p in self._compact:
            raise RuntimeError(
                "SAUAdamW(compact_grads=True): a parameter has both a kept grad[G] and a "
                ".grad (assigned by hand, or produced with the hooks removed)"
            )
        if not self.state[p]:
            self._init_state(p, self.state[p], group)

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        """Step one parameter on its current .grad (in_backward's hook)."""
        self._check_and_init(p, group)
        if "index" in self.state[p]:
            masked_adamw_grouped_unchecked_([self._grouped_call(p, group)], backend=self.backend)
        else:
            self._dense_step(p, group)
        # Counted only once the update went through: a refused step (a non-contiguous
        # param) leaves the state as it was.
        self.state[p]["step"] += 1

    def _hyper(self, p: torch.Tensor, group: dict) -> dict:
        """The step's scalars and storage of one parameter, by masked_adamw_'s names."""
        state = self.state[p]
        beta1, beta2 = group["betas"]
        param = local(p)
        return dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            step=int(state["step"].item()) + 1,
            nonfinite_count=state["nonfinite"],
            rounding=_rounding(state, group, param),
            seed=group["seed"],
            offset=local_shard(p)[1],
        )

    def _dense_steps(self, pairs: list) -> None:
        """AdamW on the parameters outside the plan: float32 ones with float32 moments in
        one foreach call per param group (bitwise `dense_adamw_` on each), the others
        one by one."""
        batched: dict[int, tuple[dict, list]] = {}
        for p, group in pairs:
            fp32 = p.dtype == torch.float32 and local(p.grad).dtype == torch.float32
            if fp32 and "exp_avg_scale" not in self.state[p]:
                batched.setdefault(id(group), (group, []))[1].append(p)
            else:
                self._dense_step(p, group)
        for group, params in batched.values():
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            dense_adamw_foreach_(
                [local(p) for p in params], [local(p.grad) for p in params],
                [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                steps=[int(st["step"].item()) + 1 for st in states], lr=group["lr"],
                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                nonfinite_counts=[st["nonfinite"] for st in states],
            )  # fmt: skip

    def _dense_step(self, p: torch.Tensor, group: dict) -> None:
        """AdamW on every entry of a parameter outside the plan."""
        state, hyper = self.state[p], self._hyper(p, group)
        param, grad = local(p), local(p.grad)
        if "exp_avg_scale" in state or hyper["rounding"] != "nearest":
            masked_adamw_unchecked_(
                param, grad, state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1), None,
                **_stored(state, slice(None), slice(None)), **hyper,
            )  # fmt: skip
        else:
            for key in ("rounding", "seed", "offset"):
                del hyper[key]
            dense_adamw_(param, grad, state["exp_avg"], state["exp_avg_sq"], **hyper)

    def _grouped_call(self, p: torch.Tensor, group: dict) -> tuple[SegmentGroup, dict]:
        """masked_adamw_grouped_unchecked_'s (group, shared) of a planned parameter (its
        local shard): one segment for a matrix, one per expert of a fused experts tensor;
        the group is cached across steps, shared is this step's."""
        state, amplify = self.state[p], group["amplify"]
        param = local(p)
        if not param.is_contiguous():  # the one check a step needs: p.data can change
            raise ValueError(
                "SAUAdamW: a planned parameter must be contiguous (it is updated in place "
                "by flat index)"
            )
        if amplify == "saliency" and "entry_scale" not in state:
            raise RuntimeError(
                'amplify="saliency" but this parameter\'s state has no entry_scale '
                "(a checkpoint made with another amplify mode)"
            )
        compact = self._compact.get(p)
        # _hyper first: its _rounding may create or drop the compensation codes, which
        # the cached group below must then see.
        shared = dict(self._hyper(p, group), compact_grad=compact is not None, param=param)
        shared["grad"] = local(p.grad) if compact is None else compact
        return self._cached_group(p, state, amplify), shared

    def _cached_group(self, p: torch.Tensor, state: dict, amplify: str) -> SegmentGroup:
        """The SegmentGroup of p's state, rebuilt only when what it is made of changed.

        Its segments are slices of state tensors, valid as long as the state holds the
        same tensors at the same addresses with the same segments and mode; the token
        checks exactly that (one comparison per parameter, not per segment).
        load_state_dict also drops every cached group (__setstate__). What changes every
        step (param, grad, step, lr and the other hyper-parameters) is never cached.
        """
        token = _views_token(state, amplify)
        cached = self._views.get(p)
        if cached is not None and _same_token(cached[0], token):
            return cached[1]
        built = segment_group(_segment_views(state, amplify))
        self._views[p] = (token, built)
        return built

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

        Every entry is checked first (keys, index dtype, range and order, moment lengths,
        amplification, codes), and a state_dict that is not a SAUAdamW one (e.g. a plain
        torch.optim.AdamW's) is refused: on error the optimizer keeps its state.

        Pruned entries stay untouched whatever is loaded: an index that selects an entry
        whose weight is exactly 0 now (a pruned entry: plan_selection selects only
        non-zero weights) is refused, and so is a dense state (no index) for a parameter
        of this optimizer's plan. So load a state into the model it was made for, as
        pruned, or with its trained weights. The loaded index itself may differ from
        this optimizer's plan (a run resumed on another number of ranks recomputes a plan
        that can differ at ties of the threshold; the state's index is the run's).

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
        if not isinstance(state_dict.get("state"), Mapping) or "param_groups" not in state_dict:
            raise ValueError("not a SAUAdamW state_dict: it needs 'state' and 'param_groups'")
        state_dict = dict(state_dict)
        # A checkpoint from before rounding/state_bits/seed existed resumes as it ran:
        # round to nearest, float32 moments.
        state_dict["param_groups"] = [
            {**_LEGACY_GROUP, **g} for g in state_dict.get("param_groups", [])
        ]
        for i, group in enumerate(state_dict["param_groups"]):
            _check_loaded_group(group, f"loaded param group {i}")
        saved_state = state_dict["state"]
        state_dict["state"] = {}
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        ours = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(saved_ids, ours))
        for key, entry in saved_state.items():
            if key in id_map:  # before anything changes: a refused load keeps our state
                where = f"loaded state of parameter {key}"
                _check_loaded_entry(id_map[key], entry, where)
                _check_no_pruned(id_map[key], entry, id_map[key] in self._plan, where)
        super().load_state_dict(state_dict)
        for key, entry in saved_state.items():
            param = id_map.get(key)
            if param is None:  # torch keeps state of unknown ids as is; so do we
                self.state[key] = entry
                continue
            self.state[param] = {name: _loaded_value(param, name, v) for name, v in entry.items()}

    def state_nbytes(self) -> int:
        """Bytes held by all state tensors (moments, indices, codes, step counters).

        Under FSDP2 this is this rank's bytes: the state covers the local shards only."""
        return optimizer_state_bytes(self)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in any torch optimizer's state (moments, step counters; for
    SAUAdamW also the selection indices and codes: its state_nbytes())."""
    return sum(
        v.numel() * v.element_size()
        for entry in opt.state.values()
        for v in entry.values()
        if isinstance(v, torch.Tensor)
    )


def dense_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    nonfinite_count: torch.Tensor | None = None,
) -> None:
    """One AdamW step on all of `param`, in place, with no device sync.

    torch.optim.adam._single_tensor_adam's operations in its order, with decoupled weight
    decay: a float32 param follows torch.optim.AdamW to the last bit (up to the kernels
    torch picks). Unlike torch, the moments are float32 whatever the param dtype, and a
    float16/bfloat16 param is updated in float32 and rounded to nearest once per step.

    An entry whose gradient is NaN or inf is skipped: the step is computed out of place
    and `torch.where(finite, new, old)` keeps its param and moments, as the masked kernel
    does, and nothing asks the host whether any entry was bad. The price is temporaries
    of the param's size and one more read of the gradient than torch.optim.AdamW.

    Args:
        param: float32 | float16 | bfloat16 tensor, updated in place.
        grad: same shape as param, any float dtype.
        exp_avg, exp_avg_sq: float32, shaped like param; updated in place.
        step: the step number after incrementing (>= 1).
        lr, beta1, beta2, eps, weight_decay: as torch.optim.AdamW; not checked here.
        nonfinite_count: optional 0-d int64 tensor; the skipped entries are added to it
            on its device.
    """
    fp32 = param.dtype == torch.float32
    p = param if fp32 else param.float()
    g = grad if grad.dtype == torch.float32 else grad.float()
    finite = torch.isfinite(g)
    if nonfinite_count is not None:
        nonfinite_count += finite.numel() - finite.sum()  # a device tensor: no sync
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    # A NaN/inf entry computes garbage below; torch.where drops it.
    m = torch.lerp(exp_avg, g, 1 - beta1)
    v = torch.mul(exp_avg_sq, beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)
    new_p = p.mul(1 - lr * weight_decay) if weight_decay != 0 else p.clone()
    new_p.addcdiv_(m, denom, value=-step_size)
    exp_avg.copy_(torch.where(finite, m, exp_avg))
    exp_avg_sq.copy_(torch.where(finite, v, exp_avg_sq))
    param.copy_(torch.where(finite, new_p, p))  # rounds to param's dtype once


def dense_adamw_foreach_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    steps: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    nonfinite_counts: list[torch.Tensor],
) -> None:
    """`dense_adamw_` on many float32 parameters at once, with no device sync.

    torch.optim.adam._multi_tensor_adam's operations (torch._foreach_*, one launch each
    for all tensors on a GPU) in dense_adamw_'s order, so each parameter ends bitwise as
    dense_adamw_ leaves it (on a CPU the foreach ops run the same per-tensor kernels);
    then, per tensor, the entries with a NaN/inf gradient keep their param and moments
    and are counted, as there.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: lists of float32 tensors, one of each per
            parameter, shaped alike; params and moments updated in place.
        steps: each parameter's step number after incrementing (>= 1).
        lr, beta1, beta2, eps, weight_decay: as torch.optim.AdamW; not checked here.
        nonfinite_counts: a 0-d int64 tensor per parameter; its skipped entries are
            added to it on its device.
    """
    finite = [torch.isfinite(g) for g in grads]
    for count, ok in zip(nonfinite_counts, finite):
        count += ok.numel() - ok.sum()  # a device tensor: no sync
    # A NaN/inf entry computes garbage below; torch.where drops it.
    m = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
    v = torch._foreach_mul(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in steps])
    torch._foreach_add_(denom, eps)
    if weight_decay != 0:
        new_p = torch._foreach_mul(params, 1 - lr * weight_decay)
    else:
        new_p = [p.clone() for p in params]
    torch._foreach_addcdiv_(new_p, m, denom, [-(lr / (1 - beta1**t)) for t in steps])
    for i, ok in enumerate(finite):
        exp_avgs[i].copy_(torch.where(ok, m[i], exp_avgs[i]))
        exp_avg_sqs[i].copy_(torch.where(ok, v[i], exp_avg_sqs[i]))
        params[i].copy_(torch.where(ok, new_p[i], params[i]))


# id(parameter) -> (weak ref to it, weak ref to the live in_backward / compact_grads
# SAUAdamW hooking it): a second hooking optimizer on the same parameter is refused at
# construction. Keyed by id (tensors compare elementwise), checked by identity.
_HOOKED: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _hooked_by(p: torch.Tensor):
    """The live optimizer hooking `p`, or None."""
    entry = _HOOKED.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    return entry[1]()


def _weak_hook(ref: weakref.ref):
    """A post-accumulate-grad hook that reaches its optimizer through `ref` only."""

    def hook(p: torch.Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._hook(p)

    return hook


def _remove_handles(handles: list) -> None:
    """Remove hook handles (the finalizer's callback: it must not hold the optimizer)."""
    for handle in handles:
        handle.remove()
    handles.clear()


def _global_norm(grads: list, norm_type: float, distributed: bool) -> torch.Tensor:
    """The norm of all `grads` together (float32, 0-d); FSDP2 shards: over all ranks."""
    device = grads[0].device if grads else torch.device("cpu")
    if norm_type == INF:
        parts = [g.detach().abs().max().float() for g in grads if g.numel()]
        total = torch.stack(parts).max() if parts else torch.zeros((), device=device)
        op = "max"
    else:
        parts = [g.detach().float().pow(2).sum() for g in grads]
        total = torch.stack(parts).sum() if parts else torch.zeros((), device=device)
        op = "sum"
    if distributed and torch.distributed.is_initialized():
        reduce = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        torch.distributed.all_reduce(total, op=reduce)
    return total if norm_type == INF else total.sqrt()


def _init_moments(state: dict, n: int, blocks: tuple[int, ...], group: dict, p) -> None:
    """Zero moments for n entries (8-bit: codes of 0 and zero scales, `blocks` scales per
    segment) and, for kahan on a 16-bit param, zero compensation codes."""
    if group["state_bits"] == 8:
        state["exp_avg"] = torch.full((n,), ZERO_CODE, dtype=torch.uint8, device=p.device)
        state["exp_avg_sq"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
        state["exp_avg_scale"] = torch.zeros(sum(blocks), dtype=torch.float32, device=p.device)
        state["exp_avg_sq_scale"] = torch.zeros_like(state["exp_avg_scale"])
    else:
        state["exp_avg"] = torch.zeros(n, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
    if group["rounding"] == "kahan" and p.dtype != torch.float32:
        state["compensation"] = torch.zeros(n, dtype=torch.int8, device=p.device)


def _rounding(state: dict, group: dict, param: torch.Tensor) -> str:
    """The group's rounding for this step. kahan needs the compensation codes: created
    (zero) when the group switched to kahan, dropped when it switched away (stale codes
    must not come back)."""
    rounding = group["rounding"]
    if param.dtype == torch.float32:
        return "nearest"
    if rounding != "kahan":
        state.pop("compensation", None)
    elif "compensation" not in state:
        n = state["exp_avg"].numel()
        state["compensation"] = torch.zeros(n, dtype=torch.int8, device=param.device)
    return rounding


def _stored(state: dict, entries: slice, blocks: slice) -> dict:
    """masked_adamw_'s compensation / 8-bit scales of one segment of a state."""
    out = {}
    if "compensation" in state:
        out["compensation"] = state["compensation"].view(-1)[entries]
    if "exp_avg_scale" in state:
        out["exp_avg_scale"] = state["exp_avg_scale"][blocks]
        out["exp_avg_sq_scale"] = state["exp_avg_sq_scale"][blocks]
    return out


# The state entries a segment's views slice (or copy), in a fixed order for the token.
_VIEWED = (
    "exp_avg", "exp_avg_sq", "index", "compensation", "exp_avg_scale", "exp_avg_sq_scale",
    "entry_scale",
)  # fmt: skip


def _views_token(state: dict, amplify: str) -> tuple:
    """What a planned state's segment views depend on: the mode, the amplification, the
    codes' bound, and each viewed tensor with its address (a `.data` swap moves it)."""
    tensors = tuple(state.get(k) for k in _VIEWED)
    ptrs = tuple(None if t is None else t.data_ptr() for t in tensors)
    return amplify, state["amplification"], state.get("entry_scale_max"), tensors, ptrs


def _same_token(a: tuple, b: tuple) -> bool:
    """Tokens equal: tensors by identity (a cached view keeps its tensor alive, so an id
    is never reused while cached), the rest by value."""
    return (
        a[0] == b[0]
        and a[1] == b[1]
        and a[2] == b[2]
        and all(x is y for x, y in zip(a[3], b[3]))
        and a[4] == b[4]
    )


def _segment_views(state: dict, amplify: str) -> list[dict]:
    """masked_adamw_'s per-segment arguments of a planned state, one dict per segment in
    index order (sau_kernels.adamw.segment_group drops the empty ones). Slices are views,
    so the moments update in place; 8-bit scale blocks never straddle two segments."""
    on_grad = amplify == "grad"
    out, block = [], 0
    for start, stop, w in _segments(state):
        entries, blocks = slice(start, stop), slice(block, block + num_blocks(stop - start))
        block = blocks.stop
        view = dict(
            exp_avg=state["exp_avg"][entries],
            exp_avg_sq=state["exp_avg_sq"][entries],
            index=state["index"][entries],
            **_stored(state, entries, blocks),
        )
        if amplify == "saliency":  # the per-entry scales replace the layer scalar
            w = 1.0
            view["entry_scale"] = state["entry_scale"][entries]
            view["entry_scale_max"] = state["entry_scale_max"]
        view["grad_scale"] = w if on_grad else 1.0
        view["update_scale"] = 1.0 if on_grad else w
        out.append(view)
    return out


def _segments(state: dict) -> tuple[Segment, ...]:
    """The Segments of a planned state's index, from its stored amplification."""
    w = state["amplification"]
    if not isinstance(w, (tuple, list)):
        return (Segment(0, state["index"].numel(), float(w)),)
    out, start = [], 0
    for stop, w_e in w:
        out.append(Segment(start, int(stop), float(w_e)))
        start = int(stop)
    return tuple(out)


def _stored_amplification(layer) -> float | tuple[tuple[int, float], ...]:
    """A plan layer's amplification as the state stores it: w, or ((stop, w), ...) of
    its Segments for a fused experts tensor."""
    if not getattr(layer, "experts", ()):
        return float(layer.amplification)
    return tuple((seg.stop, seg.amplification) for seg in layer.segments())


def _check_amplification(w, n_index: int, where: str) -> None:
    """w is a finite number >= 0, or per expert ((stop, w), ...) with rising stops ending
    at n_index."""
    if not isinstance(w, (tuple, list)):
        check_number("amplification", w, NON_NEGATIVE, label=f"amplification in {where}")
        return
    stops = [seg[0] if isinstance(seg, (tuple, list)) and len(seg) == 2 else None for seg in w]
    ok = all(isinstance(s, int) and not isinstance(s, bool) for s in stops)
    ok = ok and stops == sorted(stops) and (not stops or (stops[0] >= 0 and stops[-1] == n_index))
    if not ok or not all(is_number(w_e, NON_NEGATIVE) for _, w_e in w):
        raise ValueError(
            f"{where}: per-expert amplification must be ((stop, w), ...) with rising stops "
            f"ending at {n_index} and finite w >= 0, got {w!r}"
        )


def _check_codes(codes, n_index: int, where: str) -> None:
    """amplify="saliency"'s per-entry codes: uint8, one per index entry."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"{where}: entry_scale must be a uint8 tensor, got {got}")
    if codes.dim() != 1 or codes.numel() != n_index:
        raise ValueError(
            f"{where}: entry_scale must be 1-D with one code per index entry ({n_index}), "
            f"got shape {tuple(codes.shape)}"
        )


def _check_index(index, numel: int, where: str) -> None:
    """A 1-D int32/int64 tensor of flat indices into `numel` entries, strictly increasing."""
    check_index_tensor(index, name=f"{where}: index")
    if not check_index_values(index, numel, name=f"{where}: index"):
        raise ValueError(f"{where}: index must be strictly increasing")


def _checked_plan_entry(name: str, layer, keep_codes: bool, w_max: float) -> _PlanEntry:
    """One plan layer, checked: a bad plan fails at construction, not at the first step.

    keep_codes: the parameter is in an amplify="saliency" group, which needs the plan's
    per-entry codes (kept; otherwise dropped).
    """
    where = f"plan[{name!r}]"
    param, index = local(layer.param), layer.selection.index  # FSDP2: a local index
    check_index_tensor(index, name=f"{where}: index")
    w = _stored_amplification(layer)
    _check_amplification(w, index.numel(), where)
    _check_index(index, param.numel(), where)
    index = index.to(device=param.device).contiguous()
    codes = getattr(layer, "entry_scale", None) if keep_codes else None
    if keep_codes:
        if codes is None:
            raise ValueError(
                'amplify="saliency" needs per-entry scales in the plan '
                "(LayerPlan.entry_scale, made by plan_selection)"
            )
        _check_codes(codes, index.numel(), where)
    return _PlanEntry(index, w, codes, w_max)


def _check_loaded_entry(param: torch.Tensor, entry, where: str) -> None:
    """One parameter's loaded state, checked once, so that no step checks the index.

    A planned entry needs a 1-D int32/int64 index inside the parameter, strictly
    increasing, and float moments with one entry per index entry; a dense entry needs
    moments shaped like the parameter. Anything else would make the unchecked step read
    and write outside the tensor (on the GPU: silently corrupt other tensors).
    """
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a dict of state, got {type(entry).__name__}")
    param = local(param)
    missing = [k for k in ("step", "nonfinite", *_FP32_STATE) if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    counter = entry["nonfinite"]
    if not isinstance(counter, torch.Tensor) or counter.dtype != torch.int64 or counter.dim():
        raise TypeError(f"{where}: nonfinite must be a 0-d int64 tensor")
    _check_step(entry["step"], where)
    if "index" in entry:
        check_index_tensor(entry["index"], name=f"{where}: index")
    n = entry["index"].numel() if "index" in entry else param.numel()
    moments = [entry[k] for k in _FP32_STATE]
    if "index" in entry:
        _check_index(entry["index"], param.numel(), where)
        _check_amplification(entry.get("amplification"), n, where)
    _check_loaded_moments(entry, moments, n, where)
    if "compensation" in entry:
        comp = entry["compensation"]
        if not isinstance(comp, torch.Tensor) or comp.dtype != torch.int8 or comp.numel() != n:
            raise ValueError(f"{where}: compensation must be an int8 tensor of {n} entries")
    if "entry_scale" in entry:  # amplify="saliency": one uint8 code per index entry
        _check_codes(entry["entry_scale"], n, where)
        w_max = entry.get("entry_scale_max")
        check_number(
            "entry_scale_max", w_max, (1, INF, False, False), label=f"entry_scale_max in {where}"
        )


def _check_loaded_group(group: Mapping, where: str) -> None:
    """A loaded param group's hyper-parameters, checked as add_param_group checks a new
    one (torch's load_state_dict restores them unchecked, and the step trusts them)."""
    if group["amplify"] not in AMPLIFY_MODES:
        raise ValueError(
            f"{where}: amplify must be one of {AMPLIFY_MODES}, got {group['amplify']!r}"
        )
    betas = group.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair, got {betas!r}")
    for name, value, rule in (
        ("lr", group.get("lr"), NON_NEGATIVE),
        ("beta1", betas[0], _BETA),
        ("beta2", betas[1], _BETA),
        ("eps", group.get("eps"), NON_NEGATIVE),
        ("weight_decay", group.get("weight_decay"), NON_NEGATIVE),
    ):
        check_number(name, value, rule, label=f"{name} in {where}")
    if group["rounding"] not in ROUNDINGS:
        raise ValueError(f"{where}: rounding must be one of {ROUNDINGS}, got {group['rounding']!r}")
    bits, seed = group["state_bits"], group["seed"]
    if bits not in STATE_BITS or isinstance(bits, bool):
        raise ValueError(f"{where}: state_bits must be one of {STATE_BITS}, got {bits!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{where}: seed must be an integer in [0, 2**63), got {seed!r}")


def _check_step(step, where: str) -> None:
    """A loaded step count: a whole number >= 0 (a 0-d tensor or a number); a negative,
    fractional or NaN count would break the bias corrections."""
    if isinstance(step, torch.Tensor) and step.dim() == 0 and not step.is_complex():
        value = step.item()
    else:
        value = step
    if not is_number(value, NON_NEGATIVE) or float(value) != int(value):
        raise ValueError(f"{where}: step must be a whole number >= 0, got {step!r}")


def _check_no_pruned(param: torch.Tensor, entry: Mapping, planned: bool, where: str) -> None:
    """A checked loaded entry must leave the pruned entries (weight exactly 0) alone: its
    index selects none of them, and a parameter of the plan gets no dense state."""
    if "index" not in entry:
        if planned:
            raise ValueError(
                f"{where}: a dense state (no index) for a parameter this optimizer's plan "
                "selects entries of: it would update every entry, the pruned ones too"
            )
        return
    flat = local(param).detach().reshape(-1)
    picked = flat.index_select(0, entry["index"].to(device=flat.device, dtype=torch.int64))
    pruned = int((picked == 0).sum())
    if pruned:
        raise ValueError(
            f"{where}: its index selects {pruned} of {picked.numel()} entries whose weight "
            "is exactly 0 here (pruned; a plan selects only non-zero weights): a state "
            "made for another plan or model, which would move pruned weights"
        )


def _check_loaded_moments(entry: Mapping, moments: list, n: int, where: str) -> None:
    """float moments with n entries (a dense param's may keep its shape), or uint8 codes
    with their block scales: one float32 scale per 256 entries of each segment."""
    if "exp_avg_scale" not in entry:
        if not all(isinstance(m, torch.Tensor) and m.is_floating_point() for m in moments):
            raise TypeError(f"{where}: exp_avg and exp_avg_sq must be float tensors")
        if "index" not in entry and any(m.numel() != n for m in moments):
            raise ValueError(f"{where}: dense moments must have the parameter's {n} entries")
        if "index" in entry and any(m.dim() != 1 or m.numel() != n for m in moments):
            raise ValueError(f"{where}: moments must be 1-D with one entry per index entry ({n})")
        # No step makes NaN moments (NaN gradients are skipped) or a negative second
        # moment; either would turn the entries it touches into NaN at the next step.
        if bool(torch.isnan(moments[0]).any()) or not bool((moments[1] >= 0).all()):
            raise ValueError(f"{where}: exp_avg holds NaN or exp_avg_sq is NaN or negative")
        return
    if not all(isinstance(m, torch.Tensor) and m.dtype == torch.uint8 for m in moments):
        raise TypeError(f"{where}: 8-bit moments must be uint8 codes")
    if any(m.dim() != 1 or m.numel() != n for m in moments):
        raise ValueError(f"{where}: 8-bit moments must be 1-D with {n} entries")
    if "index" in entry:
        blocks = sum(num_blocks(seg.stop - seg.start) for seg in _segments(entry))
    else:
        blocks = num_blocks(n)
    for key in ("exp_avg_scale", "exp_avg_sq_scale"):
        scale = entry.get(key)
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
            raise TypeError(f"{where}: {key} must be a float32 tensor")
        if scale.dim() != 1 or scale.numel() != blocks:
            raise ValueError(f"{where}: {key} must be 1-D with {blocks} entries")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError(f"{where}: {key} must be finite and >= 0")


def _loaded_value(param: torch.Tensor, name: str, value):
    """One loaded state value: moved to param's device, float32 moments kept float32."""
    if not isinstance(value, torch.Tensor):
        return value
    if name == "step":  # a CPU float32 counter, as torch keeps it
        return value.to(dtype=torch.float32)
    if name == "index":
        return value.to(device=param.device)
    if name in _FP32_STATE and value.dtype != torch.uint8:  # 8-bit codes stay codes
        return value.to(device=param.device, dtype=torch.float32)
    return value.to(device=param.device)
