"""The inputs of one unlearning run, loaded and checked before anything is written.

`Inputs.from_files` is the one way a user's model directory and QA files become a run's
inputs, for `sau unlearn` and `sau sweep --model` alike, so both refuse the same things
with the same line:

- a model holding NaN or inf in any parameter (`check_finite_weights`);
- a QA row that does not fit the context of every model it is fed to (the target's and
  the retain model's), which would hang or fail deep inside the forward pass
  (`check_row_lengths`): question + answer + EOS as training sees it, question + the
  paraphrased answer and question + each perturbed answer as evaluation scores them, and
  question + `max_new_tokens` as evaluation generates;
- a retain model whose tokenizer differs from the target's: it is scored with the
  target's tokenizer (`check_same_tokenizer`).

`path_digest` is the content identity of an input (the SHA-256 of a file, or of a model
directory's top-level files): what `sau unlearn --resume` and a sweep's cells are keyed by.

Every model of a run is loaded in the run's dtype (`sau.lab.variants.DTYPES`): the target
and the retain model alike, so forget quality compares models of one precision.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sau.batching import encode_pair, encode_prompts, encode_rows
from sau.errors import SAUError
from sau.lab.data import load_qa
from sau.lab.models import load_model
from sau.lab.variants import DTYPES
from sau.prompt import format_answer, format_prompt

__all__ = [
    "Inputs",
    "check_finite_weights",
    "check_row_lengths",
    "check_same_tokenizer",
    "file_digest",
    "model_context",
    "path_digest",
    "torch_dtype",
]

# Files whose rows evaluation scores with their paraphrased and perturbed answers and
# generates answers for (the holdout rows are only scored on their answer, for the MIA).
_EVALUATED = ("forget", "retain", "general")
_CHUNK = 1 << 20


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
    def from_default(
        cls,
        art,
        retain_model=None,
        *,
        dtype: str = "float32",
        max_new_tokens: int | None = None,
    ) -> Inputs:
        """The inputs of a built embedded default (`sau.lab.models.build_default`'s result):
        a fresh load of its target model and tokenizer in `dtype`, its forget / retain /
        holdout / general splits, and its retain model (loaded in `dtype` unless one is
        given; a given one is used as it is).

        Args:
            max_new_tokens: the evaluation's generation length; given, every evaluated
                question plus it must fit the models' context (`check_row_lengths`).

        Raises:
            SAUError: max_new_tokens too long for a question and the context.
            ValueError: an unknown dtype name.
        """
        want = torch_dtype(dtype)
        model, tok = load_model(art.target_dir, dtype=want)
        if retain_model is None:
            retain_model, _ = load_model(art.retain_dir, dtype=want)
        split = art.dataset.splits()
        if max_new_tokens is not None:
            sources = {name: f"the embedded {name} split" for name in split}
            _check_fit(tok, split, sources, (model, retain_model), max_new_tokens)
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
        max_new_tokens: int | None = None,
    ) -> Inputs:
        """Load a local model directory and TOFU-format QA files, and check them together.

        The target and retain model are loaded in `dtype` ("float32" or "bfloat16"),
        whatever dtype their weights were saved in. Every command that reads a user's
        model and files loads them here (module docstring).

        Args:
            max_new_tokens: the evaluation's generation length (None: not checked); every
                evaluated question plus it must fit the context of both models.

        Raises:
            SAUError: a file without QA rows, a model that cannot be loaded or holds
                NaN/inf, a row (or an evaluated answer, or a question plus
                max_new_tokens) longer than a model's context, or a retain model with
                another tokenizer (one line naming the file).
            ValueError: an unknown dtype name.
        """
        want = torch_dtype(dtype)
        files = {"forget": forget, "retain": retain, "holdout": holdout, "general": general}
        rows = {name: _rows(path, name) for name, path in files.items()}
        target, tok = load_model(model, dtype=want)
        check_finite_weights(target, model)
        reference = None
        if retain_model:
            reference, retain_tok = load_model(retain_model, dtype=want)
            check_same_tokenizer(tok, retain_tok, reference, retain_model)
            check_finite_weights(reference, retain_model)
        _check_fit(tok, rows, files, (target, reference), max_new_tokens)
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


def _check_fit(tok, rows: dict, sources: dict, models, max_new_tokens: int | None) -> None:
    """`check_row_lengths` of every split against the shortest context of `models`."""
    limits = [model_context(m) for m in models if m is not None]
    limit = min((v for v in limits if v is not None), default=None)
    for name, split in rows.items():
        check_row_lengths(
            tok,
            split,
            limit,
            sources[name],
            evaluated=name in _EVALUATED,
            max_new_tokens=max_new_tokens if name in _EVALUATED else None,
        )


def model_context(model) -> int | None:
    """The longest sequence `model` takes (max_position_embeddings / n_positions), or None."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_row_lengths(
    tok,
    rows: list[dict] | None,
    limit: int | None,
    source: str,
    *,
    evaluated: bool = False,
    max_new_tokens: int | None = None,
) -> None:
    """Refuse the first row that does not fit in `limit` tokens (never cut it).

    Every row: prompt + answer + EOS, encoded exactly as training sees it. With
    `evaluated`, also prompt + paraphrased answer and prompt + each perturbed answer, as
    evaluation scores them; with `max_new_tokens`, prompt + that many generated tokens.

    Args:
        tok: the tokenizer.
        rows: QA dicts (question, answer, optional paraphrased_answer / perturbed_answer),
            or None (nothing to check).
        limit: the context in tokens (`model_context`); None: no limit known.
        source: the file the rows came from, for the message.
        evaluated: the rows' paraphrased and perturbed answers are scored.
        max_new_tokens: tokens generated after each prompt (None: no generation).

    Raises:
        SAUError: "<source>: row <i> is <n> tokens long ..., more than the model's context
            of <limit>; ..." naming what is too long.
    """
    if not rows or limit is None:
        return
    for i, row in enumerate(rows, start=1):
        n, what = _longest(tok, row, evaluated)
        if n > limit:
            raise SAUError(
                f"{source}: row {i} is {n} tokens long{what}, more than the model's context "
                f"of {limit}; shorten or remove it"
            )
        if max_new_tokens is not None:
            prompt = len(encode_prompts(tok, [format_prompt(row["question"])])[0])
            if prompt + max_new_tokens > limit:
                raise SAUError(
                    f"{source}: row {i}: its question ({prompt} tokens) + max_new_tokens "
                    f"({max_new_tokens}) is more than the model's context of {limit}; "
                    f"lower max_new_tokens to at most {max(limit - prompt, 0)} or shorten it"
                )


def _longest(tok, row: dict, evaluated: bool) -> tuple[int, str]:
    """(tokens, which text) of the longest sequence `row` becomes: question + answer +
    EOS (training), and with `evaluated` question + each scored answer (no EOS)."""
    best = (len(encode_rows(tok, [row])[0].ids), "")
    if not evaluated:
        return best
    prompt = format_prompt(row["question"])
    answers = {"paraphrased answer": row.get("paraphrased_answer")}
    wrong = row.get("perturbed_answer") or []
    for j, text in enumerate([wrong] if isinstance(wrong, str) else wrong, start=1):
        answers[f"perturbed answer {j}"] = text
    for label, text in answers.items():
        if isinstance(text, str) and text:
            n = len(encode_pair(tok, prompt, format_answer(text), eos=False).ids)
            if n > best[0]:
                best = (n, f" with its {label}")
    return best


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


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of one file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def path_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a directory's top-level regular files (names and bytes):
    all `from_pretrained` reads of a model directory."""
    path = Path(path)
    if not path.is_dir():
        return file_digest(path)
    h = hashlib.sha256()
    for entry in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(entry.name.encode() + b"\0" + file_digest(entry).encode() + b"\0")
    return h.hexdigest()
