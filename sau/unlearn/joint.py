"""Two-term objectives (forget term + retain term) from ONE forward over [forget; retain].

Why: GradDiff, NPO+RT and SimNPO+RT normally run two forward passes, so every weight is
used twice in one backward. Autograd's engine runs ready nodes in decreasing sequence
number, i.e. the whole second (retain) pass's backward before any node of the first
(forget) pass; each weight's AccumulateGrad waits for its forget contribution, and all
the retain pass's partial weight gradients stay buffered inside the engine meanwhile.
SAUAdamW(in_backward=True) then frees nothing until the end (measured on the CPU:
benchmarks/repro/in_backward_late_hooks.py). One forward over the concatenated rows uses
each weight once, so each weight's gradient is complete, stepped and freed as soon as
the backward has passed its layer.

The result equals the two-pass loss up to float rounding (other batch shapes, extra
right padding), not bitwise: hence an option (UnlearnConfig.joint_forward), off by
default. Padding: both batches are right-padded (sau.batching.collate) with attention
mask 0 and label IGNORE; padding a row further on the right changes no real position of
a causal LM, and the logits are cut back to each part's own length.
"""

from __future__ import annotations

import torch

from sau.batching import IGNORE_INDEX
from sau.unlearn import objectives as obj

__all__ = ["concat_batches", "joint_loss", "split_logits"]

_PAD = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}


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
            parts.append(torch.nn.functional.pad(part, (0, extra), value=fill))
        out[key] = torch.cat(parts)
    return out


def split_logits(logits: torch.Tensor, forget: dict, retain: dict):
    """The joint batch's logits [B_f + B_r, T, V] cut into each part's own [B, T_part, V]."""
    n_f, t_f = forget["input_ids"].shape
    t_r = retain["input_ids"].shape[1]
    return logits[:n_f, :t_f], logits[n_f:, :t_r]


def joint_loss(config, model, forget: dict, retain: dict, ref_logp, ref_model) -> torch.Tensor:
    """config.method's loss (graddiff | npo | simnpo, with a retain term) from one forward.

    Same terms, weights and denominators (including data-parallel ``loss_tokens`` /
    ``loss_rows`` of each part) as sau.unlearn.objectives; ref_logp [B_f] for NPO,
    ref_model for GradDiff's KL term (its own no-grad forward on the retain rows).
    Returns a 0-d float32 loss to minimize.
    """
    logits = obj._logits(model, concat_batches(forget, retain))
    f_logits, r_logits = split_logits(logits, forget, retain)
    retain_term = config.retain_weight * obj.nll_of_logits(r_logits, retain)
    if config.method == "graddiff":
        loss = -obj.nll_of_logits(f_logits, forget) + retain_term
        if config.kl_weight:
            loss = loss + config.kl_weight * obj.kl_of_logits(r_logits, ref_model, retain)
        return loss
    picked, live = obj._token_logprobs(f_logits, forget["labels"])
    logp = picked.sum(-1)
    rows = forget.get("loss_rows")
    if config.method == "npo":
        return obj.npo_term(logp, ref_logp, config.beta, rows) + retain_term
    if config.method == "simnpo":
        n_tokens = live.sum(-1).float()
        return obj.simnpo_term(logp, n_tokens, config.simnpo_beta, config.gamma, rows) + retain_term
    raise ValueError(f"joint_loss: method {config.method!r} has no retain term")
