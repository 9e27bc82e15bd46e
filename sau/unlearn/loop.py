"""The unlearning loop: fixed data order, atomic checkpoints, interrupt and resume.

A run is a fixed sequence of steps whose data order is drawn up front and stored in every
checkpoint (sau.unlearn.checkpoint), so a resumed run sees exactly the batches the
uninterrupted one would have.

SIGINT / SIGTERM during `unlearn` set a flag; the loop checkpoints at the next step
boundary and returns with ``interrupted=True`` and ``stop_signal`` naming the signal (a
second Ctrl-C raises right away).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sau import batching
from sau.errors import RunFailedError, SAUError
from sau.names import METHODS
from sau.settings import INF, check
from sau.unlearn import checkpoint as ckpt
from sau.unlearn import objectives as obj
from sau.unlearn.checkpoint import CHECKPOINT_NAME
from sau.unlearn.sharded_checkpoint import has_sharded_checkpoint, load_sharded, save_sharded
from sau.unlearn.signals import stop_on_signals

__all__ = ["UNLEARN_RANGES", "UnlearnConfig", "UnlearnResult", "unlearn"]


@dataclass
class UnlearnConfig:
    """Settings of one unlearning run.

    Attributes:
        method: "ga" | "graddiff" | "npo" | "simnpo" (see sau.unlearn.objectives).
        epochs: passes over the forget set; batch_size forget rows per step.
        lr: learning rate (only recorded here; the optimizer is built by the caller).
        retain_batch_size: retain rows per step (default batch_size); unused by GA.
        beta: NPO's beta; simnpo_beta, gamma: SimNPO's; retain_weight: weight of the
            retain NLL (GradDiff, NPO, SimNPO); kl_weight: GradDiff's KL to the start.
        seed: the data order's seed.
        checkpoint_every: steps between periodic checkpoints (0: not by steps).
        checkpoint_seconds: seconds of work between periodic checkpoints (0: not by
            time). Either that comes first triggers one; a stop and the end always do.
        joint_forward: compute a two-term loss (GradDiff, NPO/SimNPO with a retain
            term) from one forward over the rows [forget; retain]
            (sau.unlearn.objectives, "joint"). Equal to the separate forwards up to
            float rounding, not bitwise; recommended with SAUAdamW(in_backward=True),
            which saves memory only when each weight is used once per backward. Off by
            default.
    """

    method: str = "graddiff"
    epochs: int = 5
    lr: float = 1e-4
    batch_size: int = 16
    retain_batch_size: int | None = None
    beta: float = 0.1
    simnpo_beta: float = 2.5
    gamma: float = 0.0
    retain_weight: float = 1.0
    kl_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 0
    checkpoint_seconds: float = 60.0
    joint_forward: bool = False

    def validate(self) -> None:
        """Raise SAUError for a setting of the wrong type or one no run can use."""
        check(self, {**UNLEARN_RANGES, "method": METHODS})


UNLEARN_RANGES = {  # (lo, hi, lo_open, hi_open); types come from the annotations
    "epochs": (1, INF, False, False),
    "lr": (0.0, INF, True, False),
    "batch_size": (1, INF, False, False),
    "retain_batch_size": (1, INF, False, False),
    "beta": (0.0, INF, True, False),
    "simnpo_beta": (0.0, INF, True, False),
    "gamma": (0.0, INF, False, False),
    "retain_weight": (0.0, INF, False, False),
    "kl_weight": (0.0, INF, False, False),
    "seed": (0, 2**63 - 1, False, False),
    "checkpoint_every": (0, INF, False, False),
    "checkpoint_seconds": (0.0, INF, False, False),
}


# Settings that must match for a checkpoint to be resumed: all but when it checkpoints
# (those may change between the interrupted and the resumed run).
_RESUME_KEYS = tuple(
    f.name
    for f in fields(UnlearnConfig)
    if f.name not in ("checkpoint_every", "checkpoint_seconds")
)


@dataclass
class UnlearnResult:
    """What `unlearn` did: steps done of steps planned, per-step losses, and whether it
    stopped early (a resumable checkpoint is then on disk when a directory was given).
    stop_signal: the signal number that stopped it (SIGINT, SIGTERM; under torchrun any
    rank's), None when it ran to its end or `should_stop` stopped it."""

    steps_done: int
    total_steps: int
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    checkpoint: Path | None = None
    stop_signal: int | None = None


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _ref_logprobs(model, encoded, pad_id: int, batch_size: int) -> torch.Tensor:
    was = model.training
    model.eval()  # dropout off: the reference is a property of the starting weights
    out = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = batching.collate(encoded[start : start + batch_size], pad_id)
            out.append(obj.sequence_logprobs(model, batch)[0].cpu())
    model.train(was)
    return torch.cat(out)


def _loss(config, model, forget, retain, ref_logp, ref_model) -> torch.Tensor:
    """config.method's loss on one step's batches (sau.unlearn.objectives.objective_loss)."""
    return obj.objective_loss(
        config.method,
        model,
        forget,
        retain,
        ref_logp=ref_logp,
        ref_model=ref_model,
        beta=config.simnpo_beta if config.method == "simnpo" else config.beta,
        gamma=config.gamma,
        retain_weight=config.retain_weight,
        kl_weight=config.kl_weight,
        joint=config.joint_forward,
    )


@dataclass
class _Run:
    """What one call of `unlearn` carries from step to step."""

    config: UnlearnConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ref_model: object
    dp: object  # sau.distributed.DataParallel or None
    checkpoint_dir: str | os.PathLike | None
    path: Path | None  # the single-file checkpoint (None: no checkpoints)
    pad_id: int
    f_enc: list
    r_enc: list
    params: dict
    cfg: dict  # the settings a checkpoint must match to be resumed
    order: dict = field(default_factory=dict)
    ref_logp: torch.Tensor | None = None
    start: int = 0
    losses: list[float] = field(default_factory=list)


def _check_inputs(config: UnlearnConfig, forget_rows, retain_rows, ref_model) -> None:
    config.validate()
    if not forget_rows:
        raise SAUError("the forget set is empty")
    if config.method != "ga" and not retain_rows:
        raise SAUError(f"method {config.method} needs retain rows, and the retain set is empty")
    if config.method == "graddiff" and config.kl_weight and ref_model is None:
        raise SAUError("GradDiff with a KL term needs the starting model (ref_model)")


def _new_run(
    config, model, tok, forget_rows, retain_rows, optimizer, ref_model, dp, checkpoint_dir
) -> _Run:
    """The run's state before its first step: encoded rows, trainable parameters, the
    checkpoint path and the settings a checkpoint must match (GA reads no retain rows)."""
    f_enc = batching.encode_rows(tok, forget_rows)
    r_enc = batching.encode_rows(tok, retain_rows) if config.method != "ga" else []
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    return _Run(config, model, optimizer, ref_model, dp, checkpoint_dir, path,
                batching.pad_id(tok), f_enc, r_enc, _trainable(model),
                _resume_key(config, f_enc, r_enc))  # fmt: skip


def _resume_key(config: UnlearnConfig, f_enc: list, r_enc: list) -> dict:
    cfg = {k: v for k, v in asdict(config).items() if k in _RESUME_KEYS}
    cfg["data"] = ckpt.rows_digest(f_enc, r_enc)  # other rows, same settings: another run
    return cfg


def _settings_differ(where, saved: dict, cfg: dict, *, name_rows: bool) -> None:
    if saved == cfg:
        return
    diff = [k for k in cfg if saved.get(k) != cfg[k]]
    if name_rows:
        diff = ", ".join("forget/retain rows" if k == "data" else k for k in diff)
    raise SAUError(f"{where}: checkpoint was made with other settings ({diff})")


_LOOP_KEYS = ("config", "step", "rng", "order", "ref_logp", "losses")


def _check_loop_state(where, state: dict, run: _Run, *, name_rows: bool) -> None:
    """Refuse (one SAUError line, the same on every rank) a checkpoint's loop state that
    this run cannot continue from: missing fields, other settings or rows, a data order
    other than the one its seed draws, a step outside the run, a loss log or NPO's
    reference log-probs that do not fit."""
    missing = [k for k in _LOOP_KEYS if k not in state]
    if missing or not isinstance(state["config"], dict):
        raise SAUError(
            f"{where}: not a sau checkpoint (missing or bad {', '.join(missing) or 'config'}); "
            "start the run over (sau unlearn: --force instead of --resume)"
        )
    _settings_differ(where, state["config"], run.cfg, name_rows=name_rows)
    want = ckpt.data_order(run.config, len(run.f_enc), len(run.r_enc))
    order, step, losses, ref = (state[k] for k in ("order", "step", "losses", "ref_logp"))
    bad = []
    if not (isinstance(order, dict) and order.get("steps") == want["steps"]) or not all(
        isinstance(order.get(k), torch.Tensor) and torch.equal(order[k], want[k])
        for k in ("forget", "retain")
    ):
        bad.append("data order")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= want["steps"]:
        bad.append("step")
    elif not (isinstance(losses, list) and len(losses) == step):
        bad.append("loss log")
    elif not all(isinstance(x, float) for x in losses):
        bad.append("loss log")
    if (ref is None) != (run.config.method != "npo") or not (
        ref is None or (isinstance(ref, torch.Tensor) and ref.shape == (len(run.f_enc),))
    ):
        bad.append("reference log-probs")
    if bad:
        raise SAUError(
            f"{where}: checkpoint's {', '.join(bad)} do not fit this run; start the run over "
            "(sau unlearn: --force instead of --resume)"
        )


def _check_checkpoint_kind(run: _Run, sharded: bool) -> None:
    """Refuse to resume a sharded checkpoint in one process, or a single-process one
    under torchrun (which would otherwise start over unasked); the same on every rank."""
    where, error = run.checkpoint_dir, None
    if sharded and run.dp is None:
        error = (
            f"{where}: this run was checkpointed under torchrun; resume it with "
            "torchrun --nproc-per-node N (any N)"
        )
    single = run.path is not None and run.path.is_file()
    if run.dp is not None and not sharded and single:
        error = (
            f"{run.path}: this run was checkpointed in one process; resume it without "
            "torchrun (or start over with --force)"
        )
    if run.dp is not None:
        run.dp.raise_first(error)
    elif error:
        raise SAUError(error)


def _load_sharded_state(run: _Run) -> dict:
    """The sharded checkpoint loaded and its loop state checked on every rank; any rank's
    refusal is every rank's (one line: sau.distributed.DataParallel.raise_first)."""
    where, error, state = run.checkpoint_dir, None, None
    try:
        state = load_sharded(where, run.params, run.optimizer)
        _check_loop_state(where, state, run, name_rows=False)
        _set_rng(where, state["rng"])
    except SAUError as err:
        error = str(err)
    run.dp.raise_first(error)
    return state


def _set_rng(where, rng) -> None:
    try:
        ckpt.set_rng_state(rng)
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as err:
        raise SAUError(f"{where}: checkpoint's RNG state is unusable: {err}") from None


def _start(run: _Run, resume: bool) -> None:
    """Fill run.order, ref_logp, start and losses: from a checkpoint when resuming one,
    else a fresh data order at step 0."""
    dp, where = run.dp, run.checkpoint_dir
    sharded = where is not None and has_sharded_checkpoint(where)
    if resume:
        _check_checkpoint_kind(run, sharded)
    if resume and dp is not None and sharded:
        state = _load_sharded_state(run)
    elif resume and dp is None and run.path is not None and run.path.is_file():
        state = ckpt.load_checkpoint(run.path)
        _check_loop_state(run.path, state, run, name_rows=True)
        ckpt.restore(run.path, state, run.params, run.optimizer)
    else:
        c = run.config
        run.order = ckpt.data_order(c, len(run.f_enc), len(run.r_enc))
        if c.method == "npo":
            run.ref_logp = _ref_logprobs(run.model, run.f_enc, run.pad_id, c.batch_size)
        return
    run.order, run.ref_logp = state["order"], state["ref_logp"]
    run.start, run.losses = state["step"], list(state["losses"])


def _save(run: _Run, step: int) -> None:
    if run.path is None:
        return
    meta = {
        "config": run.cfg,
        "step": step,
        "rng": ckpt.rng_state(),
        "order": run.order,
        "ref_logp": run.ref_logp,
        "losses": run.losses,
    }
    if run.dp is not None:
        save_sharded(run.checkpoint_dir, run.dp, run.params, run.optimizer, meta)
        return
    weights = {n: p.detach().cpu().clone() for n, p in run.params.items()}
    payload = {**meta, "weights": weights, "optimizer": run.optimizer.state_dict()}
    ckpt.save_atomic({k: payload[k] for k in ckpt.CHECKPOINT_KEYS}, run.path)


def _train_step(run: _Run, step: int) -> float:
    """One step: this step's batches, the loss, zero_grad, backward, optimizer.step."""
    c, dp = run.config, run.dp
    f_idx = ckpt.forget_rows_of(run.order, step, c.batch_size)
    r_idx = run.order["retain"][step].tolist() if run.r_enc else []
    if dp is None:
        forget = batching.collate([run.f_enc[i] for i in f_idx], run.pad_id)
        retain = batching.collate([run.r_enc[i] for i in r_idx], run.pad_id) if run.r_enc else None
    else:  # this rank's slice of the global batch (sau.distributed); an empty slice's
        # placeholder row carries loss_weight 0, which weighs that batch's terms only
        forget = dp.batch(run.f_enc, f_idx, run.pad_id)[0]
        retain = dp.batch(run.r_enc, r_idx, run.pad_id)[0] if run.r_enc else None
        f_idx = dp.rows(f_idx)[0]
    ref = run.ref_logp[f_idx] if run.ref_logp is not None else None
    loss = _loss(c, run.model, forget, retain, ref, run.ref_model)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    return float(loss.detach()) if dp is None else dp.mean(loss)


def _agree(run: _Run, flag: bool) -> bool:
    """`flag` as all ranks agree on it (any rank's True), or as is on one process."""
    return run.dp.any(flag) if run.dp is not None else flag


def _agree_stop(run: _Run, stop: bool, signum: int | None) -> tuple[bool, int | None]:
    """(stop, the signal behind it) as all ranks agree: any rank's stop, the largest
    signal number any rank received (SIGTERM over SIGINT); as is on one process."""
    if run.dp is None:
        return stop, signum
    got = run.dp.max([float(stop), float(signum or 0)])
    return bool(got[0]), (int(got[1]) or None)


def _steps(run: _Run, should_stop, progress: bool) -> tuple[int, bool, int | None]:
    """Run the steps from run.start with periodic checkpoints; (steps done, stopped
    early, the signal that stopped it or None)."""
    c, total, step = run.config, run.order["steps"], run.start
    last_save = time.monotonic()
    bar = tqdm(total=total, initial=step, desc=f"unlearn ({c.method})", unit="step",
               disable=not progress)  # fmt: skip
    with stop_on_signals() as flag, bar:
        while step < total:
            stop = flag.requested or (should_stop is not None and should_stop(step))
            stop, signum = _agree_stop(run, stop, flag.signum)  # ranks stop at one step
            if stop:
                return step, True, signum
            run.losses.append(_train_step(run, step))
            step += 1
            bar.set_postfix(loss=f"{run.losses[-1]:.3f}", refresh=False)
            bar.update(1)
            by_steps = c.checkpoint_every and step % c.checkpoint_every == 0
            by_time = c.checkpoint_seconds and time.monotonic() - last_save >= c.checkpoint_seconds
            if _agree(run, bool(by_steps or by_time) and step < total):  # clocks differ
                _save(run, step)
                last_save = time.monotonic()
    return step, False, None


def _finish(run: _Run, step: int) -> None:
    """After the last step done: drop the gradients, let SAUAdamW warn of skipped NaN/inf
    gradient entries, refuse a run whose every loss was NaN or inf (RunFailedError, no
    checkpoint), then write the final checkpoint."""
    run.optimizer.zero_grad(set_to_none=True)
    if hasattr(run.optimizer, "nonfinite_count"):
        run.optimizer.nonfinite_count()
    if run.losses and not any(math.isfinite(x) for x in run.losses):
        raise RunFailedError(
            f"the loss was NaN or inf at every one of the {len(run.losses)} steps: no usable "
            "update was made (check the model's weights and the loss weights)"
        )
    _save(run, step)


def unlearn(
    model,
    tok,
    forget_rows: Sequence[dict],
    retain_rows: Sequence[dict],
    optimizer: torch.optim.Optimizer,
    config: UnlearnConfig,
    *,
    ref_model=None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    should_stop: Callable[[int], bool] | None = None,
    progress: bool = True,
    data_parallel=None,
) -> UnlearnResult:
    """Run (or resume) `config.method` on `model` with `optimizer` for the planned steps.

    The model's parameters with ``requires_grad`` are the trainable set (the optimizer
    must hold exactly those it should update); only they are checkpointed, so on resume
    the caller rebuilds the model the same way (load, prune) and this function restores
    the trained values, the optimizer state, RNG states and position in the data order.

    Args:
        model, tok: a causal LM and its tokenizer.
        forget_rows, retain_rows: QA dicts (question, answer).
        optimizer: any torch optimizer over the model's trainable parameters; one that
            steps inside backward (SAUAdamW(in_backward=True)) too (with a two-term method
            set config.joint_forward, or the retain pass's gradients stay buffered).
        config: UnlearnConfig.
        ref_model: the frozen starting model, needed only for GradDiff with kl_weight > 0.
        checkpoint_dir: where checkpoint.pt lives; None: no checkpoints.
        resume: continue from checkpoint_dir/checkpoint.pt if it exists.
        should_stop: called with the number of steps done at each step boundary; True
            stops like a signal does (checkpoint, return interrupted). For tests.
        progress: tqdm bar over steps.
        data_parallel: a sau.distributed.DataParallel when the model is FSDP2-sharded
            (under torchrun): each global batch is split across ranks, stops agree across
            ranks, and checkpoints are sharded ones (sau.unlearn.sharded_checkpoint) that
            resume on any number of ranks. The optimizer must then be a SAUAdamW.

    Returns:
        UnlearnResult. A final checkpoint (steps_done == total_steps) is written too, so
        a run interrupted after the loop resumes straight to what follows it.

    Raises:
        SAUError: a config no run can use, no forget rows, no retain rows for a method
            with a retain term, GradDiff's KL term without ref_model, or a checkpoint that
            does not fit this run (settings, rows, data order, parameters, optimizer).
        RunFailedError: the loss was NaN or inf at every step (no final checkpoint).
    """
    _check_inputs(config, forget_rows, retain_rows, ref_model)
    run = _new_run(config, model, tok, forget_rows, retain_rows, optimizer, ref_model,
                   data_parallel, checkpoint_dir)  # fmt: skip
    _start(run, resume)
    was_training = model.training
    model.train()
    step, interrupted, signum = _steps(run, should_stop, progress)
    model.train(was_training)
    _finish(run, step)
    return UnlearnResult(step, run.order["steps"], run.losses, interrupted, run.path, signum)
