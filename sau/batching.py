"""How a QA row becomes tokens and how rows become a padded batch: the one home of both.

Every path that feeds text to a model goes through here: training, unlearning
(`sau.unlearn.loop`), saliency, Wanda calibration (`calibration_batches`) and scoring. So
the answer tokens a loss is taken over are the answer tokens a score is read from.

A row renders as ``format_prompt(question)`` then ``format_answer(answer)`` (`sau.prompt`).
The prompt is tokenized with the tokenizer's special tokens (BOS), the answer without.
Token layout of one `EncodedRow`:

    ids = [prompt tokens (n_prompt)] [answer tokens (n_answer)] [EOS, when eos=True]

The *answer mask* is the n_answer answer positions. Losses (training, unlearning) also
take the EOS that ends the answer: the model learns to stop there, so forgetting the
stop is part of forgetting the answer. Scores (probabilities, Min-K%) read the answer
tokens only, as TOFU does.

Padding: batches are right-padded for losses and scores (real tokens never attend to
later pads under a causal mask) and left-padded for generation (new tokens must follow
the prompt directly). Padded positions have attention mask 0 and label `IGNORE_INDEX`,
so the pad id's value never reaches a loss or a score; `pad_id` still picks one rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from sau.prompt import format_answer, format_prompt

__all__ = [
    "IGNORE_INDEX",
    "EncodedRow",
    "answer_mask",
    "calibration_batches",
    "collate",
    "encode_pair",
    "encode_prompts",
    "encode_rows",
    "loss_batches",
    "pad_id",
    "pad_left",
    "pad_right",
]

IGNORE_INDEX = -100  # the label torch's cross entropy (and our objectives) skip


class EncodedRow(NamedTuple):
    """One QA pair as token ids.

    ids: list[int], prompt tokens, answer tokens, then EOS when encoded with eos=True.
    n_prompt: int, number of prompt tokens (BOS included).
    n_answer: int, number of answer tokens (EOS not included).
    """

    ids: list[int]
    n_prompt: int
    n_answer: int


def pad_id(tok) -> int:
    """The id written at padded positions: the tokenizer's pad, else its EOS, else 0.

    Any id works (padded positions are masked out of attention, losses and scores);
    one rule keeps every batch of the same rows identical across paths.
    """
    for value in (tok.pad_token_id, tok.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def encode_pair(tok, prompt: str, answer: str, *, eos: bool = True) -> EncodedRow:
    """Tokenize an already rendered prompt and answer (see `sau.prompt`).

    Args:
        tok: a transformers tokenizer; special tokens are added to the prompt only.
        prompt, answer: str, e.g. ``format_prompt(q)`` and ``format_answer(a)``.
        eos: append the tokenizer's EOS (when it has one) after the answer.

    Returns:
        EncodedRow.
    """
    prompt_ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
    answer_ids = list(tok(answer, add_special_tokens=False)["input_ids"])
    stop = [tok.eos_token_id] if eos and tok.eos_token_id is not None else []
    return EncodedRow(prompt_ids + answer_ids + stop, len(prompt_ids), len(answer_ids))


def encode_rows(tok, rows: Sequence[dict], *, eos: bool = True) -> list[EncodedRow]:
    """`encode_pair` of each row's ``question`` and ``answer`` rendered with `sau.prompt`."""
    return [
        encode_pair(tok, format_prompt(r["question"]), format_answer(r["answer"]), eos=eos)
        for r in rows
    ]


def encode_prompts(tok, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered prompts alone (special tokens added), for generation."""
    return [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]


def pad_right(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)``, int64 [B, T] each.

    T is the longest sequence; attention_mask is 1 on real tokens, 0 on padding.
    """
    return _pad(seqs, pad, left=False)


def pad_left(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)``, int64 [B, T] each.

    For generation: every row's last real token sits at column T - 1.
    """
    return _pad(seqs, pad, left=True)


def _pad(seqs, pad: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        input_ids[i, cols] = torch.tensor(s)
        mask[i, cols] = 1
    return input_ids, mask


def collate(rows: Sequence[EncodedRow], pad: int) -> dict:
    """Right-padded loss batch of encoded rows.

    Returns a dict of int64 [B, T] tensors: ``input_ids``, ``attention_mask`` and
    ``labels``; labels hold the token id on the answer and its EOS, `IGNORE_INDEX` on
    the prompt and on padding.
    """
    input_ids, mask = pad_right([r.ids for r in rows], pad)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, r in enumerate(rows):
        labels[i, r.n_prompt : len(r.ids)] = torch.tensor(r.ids[r.n_prompt :])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def loss_batches(rows: Sequence[EncodedRow], pad: int, batch_size: int) -> list[dict]:
    """`collate` of consecutive chunks of ``batch_size`` rows, in order."""
    return [collate(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)]


def calibration_batches(
    tok, rows: Sequence[dict], batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wanda calibration data: ``(input_ids, attention_mask)`` int64 [B, T] pairs.

    The rows encoded as for a loss (prompt, answer, EOS) and right-padded in consecutive
    chunks of ``batch_size``; padding is masked out of the activation norms.
    """
    pad = pad_id(tok)
    return [
        (b["input_ids"], b["attention_mask"])
        for b in loss_batches(encode_rows(tok, rows), pad, batch_size)
    ]


def answer_mask(rows: Sequence[EncodedRow], width: int) -> torch.Tensor:
    """Bool [B, width]: True at each row's answer tokens (not the prompt, EOS or padding)."""
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        mask[i, r.n_prompt : r.n_prompt + r.n_answer] = True
    return mask
