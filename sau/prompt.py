"""The one prompt format shared by training, unlearning and evaluation.

A QA row is rendered as ``format_prompt(question)`` followed by ``format_answer(answer)``;
losses and answer probabilities are taken over the answer tokens only.
"""

from __future__ import annotations

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


def format_prompt(question: str) -> str:
    """The text the model is conditioned on for one question."""
    return PROMPT_TEMPLATE.format(question=question.strip())


def format_answer(answer: str) -> str:
    """The continuation scored or generated after the prompt (leading space, no EOS)."""
    return " " + answer.strip()
