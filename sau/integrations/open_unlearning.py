"""open-unlearning plug-in: SAU variants of its unlearning trainers, and their YAMLs.

`register()` adds ``SAUGradAscent``, ``SAUGradDiff``, ``SAUNPO`` and ``SAUSimNPO`` to
open-unlearning's ``TRAINER_REGISTRY`` (keyed by class name; its ``load_trainer`` looks up
the trainer YAML's ``handler:`` there). Each is ``type(name, (SAUTrainerMixin, Base), ...)``
over open-unlearning's own class: the loss is open-unlearning's, the optimizer SAU's.
open-unlearning is imported by `register` only, when no registry is passed.

``compute_loss`` also takes the ``num_items_in_batch`` that transformers >= 4.46 passes
(open-unlearning's trainers, written for 4.45, do not); it is forwarded only to a base that
takes it. With nested forget/retain batches the Trainer counts no items (no top-level
``labels``), so it divides the loss by the accumulation steps as before.

SAUNPO keeps no reference model: before the first step (in `create_optimizer`, before the
saliency pass) it runs the model once over every forget row of ``train_dataset`` and keeps
each row's summed answer NLL; NPO's loss then reads those numbers where open-unlearning
runs its deep-copied reference model. Rows are found by content (attended tokens and
labels), so shuffling and right padding do not matter. With ``retain_loss_type: KL`` the
retain term needs the reference model's logits, so the copy is made as open-unlearning does.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch
import torch.nn.functional as F

from sau.integrations.trainer import SAUTrainerMixin

__all__ = ["CONFIG_DIR", "VARIANTS", "register"]

# The trainer YAMLs (package data): CONFIG_DIR / "trainer" / "SAUGradDiff.yaml", ...
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# SAU variant -> the open-unlearning trainer it extends (a TRAINER_REGISTRY name).
VARIANTS = {
    "SAUGradAscent": "GradAscent",
    "SAUGradDiff": "GradDiff",
    "SAUNPO": "NPO",
    "SAUSimNPO": "SimNPO",
}


def register(registry=None) -> list[str]:
    """Add the SAU variants to open-unlearning's trainer registry; returns their names.

    Args:
        registry: None (import open-unlearning's ``trainer`` module: its ``src/`` must be on
            sys.path), a module with ``TRAINER_REGISTRY`` (and ``_register_trainer``, used
            when there), or the registry dict itself.

    Idempotent: a variant already registered over the same base class is kept as it is.
    Raises ImportError (one line) when open-unlearning cannot be imported, ValueError when
    the registry lacks one of the base trainers.
    """
    module = _trainer_module() if registry is None else registry
    table = module if isinstance(module, MutableMapping) else None
    table = getattr(module, "TRAINER_REGISTRY", table)
    if not isinstance(table, MutableMapping):
        raise TypeError(f"register: {module!r} is neither a registry dict nor has TRAINER_REGISTRY")
    missing = [base for base in VARIANTS.values() if base not in table]
    if missing:
        raise ValueError(f"register: open-unlearning's registry has no {', '.join(missing)}")
    add = getattr(module, "_register_trainer", None)
    for name, base_name in VARIANTS.items():
        base = table[base_name]
        if getattr(table.get(name), "_sau_base", None) is base:
            continue
        variant = _variant(name, base)
        if add is not None:
            add(variant)  # open-unlearning's: TRAINER_REGISTRY[cls.__name__] = cls
        else:
            table[name] = variant
    return list(VARIANTS)


def _trainer_module():
    """open-unlearning's ``trainer`` module (its src/trainer/__init__.py)."""
    try:
        module = importlib.import_module("trainer")
    except ImportError as err:
        raise ImportError(
            f"register: open-unlearning is not importable ({err}); put its src/ on sys.path "
            "(run from it) or pass registry="
        ) from None
    if not hasattr(module, "TRAINER_REGISTRY"):
        where = getattr(module, "__file__", "?")
        raise ImportError(f"register: the 'trainer' module at {where} is not open-unlearning's")
    return module


def _variant(name: str, base: type) -> type:
    """``type(name, (SAUTrainerMixin, base), ...)``; SAUNPO also gets the reference table."""
    body = {
        "__module__": __name__,
        "__doc__": f"open-unlearning's {base.__name__} loss with SAU's optimizer "
        "(SAUTrainerMixin: the sau_* keyword arguments).",
        "_sau_base": base,
        "compute_loss": _compute_loss,
    }
    if name == "SAUNPO":
        body.update(
            sau_ref_nll=None,
            _prepare_ref_model=_npo_prepare_ref_model,
            create_optimizer=_npo_create_optimizer,
            compute_loss=_npo_compute_loss,
            _sau_reference_nll=_npo_reference_nll,
            _sau_lookup=_npo_lookup,
        )
    return type(name, (SAUTrainerMixin, base), body)


def _compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """The base's compute_loss(model, inputs, return_outputs); num_items_in_batch goes on
    only where the base takes it."""
    base = self._sau_base.compute_loss
    kwargs = {}
    if (
        num_items_in_batch is not None
        and "num_items_in_batch" in inspect.signature(base).parameters
    ):
        kwargs["num_items_in_batch"] = num_items_in_batch
    return base(self, model, inputs, return_outputs=return_outputs, **kwargs)


def _npo_prepare_ref_model(self, model):
    """No copy for NPO's forget term (it reads `sau_ref_nll`); open-unlearning's copy only
    for retain_loss_type="KL", whose retain term needs the reference logits."""
    if self.retain_loss_type == "KL":
        return self._sau_base._prepare_ref_model(self, model)
    return None


def _npo_create_optimizer(self, model=None):
    """The reference table (before the saliency pass and any step), then SAU's optimizer."""
    if self.sau_ref_nll is None:
        self.sau_ref_nll = self._sau_reference_nll(self.model if model is None else model)
    return SAUTrainerMixin.create_optimizer(self, model)


def _npo_reference_nll(self, model) -> dict[bytes, torch.Tensor]:
    """Each forget row's summed answer NLL under `model` as it is now: {row key: 0-d tensor
    (the model's dtype, on the CPU)}, over every forget row of train_dataset (all of it on
    every rank), in eval mode without grad. The global RNG is left as it was (a
    ForgetRetainDataset draws retain rows from it)."""
    table, size = {}, self.args.per_device_train_batch_size
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            rows = list(_forget_rows(self.train_dataset, type(self).__name__))
            for start in range(0, len(rows), size):
                batch = self._prepare_inputs(self.data_collator(rows[start : start + size]))
                with self.compute_loss_context_manager():
                    nll, _ = _batch_nll(model, batch)
                table.update(zip(_row_keys(batch), nll.detach().cpu()))
    finally:
        model.train(was_training)
    return table


def _npo_lookup(self, forget_inputs: dict) -> torch.Tensor:
    """The reference NLLs of a forget batch's rows, float [B] on the batch's device."""
    if self.sau_ref_nll is None:  # compute_loss before create_optimizer: still no step
        self.sau_ref_nll = self._sau_reference_nll(self.model)
    try:
        values = [self.sau_ref_nll[key] for key in _row_keys(forget_inputs)]
    except KeyError:
        raise ValueError(
            f"{type(self).__name__}: a forget row has no reference NLL (the table holds the "
            "forget rows of train_dataset, right-padded, as they were before the first step)"
        ) from None
    return torch.stack(values).to(forget_inputs["input_ids"].device)


def _npo_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """open-unlearning's NPO loss (compute_dpo_loss with win_inputs=None), the reference
    NLLs read from the table: gamma * -2/beta * mean(logsigmoid(beta * (nll - nll_ref)))
    + alpha * retain_loss. num_items_in_batch is not used (as in open-unlearning)."""
    forget_inputs = inputs["forget"]
    lose_loss, lose_outputs = _batch_nll(model, forget_inputs)
    lose_ref_loss = self._sau_lookup(forget_inputs)
    win_log_ratio, lose_log_ratio = 0.0, -(lose_loss - lose_ref_loss)
    beta = self.beta
    forget_loss = -2 / beta * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()
    retain_inputs = {k: inputs["retain"][k] for k in ("input_ids", "attention_mask", "labels")}
    retain_loss = self.compute_retain_loss(model=model, retain_inputs=retain_inputs)
    loss = self.gamma * forget_loss + self.alpha * retain_loss
    return (loss, (None, lose_outputs)) if return_outputs else loss


def _batch_nll(model, inputs: dict):
    """open-unlearning's compute_batch_nll: each row's summed NLL of its labels (-100
    ignored), float [B] in the logits' dtype, and the model's outputs."""
    outputs = model(**inputs)
    shifted_labels = inputs["labels"][..., 1:].contiguous()
    logits = outputs.logits[..., :-1, :].contiguous()
    loss_function = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return loss_function(logits.transpose(-1, -2), shifted_labels).sum(dim=-1), outputs


def _row_keys(batch: dict) -> list[bytes]:
    """A key per row: a digest of its attended input_ids and their labels (int [B, T];
    attention_mask [B, T], all ones when absent), so padding does not change it."""
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.cpu().bool()
    keys = []
    for row_ids, row_labels, row_mask in zip(ids, labels, mask):
        row = torch.cat([row_ids[row_mask], row_labels[row_mask]]).to(torch.int64)
        keys.append(hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest())
    return keys


def _forget_rows(dataset, name: str) -> Iterator[dict]:
    """The forget rows: ``dataset.forget`` (open-unlearning's ForgetRetainDataset), else the
    ``"forget"`` part of each row of ``dataset``."""
    forget = getattr(dataset, "forget", None)
    if forget is not None:
        yield from (forget[i] for i in range(len(forget)))
        return
    for i in range(len(dataset)):
        row = dataset[i]
        if not isinstance(row, dict) or "forget" not in row:
            raise ValueError(f"{name}: a train_dataset row has no 'forget' part")
        yield row["forget"]
