"""Unlearning objectives: GA, GradDiff, NPO, SimNPO, over answer tokens only.

Every objective is a loss to *minimize* built from terms of the model's logits, so it
works with any optimizer (torch AdamW, SAUAdamW, SGD):

    L = F(forget) + retain_weight * NLL(retain) [+ kl_weight * KL(p_ref || p_model) on retain]

with the forget term F of each method (`TERMS`, where log pi(y|x) is a row's sequence
log-probability, |y| its number of answer tokens and means run over rows):

    ga, graddiff   F = -NLL(forget)
    npo            F = -(2/beta) mean log sigmoid(-beta * (log pi(y|x) - log pi_ref(y|x)))
    simnpo         F = -(2/beta) mean log sigmoid(-(beta/|y|) * log pi(y|x) - gamma)

GA has no retain term. GradDiff's retain term is part of its definition (added at any
weight, 0 included) and it alone has the KL term (kl_weight > 0 needs the starting model).
NPO's and SimNPO's retain term (their "+RT" form) is added only with a retain batch and a
nonzero retain_weight.

A batch is the dict `sau.batching.collate` builds: ``input_ids`` [B, T], ``attention_mask``
[B, T] and ``labels`` [B, T] holding -100 at prompt and padding positions, so every loss
and log-probability below is over the answer tokens (and the EOS that ends them) only.
Sequence log-probability: log pi(y|x) = sum over answer tokens t of log p(y_t | x, y_<t).
NLL is the mean negative log-probability per answer token of the batch.

Data parallelism (`sau.distributed`): a batch may carry ``loss_tokens`` and ``loss_rows``
(floats), the denominators of its token means and row means in place of its own counts.
A rank's slice of a global batch sets them to the global batch's counts divided by the
world size, so the ranks' averaged gradients are exactly the global batch's gradient. A
batch may also carry ``loss_weight`` (a float, default 1), which multiplies the terms
computed from that batch only: a rank whose slice of the forget batch is empty runs a
placeholder forget row with weight 0 and still adds its full share of the retain terms.

Where the logits come from is the only difference between the two forwards:

- separate (default): one forward of the model per term (forget rows; retain rows; the
  KL term its own forward of the retain rows).
- joint: one forward over the rows [forget; retain] (`concat_batches`), cut back into each
  part's logits (`split_logits`). With separate forwards every weight is used twice in one
  backward; autograd runs ready nodes in decreasing sequence number, i.e. the whole retain
  pass's backward before any node of the forget pass, so each weight's gradient waits for
  its forget contribution while all the retain pass's partial weight gradients stay
  buffered in the engine, and SAUAdamW(in_backward=True) frees nothing until the end. One
  forward uses each weight once: its gradient is complete, stepped and freed as soon as
  the backward has passed its layer. The loss equals the separate one up to float rounding
  (other batch shapes, extra right padding), not bitwise. Padding a row further on the
  right (attention mask 0, label -100) changes no real position of a causal LM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sau.batching import IGNORE_INDEX as IGNORE
from sau.names import METHODS

__all__ = [
    "TERMS",
    "Terms",
    "concat_batches",
    "ga_loss",
    "graddiff_loss",
    "kl_of_logits",
    "nll",
    "nll_of_logits",
    "npo_loss",
    "npo_term",
    "objective_loss",
    "sequence_logprobs",
    "simnpo_loss",
    "simnpo_term",
    "split_logits",
]

_PAD = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE}


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


def _sequence_logprobs(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    picked, live = _token_logprobs(logits, batch["labels"])
    return picked.sum(-1), live.sum(-1).float()


def sequence_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of answer-token log-probs, and the number of answer tokens.

    Returns (logp [B] float32, n_tokens [B] float32); logp carries gradients.
    """
    return _sequence_logprobs(_logits(model, batch), batch)


def nll(model, batch: dict) -> torch.Tensor:
    """Mean negative log-likelihood per answer token over the batch (the SFT loss), 0-d."""
    return nll_of_logits(_logits(model, batch), batch)


def nll_of_logits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """`nll` from the batch's logits [B, T, V] (any float dtype; math in float32).

    -sum of answer-token log-probs / the batch's ``loss_tokens`` (default: its number of
    answer tokens, at least 1). Returns a 0-d float32 tensor.
    """
    picked, live = _token_logprobs(logits, batch["labels"])
    return -picked.sum() / batch.get("loss_tokens", live.sum().clamp(min=1))


def kl_of_logits(logits: torch.Tensor, ref_model, batch: dict) -> torch.Tensor:
    """KL(p_ref || p_model) per answer token, averaged like `nll_of_logits` (keeps the
    retain distribution). `logits` [B, T, V] are the model's on `batch`; ref_model runs
    its own forward on `batch` under no_grad. Returns a 0-d float32 tensor."""
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


def _row_mean(x: torch.Tensor, n_rows: float | None) -> torch.Tensor:
    return x.mean() if n_rows is None else x.sum() / n_rows


def npo_term(
    logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1, n_rows: float | None = None
) -> torch.Tensor:
    """NPO's forget term on sequence log-probs logp, ref_logp [B].

    L = -(2/beta) * mean log sigmoid(-beta * (logp - ref_logp)); the mean divides by
    n_rows when given (a rank's slice of a global batch), else by len(logp).

    Equal to (2/beta) * mean log(1 + (pi/pi_ref)^beta); as beta -> 0 its gradient is GA's
    (Zhang et al. 2024, "Negative Preference Optimization", eq. 3).
    """
    return -(2.0 / beta) * _row_mean(F.logsigmoid(-beta * (logp - ref_logp.to(logp))), n_rows)


def simnpo_term(
    logp: torch.Tensor,
    n_tokens: torch.Tensor,
    beta: float = 2.5,
    gamma: float = 0.0,
    n_rows: float | None = None,
) -> torch.Tensor:
    """SimNPO's forget term on sequence log-probs logp [B] with n_tokens [B] answer tokens:
    -(2/beta) * mean log sigmoid(-(beta/|y|) * logp - gamma) (|y| = n_tokens, at least 1;
    the mean divides by n_rows when given, else by len(logp))."""
    inner = F.logsigmoid(-(beta / n_tokens.clamp(min=1)) * logp - gamma)
    return -(2.0 / beta) * _row_mean(inner, n_rows)


def _ascent(logits, forget, ref_logp, beta, gamma) -> torch.Tensor:
    return -nll_of_logits(logits, forget)


def _npo(logits, forget, ref_logp, beta, gamma) -> torch.Tensor:
    logp, _ = _sequence_logprobs(logits, forget)
    return npo_term(logp, ref_logp, beta, forget.get("loss_rows"))


def _simnpo(logits, forget, ref_logp, beta, gamma) -> torch.Tensor:
    logp, n_tokens = _sequence_logprobs(logits, forget)
    return simnpo_term(logp, n_tokens, beta, gamma, forget.get("loss_rows"))


@dataclass(frozen=True)
class Terms:
    """One method's loss terms.

    forget(logits, forget, ref_logp, beta, gamma): the forget term F from the forget rows'
        logits [B, T, V] (ref_logp [B]: NPO's reference sequence log-probs).
    retain: "none" (no retain term), "always" (added at any weight) or "weighted" (added
        with a retain batch and a nonzero weight).
    kl: whether kl_weight > 0 adds KL(p_ref || p_model) on the retain rows.
    needs: the arguments of the forget term that must not be None ("beta", "ref_logp").
    """

    forget: Callable[..., torch.Tensor]
    retain: str
    kl: bool = False
    needs: tuple[str, ...] = ()


# method -> its terms; the keys are sau.names.METHODS, in order.
TERMS = {
    "ga": Terms(_ascent, "none"),
    "graddiff": Terms(_ascent, "always", kl=True),
    "npo": Terms(_npo, "weighted", needs=("beta", "ref_logp")),
    "simnpo": Terms(_simnpo, "weighted", needs=("beta",)),
}


def concat_batches(forget: dict, retain: dict) -> dict:
    """One batch of the rows [forget; retain], right-padded to the longer length.

    forget, retain: collate() dicts (int64 [B_f, T_f] and [B_r, T_r] input_ids,
    attention_mask, labels). Returns the same keys, int64 [B_f + B_r, max(T_f, T_r)];
    padding is id 0 with attention mask 0 and label IGNORE (never read by a loss).
    """
    width = max(forget["input_ids"].shape[1], retain["input_ids"].shape[1])
    out = {}
    for key, fill in _PAD.items():
        parts = []
        for part in (forget[key], retain[key]):
            extra = width - part.shape[1]
            parts.append(F.pad(part, (0, extra), value=fill))
        out[key] = torch.cat(parts)
    return out


def split_logits(
    logits: torch.Tensor, forget: dict, retain: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint batch's logits [B_f + B_r, T, V] cut into each part's own [B, T_part, V]."""
    n_f, t_f = forget["input_ids"].shape
    t_r = retain["input_ids"].shape[1]
    return logits[:n_f, :t_f], logits[n_f:, :t_r]


def _separate_logits(model, forget: dict, retain: dict | None) -> Callable[[str], torch.Tensor]:
    """part ("forget" | "retain") -> the model's logits from a forward of that part alone,
    one forward per call."""
    parts = {"forget": forget, "retain": retain}
    return lambda part: _logits(model, parts[part])


def _joint_logits(model, forget: dict, retain: dict) -> Callable[[str], torch.Tensor]:
    """part -> that part's logits, cut from one forward over the rows [forget; retain]."""
    f_logits, r_logits = split_logits(
        _logits(model, concat_batches(forget, retain)), forget, retain
    )
    return {"forget": f_logits, "retain": r_logits}.__getitem__


def objective_loss(
    method: str,
    model,
    forget: dict,
    retain: dict | None = None,
    *,
    ref_logp: torch.Tensor | None = None,
    ref_model=None,
    beta: float | None = None,
    gamma: float = 0.0,
    retain_weight: float = 1.0,
    kl_weight: float = 0.0,
    joint: bool = False,
) -> torch.Tensor:
    """`method`'s loss (see the module: F(forget) + retain term [+ KL term]) on `model`.

    Args:
        method: one of `sau.names.METHODS` ("ga", "graddiff", "npo", "simnpo").
        model: a causal LM returning logits [B, T, V] (or an output with ``.logits``).
        forget, retain: collate() batches; retain is required by GradDiff, optional for
            NPO and SimNPO, unused by GA. Each may carry ``loss_weight`` (a float
            multiplying the terms computed from it; the module docstring).
        ref_logp: [B_f] the starting model's sequence log-probs of the forget rows (NPO).
        ref_model: the frozen starting model (GradDiff with kl_weight > 0).
        beta: NPO's or SimNPO's beta (required by those two); gamma: SimNPO's margin.
        retain_weight: weight of NLL(retain); kl_weight: weight of GradDiff's KL term
            (the other methods have none and ignore it).
        joint: compute the forget and retain terms from one forward over [forget; retain]
            (taken when a retain term with a nonzero weight is added; otherwise the
            forwards are separate, as with joint=False).

    Returns a 0-d float32 loss to minimize.

    Raises:
        ValueError: an unknown method, GradDiff without a retain batch, NPO or SimNPO
            without beta (NPO also without ref_logp), GradDiff's KL term without ref_model.
    """
    terms = _check_objective(method, retain, ref_logp, ref_model, beta, kl_weight)
    with_retain = retain is not None and (
        terms.retain == "always" or (terms.retain == "weighted" and bool(retain_weight))
    )
    if joint and with_retain and retain_weight:
        logits_of = _joint_logits(model, forget, retain)
    else:
        logits_of = _separate_logits(model, forget, retain)
    loss = terms.forget(logits_of("forget"), forget, ref_logp, beta, gamma)
    loss = loss * _weight(forget)
    r_scale = _weight(retain) if retain is not None else 1.0
    if with_retain:
        loss = loss + retain_weight * r_scale * nll_of_logits(logits_of("retain"), retain)
    if terms.kl and kl_weight:
        kl = kl_of_logits(logits_of("retain"), ref_model, retain)
        loss = loss + kl_weight * r_scale * kl
    return loss


def _weight(batch: dict) -> float:
    """A batch's ``loss_weight`` (module docstring), 1.0 when it carries none."""
    return float(batch.get("loss_weight", 1.0))


def _check_objective(method, retain, ref_logp, ref_model, beta, kl_weight) -> Terms:
    if method not in TERMS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    terms = TERMS[method]
    if terms.retain == "always" and retain is None:
        raise ValueError(f"{method} needs a retain batch")
    given = {"beta": beta, "ref_logp": ref_logp}
    for name in terms.needs:
        if given[name] is None:
            raise ValueError(f"{method} needs {name}")
    if terms.kl and kl_weight and ref_model is None:
        raise ValueError(f"{method} with kl_weight > 0 needs ref_model")
    return terms


def ga_loss(model, forget: dict) -> torch.Tensor:
    """Gradient ascent (GA): L = -NLL(forget).

    Minimizing it ascends the forget set's likelihood loss; the classic unlearning
    baseline (Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in
    Language Models"; TOFU, Maini et al. 2024). Unbounded below, so it eventually
    destroys the model; use few steps.
    """
    return objective_loss("ga", model, forget)


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
    variant); ``ref_model`` is then required (ValueError without it).
    """
    return objective_loss(
        "graddiff",
        model,
        forget,
        retain,
        ref_model=ref_model,
        retain_weight=retain_weight,
        kl_weight=kl_weight,
    )


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
    return objective_loss(
        "npo", model, forget, retain, ref_logp=ref_logp, beta=beta, retain_weight=retain_weight
    )


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
    return objective_loss(
        "simnpo", model, forget, retain, beta=beta, gamma=gamma, retain_weight=retain_weight
    )
