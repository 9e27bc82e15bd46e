"""The steps the pipeline runs for each variant: prune, saliency, optimizer and plan,
evaluation, and the row a variant adds to the results (orchestrated by sau.lab.pipeline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sau.errors import SAUError
from sau.lab.pipeline_config import OPTION_VARIANTS, PipelineConfig

if TYPE_CHECKING:
    from sau.lab.pipeline import Inputs


def evaluate(model, tok, inputs: Inputs, cfg: PipelineConfig, retain_tr, progress) -> dict:
    """sau.lab.eval.evaluate_model of `model` on the inputs' rows with the config's evaluation
    sizes (cfg: anything with eval_retain_rows, eval_batch_size and max_new_tokens, e.g. a
    PipelineConfig or sau.lab.sweep.Settings); forget quality against the retain model's truth
    ratios `retain_tr` (a float64 array, or None: not reported)."""
    from sau.lab.eval import evaluate_model

    step = max(1, len(inputs.retain) // max(1, cfg.eval_retain_rows))
    # Every step-th retain row: spread over people rather than the first few people.
    retain_eval = inputs.retain[::step][: cfg.eval_retain_rows]
    return evaluate_model(
        model,
        tok,
        forget=inputs.forget,
        retain=retain_eval,
        general=inputs.general,
        holdout=inputs.holdout,
        retain_model_truth_ratios=retain_tr,
        batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.max_new_tokens,
        progress=progress,
    )


def result_row(name: str, res: dict, seconds, kept, extra=None) -> dict:
    """One results row: variant `name`, its metrics `res`, wall `seconds` (None for the
    starting models), the share of pruned entries still zero `kept` (None: not pruned)
    and any `extra` columns."""
    row = {
        "variant": name,
        "forget_quality": res.get("forget_quality"),
        "model_utility": res["model_utility"],
        "forget_rouge": res["forget_rouge"],
        "retain_rouge": res["retain_rouge"],
        "mia_auc": res.get("mia_auc"),
        "sparsity_kept": kept,
        "seconds": seconds,
        "forget_truth_ratio_score": res.get("forget_truth_ratio_score"),
        "forget_prob": res.get("forget_prob"),
    }
    row.update(extra or {})
    return row


def prune_as_configured(model, cfg: PipelineConfig, inputs: Inputs, progress: bool):
    """Prune `model` in place as cfg says (method, sparsity or N:M); returns
    sau.prune.prune_model's report."""
    nm = tuple(cfg.nm) if cfg.nm else None
    return prune_on_inputs(model, cfg.prune, cfg.sparsity, nm, inputs, progress)


def prune_on_inputs(model, method: str, sparsity: float, nm, inputs: Inputs, progress: bool):
    """sau.prune.prune_model(model, method, sparsity, nm=nm) in place, Wanda calibrated on
    the inputs' first 128 retain rows (batches of 16); a bad setting is one SAUError line."""
    from sau.batching import calibration_batches
    from sau.prune import prune_model

    calib = None
    if method == "wanda":
        calib = calibration_batches(inputs.tok, inputs.retain[:128], 16)
    try:
        return prune_model(model, method, sparsity, nm=nm, calib_batches=calib, progress=progress)
    except ValueError as err:
        raise SAUError(str(err)) from None


def freeze_all_but(model, names: list[str]) -> None:
    """requires_grad on the parameters named in `names` only."""
    keep = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)


def measured_sparsity(model, names) -> float:
    """Fraction of exact zeros over the parameters named in `names`."""
    total = sum(model.get_parameter(n).numel() for n in names)
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in names)
    return zeros / total if total else 0.0


def _rank_slices(dp, encoded, pad: int, size: int) -> list[tuple[dict, float]]:
    """(this rank's batch, weight) for each global batch of `size` consecutive rows."""
    n = len(encoded)
    return [dp.batch(encoded, range(i, min(i + size, n)), pad) for i in range(0, n, size)]


def _weighted_nll(model, pair: tuple[dict, float]) -> torch.Tensor:
    from sau.unlearn.objectives import nll

    return nll(model, pair[0]) * pair[1]  # weight 0: a rank without rows in this batch


def saliency_of(model, inputs: Inputs, cfg: PipelineConfig, names, progress, dp=None):
    """Squared-gradient saliency of the forget rows (and, for sau-contrast, the retain
    rows) over the weights `names`: sau.saliency.compute_saliency's dict name -> float32
    tensor of the weight's shape (this rank's shard under FSDP2, `dp` given)."""
    from sau.batching import encode_rows, loss_batches, pad_id
    from sau.saliency import compute_saliency
    from sau.unlearn.objectives import nll

    tok = inputs.tok
    enc, pad, size = encode_rows(tok, inputs.forget), pad_id(tok), cfg.batch_size
    r_enc = encode_rows(tok, inputs.retain) if "sau-contrast" in cfg.variants else None
    # The forget NLL: its gradient is GA's and (up to a per-row factor) GradDiff's and NPO's
    # forget term, so it ranks the weights every method's forget gradient leans on.
    loss = nll
    if dp is None:
        batches = loss_batches(enc, pad, size)
        retain = loss_batches(r_enc, pad, size) if r_enc else None  # one more pass
    else:  # FSDP2: this rank's weighted slice of every global batch (sau.distributed)
        batches = _rank_slices(dp, enc, pad, size)
        retain = _rank_slices(dp, r_enc, pad, size) if r_enc else None
        loss = _weighted_nll
    return compute_saliency(
        model,
        batches,
        loss,
        params=names,
        progress=progress,
        retain_batches=retain,
        contrast=cfg.contrast,
    )


def optimizer_for(variant: str, model, names, saliency, cfg: PipelineConfig, plans=None):
    """(optimizer, plan) of one variant over `model`'s trainable weights `names`.

    plans: a dict shared by the variants of one run, or None. Variants with the same
    plan settings (sau-grad and sau-update) then plan once, on the first variant's copy,
    and the others rebind that plan to their own copy (same weights, same saliency, so
    the same plan)."""
    from sau.optim import SAUAdamW
    from sau.plan import plan_selection

    named = {n: model.get_parameter(n) for n in names}
    params = list(named.values())
    if variant in ("dense", "unlearn-then-prune"):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0), None
    amplify = {"masked": "grad", "sau-grad": "grad", "sau-update": "update"}.get(
        variant, cfg.amplify
    )
    options = {"k": 1.0, "alpha": 0.0} if variant == "masked" else {}
    if variant in OPTION_VARIANTS:
        options, amplify = OPTION_VARIANTS[variant]
        options = {key: (f"mass:{cfg.mass}" if v == "mass" else v) for key, v in options.items()}
    options = {"k": cfg.k, "alpha": cfg.alpha, **options}
    key = tuple(sorted(options.items()))
    if plans is not None and key in plans:
        plan = plans[key].bound_to(named)
    else:
        plan = plan_selection(list(named.items()), saliency, w_max=cfg.w_max, **options)
        if plans is not None:
            plans[key] = plan
    opt = SAUAdamW(params, plan=plan, lr=cfg.lr, amplify=amplify, in_backward=cfg.in_backward)
    return opt, plan
