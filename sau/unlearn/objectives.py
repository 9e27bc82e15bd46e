"""Unlearning objectives: GA, GradDiff, NPO, SimNPO, over answer tokens only.

Every objective is a plain function of a model and batches and returns a 0-d loss to
*minimize*, so it works with any optimizer (torch AdamW, SAUAdamW, SGD). A batch is the
dict `sau.batching.collate` builds: ``input_ids`` [B, T], ``attention_mask`` [B, T] and
``labels`` [B, T] holding -100 at prompt and padding positions, so every loss and
log-probability below is over the answer tokens (and the EOS that ends them) only.

Sequence log-probability: log pi(y|x) = sum over answer tokens t of log p(y_t | x, y_<t).

Data parallelism (`sau.distributed`): a batch may carry ``loss_tokens`` and ``loss_rows``
(floats), the denominators of its token means and row means in place of its own counts.
A rank's slice of a global batch sets them to the global batch's counts divided by the
world size, so the ranks' averaged gradients are exactly the global batch's gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sau.batching import IGNORE_INDEX as IGNORE
from sau.names import METHODS

__all__ = [
    "METHODS",
    "ga_loss",
    "graddiff_loss",
    "kl_of_logits",
    "nll",
    "nll_of_logits",
    "npo_loss",
    "npo_term",
    "sequence_logprobs",
    "simnpo_loss",
    "simnpo_term",
]


def _logits(model, batch: dict) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    )
    return out.logits if hasattr(out, "logits") else out


def _token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # Position t predicts token t + 1: shift, then gather the label's log-prob.
    logits = logits[:, :-1].float()
    labels = labels[:, 1:].to(logits.device)
    live = labels != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * live, live


def sequence_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of answer-token log-probs, and the number of answer tokens.

    Returns (logp [B] float32, n_tokens [B] float32); logp carries gradients.
    """
    picked, live = _token_logprobs(_logits(model, batch), batch["labels"])
    return picked.sum(-1), live.sum(-1).float()


def nll(model, batch: dict) -> torch.Tensor:
    """Mean negative log-likelihood per answer token over the batch (the SFT loss)."""
    return nll_of_logits(_logits(model, batch), batch)


def nll_of_logits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """`nll` from the batch's logits [B, T, V] (any float dtype; math in float32)."""
    picked, live = _token_logprobs(logits, batch["labels"])
    return -picked.sum() / batch.get("loss_tokens", live.sum().clamp(min=1))


def ga_loss(model, forget: dict) -> torch.Tensor:
    """Gradient ascent (GA): L = -NLL(forget).

    Minimizing it ascends the forget set's likelihood loss; the classic unlearning
    baseline (Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in
    Language Models"; TOFU, Maini et al. 2024). Unbounded below, so it eventually
    destroys the model; use few steps.
    """
    return -nll(model, forget)


def _kl_to_reference(model, ref_model, batch: dict) -> torch.Tensor:
    return kl_of_logits(_logits(model, batch), ref_model, batch)


def kl_of_logits(logits: torch.Tensor, ref_model, batch: dict) -> torch.Tensor:
    """KL(p_ref || p_model) per answer token, averaged (keeps the retain distribution);
    `logits` [B, T, V] are the model's on `batch`, ref_model runs under no_grad."""
    logits = logits[:, :-1].float()
    with torch.no_grad():
        ref = _logits(ref_model, batch)[:, :-1].float()
    live = (batch["labels"][:, 1:] != IGNORE).to(logits.device)
    kl = F.kl_div(
        torch.log_softmax(logits, -1),
        torch.log_softmax(ref, -1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    return (kl * live).sum() / batch.get("loss_tokens", live.sum().clamp(min=1))


def graddiff_loss(
    model,
    forget: dict,
    retain: dict,
    *,
    retain_weight: float = 1.0,
    kl_weight: float = 0.0,
    ref_model=None,
) -> torch.Tensor:
    """Gradient difference (GradDiff): L = -NLL(forget) + retain_weight * NLL(retain)
    [+ kl_weight * KL(p_ref || p_model) on retain].

    Ascent on the forget set, descent on the retain set so the rest of the model's
    knowledge is kept (Liu et al. 2022, "Continual Learning and Private Unlearning";
    TOFU's "Grad. Diff.", Maini et al. 2024). With ``kl_weight > 0`` the retain term also
    holds the answer distributions close to the starting model ``ref_model`` (TOFU's KL
    variant); ``ref_model`` is then required.
    """
    loss = -nll(model, forget) + retain_weight * nll(model, retain)
    if kl_weight:
        if ref_model is None:
            raise ValueError("graddiff_loss with kl_weight > 0 needs ref_model")
        loss = loss + kl_weight * _kl_to_reference(model, ref_model, retain)
    return loss


def _row_mean(x: torch.Tensor, n_rows: float | None) -> torch.Tensor:
    return x.mean() if n_rows is None else x.sum() / n_rows


def npo_term(
    logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1, n_rows: float | None = None
) -> torch.Tensor:
    """NPO's forget loss on sequence log-probs.

    L = -(2/beta) * mean log sigmoid(-beta * (logp - ref_logp)); the mean divides by
    n_rows when given (a rank's slice of a global batch), else by len(logp).

    Equal to (2/beta) * mean log(1 + (pi/pi_ref)^beta); as beta -> 0 its gradient is GA's
    (Zhang et al. 2024, "Negative Preference Optimization", eq. 3).
    """
    return -(2.0 / beta) * _row_mean(F.logsigmoid(-beta * (logp - ref_logp.to(logp))), n_rows)


def npo_loss(
    model,
    forget: dict,
    ref_logp: torch.Tensor,
    retain: dict | None = None,
    *,
    beta: float = 0.1,
    retain_weight: float = 1.0,
) -> torch.Tensor:
    """Negative Preference Optimization (Zhang, Lin, Bai, Mei 2024, arXiv 2404.05868).

    L = -(2/beta) E_forget[log sigmoid(-beta * (log pi(y|x) - log pi_ref(y|x)))]
        + retain_weight * NLL(retain)   (the "NPO+RT" form TOFU results use).

    NPO treats forget answers as dispreferred responses of DPO without a preferred one;
    the loss is bounded below (0), so unlike GA it slows down instead of collapsing.
    ``ref_logp`` [B]: the starting model's sequence log-probs of these forget rows
    (computed once, before unlearning). beta = 0.1 as in the paper's TOFU runs.
    """
    logp, _ = sequence_logprobs(model, forget)
    loss = npo_term(logp, ref_logp, beta, forget.get("loss_rows"))
    if retain is not None and retain_weight:
        loss = loss + retain_weight * nll(model, retain)
    return loss


def simnpo_term(
    logp: torch.Tensor,
    n_tokens: torch.Tensor,
    beta: float = 2.5,
    gamma: float = 0.0,
    n_rows: float | None = None,
) -> torch.Tensor:
    """SimNPO's forget loss: -(2/beta) * mean log sigmoid(-(beta/|y|) * logp - gamma)
    (the mean divides by n_rows when given, else by len(logp))."""
    inner = F.logsigmoid(-(beta / n_tokens.clamp(min=1)) * logp - gamma)
    return -(2.0 / beta) * _row_mean(inner, n_rows)


def simnpo_loss(
    model,
    forget: dict,
    retain: dict | None = None,
    *,
    beta: float = 2.5,
    gamma: float = 0.0,
    retain_weight: float = 1.0,
) -> torch.Tensor:
    """SimNPO (Fan, Liu, Lin, Jia, Zhang, Mei, Liu 2024, "Simplicity Prevails:
    Rethinking Negative Preference Optimization for LLM Unlearning", arXiv 2410.07163).

    L = -(2/beta) E_forget[log sigmoid(-(beta/|y|) log pi(y|x) - gamma)]
        + retain_weight * NLL(retain).

    NPO's reference model is replaced by length normalisation (|y| = answer tokens)
    and a reward margin gamma, so no reference log-probs are needed and long answers do
    not dominate. beta = 2.5, gamma = 0 are our defaults (the paper tunes per task).
    """
    logp, n_tokens = sequence_logprobs(model, forget)
    loss = simnpo_term(logp, n_tokens, beta, gamma, forget.get("loss_rows"))
    if retain is not None and retain_weight:
        loss = loss + retain_weight * nll(model, retain)
    return loss
