"""Saving and loading the small models (transformers `save_pretrained` layout)."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from sau.errors import ModelLoadError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `model` (a PreTrainedModel) and `tokenizer` into `out_dir` (created)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_pretrained draws its own "Writing model shards" bar; ours is the training bar.
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return out_dir


def load_model(model_dir: str | os.PathLike, *, dtype=None, tokenizer: bool = True):
    """Load a causal LM and its tokenizer from a local directory (never the hub).

    Args:
        model_dir: directory holding config.json, weights (safetensors or .bin, possibly
            sharded) and tokenizer files, as written by `save_model`.
        dtype: optional torch.dtype for the weights; default float32 as saved.
        tokenizer: also load the tokenizer; False returns (model, None) and works on a
            directory without a loadable tokenizer.

    Returns:
        (model, tokenizer): a `transformers.PreTrainedModel` in eval mode on the CPU and
        a `PreTrainedTokenizerFast` (None when tokenizer=False).

    Raises:
        ModelLoadError: one line naming `model_dir` when it is not a directory, lacks
            config.json or a weights file, transformers cannot read it, or config.json
            does not describe the weights: a weight the model needs is missing from the
            files (it would be left randomly initialized: another `model_type`, more
            `num_hidden_layers`) or the files hold weights the model does not use (fewer
            layers, another architecture). A few of them are named.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (not a saved model directory)")
    if not any((path / f).is_file() for f in WEIGHT_FILES + INDEX_FILES):
        raise ModelLoadError(f"{path}: no weights file ({' or '.join(WEIGHT_FILES)})")
    # weights_only: a pytorch_model.bin is unpickled only as tensors (transformers'
    # default today; explicit so a change of default cannot run a planted pickle).
    kwargs = {"local_files_only": True, "weights_only": True}
    # Loading a 1M-parameter model is instant; its "Loading weights" bar is noise.
    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load report is ours to give, in one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path,
            **kwargs,
            **({"dtype": dtype} if dtype is not None else {}),
            output_loading_info=True,
        )
        tok = AutoTokenizer.from_pretrained(path, **kwargs) if tokenizer else None
    except Exception as err:  # noqa: BLE001 - truncated safetensors, refused pickles, ...
        # Whatever the parser raises (SafetensorError, UnpicklingError, OSError, ...),
        # the user's file is unusable: one line naming the directory.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{path}: cannot load model: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()
    _check_loading_info(path, type(model).__name__, info)
    model.eval()
    return model, tok


def _few(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:3])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > 3 else shown


def _check_loading_info(path: Path, arch: str, info: dict) -> None:
    """Refuse a model whose weight files and config.json disagree (transformers'
    output_loading_info report): one line naming a few of the weights."""
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched, errors = info.get("mismatched_keys") or (), info.get("error_msgs") or ()
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights it needs are not in the files ({_few(missing)})")
    if unexpected:
        problems.append(f"the files hold {len(unexpected)} it does not use ({_few(unexpected)})")
    if mismatched:
        names = [m[0] if isinstance(m, (tuple, list)) else str(m) for m in mismatched]
        problems.append(f"{len(names)} have another shape ({_few(names)})")
    if errors:
        problems.append(str(errors[0]).strip().splitlines()[0][:200])
    if problems:
        raise ModelLoadError(
            f"{path}: config.json does not describe the weight files: as {arch}, "
            f"{'; '.join(problems)}; fix config.json (model_type, num_hidden_layers, ...) "
            "or the weights"
        )
