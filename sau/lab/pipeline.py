"""The end-to-end pipeline: load, prune, saliency, plan, unlearn, evaluate (one row per variant).

Variants (each starts from the same loaded model and the same data order):

- ``dense``: unlearn the unpruned model with plain AdamW.
- ``masked``: unlearn the pruned model with AdamW over all survivors (SAUAdamW with a
  k = 1, alpha = 0 plan: every survivor selected, no amplification).
- ``sau-grad`` / ``sau-update``: SAUAdamW with the configured k and alpha, the
  amplification applied to the gradient (the paper's form) or to the update.
- ``unlearn-then-prune``: the dense variant's unlearned model, pruned afterwards; its row
  says whether forgotten answers come back (forget ROUGE before vs after pruning).

In every variant the trainable set is the same: the weights of the decoder blocks'
Linear layers (the ones pruning touches). Embeddings, norms and the LM head are frozen,
so the variants differ only in *which entries* of those weights move.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sau.errors import SAUError
from sau.lab.pipeline_config import OPTION_VARIANTS, VARIANTS, PipelineConfig, load_config_file
from sau.lab.pipeline_steps import (
    evaluate,
    freeze_all_but,
    measured_sparsity,
    optimizer_for,
    prune_as_configured,
    result_row,
    saliency_of,
)
from sau.optim import optimizer_state_bytes

__all__ = [
    "OPTION_VARIANTS",
    "VARIANTS",
    "Inputs",
    "PipelineConfig",
    "load_config_file",
    "run_pipeline",
]


@dataclass
class Inputs:
    """Everything loaded and checked before anything is written.

    model/tok: the target (dense or already pruned); retain_model: the reference for forget
    quality (None: forget quality is not reported); rows: forget / retain required,
    holdout (MIA AUC) and general (utility) optional.
    """

    model: object
    tok: object
    forget: list
    retain: list
    holdout: list | None = None
    general: list | None = None
    retain_model: object | None = None
    source: str = ""

    @classmethod
    def from_default(cls, art, retain_model=None) -> Inputs:
        """The inputs of a built embedded default (`sau.lab.models.build_default`'s result):
        a fresh load of its target model and tokenizer, its forget / retain / holdout /
        general splits, and its retain model (loaded unless one is given)."""
        from sau.lab.models import load_model

        model, tok = load_model(art.target_dir)
        if retain_model is None:
            retain_model, _ = load_model(art.retain_dir)
        split = art.dataset.splits()
        return cls(
            model,
            tok,
            split["forget"],
            split["retain"],
            split["holdout"],
            split["general"],
            retain_model,
            source=str(art.target_dir),
        )


@dataclass
class Results:
    """One pipeline run: variant rows, reference rows, the plan's per-layer stats."""

    config: dict
    rows: list = field(default_factory=list)
    reference: list = field(default_factory=list)
    plan_stats: list = field(default_factory=list)
    plan_totals: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)  # variant -> unlearned model (not saved to JSON)


def run_pipeline(
    inputs: Inputs,
    cfg: PipelineConfig,
    *,
    progress: bool = True,
    work_dir: Path | None = None,
    resume: bool = False,
    references: bool = True,
    log=print,
    data_parallel=None,
) -> Results:
    """Prune (unless cfg.prune == "none"), compute saliency, unlearn and evaluate each variant.

    Args:
        inputs: the loaded models and rows (`Inputs`).
        cfg: PipelineConfig (validated here).
        work_dir: where each variant keeps its checkpoint (work_dir/<variant>/); None: none.
        resume: continue variants from their checkpoints in work_dir.
        references: also evaluate the starting models (target dense and pruned, retain).
        log: one-line progress messages (print, or a no-op).
        data_parallel: a sau.distributed.DataParallel under torchrun: each variant's model
            is sharded with FSDP2 (sau.distributed.shard_model), saliency and unlearning
            split every global batch across ranks, and the unlearned weights are gathered
            to rank 0, which alone evaluates; other ranks return Results without rows.
            Only the SAUAdamW variants (sau, masked, sau-grad, sau-update) run sharded.

    Returns:
        Results; `rows` hold one dict per variant with the keys of results.json.
        The unlearned models are in `Results.models` (not serialised).
    """
    from sau.prune import pruned_masks

    cfg.validate()
    dp = data_parallel
    main = dp is None or dp.is_main  # evaluates and reports
    _check_distributed(cfg, dp)
    torch.manual_seed(cfg.seed)
    model = inputs.model
    names = _trainable_names(inputs)
    freeze_all_but(model, names)
    results = Results(config=asdict(cfg))
    results.config["world_size"] = 1 if dp is None else dp.world
    dense = copy.deepcopy(model)
    if cfg.prune != "none":
        prune_as_configured(model, cfg, inputs, progress)
    masks = pruned_masks(model, names)
    results.config["measured_sparsity"] = measured_sparsity(model, names)
    run = _Run(inputs, cfg, model, dense, names, masks, progress, dp, main, log)
    run.retain_tr = _retain_reference(run, results, references)
    if references and main:
        _starting_rows(run, results)

    t0 = time.perf_counter()
    run.saliency = saliency_of(model, inputs, cfg, names, progress) if dp is None else None
    run.saliency_s = time.perf_counter() - t0

    dense_done = None
    for variant in _run_order(cfg.variants):
        if variant == "unlearn-then-prune":
            _unlearn_then_prune(run, dense_done, results)
            continue
        done = _unlearn_variant(run, variant, results, work_dir, resume)
        if variant == "dense":
            dense_done = done
    results.rows = [r for r in results.rows if r["variant"] in cfg.variants]
    return results


@dataclass
class _Run:
    """What every variant of one pipeline run shares."""

    inputs: Inputs
    cfg: PipelineConfig
    model: object  # the (pruned) starting model
    dense: object  # the model as loaded, before pruning
    names: list
    masks: dict
    progress: bool
    dp: object
    main: bool
    log: object
    retain_tr: object = None
    saliency: object = None
    saliency_s: float = 0.0
    plans: dict = field(default_factory=dict)  # plan settings -> SelectionPlan (optimizer_for)

    def eval(self, model) -> dict:
        return evaluate(
            model, self.inputs.tok, self.inputs, self.cfg, self.retain_tr, self.progress
        )


@dataclass
class _Trained:
    """One variant after unlearning: its model (full on rank 0), optimizer, plan, result."""

    model: object
    opt: object
    plan: object  # a SelectionPlan, or None for plain AdamW
    out: object  # the loop's UnlearnResult


@dataclass
class _Done:
    """The dense variant's outcome, the starting point of unlearn-then-prune."""

    model: object
    seconds: float
    res: dict


def _check_distributed(cfg: PipelineConfig, dp) -> None:
    if dp is not None:
        odd = [v for v in cfg.variants if v not in ("sau", "masked", "sau-grad", "sau-update")]
        if odd:
            raise SAUError(f"variant(s) {', '.join(odd)} do not run under torchrun (FSDP2)")


def _trainable_names(inputs: Inputs) -> list[str]:
    from sau.prune import target_linear_names

    names = target_linear_names(inputs.model)
    if not names:
        raise SAUError(
            f"{inputs.source}: nothing to unlearn: no nn.Linear, Conv1D or fused experts "
            "weight inside the model's decoder blocks"
        )
    return names


def _retain_reference(run: _Run, results: Results, references: bool):
    """Evaluate the retain model (rank 0): its forget truth ratios, or None without one."""
    inputs = run.inputs
    if inputs.retain_model is None or not run.main:
        return None
    run.log("evaluating the retain model (reference for forget quality)")
    ret = evaluate(inputs.retain_model, inputs.tok, inputs, run.cfg, None, run.progress)
    retain_tr = ret["forget_truth_ratio"]
    from sau.lab.eval import forget_quality

    ret["forget_quality"] = forget_quality(retain_tr, retain_tr)
    if references:
        results.reference.append(result_row("retain model", ret, None, None))
    return retain_tr


def _starting_rows(run: _Run, results: Results) -> None:
    """Reference rows of the starting models: target (if pruned here) and target pruned."""
    for label, m, kept in (("target", run.dense, None), ("target pruned", run.model, 1.0)):
        if label == "target" and run.cfg.prune == "none":
            continue
        run.log(f"evaluating the starting model: {label}")
        results.reference.append(result_row(label, run.eval(m), None, kept))


def _run_order(variants) -> list[str]:
    """The variants in order, with dense inserted before unlearn-then-prune (its start)."""
    todo = list(variants)
    if "unlearn-then-prune" in todo and "dense" not in todo:
        todo.insert(todo.index("unlearn-then-prune"), "dense")  # its starting point
    return todo


def _unlearn_then_prune(run: _Run, dense_done: _Done, results: Results) -> None:
    """Prune the dense-unlearned model and record whether forgotten answers come back."""
    from sau.lab.eval import sparsity_integrity

    cfg = run.cfg
    run.log("variant unlearn-then-prune: pruning the dense-unlearned model")
    t0 = time.perf_counter()
    m = copy.deepcopy(dense_done.model)
    if cfg.prune != "none":
        prune_as_configured(m, cfg, run.inputs, run.progress)
    else:  # the user's model was pruned before: reapply its zeros
        with torch.no_grad():
            for n in run.names:
                m.get_parameter(n).masked_fill_(run.masks[n], 0)
    seconds = dense_done.seconds + time.perf_counter() - t0
    res = run.eval(m)
    extra = {
        "forget_rouge_before_prune": dense_done.res["forget_rouge"],
        "forget_quality_before_prune": dense_done.res.get("forget_quality"),
    }
    variant = "unlearn-then-prune"
    results.rows.append(result_row(variant, res, seconds, sparsity_integrity(run.masks, m), extra))
    results.models[variant] = m


def _unlearn_variant(run: _Run, variant: str, results, work_dir, resume) -> _Done | None:
    """Unlearn one variant from its starting model, evaluate it (rank 0) and add its row."""
    from sau.lab.eval import sparsity_integrity

    cfg, dp = run.cfg, run.dp
    run.log(f"variant {variant}: unlearning ({cfg.method}, {cfg.epochs} epochs, lr {cfg.lr})")
    start = run.dense if variant == "dense" else run.model
    m = copy.deepcopy(start)
    torch.manual_seed(cfg.seed)  # same RNG stream for every variant
    t0 = time.perf_counter()
    trained = _train_variant(run, variant, start, m, work_dir, resume)
    if dp is not None and not run.main:
        return None
    m, opt, plan, out = trained.model, trained.opt, trained.plan, trained.out
    seconds = time.perf_counter() - t0 + (run.saliency_s if variant.startswith("sau") else 0.0)
    res = run.eval(m)
    kept = None if variant == "dense" else sparsity_integrity(run.masks, m)
    extra = {
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "final_loss": out.losses[-1] if out.losses else None,
    }
    results.rows.append(result_row(variant, res, seconds, kept, extra))
    results.models[variant] = m
    if plan is not None and variant.startswith("sau") and not results.plan_stats:
        results.plan_stats, results.plan_totals = plan.stats(), plan.totals()
    return _Done(m, seconds, res)


def _train_variant(run: _Run, variant: str, start, m, work_dir, resume) -> _Trained:
    """Run the unlearning loop on m (sharded under torchrun, gathered back to rank 0)."""
    from sau.unlearn.loop import unlearn

    cfg, dp, inputs = run.cfg, run.dp, run.inputs
    sal = run.saliency
    if dp is not None:  # shard this variant's copy; saliency over its shards
        from sau.distributed import shard_model

        shard_model(m, dp)
        sal = saliency_of(m, inputs, cfg, run.names, run.progress, dp)
    plans = run.plans if dp is None else None  # sharded: saliency per variant's shards
    opt, plan = optimizer_for(variant, m, run.names, sal, cfg, plans)
    ref = copy.deepcopy(start) if cfg.kl_weight else None
    ckpt = work_dir / variant if work_dir is not None else None
    out = unlearn(
        m,
        inputs.tok,
        inputs.forget,
        inputs.retain,
        opt,
        cfg.unlearn_config(),
        ref_model=ref,
        checkpoint_dir=ckpt,
        resume=resume,
        progress=run.progress,
        data_parallel=dp,
    )
    if out.interrupted:
        raise KeyboardInterrupt  # the checkpoint (if any) is on disk; the CLI says so
    if dp is not None:  # the full weights, on rank 0 only
        from sau.distributed import gather_full_model

        m = gather_full_model(m, copy.deepcopy(start), dp)
    return _Trained(m, opt, plan, out)
