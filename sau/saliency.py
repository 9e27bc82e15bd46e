"""Saliency over a forget set: the diagonal empirical Fisher, one float32 tensor per weight.

s_i = mean over forget batches b of (dL_f(b)/dtheta_i)^2 (docs/method.md), over ALL
entries of a weight, pruned ones included: a pruned weight still gets a gradient in a
dense backward pass, and its saliency is what pruning threw away.

Memory: gradients are squared into the float32 accumulator the moment autograd has
finished accumulating them (a post-accumulate-grad hook) and freed right away, so no
full set of gradients is ever alive at once; unscored parameters get no gradient at all.

FSDP2 (compute_saliency): a `fully_shard`-ed model works unchanged. Each rank passes its
own batches (the same number on every rank, equal sizes, a mean loss); the hook sees the
reduce-scattered, rank-averaged gradient shard, which is the gradient of the loss over the
global batch (the rank batches together). So for a DTensor parameter the result is a
DTensor with its mesh and placements, and `saliency[name].full_tensor()` is the
single-process saliency over the concatenated global batches, up to float rounding:
s_i = mean over steps t of (d mean-loss(global batch t) / d theta_i)^2.

Bounded accumulators (max_accumulator_bytes=N): the scored weights are cut, in model
order, into groups whose accumulators total at most N bytes, and each group gets its own
pass over the same batches, with every other parameter's requires_grad off. A weight's
accumulator depends only on its own gradients, and switching requires_grad off elsewhere
changes which gradients autograd computes, not the values of those it does compute, so
the result is bitwise the one-pass result (given a deterministic forward and backward).
Each finished group is copied to host memory and its accumulators are freed, so the
parameters' device never holds more than N bytes of saliency. Under FSDP2 a weight
counts with its largest shard on any rank, so every rank plans the same groups (and
runs the same number of passes: the collectives match).
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from sau.distributed import like_param, local
from sau.settings import INF, check_number
from sau.weights import is_norm_or_embedding, plannable_weights
from sau_kernels import accumulate_sq_grad_

__all__ = ["Saliency", "compute_saliency", "contrast_score", "default_saliency_params"]


class Saliency(dict):
    """{name: forget saliency}, plus the retain-set Fisher when one was computed.

    A plain dict of float32 forget saliency, with two attributes for the contrastive
    score (`contrast_score`):

    Attributes:
        retain: {name: float32 retain-set Fisher, shaped like the parameter} or None.
        contrast: lambda of `contrast_score` (a float > 0) or None.
        passes: passes over the forget batches that computed it (an int >= 1: the
            number of groups of `compute_saliency(max_accumulator_bytes=...)`; the
            retain batches, when given, got as many).
    """

    def __init__(self, forget, retain=None, contrast=None, passes: int = 1) -> None:
        super().__init__(forget)
        self.retain = retain
        self.contrast = contrast
        self.passes = passes

    def score(self, name: str) -> torch.Tensor:
        """The contrastive score of one weight (needs retain); see contrast_score."""
        if self.retain is None or self.contrast is None:
            raise ValueError(
                'score="contrast" needs a saliency computed with retain_batches= '
                "(compute_saliency(..., retain_batches=..., contrast=lambda))"
            )
        return contrast_score(self[name], self.retain[name], self.contrast)


def contrast_score(forget: torch.Tensor, retain: torch.Tensor, contrast: float) -> torch.Tensor:
    """score_i = F_forget,i / (F_retain,i + contrast * mean(F_retain)) over one weight.

    Selective Synaptic Dampening (Foster et al., AAAI 2024) ranks parameters by the ratio
    of forget-set to retain-set Fisher: large where a weight matters to the forget set
    and little to everything else. The lambda * mean term keeps the ratio finite and
    damps entries whose retain Fisher is tiny by chance. A weight whose retain Fisher is
    all zero has no retain information; its score is the forget saliency itself (any
    constant denominator ranks alike). Zero forget saliency gives score 0, so the
    zero-saliency rule of the selection still applies.

    Args:
        forget, retain: float32 tensors of one shape, finite and >= 0.
        contrast: lambda, a finite float > 0.
    Returns:
        float32 tensor shaped like forget, finite and >= 0.
    """
    mean = float(retain.double().mean()) if retain.numel() else 0.0
    if mean == 0.0:
        return forget.float().clone()
    return forget.float() / (retain.float() + contrast * mean)


def default_saliency_params(model: nn.Module) -> list[str]:
    """Names of every plannable weight of `model` (`sau.weights.plannable_weights`).

    That is each 2-D nn.Linear weight (`lm_head` included when it is not tied to the input
    embedding), each Conv1D weight (GPT-2 family) and each 3-D fused experts tensor
    (Mixtral, Qwen2-MoE); never embeddings, norms, biases or routers. Each tensor is
    listed once, under the name `model.named_parameters()` gives it, so the result lines
    up with `plan_selection(model.named_parameters(), ...)`.
    `sau.weights.describe_weights(plannable_weights(model))` says what was found per kind.

    Returns: parameter names, in module order.
    """
    return [w.name for w in plannable_weights(model)]


def _resolve(
    model: nn.Module, params: Iterable[str] | None, allow_norms_and_embeddings: bool = False
) -> dict[str, nn.Parameter]:
    if params is None:
        names = default_saliency_params(model)
    elif isinstance(params, str):
        raise TypeError("params must be an iterable of parameter names, not a single string")
    else:
        names = list(params)
    # remove_duplicate=False so that every alias of a tied weight can be asked for by name.
    by_name = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"params names not found in the model: {missing[:5]}")
    if params is not None and not allow_norms_and_embeddings:
        odd = [n for n in names if is_norm_or_embedding(model, n)]
        if odd:
            raise ValueError(
                f"params names a norm or embedding weight ({odd[0]!r}); these are not "
                "pruned or planned by default: pass allow_norms_and_embeddings=True to "
                "score them"
            )
    chosen: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name in names:
        p = by_name[name]
        if id(p) in seen:  # two aliases of one tensor: score it once
            continue
        if not p.is_floating_point():
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; saliency needs floats")
        seen.add(id(p))
        chosen[name] = p
    if not chosen:
        raise ValueError(
            "no parameters to score: params is empty and the model has no plannable weight "
            "(nn.Linear, Conv1D or fused experts tensor)"
        )
    return chosen


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    return sys.stderr.isatty()


def compute_saliency(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    *,
    params: Iterable[str] | None = None,
    progress: bool | None = None,
    backend: str | None = None,
    retain_batches: Iterable | None = None,
    contrast: float | None = None,
    dtype: torch.dtype = torch.float32,
    allow_norms_and_embeddings: bool = False,
    max_accumulator_bytes: int | None = None,
) -> Saliency:
    """Mean squared gradient of the forget loss per weight entry (diagonal empirical Fisher).

    One forward and backward per batch in eval mode; each scored gradient is squared into
    its accumulator as soon as autograd has finished it, then freed; unscored parameters
    have requires_grad off meanwhile (mode, flags and .grad restored afterwards, also when
    loss_fn raises). FSDP2 and max_accumulator_bytes: the module docstring.

    Args:
        model: any nn.Module (e.g. a transformers causal LM).
        batches: an iterable of batches (one without len() is counted as it comes); for
            more than one pass, re-iterable with the same batches every time (a list).
        loss_fn: loss_fn(model, batch) -> 0-d tensor, the loss on the forget set.
        params: names (model.named_parameters()) of the weights to score; default every
            plannable weight (`default_saliency_params`).
        progress: show a tqdm bar; None shows it only when stderr is a terminal.
        backend: kernel backend for accumulate_sq_grad_ ("triton" | "torch" | None).
        retain_batches: optional retain-set batches: the retain-set Fisher for
            `plan_selection(..., score="contrast")`, in as many passes as `batches`.
        contrast: lambda of that score (`contrast_score`), finite > 0, 1.0 if None; needs them.
        dtype: the accumulators' dtype, torch.float32 or torch.bfloat16 (half the bytes;
            each batch's sum is formed in float32 and rounded to nearest: ~2**-8 relative).
        allow_norms_and_embeddings: accept a norm or embedding weight named in params.
        max_accumulator_bytes: None (one pass), or an int N >= 1: weights scored in groups
            of <= N accumulator bytes, one pass each; bitwise equal, returned on the CPU.

    Returns:
        Saliency {name: saliency of `dtype` shaped like the parameter, >= 0} on its device
        (the CPU with max_accumulator_bytes; a DTensor parameter gets a DTensor on its
        mesh's device); `.retain` and `.contrast` with retain_batches; `.passes`.

    Raises:
        ValueError: no batches, an unknown or refused parameter name, no plannable weight,
            a non-scalar loss, contrast <= 0 or without retain_batches, max_accumulator_bytes
            not an int >= 1 or below a weight's accumulator, another batch count on a later pass.
        TypeError: dtype not float32 / bfloat16, a non-float param, an iterator (e.g. a
            generator) as batches or retain_batches when more than one pass is needed.
    """
    _check_options(dtype, retain_batches, contrast, max_accumulator_bytes)
    chosen = _resolve(model, params, allow_norms_and_embeddings)
    groups = _plan(chosen, dtype, max_accumulator_bytes, batches, retain_batches)
    sets = {"forget": batches, "retain": retain_batches}
    host = max_accumulator_bytes is not None
    out = _all_passes(model, chosen, groups, sets, loss_fn, progress, backend, dtype, host)
    if retain_batches is None:
        return Saliency(out["forget"], passes=len(groups))
    return Saliency(out["forget"], out["retain"], float(contrast or 1.0), passes=len(groups))


def _all_passes(model, chosen, groups, sets, loss_fn, progress, backend, dtype, host) -> dict:
    """{which: {name: saliency in its parameter's layout}} for each non-None batch set of
    `sets` ({"forget": batches, "retain": ...}), one pass per group and set."""
    fisher = {
        which: _fisher_in_groups(
            model, groups, data, which, loss_fn, progress, backend, dtype, host
        )
        for which, data in sets.items()
        if data is not None
    }
    # DTensors only now: wrapping puts a host shard back on its mesh's device.
    return {which: _like_params(acc, chosen) for which, acc in fisher.items()}


def _plan(chosen: dict, dtype, max_accumulator_bytes, batches, retain_batches) -> list[dict]:
    """The groups of parameters, one pass each; refuses iterators that need re-walking."""
    if max_accumulator_bytes is None:
        return [chosen]
    groups = _groups(chosen, dtype, int(max_accumulator_bytes))
    _check_reiterable(batches, "batches", len(groups))
    _check_reiterable(retain_batches, "retain_batches", len(groups))
    return groups


def _like_params(acc: dict, chosen: dict) -> dict:
    """{name: accumulator as its parameter's layout (`like_param`)}, in `chosen`'s order."""
    return {name: like_param(acc[name], p) for name, p in chosen.items()}


def _fisher_in_groups(model, groups, batches, which, loss_fn, progress, backend, dtype, host):
    """One `_fisher` pass over `batches` per group of parameters; {name: local
    accumulator}, each group copied to host memory as it finishes when `host`."""
    out: dict[str, torch.Tensor] = {}
    first = None
    for i, group in enumerate(groups):
        part = f"pass {i + 1}/{len(groups)}" if len(groups) > 1 else ""
        acc, count = _fisher(model, group, batches, loss_fn, progress, backend, which, dtype, part)
        first = count if first is None else first
        if count != first:
            raise ValueError(
                f"{which} batches gave {first} batches on the first pass and {count} on pass "
                f"{i + 1}: max_accumulator_bytes needs the same batches on every pass (pass a "
                "list)"
            )
        out.update(_to_host(acc) if host else acc)
    return out


def _check_options(dtype, retain_batches, contrast, max_accumulator_bytes) -> None:
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    if contrast is not None and retain_batches is None:
        raise ValueError(
            f"contrast={contrast!r} needs retain_batches (the retain-set Fisher it weighs); "
            "without them it would be ignored"
        )
    if retain_batches is not None and contrast is not None:
        check_number("contrast", contrast, (0, INF, True, False))
    if max_accumulator_bytes is not None:
        n = max_accumulator_bytes
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(
                f"max_accumulator_bytes must be None or an int >= 1 (bytes), got {n!r}"
            )


def _accumulator_bytes(p: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of p's accumulator on the rank holding its largest shard: the same number
    on every rank (FSDP2 shards a dim into chunks of ceil(size / ranks))."""
    if not isinstance(p, DTensor):
        return p.numel() * dtype.itemsize
    shape = list(p.shape)
    for mesh_dim, placement in enumerate(p.placements):
        if placement.is_shard():
            ranks = p.device_mesh.size(mesh_dim)
            shape[placement.dim] = -(-shape[placement.dim] // ranks)
    return math.prod(shape) * dtype.itemsize


def _groups(chosen: dict, dtype: torch.dtype, limit: int) -> list[dict]:
    """`chosen` cut, in order, into groups whose accumulators total <= `limit` bytes."""
    sizes = {name: _accumulator_bytes(p, dtype) for name, p in chosen.items()}
    largest = max(sizes, key=sizes.__getitem__)  # the first of the largest
    if sizes[largest] > limit:
        raise ValueError(
            f"max_accumulator_bytes={limit} is smaller than the accumulator of {largest!r} "
            f"({sizes[largest]} bytes in {dtype}), the largest: give at least "
            f"{sizes[largest]} bytes"
        )
    groups: list[dict] = [{}]
    used = 0
    for name, p in chosen.items():
        size = sizes[name]
        if groups[-1] and used + size > limit:
            groups.append({})
            used = 0
        groups[-1][name] = p
        used += size
    return groups


def _check_reiterable(batches, name: str, passes: int) -> None:
    if passes > 1 and isinstance(batches, Iterator):
        raise TypeError(
            f"{name} is an iterator (e.g. a generator), which can be walked only once, but "
            f"max_accumulator_bytes needs {passes} passes over it: pass a list (or another "
            "re-iterable that gives the same batches every time)"
        )


def _to_host(acc: dict) -> dict:
    """Each accumulator copied to host memory and freed, one at a time."""
    return {name: acc.pop(name).to("cpu", copy=True) for name in list(acc)}


def _fisher(
    model, chosen, batches, loss_fn, progress, backend, which: str, dtype, part: str = ""
) -> tuple[dict, int]:
    """{name: local accumulator of the mean squared gradient of loss_fn over `batches`},
    how many batches came. `part` ("pass 2/5"): for the bar."""
    try:
        n_batches: int | None = len(batches)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    if n_batches == 0:
        raise ValueError(f"{which} batches are empty: saliency needs at least one batch")
    # With a known count the mean is accumulated directly; otherwise sum, divide at the end.
    scale = 1.0 / n_batches if n_batches else 1.0
    acc = {  # FSDP2: each rank accumulates its own shard of every DTensor parameter
        name: torch.zeros(local(p).shape, dtype=dtype, device=local(p).device)
        for name, p in chosen.items()
    }

    all_params = list(model.parameters())
    saved_flags = [p.requires_grad for p in all_params]
    saved_grads = [p.grad for p in all_params]
    was_training = model.training
    scored = {id(p) for p in chosen.values()}
    handles = []

    def make_hook(name: str):
        def hook(p: torch.Tensor) -> None:
            accumulate_sq_grad_(acc[name], local(p.grad), scale=scale, backend=backend)
            p.grad = None  # the point of the hook: this gradient dies now

        return hook

    try:
        for p in all_params:
            # Existing grads are parked (and put back below): autograd would otherwise add
            # the forget gradient to them before our hook sees it.
            p.grad = None
            p.requires_grad_(id(p) in scored)
        for name, p in chosen.items():
            handles.append(p.register_post_accumulate_grad_hook(make_hook(name)))
        model.eval()
        desc = f"saliency ({which}, {part})" if part else f"saliency ({which})"
        count = _backward_each(model, batches, loss_fn, n_batches, desc, progress)
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in zip(all_params, saved_flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    if count == 0:
        raise ValueError(f"{which} batches are empty: saliency needs at least one batch")
    if n_batches is None:
        for t in acc.values():
            t.div_(count)
    elif count != n_batches:
        # len() promised more (or fewer) batches than came: rescale to the true mean.
        for t in acc.values():
            t.mul_(n_batches / count)
    return acc, count


def _backward_each(model, batches, loss_fn, n_batches, desc: str, progress) -> int:
    """loss_fn(model, batch).backward() for every batch (the hooks accumulate); returns
    how many batches came."""
    count = 0
    bar = tqdm(
        batches,
        total=n_batches,
        desc=desc,
        unit="batch",
        disable=not _show_progress(progress),
    )
    with torch.enable_grad():
        for batch in bar:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            loss.reshape(()).backward()
            count += 1
    bar.close()
    return count
