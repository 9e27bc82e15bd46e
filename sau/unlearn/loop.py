"""The unlearning loop: fixed data order, atomic checkpoints, interrupt and resume.

A run is a fixed sequence of steps. Its whole data order (forget permutations per epoch,
retain rows per step) is drawn up front from ``config.seed`` and stored in every
checkpoint, so a resumed run sees exactly the batches the uninterrupted one would have.
A checkpoint holds the trainable weights, the optimizer's state_dict, the step, the RNG
states (torch, Python), the data order, NPO's reference log-probs and the loss log; it is
written to a temporary file in the same directory and moved into place with os.replace,
so the file on disk is always a complete checkpoint, never half of one.

SIGINT / SIGTERM during `unlearn` set a flag; the loop checkpoints at the next step
boundary and returns with ``interrupted=True`` (a second Ctrl-C raises right away).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sau import batching
from sau.errors import RunFailedError, SAUError
from sau.settings import INF, check
from sau.unlearn import objectives as obj
from sau.unlearn.joint import joint_loss
from sau.unlearn.sharded_checkpoint import has_sharded_checkpoint, load_sharded, save_sharded

__all__ = ["CHECKPOINT_NAME", "UnlearnConfig", "UnlearnResult", "stop_on_signals", "unlearn"]

CHECKPOINT_NAME = "checkpoint.pt"
# Settings that must match for a checkpoint to be resumed (others, like checkpoint_every
# or progress, may change between the interrupted and the resumed run).
_RESUME_KEYS = (
    "method",
    "epochs",
    "lr",
    "batch_size",
    "retain_batch_size",
    "beta",
    "simnpo_beta",
    "gamma",
    "retain_weight",
    "kl_weight",
    "seed",
)


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
            (sau.unlearn.joint). Equal up to float rounding, not bitwise; recommended
            with SAUAdamW(in_backward=True), which saves memory only when each weight is
            used once per backward. Off by default (results stay bitwise as before).
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
        check(self, {**_RANGES, "method": obj.METHODS})


_RANGES = {  # (lo, hi, lo_open, hi_open); types come from the annotations
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


@dataclass
class UnlearnResult:
    """What `unlearn` did: steps done of steps planned, per-step losses, and whether it
    stopped early (a resumable checkpoint is then on disk when a directory was given)."""

    steps_done: int
    total_steps: int
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    checkpoint: Path | None = None


class _StopFlag:
    requested = False


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """Context manager yielding a flag whose ``.requested`` turns True on SIGINT/SIGTERM.

    The first signal only sets the flag (the loop stops at the next step boundary, after
    a checkpoint); a second SIGINT raises KeyboardInterrupt at once. Outside the main
    thread signal handlers cannot be installed and the flag simply never flips.
    """
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _data_order(config: UnlearnConfig, n_forget: int, n_retain: int) -> dict:
    gen = torch.Generator().manual_seed(config.seed)
    forget = torch.stack([torch.randperm(n_forget, generator=gen) for _ in range(config.epochs)])
    steps = config.epochs * math.ceil(n_forget / config.batch_size)
    rbs = min(config.retain_batch_size or config.batch_size, n_retain) if n_retain else 0
    need = steps * rbs
    # Retain rows cycle through fresh permutations, so every row is seen equally often.
    perms = [torch.randperm(n_retain, generator=gen) for _ in range(-(-need // max(n_retain, 1)))]
    retain = torch.cat(perms)[:need].view(steps, rbs) if need else torch.zeros(steps, 0)
    return {"forget": forget, "retain": retain.long(), "steps": steps}


def _forget_rows_of(order: dict, step: int, batch_size: int) -> list[int]:
    per_epoch = math.ceil(order["forget"].shape[1] / batch_size)
    epoch, k = divmod(step, per_epoch)
    return order["forget"][epoch, k * batch_size : (k + 1) * batch_size].tolist()


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_atomic(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _rows_digest(*encoded: list) -> str:
    """SHA-256 of the encoded rows (token ids and prompt lengths), in order."""
    h = hashlib.sha256()
    for rows in encoded:
        h.update(json.dumps(rows).encode() + b"\0")
    return h.hexdigest()


_CHECKPOINT_KEYS = ("config", "step", "weights", "optimizer", "rng", "order", "ref_logp", "losses")


def _load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, loaded with weights_only=True (tensors and plain
    containers only: a planted pickle cannot run code); SAUError if it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SAUError(
            f"{path}: not a readable sau checkpoint (corrupt, truncated or foreign: {first}); "
            "start the run over (sau unlearn: --force instead of --resume)"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in _CHECKPOINT_KEYS):
        raise SAUError(
            f"{path}: not a sau checkpoint (missing fields); start the run over "
            "(sau unlearn: --force instead of --resume)"
        )
    return state


def _restore(path: Path, state: dict, params: dict, optimizer) -> None:
    """Put a checkpoint's weights, optimizer state and RNG states in place, or refuse it
    with one line when it does not fit this model and optimizer."""
    if set(state["weights"]) != set(params):
        raise SAUError(f"{path}: checkpoint holds other parameters than this model trains")
    bad = [n for n, v in state["weights"].items() if v.shape != params[n].shape]
    if bad:
        raise SAUError(f"{path}: checkpoint's {bad[0]} has another shape than this model's")
    try:
        optimizer.load_state_dict(state["optimizer"])  # SAUAdamW validates index and moments
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as err:
        raise SAUError(f"{path}: checkpoint does not fit this run: {err}") from None
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value)


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
    m = config.method
    if config.joint_forward and m != "ga" and retain is not None and config.retain_weight:
        return joint_loss(config, model, forget, retain, ref_logp, ref_model)
    if m == "ga":
        return obj.ga_loss(model, forget)
    if m == "graddiff":
        return obj.graddiff_loss(
            model,
            forget,
            retain,
            retain_weight=config.retain_weight,
            kl_weight=config.kl_weight,
            ref_model=ref_model,
        )
    if m == "npo":
        return obj.npo_loss(
            model, forget, ref_logp, retain, beta=config.beta, retain_weight=config.retain_weight
        )
    return obj.simnpo_loss(
        model,
        forget,
        retain,
        beta=config.simnpo_beta,
        gamma=config.gamma,
        retain_weight=config.retain_weight,
    )


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
        optimizer: any torch optimizer over the model's trainable parameters. One that
            steps inside backward (SAUAdamW(in_backward=True), `sau unlearn
            --in-backward`) works unchanged: each step is one zero_grad, backward, step;
            with a two-term method set config.joint_forward, or the retain pass's
            partial gradients stay buffered until the end of backward (no saving).
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
    """
    from tqdm.auto import tqdm

    config.validate()
    if not forget_rows:
        raise SAUError("the forget set is empty")
    if config.method != "ga" and not retain_rows:
        raise SAUError(f"method {config.method} needs retain rows, and the retain set is empty")
    if config.method == "graddiff" and config.kl_weight and ref_model is None:
        raise SAUError("GradDiff with a KL term needs the starting model (ref_model)")
    pad_id = batching.pad_id(tok)
    f_enc = batching.encode_rows(tok, forget_rows)
    r_enc = batching.encode_rows(tok, retain_rows) if config.method != "ga" else []
    path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    params = _trainable(model)
    cfg = {k: v for k, v in asdict(config).items() if k in _RESUME_KEYS}
    cfg["data"] = _rows_digest(f_enc, r_enc)  # other rows, same settings: another run
    if config.joint_forward:  # only when set, so older checkpoints still resume
        cfg["joint_forward"] = True

    dp = data_parallel
    sharded = checkpoint_dir is not None and has_sharded_checkpoint(checkpoint_dir)
    if resume and sharded and dp is None:
        raise SAUError(
            f"{checkpoint_dir}: this run was checkpointed under torchrun; resume it with "
            "torchrun --nproc-per-node N (any N)"
        )
    if resume and dp is not None and sharded:
        state = load_sharded(checkpoint_dir, params, optimizer)
        if state["config"] != cfg:
            diff = [k for k in cfg if state["config"].get(k) != cfg[k]]
            raise SAUError(f"{checkpoint_dir}: checkpoint was made with other settings ({diff})")
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        order, ref_logp = state["order"], state["ref_logp"]
        start, losses = state["step"], list(state["losses"])
    elif resume and dp is None and path is not None and path.is_file():
        state = _load_checkpoint(path)
        if state["config"] != cfg:
            diff = [k for k in cfg if state["config"].get(k) != cfg[k]]
            what = ", ".join("forget/retain rows" if k == "data" else k for k in diff)
            raise SAUError(f"{path}: checkpoint was made with other settings ({what})")
        _restore(path, state, params, optimizer)
        order, ref_logp = state["order"], state["ref_logp"]
        start, losses = state["step"], list(state["losses"])
    else:
        order = _data_order(config, len(f_enc), len(r_enc))
        ref_logp = (
            _ref_logprobs(model, f_enc, pad_id, config.batch_size)
            if config.method == "npo"
            else None
        )
        start, losses = 0, []
    total = order["steps"]

    def save(step: int) -> None:
        if path is None:
            return
        if dp is not None:
            meta = {
                "config": cfg,
                "step": step,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "order": order,
                "ref_logp": ref_logp,
                "losses": losses,
            }
            save_sharded(checkpoint_dir, dp, params, optimizer, meta)
            return
        _save_atomic(
            {
                "config": cfg,
                "step": step,
                "weights": {n: p.detach().cpu().clone() for n, p in params.items()},
                "optimizer": optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "order": order,
                "ref_logp": ref_logp,
                "losses": losses,
            },
            path,
        )

    was_training = model.training
    model.train()
    step = start
    interrupted = False
    last_save = time.monotonic()
    with (
        stop_on_signals() as flag,
        tqdm(
            total=total,
            initial=start,
            desc=f"unlearn ({config.method})",
            unit="step",
            disable=not progress,
        ) as bar,
    ):
        while step < total:
            stop = flag.requested or (should_stop is not None and should_stop(step))
            if dp.any(stop) if dp is not None else stop:  # ranks stop at the same step
                interrupted = True
                break
            f_idx = _forget_rows_of(order, step, config.batch_size)
            r_idx = order["retain"][step].tolist() if r_enc else []
            if dp is None:
                forget = batching.collate([f_enc[i] for i in f_idx], pad_id)
                retain = batching.collate([r_enc[i] for i in r_idx], pad_id) if r_enc else None
                weight = 1.0
            else:  # this rank's slice of the global batch (sau.distributed)
                forget, weight = dp.batch(f_enc, f_idx, pad_id)
                retain = dp.batch(r_enc, r_idx, pad_id)[0] if r_enc else None
                f_idx = dp.rows(f_idx)[0]
            ref = ref_logp[f_idx] if ref_logp is not None else None
            loss = _loss(config, model, forget, retain, ref, ref_model) * weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()) if dp is None else dp.mean(loss))
            step += 1
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update(1)
            by_steps = config.checkpoint_every and step % config.checkpoint_every == 0
            by_time = (
                config.checkpoint_seconds
                and time.monotonic() - last_save >= config.checkpoint_seconds
            )
            due = bool(by_steps or by_time) and step < total
            if dp.any(due) if dp is not None else due:  # clocks differ: ranks agree
                save(step)
                last_save = time.monotonic()
    optimizer.zero_grad(set_to_none=True)
    model.train(was_training)
    if hasattr(optimizer, "nonfinite_count"):
        optimizer.nonfinite_count()  # SAUAdamW skips NaN/inf gradient entries: warn if any
    if losses and not any(math.isfinite(x) for x in losses):
        raise RunFailedError(
            f"the loss was NaN or inf at every one of the {len(losses)} steps: no usable "
            "update was made (check the model's weights and the loss weights)"
        )
    save(step)
    return UnlearnResult(step, total, losses, interrupted, path)
