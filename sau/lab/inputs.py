"""The inputs of one unlearning run, loaded and checked before anything is written.

`Inputs.from_files` is the one way a user's model directory and QA files become a run's
inputs, for `sau unlearn` and `sau sweep --model` alike, so both refuse the same things
with the same line:

- a model holding NaN or inf in any parameter (`check_finite_weights`);
- a QA row longer than the model's context, which would hang or fail deep inside the
  forward pass (`check_row_lengths`);
- a retain model whose tokenizer differs from the target's: it is scored with the
  target's tokenizer (`check_same_tokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sau.batching import encode_rows
from sau.errors import SAUError
from sau.lab.data import load_qa
from sau.lab.models import load_model

__all__ = [
    "Inputs",
    "check_finite_weights",
    "check_row_lengths",
    "check_same_tokenizer",
    "model_context",
]


@dataclass
class Inputs:
    """Everything a run reads, loaded and checked.

    model/tok: the target (dense or already pruned); retain_model: the reference for forget
    quality (None: forget quality is not reported); rows: forget / retain required,
    holdout (MIA AUC) and general (utility) optional; source: where the model came from.
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

    @classmethod
    def from_files(
        cls,
        model: str,
        forget: str,
        retain: str,
        holdout: str | None = None,
        general: str | None = None,
        retain_model: str | None = None,
    ) -> Inputs:
        """Load a local model directory and TOFU-format QA files, and check them together.

        Raises:
            SAUError: a file without QA rows, a model that cannot be loaded or holds
                NaN/inf, a row longer than the model's context, or a retain model with
                another tokenizer (one line naming the file).
        """
        files = {"forget": forget, "retain": retain, "holdout": holdout, "general": general}
        rows = {name: _rows(path, name) for name, path in files.items()}
        target, tok = load_model(model)
        check_finite_weights(target, model)
        limit = model_context(target)
        for name, path in files.items():
            check_row_lengths(tok, rows[name], limit, path)
        reference = None
        if retain_model:
            reference, retain_tok = load_model(retain_model)
            check_same_tokenizer(tok, retain_tok, reference, retain_model)
            check_finite_weights(reference, retain_model)
        return cls(
            target,
            tok,
            rows["forget"],
            rows["retain"],
            rows["holdout"],
            rows["general"],
            reference,
            source=model,
        )


def _rows(path: str | None, what: str) -> list | None:
    if path is None:
        return None
    rows = load_qa(path)
    if not rows:
        raise SAUError(f"{path}: no QA rows in the {what} file")
    return rows


def model_context(model) -> int | None:
    """The longest sequence `model` takes (max_position_embeddings / n_positions), or None."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_row_lengths(tok, rows: list[dict] | None, limit: int | None, source: str) -> None:
    """Refuse the first row whose prompt + answer + EOS exceeds `limit` tokens.

    Args:
        tok: the tokenizer; rows are encoded exactly as training sees them.
        rows: QA dicts (question, answer), or None (nothing to check).
        limit: the model's context in tokens (`model_context`); None: no limit known.
        source: the file the rows came from, for the message.

    Raises:
        SAUError: "<source>: row <i> is <n> tokens long, more than the model's context ...".
    """
    if not rows or limit is None:
        return
    for i, row in enumerate(rows, start=1):
        ids = encode_rows(tok, [row])[0].ids
        if len(ids) > limit:
            raise SAUError(
                f"{source}: row {i} is {len(ids)} tokens long, more than the model's context "
                f"of {limit}; shorten or remove it"
            )


def check_same_tokenizer(tok, other_tok, other_model, source: str) -> None:
    """Refuse a reference model whose tokenizer or embedding table differs from `tok`'s."""
    n_embed = other_model.get_input_embeddings().num_embeddings
    if n_embed < len(tok):
        raise SAUError(
            f"{source}: its vocabulary has {n_embed} entries, fewer than the model's "
            f"tokenizer ({len(tok)}); it must use the same tokenizer"
        )
    if other_tok.get_vocab() != tok.get_vocab():
        raise SAUError(f"{source}: uses another tokenizer than the model; it must be the same")


def check_finite_weights(model, source: str) -> None:
    """Refuse a model holding NaN or inf in any parameter (nothing useful comes of it)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise SAUError(f"{source}: parameter {name} holds NaN or inf values")
