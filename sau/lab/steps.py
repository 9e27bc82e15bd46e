"""The steps a lab run is made of, shared by the pipeline (`sau demo`, `sau unlearn`) and
the sweep: which weights train, pruning, forget-set saliency, evaluation and the row a
variant adds to the results."""

from __future__ import annotations

import contextlib

import torch

from sau.batching import calibration_batches, encode_rows, loss_batches, pad_id
from sau.errors import SAUError
from sau.lab.eval import evaluate_model
from sau.lab.inputs import Inputs
from sau.prune import prune_model, target_linear_names
from sau.saliency import compute_saliency
from sau.unlearn.objectives import nll

__all__ = [
    "activation_checkpointing",
    "evaluate",
    "forget_saliency",
    "freeze_all_but",
    "measured_sparsity",
    "prune_on_inputs",
    "result_row",
    "trainable_names",
]


def trainable_names(inputs: Inputs) -> list[str]:
    """The weights every variant unlearns: the decoder blocks' Linear (Conv1D, fused
    experts) weights, the ones pruning touches; embeddings, norms and the head stay frozen.

    Raises:
        SAUError: the model has none.
    """
    names = target_linear_names(inputs.model)
    if not names:
        raise SAUError(
            f"{inputs.source}: nothing to unlearn: no nn.Linear, Conv1D or fused experts "
            "weight inside the model's decoder blocks"
        )
    return names


def freeze_all_but(model, names: list[str]) -> None:
    """requires_grad on the parameters named in `names` only."""
    keep = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)


@contextlib.contextmanager
def activation_checkpointing(model, enabled: bool = True):
    """transformers' activation checkpointing on `model` inside the block (bitwise the
    same training steps, less memory), then off again with the model's `use_cache`.

    Non-reentrant: frozen embeddings give inputs that need no gradient, which the
    reentrant form would not backpropagate. No KV cache meanwhile (pointless in
    training, and warned about). `enabled=False`: a block that changes nothing.

    Raises:
        SAUError: the model does not support it (one line).
    """
    if not enabled:
        yield model
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise SAUError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    try:
        yield model
    finally:  # evaluation and the saved model as without it
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()
        model.config.use_cache = use_cache


def measured_sparsity(model, names) -> float:
    """Fraction of exact zeros over the parameters named in `names`."""
    total = sum(model.get_parameter(n).numel() for n in names)
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in names)
    return zeros / total if total else 0.0


def prune_on_inputs(model, method: str, sparsity: float, nm, inputs: Inputs, progress: bool):
    """`sau.prune.prune_model(model, method, sparsity, nm=nm)` in place, Wanda calibrated
    on the inputs' first 128 retain rows (batches of 16); returns its report.

    Raises:
        SAUError: a setting the model cannot take (one line).
    """
    calib = None
    if method == "wanda":
        calib = calibration_batches(inputs.tok, inputs.retain[:128], 16)
    try:
        return prune_model(model, method, sparsity, nm=nm, calib_batches=calib, progress=progress)
    except ValueError as err:
        raise SAUError(str(err)) from None


def _rank_slices(dp, encoded, pad: int, size: int) -> list[tuple[dict, float]]:
    """(this rank's batch, weight) for each global batch of `size` consecutive rows."""
    n = len(encoded)
    return [dp.batch(encoded, range(i, min(i + size, n)), pad) for i in range(0, n, size)]


def _weighted_nll(model, pair: tuple[dict, float]) -> torch.Tensor:
    return nll(model, pair[0]) * pair[1]  # weight 0: a rank without rows in this batch


def forget_saliency(
    model,
    inputs: Inputs,
    names: list[str],
    batch_size: int,
    *,
    contrast: float | None = None,
    progress: bool = False,
    dp=None,
    max_accumulator_bytes: int | None = None,
):
    """Squared-gradient saliency of the forget rows over the weights `names`.

    The loss is the forget NLL: its gradient is GA's and (up to a per-row factor)
    GradDiff's and NPO's forget term, so it ranks the weights every method's forget
    gradient leans on.

    Args:
        batch_size: rows per (global) batch.
        contrast: lambda of the contrastive score; given, one more pass adds the retain
            rows' Fisher (for plan_selection(score="contrast")).
        dp: a `sau.distributed.DataParallel` under torchrun: each rank takes its weighted
            slice of every global batch, and the result is this rank's shards.
        max_accumulator_bytes: None (one pass), or an int >= 1 bounding the saliency
            accumulators' bytes: the weights are scored in groups, one pass each, with the
            same result (`sau.compute_saliency`).

    Returns:
        `sau.compute_saliency`'s Saliency (name -> float32 tensor of the weight's shape;
        `.passes` the number of passes over the forget rows).
    """
    tok = inputs.tok
    enc, pad = encode_rows(tok, inputs.forget), pad_id(tok)
    r_enc = encode_rows(tok, inputs.retain) if contrast is not None else None
    if dp is None:
        loss, batches = nll, loss_batches(enc, pad, batch_size)
        retain = loss_batches(r_enc, pad, batch_size) if r_enc else None
    else:
        loss, batches = _weighted_nll, _rank_slices(dp, enc, pad, batch_size)
        retain = _rank_slices(dp, r_enc, pad, batch_size) if r_enc else None
    extra = {} if contrast is None else {"retain_batches": retain, "contrast": contrast}
    return compute_saliency(
        model,
        batches,
        loss,
        params=names,
        progress=progress,
        max_accumulator_bytes=max_accumulator_bytes,
        **extra,
    )


def evaluate(model, inputs: Inputs, cfg, retain_tr, progress: bool) -> dict:
    """`sau.lab.eval.evaluate_model` of `model` on the inputs' rows.

    Args:
        cfg: anything with eval_retain_rows, eval_batch_size and max_new_tokens (a
            PipelineConfig or a sweep's Settings).
        retain_tr: the retain model's forget truth ratios (float64 array) for forget
            quality, or None (not reported).
    """
    step = max(1, len(inputs.retain) // max(1, cfg.eval_retain_rows))
    # Every step-th retain row: spread over people rather than the first few people.
    retain_eval = inputs.retain[::step][: cfg.eval_retain_rows]
    return evaluate_model(
        model,
        inputs.tok,
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
