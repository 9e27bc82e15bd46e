"""Model-side TOFU evaluation: answer log-probabilities, greedy answers, ROUGE, Min-K%.

Every function runs batched under ``torch.no_grad()`` with the model in eval mode (its
previous mode is restored). Encoding and padding come from `sau.batching`, not from the
tokenizer, so the tokenizer's ``padding_side`` does not matter: scoring pads on the
right, generation on the left, and transformers derives position ids from the mask.
Rows are sorted by length before batching to waste less compute on padding; results come
back in input order.

Text convention: ``prompts`` are rendered with ``sau.prompt.format_prompt`` and
``answers`` with ``sau.prompt.format_answer``; the scored answer tokens are the tokens of
the answer text, appended to the prompt's tokens (special tokens only on the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import GenerationConfig

from sau.batching import EncodedRow, encode_pair, encode_prompts, pad_id, pad_left, pad_right
from sau.lab.eval import metrics
from sau.prompt import format_answer, format_prompt

__all__ = [
    "answer_logprobs",
    "answer_token_logprobs",
    "encoded_token_logprobs",
    "evaluate_model",
    "generate_ids",
    "greedy_answers",
    "min_k_prob",
    "rouge_l_recall",
]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _encode_pairs(tok, prompts, answers) -> list[EncodedRow]:
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    # Scores read the answer tokens only: no EOS (sau.batching's answer mask).
    out = [encode_pair(tok, p, a, eos=False) for p, a in zip(prompts, answers)]
    for i, row in enumerate(out):
        if not row.n_prompt or not row.n_answer:
            raise ValueError(f"row {i}: prompt and answer must each give at least one token")
    return out


def _batches(lengths: Sequence[int], batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class _EvalMode:
    """Context manager: model.eval() + no_grad, restoring the training flag afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        self.no_grad.__exit__(*exc)


def answer_token_logprobs(
    model, tok, prompts, answers, batch_size: int = 16, progress: bool = False
) -> list[np.ndarray]:
    """Per-token log-probabilities of each answer given its prompt.

    Returns a list of N float64 arrays; row i has one natural-log probability per answer
    token (prompt tokens are conditioned on, never scored). Computed in float32.
    """
    return encoded_token_logprobs(
        model, tok, _encode_pairs(tok, prompts, answers), batch_size, progress
    )


def encoded_token_logprobs(
    model, tok, encoded: Sequence[EncodedRow], batch_size: int = 16, progress: bool = False
) -> list[np.ndarray]:
    """Per-token log-probabilities of every token after each row's prompt.

    encoded: N `sau.batching.EncodedRow`; row i scores ``ids[n_prompt:]`` (the answer, and
    the EOS when the row carries one). Returns a list of N float64 arrays, one natural-log
    probability per scored token, computed in float32 on right-padded batches.
    """
    pad, device = pad_id(tok), _device(model)
    out: list[np.ndarray | None] = [None] * len(encoded)
    lengths = [len(r.ids) for r in encoded]
    with _EvalMode(model):
        batches = list(_batches(lengths, batch_size))
        for idx in tqdm(batches, desc="score", disable=not progress, leave=False):
            input_ids, attn = pad_right([encoded[i].ids for i in idx], pad)
            input_ids, attn = input_ids.to(device), attn.to(device)
            logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
            # position t predicts token t+1
            token_lp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1))[
                ..., 0
            ]
            token_lp = token_lp.double().cpu().numpy()
            for row, i in enumerate(idx):
                n_prompt = encoded[i].n_prompt
                out[i] = token_lp[row, n_prompt - 1 : lengths[i] - 1]
    return out  # type: ignore[return-value]


def answer_logprobs(
    model, tok, prompts, answers, batch_size: int = 16, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Sum of answer-token log-probabilities and the answer token count per row.

    Args: ``prompts`` / ``answers``: N strings each (see module docstring for rendering).
    Returns ``(logprob_sum float64 [N], n_tokens int64 [N])``; the length-normalised
    probability is ``metrics.length_normalized_prob(logprob_sum, n_tokens)`` =
    ``exp(mean token log-prob)``.
    """
    return _sums(answer_token_logprobs(model, tok, prompts, answers, batch_size, progress))


def _sums(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    # (logprob_sum float64 [N], n_tokens int64 [N]) of per-token log-prob rows.
    sums = np.array([row.sum() for row in rows], dtype=np.float64)
    counts = np.array([row.size for row in rows], dtype=np.int64)
    return sums, counts


def min_k_prob(
    model, tok, prompts, answers, k: float = 0.2, batch_size: int = 16, progress: bool = False
) -> np.ndarray:
    """Min-K% Prob membership score per row (Shi et al., 2024): float64 [N].

    The mean of the lowest ``max(1, floor(k * n))`` answer-token log-probs. Higher means
    more likely seen in training (the orientation ``metrics.mia_auc`` expects).
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    return _min_k(answer_token_logprobs(model, tok, prompts, answers, batch_size, progress), k)


def _min_k(rows: list[np.ndarray], k: float) -> np.ndarray:
    # Min-K% of per-token log-prob rows: mean of the lowest max(1, floor(k * n)).
    return np.array(
        [np.sort(row)[: max(1, int(k * row.size))].mean() for row in rows], dtype=np.float64
    )


def greedy_answers(
    model,
    tok,
    prompts,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy continuation (``do_sample=False``) of each prompt, decoded and stripped.

    Returns N strings, only the newly generated text, special tokens removed. Prompts are
    left-padded so every row's continuation starts right after its last real token.
    """
    new = generate_ids(
        model, tok, encode_prompts(tok, prompts), max_new_tokens, batch_size, progress
    )
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in new]


def generate_ids(
    model,
    tok,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy continuation (``do_sample=False``) of each prompt given as token ids.

    Returns N lists of the newly generated token ids (padding after an EOS included:
    decode with ``skip_special_tokens=True``). Prompts are left-padded so every row's
    continuation starts right after its last real token.
    """
    encoded = [list(ids) for ids in prompt_ids]
    pad, device = pad_id(tok), _device(model)
    eos = tok.eos_token_id
    if eos is None:
        eos = getattr(model.generation_config, "eos_token_id", None)
    # A fresh config: the model's may carry sampling defaults (temperature, top_p).
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    out: list[list[int] | None] = [None] * len(encoded)
    lengths = [len(ids) for ids in encoded]
    with _EvalMode(model):
        batches = list(_batches(lengths, batch_size))
        for idx in tqdm(batches, desc="generate", disable=not progress, leave=False):
            input_ids, attn = pad_left([encoded[i] for i in idx], pad)
            width = input_ids.shape[1]
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attn.to(device),
                generation_config=gen_cfg,
            )
            new = generated[:, width:].cpu()
            for row, i in enumerate(idx):
                out[i] = new[row].tolist()
    return out  # type: ignore[return-value]


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L recall of each prediction against its reference: float64 [N].

    ``rouge_score``'s ``RougeScorer(["rougeL"], use_stemmer=True)``, the setting TOFU and
    open-unlearning report. Argument order matters: recall is over the reference's tokens.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array(
        [scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)],
        dtype=np.float64,
    )


def _prompts_answers(rows) -> tuple[list[str], list[str]]:
    return [format_prompt(r["question"]) for r in rows], [format_answer(r["answer"]) for r in rows]


def _split_scores(model, tok, rows, *, options: bool, kw: dict, answer_tokens=None):
    """One split's per-row numbers: probability, ROUGE, raw truth ratios (or None).

    answer_tokens: the rows' answer-token log-probs when the caller already has them
    (evaluate_model scores the forget answers once, for these numbers and the MIA).
    """
    batch_size, progress = kw["batch_size"], kw["progress"]
    prompts, answers = _prompts_answers(rows)
    if answer_tokens is None:
        answer_tokens = answer_token_logprobs(model, tok, prompts, answers, batch_size, progress)
    prob = metrics.length_normalized_prob(*_sums(answer_tokens))
    generated = greedy_answers(model, tok, prompts, kw["max_new_tokens"], batch_size, progress)
    rouge = rouge_l_recall(generated, [r["answer"] for r in rows])
    wrong = _wrong_answer_probs(model, tok, rows, prompts, batch_size, progress)
    ratios = None
    if wrong is not None:
        para = [format_answer(r.get("paraphrased_answer") or r["answer"]) for r in rows]
        lp, n = answer_logprobs(model, tok, prompts, para, batch_size, progress)
        ratios = metrics.truth_ratio(metrics.length_normalized_prob(lp, n), wrong)
    if options and wrong is not None:
        # TOFU's real-authors / world-facts probability: normalised over the options.
        prob = metrics.option_normalized_prob(prob, wrong)
    return prob, rouge, ratios


def _wrong_answer_probs(model, tok, rows, prompts, batch_size, progress):
    # Per row, the length-normalised probability of each perturbed (wrong) answer; None
    # when any row has none (no truth ratio for that split).
    if not rows or not all(r.get("perturbed_answer") for r in rows):
        return None
    perturbed = [
        [r["perturbed_answer"]]
        if isinstance(r["perturbed_answer"], str)
        else list(r["perturbed_answer"])
        for r in rows
    ]
    flat_prompts = [p for p, ws in zip(prompts, perturbed) for _ in ws]
    flat = [format_answer(w) for ws in perturbed for w in ws]
    lp, n = answer_logprobs(model, tok, flat_prompts, flat, batch_size, progress)
    flat_prob = metrics.length_normalized_prob(lp, n)
    bounds = np.cumsum([0] + [len(ws) for ws in perturbed])
    return [flat_prob[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _truth_ratio_score(ratios, kind: str):
    return None if ratios is None else metrics.truth_ratio_score(ratios, kind)


def evaluate_model(
    model,
    tok,
    *,
    forget: Sequence[dict],
    retain: Sequence[dict],
    general: Sequence[dict] | None = None,
    holdout: Sequence[dict] | None = None,
    retain_model_truth_ratios=None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> dict:
    """TOFU-style evaluation of one model on its forget / retain (/ general / holdout) rows.

    Rows are dicts with ``question``, ``answer``, optional ``paraphrased_answer`` (falls
    back to ``answer``) and optional ``perturbed_answer`` (list of wrong answers; when any
    row lacks it, that split's truth-ratio entries are None).

    Returns a dict of Python floats (or None):
        forget_rouge, retain_rouge: mean ROUGE-L recall of greedy answers.
        forget_prob, retain_prob: mean length-normalised answer probability.
        forget_truth_ratio: float64 [N_forget] raw R (the input of forget quality).
        forget_truth_ratio_score: mean(min(R, 1/R)) on forget (open-unlearning's figure).
        retain_truth_ratio: mean(max(0, 1 - R)) on retain.
        general_prob / general_rouge / general_truth_ratio: same, when ``general`` given;
            general_prob is normalised over the answer options when perturbed answers exist.
        model_utility: harmonic mean of the retain (and general) prob, ROUGE and
            truth-ratio scores that exist.
        forget_quality: KS p-value vs ``retain_model_truth_ratios`` (None without them).
        mia_auc: Min-K% (k=0.2) AUC of forget vs ``holdout`` (None without holdout).

    The forget answers are scored once: their token log-probs give both forget_prob and
    the forget side of the MIA.

    Raises:
        NonFiniteScoresError: an answer probability or truth-ratio score is NaN or inf
            (the model's outputs are not finite: NaN or overflowing weights).
    """
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    forget_tokens = answer_token_logprobs(
        model, tok, *_prompts_answers(forget), batch_size, progress
    )
    res = _forget_retain_scores(model, tok, forget, retain, forget_tokens, kw)
    keys = ["retain_prob", "retain_rouge", "retain_truth_ratio"]
    if general is not None:
        res.update(_general_scores(model, tok, general, kw))
        keys += ["general_prob", "general_rouge", "general_truth_ratio"]
    _check_finite(res, ["forget_prob", *keys])
    res["model_utility"] = metrics.model_utility([res[k] for k in keys if res[k] is not None])
    res["forget_quality"] = _forget_quality(res["forget_truth_ratio"], retain_model_truth_ratios)
    res["mia_auc"] = _mia_auc(model, tok, forget_tokens, holdout, kw)
    return res


class NonFiniteScoresError(ValueError):
    """`evaluate_model` found NaN or inf scores: the model's outputs are not finite."""


def _check_finite(res: dict, keys: list[str]) -> None:
    bad = [k for k in keys if res.get(k) is not None and not np.isfinite(res[k])]
    if bad:
        raise NonFiniteScoresError(
            f"its {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} NaN or inf: "
            "its outputs are not finite"
        )


def _forget_retain_scores(model, tok, forget, retain, forget_tokens, kw: dict) -> dict:
    """The forget and retain entries of `evaluate_model`'s result, in its key order.

    forget_tokens: the forget answers' token log-probs, already scored by the caller.
    """
    f_prob, f_rouge, f_tr = _split_scores(
        model, tok, forget, options=False, kw=kw, answer_tokens=forget_tokens
    )
    r_prob, r_rouge, r_tr = _split_scores(model, tok, retain, options=False, kw=kw)
    return {
        "forget_rouge": float(f_rouge.mean()),
        "retain_rouge": float(r_rouge.mean()),
        "forget_prob": float(f_prob.mean()),
        "retain_prob": float(r_prob.mean()),
        "forget_truth_ratio": f_tr,
        "forget_truth_ratio_score": _truth_ratio_score(f_tr, "closer_to_1"),
        "retain_truth_ratio": _truth_ratio_score(r_tr, "true_better"),
    }


def _general_scores(model, tok, general, kw: dict) -> dict:
    """general_prob (normalised over the answer options), general_rouge and
    general_truth_ratio of the general rows."""
    g_prob, g_rouge, g_tr = _split_scores(model, tok, general, options=True, kw=kw)
    return {
        "general_prob": float(g_prob.mean()),
        "general_rouge": float(g_rouge.mean()),
        "general_truth_ratio": _truth_ratio_score(g_tr, "true_better"),
    }


def _forget_quality(forget_truth_ratios, retain_model_truth_ratios) -> float | None:
    """KS forget quality, or None when either side's raw truth ratios are missing."""
    if retain_model_truth_ratios is None or forget_truth_ratios is None:
        return None
    return metrics.forget_quality(forget_truth_ratios, retain_model_truth_ratios)


def _mia_auc(model, tok, forget_tokens, holdout, kw: dict) -> float | None:
    """Min-K% (k=0.2) AUC of the forget rows against `holdout`; None without holdout.

    forget_tokens: the forget answers' token log-probs (not scored again here).
    """
    if holdout is None:
        return None
    holdout_scores = min_k_prob(
        model,
        tok,
        *_prompts_answers(holdout),
        k=0.2,
        batch_size=kw["batch_size"],
        progress=kw["progress"],
    )
    return metrics.mia_auc(_min_k(forget_tokens, 0.2), holdout_scores)
