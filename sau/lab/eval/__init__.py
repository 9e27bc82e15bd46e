"""TOFU-style evaluation: pure metrics (`sau.lab.eval.metrics`) and model scoring
(`sau.lab.eval.scoring`). See those modules for the definitions and their sources.
`sau.lab.eval.open_unlearning` is the other protocol: open-unlearning's TOFU evaluator."""

from __future__ import annotations

from sau.lab.eval.metrics import (
    forget_quality,
    length_normalized_prob,
    mia_auc,
    model_utility,
    option_normalized_prob,
    sparsity_integrity,
    truth_ratio,
    truth_ratio_score,
)
from sau.lab.eval.scoring import (
    NonFiniteScoresError,
    answer_logprobs,
    answer_token_logprobs,
    evaluate_model,
    greedy_answers,
    min_k_prob,
    rouge_l_recall,
)

__all__ = [
    "NonFiniteScoresError",
    "answer_logprobs",
    "answer_token_logprobs",
    "evaluate_model",
    "forget_quality",
    "greedy_answers",
    "length_normalized_prob",
    "mia_auc",
    "min_k_prob",
    "model_utility",
    "option_normalized_prob",
    "rouge_l_recall",
    "sparsity_integrity",
    "truth_ratio",
    "truth_ratio_score",
]
