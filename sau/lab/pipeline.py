"""The end-to-end pipeline of `sau demo` and `sau unlearn`: load, prune, saliency, plan,
unlearn, evaluate, one row per variant (`sau.lab.variants`; each starts from the same
loaded model and the same data order).

In every variant the trainable set is the same: the weights of the decoder blocks'
Linear layers (the ones pruning touches). Embeddings, norms and the LM head are frozen,
so the variants differ only in *which entries* of those weights move. unlearn-then-prune
is the dense variant's unlearned model, pruned afterwards; its row says whether forgotten
answers come back (forget ROUGE before vs after pruning).

Precision: the models are in the run's dtype (float32 or bfloat16) from pruning on;
saliency is accumulated in float32 and losses and evaluation scores are computed in
float32 from the logits whatever the dtype. SAUAdamW stores each step into bfloat16
weights with the run's rounding and keeps its moments in the run's state_bits; the
torch AdamW variants (dense, unlearn-then-prune) use neither (`build_optimizer`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from sau.distributed import gather_full_model, shard_model
from sau.errors import RunFailedError, SAUError
from sau.lab.durable import durable_step_
from sau.lab.eval import NonFiniteScoresError, forget_quality, sparsity_integrity
from sau.lab.inputs import Inputs
from sau.lab.steps import (
    activation_checkpointing,
    evaluate,
    forget_saliency,
    freeze_all_but,
    measured_sparsity,
    prune_on_inputs,
    result_row,
    trainable_names,
)
from sau.lab.variants import (
    DEFAULT_VARIANTS,
    DTYPES,
    VARIANTS,
    build_optimizer,
    plan_for,
    precision_settings,
)
from sau.names import LAYER_AMPLIFY_MODES, METHODS, PRUNE_CHOICES, ROUNDINGS, STATE_BITS
from sau.optim import optimizer_state_bytes
from sau.prune import pruned_masks
from sau.settings import INF, check
from sau.unlearn.loop import UNLEARN_RANGES, UnlearnConfig, unlearn
from sau.unlearn.signals import Stopped

__all__ = ["PipelineConfig", "Results", "load_config_file", "run_pipeline"]


@dataclass
class PipelineConfig(UnlearnConfig):
    """Every knob of one pipeline run (a JSON config file may set any of these).

    The unlearning loop's settings (method, epochs, lr, batch_size, retain_batch_size,
    beta, simnpo_beta, gamma, retain_weight, kl_weight, seed, checkpoint_every,
    checkpoint_seconds, joint_forward) are UnlearnConfig's, inherited with its checks;
    only the learning rate's default differs (1e-3, sized for the embedded default on a
    2-core CPU). prune="none" takes the model as already pruned (its exact zeros are the
    pruned set).

    dtype: the dtype of the models' weights, "float32" or "bfloat16" (module docstring).
    rounding: how SAUAdamW stores a step into bfloat16 weights, one of
    sau.names.ROUNDINGS; state_bits: its moments, 32 (float32) or 8 (block-scaled).
    The run's seed also seeds SAUAdamW's stochastic rounding.
    saliency_memory: None, or the most bytes of saliency accumulators at a time (an int
    >= 1): the saliency pass scores the weights in groups, one pass over the forget rows
    each (`sau.compute_saliency(max_accumulator_bytes=)`); the result is bitwise the same.
    """

    lr: float = 1e-3
    prune: str = "magnitude"
    sparsity: float = 0.5
    nm: tuple | None = None  # (n, m), e.g. (2, 4): N:M pattern instead of `sparsity`
    k: float = 0.3
    alpha: float = 0.1
    w_max: float = 10.0
    amplify: str = "update"  # for the "sau" variant, which takes the run's amplify
    in_backward: bool = False  # SAUAdamW steps inside backward (masked / SAU variants)
    compact_grads: bool = False  # SAUAdamW keeps grad[G] only (masked / SAU variants)
    gradient_checkpointing: bool = False  # recompute activations in backward
    dtype: str = "float32"
    rounding: str = "kahan"
    state_bits: int = 32
    quick: bool = False
    variants: tuple = DEFAULT_VARIANTS
    eval_retain_rows: int = 96
    eval_batch_size: int = 32
    max_new_tokens: int = 24
    saliency_memory: int | None = None

    def validate(self) -> None:
        """Raise SAUError (one line) for any setting of the wrong type or outside its range."""
        rules = {**UNLEARN_RANGES, **_RANGES, "method": METHODS, "variants": tuple(VARIANTS)}
        check(self, rules, label=lambda name: _FLAGS.get(name, name))
        if self.in_backward and self.compact_grads:
            raise SAUError("--in-backward and --compact-grads exclude each other: pick one")
        if self.in_backward and not self.joint_forward and self._two_forwards():
            raise SAUError(
                f"--in-backward with {self.method} (a retain term) saves no memory with two "
                "forward passes (every weight's gradient stays buffered until backward ends): "
                "add --joint-forward (equal up to rounding), or use --compact-grads"
            )
        if self.state_bits not in STATE_BITS:  # int choices: `check` takes only string ones
            bits = ", ".join(map(str, STATE_BITS))
            raise SAUError(f"--state-bits must be among {bits}, got {self.state_bits!r}")
        if self.nm is not None:
            nm = tuple(self.nm)
            ints = all(isinstance(v, int) and not isinstance(v, bool) for v in nm)
            if len(nm) != 2 or not ints or not 0 < nm[0] <= nm[1]:
                raise SAUError(f"nm must be [n, m] with 0 < n <= m, e.g. [2, 4], got {self.nm}")

    def _two_forwards(self) -> bool:
        """The loss takes a forget and a retain forward pass (GradDiff, NPO and SimNPO
        with a retain weight), unless joint_forward."""
        return self.method != "ga" and bool(self.retain_weight)

    def unlearn_config(self) -> UnlearnConfig:
        """The loop's part of this config, as the UnlearnConfig `sau.unlearn` takes."""
        return UnlearnConfig(**{f.name: getattr(self, f.name) for f in fields(UnlearnConfig)})


# Ranges (lo, hi, lo_open, hi_open) and allowed values of PipelineConfig's fields; types
# come from the annotations (sau.settings.check). NaN and inf are refused everywhere.
_RANGES = {
    "prune": PRUNE_CHOICES,
    "amplify": LAYER_AMPLIFY_MODES,
    "dtype": DTYPES,
    "rounding": ROUNDINGS,
    "sparsity": (0.0, 1.0, False, True),
    "k": (0.0, 1.0, True, False),
    "alpha": (0.0, INF, False, False),
    "w_max": (1.0, INF, False, False),
    "eval_retain_rows": (1, INF, False, False),
    "eval_batch_size": (1, INF, False, False),
    "max_new_tokens": (1, INF, False, False),
    "saliency_memory": (1, INF, False, False),
}
# Settings that are also command-line options are named as the user typed them.
_FLAGS = {n: f"--{n}" for n in ("method", "prune", "sparsity", "k", "alpha", "lr", "epochs")}
_FLAGS.update(
    seed="--seed",
    amplify="--amplify",
    dtype="--dtype",
    rounding="--rounding",
    state_bits="--state-bits",
    saliency_memory="--saliency-memory",
)


def load_config_file(path: str, base: PipelineConfig) -> PipelineConfig:
    """`base` with the keys of the JSON object in `path` applied; unknown keys are errors."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SAUError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SAUError(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise SAUError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise SAUError(f"{path}: expected a JSON object of settings")
    known = {f.name: f for f in fields(PipelineConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SAUError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    if isinstance(data.get("variants"), list):
        data["variants"] = tuple(data["variants"])
    if isinstance(data.get("nm"), list):
        data["nm"] = tuple(data["nm"])
    return PipelineConfig(**{**asdict(base), **data})


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
        inputs: the loaded models and rows (`Inputs`), best loaded in cfg.dtype already
            (`Inputs.from_files(..., dtype=)`); models of another dtype are cast copies
            (`Inputs.cast`), and then those copies, not inputs.model, are pruned.
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
        Results; `rows` hold one dict per variant with the keys of results.json,
        among them the dtype, rounding and state_bits the variant ran with
        (`sau.lab.variants.precision_settings`). The unlearned models are in
        `Results.models` (not serialised).
    """
    cfg.validate()
    _check_distributed(cfg, data_parallel)
    inputs = inputs.cast(cfg.dtype)
    torch.manual_seed(cfg.seed)
    results = Results(config=asdict(cfg))
    run = _start(inputs, cfg, results, progress, data_parallel, log)
    run.retain_tr = _retain_reference(run, results, references)
    if references and run.main:
        _starting_rows(run, results)
    t0 = time.perf_counter()
    run.saliency = _saliency(run, run.model) if data_parallel is None else None
    run.saliency_s = time.perf_counter() - t0

    dense_done = None
    for variant in _run_order(cfg.variants):
        if VARIANTS[variant].prune_after:
            _unlearn_then_prune(run, variant, dense_done, results)
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
    losses: list = field(default_factory=list)  # the latest variant's loss log

    def eval(self, model, variant: str | None = None) -> dict:
        """`evaluate` of `model`: an unlearned `variant`'s, or a starting model (None).

        Raises:
            RunFailedError: the variant diverged (its outputs are NaN or inf).
            SAUError: a starting model whose outputs are NaN or inf.
        """
        what = f"variant {variant}" if variant else "the starting model"
        with _finite_outputs(what, diverged=variant is not None, losses=self.losses):
            return evaluate(model, self.inputs, self.cfg, self.retain_tr, self.progress)


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


def _start(inputs: Inputs, cfg: PipelineConfig, results: Results, progress, dp, log) -> _Run:
    """Freeze all but the trainable weights, keep a dense copy and prune the target in
    place: what every variant starts from."""
    model = inputs.model
    names = trainable_names(inputs)
    freeze_all_but(model, names)
    results.config["world_size"] = 1 if dp is None else dp.world
    dense = copy.deepcopy(model)
    if cfg.prune != "none":
        _prune_as_configured(model, cfg, inputs, progress)
    masks = pruned_masks(model, names)
    results.config["measured_sparsity"] = measured_sparsity(model, names)
    main = dp is None or dp.is_main  # evaluates and reports
    return _Run(inputs, cfg, model, dense, names, masks, progress, dp, main, log)


@contextlib.contextmanager
def _finite_outputs(what: str, *, diverged: bool, losses=()):
    """Turn evaluation's NaN / inf scores into one line: a diverged run (RunFailedError,
    exit 1: an unlearned model) or a broken input model (SAUError, exit 2)."""
    try:
        yield
    except NonFiniteScoresError as err:
        if not diverged:
            raise SAUError(f"{what}: {err} (NaN, inf or overflowing weights)") from None
        bad = [i for i, x in enumerate(losses) if not math.isfinite(x)]
        where = ""
        if bad:
            where = f"; the loss was first NaN or inf at step {bad[0] + 1} of {len(losses)}"
        raise RunFailedError(
            f"{what} diverged: after unlearning {err}{where}; lower --lr (nothing was saved)"
        ) from None


def _check_distributed(cfg: PipelineConfig, dp) -> None:
    if dp is not None:
        odd = [v for v in cfg.variants if not VARIANTS[v].sharded]
        if odd:
            raise SAUError(f"variant(s) {', '.join(odd)} do not run under torchrun (FSDP2)")


def _prune_as_configured(model, cfg: PipelineConfig, inputs: Inputs, progress: bool):
    """Prune `model` in place as cfg says (method, sparsity or N:M)."""
    nm = tuple(cfg.nm) if cfg.nm else None
    return prune_on_inputs(model, cfg.prune, cfg.sparsity, nm, inputs, progress)


def _contrast(cfg: PipelineConfig) -> float | None:
    """Lambda of the contrastive score when a variant of the run selects by it."""
    lams = [VARIANTS[v].contrast for v in cfg.variants if VARIANTS[v].contrast is not None]
    return lams[0] if lams else None


def _saliency(run: _Run, model):
    """Forget-set saliency of `model` (this rank's shards under torchrun)."""
    cfg = run.cfg
    saliency = forget_saliency(
        model,
        run.inputs,
        run.names,
        cfg.batch_size,
        contrast=_contrast(cfg),
        progress=run.progress,
        dp=run.dp,
        max_accumulator_bytes=cfg.saliency_memory,
    )
    if cfg.saliency_memory is not None:
        run.log(
            f"saliency: {saliency.passes} pass(es) over the forget rows, at most "
            f"{cfg.saliency_memory} bytes of accumulators at a time"
        )
    return saliency


def _retain_reference(run: _Run, results: Results, references: bool):
    """Evaluate the retain model (rank 0): its forget truth ratios, or None without one."""
    inputs = run.inputs
    if inputs.retain_model is None or not run.main:
        return None
    run.log("evaluating the retain model (reference for forget quality)")
    with _finite_outputs("the retain model", diverged=False):
        ret = evaluate(inputs.retain_model, inputs, run.cfg, None, run.progress)
    retain_tr = ret["forget_truth_ratio"]
    ret["forget_quality"] = forget_quality(retain_tr, retain_tr)
    if references:
        results.reference.append(result_row("retain model", ret, None, None, _precision(run)))
    return retain_tr


def _starting_rows(run: _Run, results: Results) -> None:
    """Reference rows of the starting models: target (if pruned here) and target pruned."""
    for label, m, kept in (("target", run.dense, None), ("target pruned", run.model, 1.0)):
        if label == "target" and run.cfg.prune == "none":
            continue
        run.log(f"evaluating the starting model: {label}")
        results.reference.append(result_row(label, run.eval(m), None, kept, _precision(run)))


def _precision(run: _Run, variant: str | None = None) -> dict:
    """The dtype, rounding and state_bits columns of a row: of `variant`, or of a starting
    model (None)."""
    cfg = run.cfg
    return precision_settings(variant, cfg.dtype, cfg.rounding, cfg.state_bits)


def _run_order(variants) -> list[str]:
    """The variants in order, with dense inserted before the first prune-after variant
    (its starting point)."""
    todo = list(variants)
    after = [v for v in todo if VARIANTS[v].prune_after]
    if after and "dense" not in todo:
        todo.insert(todo.index(after[0]), "dense")
    return todo


def _unlearn_then_prune(run: _Run, variant: str, dense_done: _Done, results: Results) -> None:
    """Prune the dense-unlearned model and record whether forgotten answers come back."""
    cfg = run.cfg
    run.log(f"variant {variant}: pruning the dense-unlearned model")
    t0 = time.perf_counter()
    m = copy.deepcopy(dense_done.model)
    if cfg.prune != "none":
        _prune_as_configured(m, cfg, run.inputs, run.progress)
    else:  # the user's model was pruned before: reapply its zeros
        with torch.no_grad():
            for n in run.names:
                m.get_parameter(n).masked_fill_(run.masks[n], 0)
    seconds = dense_done.seconds + time.perf_counter() - t0
    res = run.eval(m, variant)
    extra = {
        "forget_rouge_before_prune": dense_done.res["forget_rouge"],
        "forget_quality_before_prune": dense_done.res.get("forget_quality"),
        **_precision(run, variant),
    }
    results.rows.append(result_row(variant, res, seconds, sparsity_integrity(run.masks, m), extra))
    results.models[variant] = m


def _unlearn_variant(run: _Run, variant: str, results, work_dir, resume) -> _Done | None:
    """Unlearn one variant from its starting model, evaluate it (rank 0) and add its row."""
    cfg, dp = run.cfg, run.dp
    run.log(f"variant {variant}: unlearning ({cfg.method}, {cfg.epochs} epochs, lr {cfg.lr})")
    dense = VARIANTS[variant].start == "dense"
    start = run.dense if dense else run.model
    m = copy.deepcopy(start)
    torch.manual_seed(cfg.seed)  # same RNG stream for every variant
    t0 = time.perf_counter()
    trained = _train_variant(run, variant, start, m, work_dir, resume)
    if dp is not None and not run.main:
        return None
    m, opt, plan, out = trained.model, trained.opt, trained.plan, trained.out
    if VARIANTS[variant].durable:  # sau-durable's post-step (docs/method.md)
        durable_step_(m, start, run.names, plan)
    seconds = time.perf_counter() - t0 + (run.saliency_s if variant.startswith("sau") else 0.0)
    run.losses = out.losses
    res = run.eval(m, variant)
    kept = None if dense else sparsity_integrity(run.masks, m)
    extra = {
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "final_loss": out.losses[-1] if out.losses else None,
        **_precision(run, variant),
    }
    results.rows.append(result_row(variant, res, seconds, kept, extra))
    results.models[variant] = m
    if plan is not None and variant.startswith("sau") and not results.plan_stats:
        results.plan_stats, results.plan_totals = plan.stats(), plan.totals()
    return _Done(m, seconds, res)


def _optimizer(run: _Run, variant: str, m, saliency):
    """(optimizer, plan or None) of `variant` over m's trainable weights."""
    cfg = run.cfg
    named = {n: m.get_parameter(n) for n in run.names}
    plan = None
    if VARIANTS[variant].optimizer == "sau":
        plans = run.plans if run.dp is None else None  # sharded: a plan per variant's shards
        plan = plan_for(
            variant, named, saliency, k=cfg.k, alpha=cfg.alpha, w_max=cfg.w_max, cache=plans
        )
    opt = build_optimizer(
        variant,
        list(named.values()),
        plan,
        lr=cfg.lr,
        amplify=cfg.amplify,
        in_backward=cfg.in_backward,
        compact_grads=cfg.compact_grads,
        rounding=cfg.rounding,
        state_bits=cfg.state_bits,
        seed=cfg.seed,
    )
    return opt, plan


def _train_variant(run: _Run, variant: str, start, m, work_dir, resume) -> _Trained:
    """Run the unlearning loop on m (sharded under torchrun, gathered back to rank 0)."""
    cfg, dp, inputs = run.cfg, run.dp, run.inputs
    sal = run.saliency
    if dp is not None:  # shard this variant's copy; saliency over its shards
        shard_model(m, dp)
        sal = _saliency(run, m)
    opt, plan = _optimizer(run, variant, m, sal)
    ref = copy.deepcopy(start) if cfg.kl_weight else None
    ckpt = work_dir / variant if work_dir is not None else None
    with activation_checkpointing(m, cfg.gradient_checkpointing):
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
    if out.interrupted:  # the checkpoint (if any) is on disk; the CLI says so
        raise Stopped(out.stop_signal) if out.stop_signal else KeyboardInterrupt
    if dp is not None:  # the full weights, on rank 0 only
        m = gather_full_model(m, copy.deepcopy(start), dp)
    return _Trained(m, opt, plan, out)
