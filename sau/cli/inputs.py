"""Checks of loaded inputs against the model they will meet, before any work starts.

- `check_row_lengths`: a QA row longer than the model's context would hang or fail deep
  inside the forward pass (one answer of a million tokens hung without output); refused
  with one line naming the file and the row.
- `check_same_tokenizer`: the retain model is scored with the target's tokenizer, so it
  must use the same vocabulary (a smaller one failed with an index error mid-run).
"""

from __future__ import annotations

from sau.errors import SAUError

__all__ = ["check_row_lengths", "check_same_tokenizer", "model_context"]


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
    from sau.batching import encode_rows

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
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise SAUError(f"{source}: parameter {name} holds NaN or inf values")
