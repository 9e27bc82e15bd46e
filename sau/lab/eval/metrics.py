"""TOFU-style unlearning metrics on plain numbers (numpy / scipy), and sparsity integrity.

Definitions follow TOFU (Maini et al., 2024) as implemented in open-unlearning:

- length-normalised probability of an answer: ``exp(mean token log-prob)``.
- truth ratio per row: ``R = geomean_k P(perturbed_k) / P(paraphrased)``. Low R on data
  the model knows (it prefers the true answer); near 1 when it cannot tell them apart.
- truth-ratio scores: ``"true_better"`` = mean(max(0, 1 - R)) (retain / general sets);
  ``"closer_to_1"`` = mean(min(R, 1 / R)) (what open-unlearning reports for the forget set).
- forget quality: the p-value of the two-sample Kolmogorov-Smirnov test between the raw
  forget-set R of the model and of a model trained on the retain set only. High (near 1)
  means indistinguishable from never having seen the forget set.
- model utility: the harmonic mean of the retain (and general) probability, ROUGE and
  truth-ratio scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import stats

__all__ = [
    "forget_quality",
    "length_normalized_prob",
    "mia_auc",
    "model_utility",
    "option_normalized_prob",
    "sparsity_integrity",
    "truth_ratio",
    "truth_ratio_score",
]


def length_normalized_prob(logprob_sum, n_tokens) -> np.ndarray:
    """``exp(logprob_sum / n_tokens)`` per row: the geometric-mean token probability.

    Both inputs are array-likes of shape [N] (float sums of natural-log probabilities and
    positive token counts); returns float64 [N].
    """
    logprob_sum = np.asarray(logprob_sum, dtype=np.float64)
    n_tokens = np.asarray(n_tokens, dtype=np.float64)
    if np.any(n_tokens <= 0):
        raise ValueError("n_tokens must be positive for every row (an answer had no tokens)")
    return np.exp(logprob_sum / n_tokens)


def _rows_2d(perturbed_probs) -> list[np.ndarray]:
    # Perturbed answers may differ in count per row, so accept ragged lists as well as [N, K].
    return [np.atleast_1d(np.asarray(row, dtype=np.float64)) for row in perturbed_probs]


def truth_ratio(paraphrased_probs, perturbed_probs) -> np.ndarray:
    """Raw TOFU truth ratio per row.

    Args:
        paraphrased_probs: [N] length-normalised probabilities of the paraphrased (true)
            answer.
        perturbed_probs: [N, K] array or a length-N list of 1-D sequences (K may vary per
            row): length-normalised probabilities of the perturbed (wrong) answers.

    Returns float64 [N]: ``exp(mean_k log p_k) / p_para``. The geometric mean is taken in
    log space, which equals open-unlearning's ``exp(-mean avg_loss)``.
    """
    para = np.asarray(paraphrased_probs, dtype=np.float64).reshape(-1)
    rows = _rows_2d(perturbed_probs)
    if len(rows) != para.shape[0]:
        raise ValueError(f"{para.shape[0]} paraphrased rows but {len(rows)} perturbed rows")
    if any(row.size == 0 for row in rows):
        raise ValueError("every row needs at least one perturbed probability")
    with np.errstate(divide="ignore"):
        geo = np.array([np.exp(np.mean(np.log(row))) for row in rows])
        return geo / para


def truth_ratio_score(ratios, kind: str = "true_better") -> float:
    """Aggregate raw truth ratios [N] into one score in [0, 1] (higher is better).

    ``kind="true_better"``: mean(max(0, 1 - R)), used for retain / general sets (the model
    should prefer true answers). ``kind="closer_to_1"``: mean(min(R, 1 / R)), open-unlearning's
    forget-set truth ratio (1 when true and wrong answers are equally likely).
    """
    r = np.asarray(ratios, dtype=np.float64)
    if kind == "true_better":
        return float(np.mean(np.maximum(0.0, 1.0 - r)))
    if kind == "closer_to_1":
        with np.errstate(divide="ignore"):
            return float(np.mean(np.minimum(r, 1.0 / r)))
    raise ValueError(f"kind must be 'true_better' or 'closer_to_1', got {kind!r}")


def option_normalized_prob(correct_probs, wrong_probs) -> np.ndarray:
    """``p_correct / (p_correct + sum_k p_wrong_k)`` per row: TOFU's probability on the
    real-authors / world-facts sets, where wrong options are given. Shapes [N] and [N, K]
    (or ragged); returns float64 [N]."""
    correct = np.asarray(correct_probs, dtype=np.float64).reshape(-1)
    wrong = np.array([row.sum() for row in _rows_2d(wrong_probs)])
    return correct / (correct + wrong)


def forget_quality(tr_model, tr_retain_model) -> float:
    """KS-test p-value between two samples of raw forget-set truth ratios.

    ``tr_model``: [N] raw R of the model under test; ``tr_retain_model``: [M] raw R of the
    retain-only reference model. Returns ``scipy.stats.ks_2samp(...).pvalue`` (two-sided).
    """
    a = np.asarray(tr_model, dtype=np.float64).reshape(-1)
    b = np.asarray(tr_retain_model, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality needs non-empty truth-ratio samples")
    return float(stats.ks_2samp(a, b).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative scores (0.0 if any is 0, so one collapse shows)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("model_utility needs at least one value")
    if np.any(v < 0) or not np.all(np.isfinite(v)):
        raise ValueError(f"model_utility needs finite non-negative values, got {v.tolist()}")
    if np.any(v == 0):
        return 0.0
    return float(v.size / np.sum(1.0 / v))


def mia_auc(scores_forget, scores_holdout) -> float:
    """ROC AUC of a membership score, forget rows as the positive class.

    Scores are oriented "higher = looks like training data" (e.g. Min-K% Prob, a mean of
    log-probs). AUC = P(score_forget > score_holdout) + 0.5 P(tie), computed as the
    Mann-Whitney U / (n_forget * n_holdout) with average ranks for ties. Near 1: the model
    still treats the forget set as seen; near 0.5: forget looks like never-seen holdout
    (the goal of unlearning); well below 0.5: forget looks *less* familiar than unseen
    text, itself a detectable trace.
    """
    f = np.asarray(scores_forget, dtype=np.float64).reshape(-1)
    h = np.asarray(scores_holdout, dtype=np.float64).reshape(-1)
    if f.size == 0 or h.size == 0:
        raise ValueError("mia_auc needs non-empty forget and holdout scores")
    ranks = stats.rankdata(np.concatenate([f, h]))
    u = ranks[: f.size].sum() - f.size * (f.size + 1) / 2.0
    return float(u / (f.size * h.size))


def sparsity_integrity(masks: Mapping, model) -> float:
    """Fraction of originally pruned entries that are still exactly zero (1.0 = intact).

    ``masks``: name -> bool tensor (True where the weight was pruned), as returned by
    ``sau.prune.pruned_masks`` before unlearning; ``model``: the model after unlearning,
    looked up with ``model.get_parameter(name)``. 1.0 when nothing was pruned.
    """
    total = 0
    intact = 0
    with torch.no_grad():
        for name, mask in masks.items():
            weight = model.get_parameter(name).detach()
            mask = mask.to(weight.device)
            if mask.shape != weight.shape:
                raise ValueError(
                    f"mask for {name} has shape {tuple(mask.shape)}, "
                    f"weight has {tuple(weight.shape)}"
                )
            total += int(mask.sum())
            intact += int((mask & (weight == 0)).sum())
    return intact / total if total else 1.0
