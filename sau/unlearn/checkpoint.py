"""Where an unlearning run stands: its data order, and its single-file checkpoint.

A run is a fixed sequence of steps. Its whole data order (forget permutations per epoch,
retain rows per step) is drawn up front from the config's seed and stored in every
checkpoint, so a resumed run sees exactly the batches the uninterrupted one would have.
The checkpoint file holds the trainable weights, the optimizer's state_dict, the step,
the RNG states (torch, Python), the data order, NPO's reference log-probs and the loss
log. It is written to a temporary file in the same directory and moved into place with
os.replace, so the file on disk is always a complete checkpoint, never half of one.
(FSDP2 runs use sau.unlearn.sharded_checkpoint instead.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import re
import tempfile
import warnings
from pathlib import Path

import torch

from sau.errors import SAUError

__all__ = [
    "CHECKPOINT_KEYS",
    "CHECKPOINT_NAME",
    "data_order",
    "first_line",
    "forget_rows_of",
    "load_checkpoint",
    "load_tensors_only",
    "restore",
    "rng_state",
    "rows_digest",
    "save_atomic",
    "set_rng_state",
]

CHECKPOINT_NAME = "checkpoint.pt"
_ADVICE = "start the run over (sau unlearn: --force instead of --resume)"
CHECKPOINT_KEYS = ("config", "step", "weights", "optimizer", "rng", "order", "ref_logp", "losses")


def data_order(config, n_forget: int, n_retain: int) -> dict:
    """The run's whole data order from ``config.seed``.

    Returns {"forget": int64 [epochs, n_forget] permutations, "retain": int64
    [steps, retain batch] row indices, "steps": int}.
    """
    gen = torch.Generator().manual_seed(config.seed)
    forget = torch.stack([torch.randperm(n_forget, generator=gen) for _ in range(config.epochs)])
    steps = config.epochs * math.ceil(n_forget / config.batch_size)
    rbs = min(config.retain_batch_size or config.batch_size, n_retain) if n_retain else 0
    need = steps * rbs
    # Retain rows cycle through fresh permutations, so every row is seen equally often.
    perms = [torch.randperm(n_retain, generator=gen) for _ in range(-(-need // max(n_retain, 1)))]
    retain = torch.cat(perms)[:need].view(steps, rbs) if need else torch.zeros(steps, 0)
    return {"forget": forget, "retain": retain.long(), "steps": steps}


def forget_rows_of(order: dict, step: int, batch_size: int) -> list[int]:
    """The forget-row indices of global step `step` in `order`."""
    per_epoch = math.ceil(order["forget"].shape[1] / batch_size)
    epoch, k = divmod(step, per_epoch)
    return order["forget"][epoch, k * batch_size : (k + 1) * batch_size].tolist()


def rows_digest(*encoded: list) -> str:
    """SHA-256 of the encoded rows (token ids and prompt lengths), in order."""
    h = hashlib.sha256()
    for rows in encoded:
        h.update(json.dumps(rows).encode() + b"\0")
    return h.hexdigest()


def rng_state() -> dict:
    """The torch and Python RNG states, as a checkpoint stores them."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(rng: dict) -> None:
    """Restore what `rng_state` stored (the Python state's list may come back as a list
    from torch.load; random.setstate needs tuples)."""
    torch.set_rng_state(rng["torch"])
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_atomic(payload: dict, path: Path) -> None:
    """torch.save `payload` to `path` through a temporary file and os.replace."""
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


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, without terminal escapes or other control
    characters (torch's messages carry ANSI bold), at most `limit` characters."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(err)).strip()
    line = (text.splitlines() or [type(err).__name__])[0]
    return "".join(c if c.isprintable() else "?" for c in line)[:limit]


def load_tensors_only(path: Path):
    """torch.load(path, weights_only=True) on the CPU: tensors and plain containers only,
    so a planted pickle cannot run code. Its warnings (an odd pickle protocol) are
    dropped: the caller refuses or accepts the file in one line.

    Raises:
        SAUError: the file is missing, truncated, foreign, or holds other objects.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SAUError(
            f"{path}: holds objects other than tensors and plain containers (refused "
            f"unread, never run); {_ADVICE}"
        ) from None
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise SAUError(
            f"{path}: not a readable sau checkpoint (corrupt, truncated or foreign: "
            f"{first_line(err)}); {_ADVICE}"
        ) from None


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, loaded with weights_only=True (tensors and plain
    containers only: a planted pickle cannot run code); SAUError if it is not one."""
    state = load_tensors_only(path)
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        raise SAUError(f"{path}: not a sau checkpoint (missing fields); {_ADVICE}")
    return state


def restore(path: Path, state: dict, params: dict, optimizer) -> None:
    """Put a checkpoint's weights, optimizer state and RNG states in place, or refuse it
    with one line when it does not fit this model and optimizer."""
    if set(state["weights"]) != set(params):
        raise SAUError(f"{path}: checkpoint holds other parameters than this model trains")
    bad = [n for n, v in state["weights"].items() if v.shape != params[n].shape]
    if bad:
        raise SAUError(f"{path}: checkpoint's {bad[0]} has another shape than this model's")
    try:
        optimizer.load_state_dict(state["optimizer"])  # SAUAdamW validates index and moments
        set_rng_state(state["rng"])
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as err:
        raise SAUError(f"{path}: checkpoint does not fit this run: {err}") from None
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value)
