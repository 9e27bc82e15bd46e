"""The inputs of one unlearning run, loaded and checked before anything is written.

`Inputs.from_files` is the one way a user's model directory and QA files become a run's
inputs, for `sau unlearn` and `sau sweep --model` alike, so both refuse the same things
with the same line:

- a model holding NaN or inf in any parameter (`check_finite_weights`);
- a QA row longer than the model's context, which would hang or fail deep inside the
  forward pass (`check_row_lengths`);
- a retain model whose tokenizer differs from the target's: it is scored with the
  target's tokenizer (`check_same_tokenizer`).

Every model of a run is loaded in the run's dtype (`sau.lab.variants.DTYPES`): the target
and the retain model alike, so forget quality compares models of one precision.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from sau.batching import encode_rows
from sau.errors import SAUError
from sau.lab.data import load_qa
from sau.lab.models import load_model
from sau.lab.variants import DTYPES

__all__ = [
    "Inputs",
    "check_finite_weights",
    "check_row_lengths",
    "check_same_tokenizer",
    "model_context",
    "torch_dtype",
]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a run's dtype name: "float32" or "bfloat16".

    Raises:
        ValueError: a name not in sau.lab.variants.DTYPES.
    """
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def _model_dtype(model) -> torch.dtype | None:
    """The dtype of `model`'s first floating-point parameter (None: it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _cast(model, dtype: torch.dtype):
    """`model` itself when its parameters already have `dtype`, else a copy whose floating
    parameters do. Buffers keep their dtype, as `load_model(dtype=)` leaves them (a
    rotary table stays float32)."""
    if model is None or _model_dtype(model) in (None, dtype):
        return model
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return model


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

    def cast(self, dtype: str) -> Inputs:
        """These inputs with the target and retain model in `dtype` ("float32" or
        "bfloat16"): self when they already are, else new Inputs holding cast copies (the
        rows and tokenizer are shared).

        Raises:
            ValueError: an unknown dtype name.
        """
        want = torch_dtype(dtype)
        model, retain = _cast(self.model, want), _cast(self.retain_model, want)
        if model is self.model and retain is self.retain_model:
            return self
        return replace(self, model=model, retain_model=retain)

    @classmethod
    def from_default(cls, art, retain_model=None, *, dtype: str = "float32") -> Inputs:
        """The inputs of a built embedded default (`sau.lab.models.build_default`'s result):
        a fresh load of its target model and tokenizer in `dtype`, its forget / retain /
        holdout / general splits, and its retain model (loaded in `dtype` unless one is
        given; a given one is used as it is).

        Raises:
            ValueError: an unknown dtype name.
        """
        want = torch_dtype(dtype)
        model, tok = load_model(art.target_dir, dtype=want)
        if retain_model is None:
            retain_model, _ = load_model(art.retain_dir, dtype=want)
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
        *,
        dtype: str = "float32",
    ) -> Inputs:
        """Load a local model directory and TOFU-format QA files, and check them together.

        The target and retain model are loaded in `dtype` ("float32" or "bfloat16"),
        whatever dtype their weights were saved in.

        Raises:
            SAUError: a file without QA rows, a model that cannot be loaded or holds
                NaN/inf, a row longer than the model's context, or a retain model with
                another tokenizer (one line naming the file).
            ValueError: an unknown dtype name.
        """
        want = torch_dtype(dtype)
        files = {"forget": forget, "retain": retain, "holdout": holdout, "general": general}
        rows = {name: _rows(path, name) for name, path in files.items()}
        target, tok = load_model(model, dtype=want)
        check_finite_weights(target, model)
        limit = model_context(target)
        for name, path in files.items():
            check_row_lengths(tok, rows[name], limit, path)
        reference = None
        if retain_model:
            reference, retain_tok = load_model(retain_model, dtype=want)
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
