"""The open-unlearning evaluation protocol: TOFU numbers as open-unlearning reports them.

`evaluate_open_unlearning` reproduces the TOFU evaluator of open-unlearning
(github.com/locuslab/open-unlearning, checked at commit d3d7cf9; its src/evals/metrics and
configs/eval/tofu_metrics). It differs from our own protocol (`scoring.evaluate_model`):

- rows are rendered as open-unlearning does (`sau.prompt.encode_chat`: the tokenizer's
  chat template, or its template_args tags) and the appended EOS token is scored;
- retain metrics come from the retain-perturbed rows, and real authors and world facts
  are separate sets whose truth ratio uses ``answer`` as the correct answer;
- model utility is the harmonic mean of 9 values: retain, real authors and world facts,
  each with probability, ROUGE-L recall and truth ratio;
- MIA is Min-K% with k = 0.4 over the answer tokens without the EOS; privleak compares
  its AUC with the retain model's (or 0.5);
- generation is greedy up to 200 new tokens;
- forget quality reads the retain model's truth ratios from an open-unlearning eval JSON.

The result is a dict in the layout of open-unlearning's ``TOFU_EVAL.json`` (metric name ->
``agg_value`` and, per row index, ``value_by_index``), so that files written by
`write_eval_logs` can serve open-unlearning as retain logs and the other way round.
Not reproduced: extraction_strength (in open-unlearning's default summary), few-shot
prompts and truncation at max_length (512 tokens).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from rouge_score import rouge_scorer

from sau.batching import EncodedRow
from sau.errors import DataFormatError
from sau.lab.data.io import load_qa, require_fields
from sau.lab.eval import metrics
from sau.lab.eval.scoring import encoded_token_logprobs, generate_ids
from sau.prompt import TemplateArgs, chat_prompt_ids, encode_chat

__all__ = [
    "MODEL_UTILITY_KEYS",
    "PROTOCOLS",
    "SUMMARY_KEYS",
    "OpenUnlearningInputs",
    "OpenUnlearningProtocol",
    "chat_token_logprobs",
    "evaluate_open_unlearning",
    "load_template_args",
    "model_utility_of",
    "read_eval_logs",
    "retain_truth_ratios",
    "summarize",
    "write_eval_logs",
]

PROTOCOLS = ("sau", "open-unlearning")
# open-unlearning's model_utility pre_compute entries (configs/eval/tofu_metrics).
MODEL_UTILITY_KEYS = (
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "ra_Q_A_Prob_normalised",
    "ra_Q_A_ROUGE",
    "ra_Truth_Ratio",
    "wf_Q_A_Prob_normalised",
    "wf_Q_A_ROUGE",
    "wf_Truth_Ratio",
)
# Its TOFU summary (configs/eval/tofu.yaml), less extraction_strength.
SUMMARY_KEYS = (
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_quality",
    "forget_truth_ratio",
    "model_utility",
    "privleak",
)
_PARA_PERT = ("paraphrased_answer", "perturbed_answer")
_EPS = 1e-10  # open-unlearning's guard in truth ratios, option probabilities and privleak


@dataclass(frozen=True)
class OpenUnlearningProtocol:
    """open-unlearning's evaluation settings.

    template: how rows become token ids (`sau.prompt.TemplateArgs`; its configs/model).
    max_new_tokens: greedy generation length for ROUGE (its generation/default.yaml: 200).
    mia_k: the Min-K% fraction (its mia_min_k.yaml: 0.4).
    batch_size: rows per forward pass (results do not depend on it beyond rounding).
    privleak_ref: the reference AUC when the retain logs hold no mia_min_k (0.5).
    """

    template: TemplateArgs = field(default_factory=TemplateArgs)
    max_new_tokens: int = 200
    mia_k: float = 0.4
    batch_size: int = 32
    privleak_ref: float = 0.5

    def __post_init__(self):
        if not 0.0 < self.mia_k <= 1.0:
            raise ValueError(f"mia_k must be in (0, 1], got {self.mia_k}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")


def chat_token_logprobs(
    model,
    tok,
    questions: Sequence[str],
    answers: Sequence[str],
    template: TemplateArgs,
    *,
    eos: bool = True,
    batch_size: int = 32,
    progress: bool = False,
) -> list[np.ndarray]:
    """Log-probabilities of the scored tokens of each row, encoded by `sau.prompt.encode_chat`.

    Returns N float64 arrays: one natural-log probability per token after the prompt (the
    answer, any closing template tokens, then the EOS; without the EOS when eos=False).
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    encoded = []
    for i, (q, a) in enumerate(zip(questions, answers)):
        ids, n_prompt = encode_chat(tok, q, a, template)
        ids = ids if eos else ids[:-1]
        if n_prompt < 1 or len(ids) <= n_prompt:
            raise ValueError(f"row {i}: the prompt and the scored part must each have tokens")
        encoded.append(EncodedRow(ids, n_prompt, len(ids) - n_prompt))
    return encoded_token_logprobs(model, tok, encoded, batch_size, progress)


def _prob_entry(row_lp: np.ndarray) -> dict:
    # open-unlearning's evaluate_probability: avg_loss = mean token NLL, prob = exp(-avg_loss).
    avg_loss = float(-row_lp.mean())
    return {"prob": float(np.exp(-avg_loss)), "avg_loss": avg_loss}


def _probability(model, tok, rows, key: str, p: OpenUnlearningProtocol, token_rows=None):
    """open-unlearning's `probability` metric of `rows[i][key]` (a string, or a list of
    answers scored one by one). token_rows: the rows' token log-probs, when already
    scored (string keys only)."""
    lists = isinstance(rows[0][key], list)
    answers = [a for r in rows for a in (r[key] if lists else [r[key]])]
    questions = [r["question"] for r in rows for _ in (r[key] if lists else [r[key]])]
    if token_rows is None:
        token_rows = chat_token_logprobs(
            model, tok, questions, answers, p.template, batch_size=p.batch_size
        )
    entries = [_prob_entry(lp) for lp in token_rows]
    by_index, start = {}, 0
    for i, r in enumerate(rows):
        n = len(r[key]) if lists else 1
        chunk = entries[start : start + n]
        start += n
        by_index[str(i)] = (
            {s: [e[s] for e in chunk] for s in ("prob", "avg_loss")} if lists else chunk[0]
        )
    per_row = [np.mean(v["prob"]) for v in by_index.values()]
    return {"agg_value": float(np.mean(per_row)), "value_by_index": by_index}


def _rouge(model, tok, rows, p: OpenUnlearningProtocol) -> dict:
    """open-unlearning's `rouge` metric (eval_text_similarity): greedy answers against the
    answer text recovered from the tokens, as it does."""
    prompts = [chat_prompt_ids(tok, r["question"], p.template) for r in rows]
    new = generate_ids(model, tok, prompts, p.max_new_tokens, p.batch_size)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    stop = tok.decode([tok.eos_token_id])
    by_index = {}
    for i, (r, prompt, gen_ids) in enumerate(zip(rows, prompts, new)):
        full, _ = encode_chat(tok, r["question"], r["answer"], p.template)
        input_text, full_text, gen = (
            tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
            for ids in (prompt, full, gen_ids)
        )
        if stop and stop in gen:
            gen = gen.split(stop)[0]
        truth = full_text.replace(input_text, "").strip()
        s = scorer.score(truth, gen.strip())
        by_index[str(i)] = {
            "rouge1_recall": s["rouge1"].recall,
            "rougeL_f1": s["rougeL"].fmeasure,
            "rougeL_recall": s["rougeL"].recall,
            "input": input_text,
            "ground_truth": truth,
            "generation": gen.strip(),
        }
    agg = float(np.mean([v["rougeL_recall"] for v in by_index.values()]))
    return {"agg_value": agg, "value_by_index": by_index}


def _truth_ratio(correct: dict, wrong: dict, aggregator: str) -> dict:
    """open-unlearning's `truth_ratio`: per row geomean(P(wrong)) / P(correct), aggregated
    with "closer_to_1_better" (forget) or "true_better" (retain, real authors, world facts)."""
    idx = list(correct["value_by_index"])
    c_loss = np.array([np.mean(correct["value_by_index"][i]["avg_loss"]) for i in idx])
    w_loss = np.array([np.mean(wrong["value_by_index"][i]["avg_loss"]) for i in idx])
    ratios = np.exp(-w_loss) / (np.exp(-c_loss) + _EPS)
    if aggregator == "closer_to_1_better":
        agg = np.mean(np.minimum(ratios, 1 / (ratios + _EPS)))
    else:
        agg = np.mean(np.maximum(0, 1 - ratios))
    by_index = {i: {"score": float(v)} for i, v in zip(idx, ratios)}
    return {"agg_value": float(agg), "value_by_index": by_index}


def _prob_with_options(correct: dict, wrong: dict) -> dict:
    """open-unlearning's `probability_w_options`: P(answer) / (P(answer) + sum P(wrong))."""
    idx = list(correct["value_by_index"])
    c = np.array([correct["value_by_index"][i]["prob"] for i in idx])
    w = np.array([np.sum(wrong["value_by_index"][i]["prob"]) for i in idx])
    probs = c / (c + w + _EPS)
    by_index = {i: {"prob": float(v)} for i, v in zip(idx, probs)}
    return {"agg_value": float(np.mean(probs)), "value_by_index": by_index}


def _answer_sets(
    model, tok, rows, prefix: str, correct_key: str, p, aggregator: str, answer_tokens=None
):
    """The probability, ROUGE and truth-ratio logs of one set, open-unlearning's names.

    correct_key: the truth ratio's correct answer ("paraphrased_answer" for forget and
    retain, "answer" for real authors and world facts, as its configs have it).
    answer_tokens: the rows' answer token log-probs, when the caller has scored them.
    """
    logs = {f"{prefix}_Q_A_Prob": _probability(model, tok, rows, "answer", p, answer_tokens)}
    logs[f"{prefix}_Q_A_ROUGE"] = _rouge(model, tok, rows, p)
    wrong = _probability(model, tok, rows, "perturbed_answer", p)
    logs[f"{prefix}_Q_A_PERT_Prob"] = wrong
    if correct_key == "answer":
        correct = logs[f"{prefix}_Q_A_Prob"]
    else:
        correct = _probability(model, tok, rows, correct_key, p)
        logs[f"{prefix}_Q_A_PARA_Prob"] = correct
    name = "forget_truth_ratio" if prefix == "forget" else f"{prefix}_Truth_Ratio"
    logs[name] = _truth_ratio(correct, wrong, aggregator)
    return logs


def model_utility_of(logs: dict) -> float:
    """open-unlearning's model_utility (hm_aggregate): the harmonic mean of the agg_value
    of the 9 `MODEL_UTILITY_KEYS` entries of `logs` (0.0 when one of them is 0)."""
    return metrics.model_utility([logs[k]["agg_value"] for k in MODEL_UTILITY_KEYS])


def _min_k_scores(token_rows: list[np.ndarray], k: float) -> dict:
    """open-unlearning's MinKProbAttack over rows of token log-probs (EOS already left
    out): score = -mean of the lowest max(1, int(n * k)), "higher = less likely seen";
    0 for a row with no token left, as it scores one."""
    scores = [
        -np.sort(lp)[: max(1, int(lp.size * k))].mean() if lp.size else 0.0 for lp in token_rows
    ]
    by_index = {str(i): {"score": float(s)} for i, s in enumerate(scores)}
    return {"agg_value": float(np.mean(scores)), "value_by_index": by_index}


def _mia_min_k(model, tok, forget_tokens, holdout, p: OpenUnlearningProtocol) -> dict:
    """open-unlearning's mia_min_k: the AUC of its Min-K% score, holdout as the positive
    class (1 when forget rows look far more familiar than holdout rows)."""
    questions = [r["question"] for r in holdout]
    held = chat_token_logprobs(
        model, tok, questions, [r["answer"] for r in holdout], p.template,
        eos=False, batch_size=p.batch_size,
    )  # fmt: skip
    out = {
        "forget": _min_k_scores([lp[:-1] for lp in forget_tokens], p.mia_k),
        "holdout": _min_k_scores(held, p.mia_k),
    }
    f, h = ([v["score"] for v in out[s]["value_by_index"].values()] for s in ("forget", "holdout"))
    # sklearn's roc_auc_score with holdout as class 1: P(score_holdout > score_forget),
    # ties counted 1/2, which is metrics.mia_auc with holdout in the first place.
    auc = metrics.mia_auc(h, f)
    return {**out, "auc": auc, "agg_value": auc}


def _privleak(auc: float, retain_logs: dict | None, ref_value: float) -> dict:
    """open-unlearning's privleak: relative change of 1 - AUC against the retain model's."""
    mia = (retain_logs or {}).get("mia_min_k") or {}
    ref = mia.get("agg_value", ref_value)
    score, ref = 1 - auc, 1 - ref
    return {"agg_value": (score - ref) / (ref + _EPS) * 100}


def evaluate_open_unlearning(
    model,
    tok,
    *,
    forget: Sequence[dict],
    retain_perturbed: Sequence[dict],
    real_authors: Sequence[dict],
    world_facts: Sequence[dict],
    holdout: Sequence[dict] | None = None,
    retain_logs: dict | None = None,
    protocol: OpenUnlearningProtocol | None = None,
) -> dict:
    """Evaluate `model` as open-unlearning's TOFU evaluator does; see the module docstring.

    Rows are TOFU's (open-unlearning's datasets): forget (forget10_perturbed) and
    retain_perturbed need question, answer, paraphrased_answer and perturbed_answer (a
    list); real_authors and world_facts question, answer and perturbed_answer; holdout
    (for mia_min_k and privleak) question and answer. A row's index is its position.
    retain_logs: an open-unlearning eval JSON of the retain model (`read_eval_logs`): its
    forget_truth_ratio gives forget_quality (None without), its mia_min_k privleak's
    reference (0.5 without).

    Returns the eval logs: metric name -> {"agg_value": float, "value_by_index": ...},
    the layout of open-unlearning's TOFU_EVAL.json (`write_eval_logs`, `summarize`).
    """
    p = protocol or OpenUnlearningProtocol()
    for rows, need, where in (
        (forget, ("paraphrased_answer", "perturbed_answer"), "forget"),
        (retain_perturbed, ("paraphrased_answer", "perturbed_answer"), "retain_perturbed"),
        (real_authors, ("perturbed_answer",), "real_authors"),
        (world_facts, ("perturbed_answer",), "world_facts"),
        (holdout, (), "holdout"),
    ):
        if rows is not None:
            require_fields(list(rows), ("question", "answer", *need), where)
    forget_tokens = chat_token_logprobs(
        model, tok, [r["question"] for r in forget], [r["answer"] for r in forget],
        p.template, batch_size=p.batch_size,
    )  # fmt: skip
    logs = _answer_sets(
        model, tok, retain_perturbed, "retain", "paraphrased_answer", p, "true_better"
    )
    for prefix, rows in (("ra", real_authors), ("wf", world_facts)):
        logs.update(_answer_sets(model, tok, rows, prefix, "answer", p, "true_better"))
        logs[f"{prefix}_Q_A_Prob_normalised"] = _prob_with_options(
            logs[f"{prefix}_Q_A_Prob"], logs[f"{prefix}_Q_A_PERT_Prob"]
        )
    logs["model_utility"] = {"agg_value": model_utility_of(logs)}
    logs.update(_forget_logs(model, tok, forget, forget_tokens, retain_logs, p))
    if holdout is not None:
        logs["mia_min_k"] = _mia_min_k(model, tok, forget_tokens, holdout, p)
        logs["privleak"] = _privleak(logs["mia_min_k"]["agg_value"], retain_logs, p.privleak_ref)
    return logs


def _forget_logs(model, tok, forget, forget_tokens, retain_logs, p) -> dict:
    """forget_Q_A_Prob (from the already scored forget tokens), ROUGE, truth ratio and
    forget_quality (KS p-value against the retain logs' forget truth ratios)."""
    logs = _answer_sets(
        model, tok, forget, "forget", "paraphrased_answer", p, "closer_to_1_better", forget_tokens
    )
    ref = None if retain_logs is None else retain_truth_ratios(retain_logs)
    mine = [v["score"] for v in logs["forget_truth_ratio"]["value_by_index"].values()]
    logs["forget_quality"] = {
        "agg_value": None if ref is None else metrics.forget_quality(mine, ref)
    }
    return logs


def summarize(logs: dict) -> dict:
    """open-unlearning's TOFU_SUMMARY.json: metric name -> agg_value, for the metrics of
    its default TOFU summary (`SUMMARY_KEYS`) present with a value."""
    return {
        k: logs[k]["agg_value"]
        for k in SUMMARY_KEYS
        if k in logs and logs[k].get("agg_value") is not None
    }


def write_eval_logs(logs: dict, out_dir: str | os.PathLike, name: str = "TOFU") -> tuple:
    """Write `logs` as open-unlearning does: ``<name>_EVAL.json`` (keys sorted, indent 4)
    and ``<name>_SUMMARY.json`` (`summarize`). Returns the two paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / f"{name}_EVAL.json", out_dir / f"{name}_SUMMARY.json"
    for path, data in zip(paths, (dict(sorted(logs.items())), summarize(logs))):
        path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")
    return paths


def read_eval_logs(path: str | os.PathLike) -> dict:
    """Read an open-unlearning eval JSON (TOFU_EVAL.json, e.g. a retain model's logs).

    Raises:
        DataFormatError: one line, when the file is missing, not JSON, or not an object.
    """
    path = Path(path)
    try:
        logs = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataFormatError(f"{path}: not an open-unlearning eval JSON: {err}") from None
    if not isinstance(logs, dict):
        raise DataFormatError(f"{path}: not an open-unlearning eval JSON (expected an object)")
    return logs


def retain_truth_ratios(logs: dict) -> np.ndarray:
    """The per-row forget truth ratios of retain-model logs, float64 [N] in file order
    (what open-unlearning's forget_quality reads: forget_truth_ratio.value_by_index).

    Raises:
        DataFormatError: the logs hold no forget_truth_ratio scores.
    """
    try:
        rows = logs["forget_truth_ratio"]["value_by_index"].values()
        return np.array([float(v["score"]) for v in rows], dtype=np.float64)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise DataFormatError(
            "retain logs: no forget_truth_ratio.value_by_index.<i>.score entries "
            "(write them with open-unlearning's TOFU evaluation of the retain model)"
        ) from None


def load_template_args(path: str | os.PathLike) -> TemplateArgs:
    """`TemplateArgs` from a YAML or JSON file: open-unlearning's configs/model/<name>.yaml
    as is (its ``template_args`` key is read) or the template_args mapping alone.

    Raises:
        DataFormatError: one line, when the file is missing, unreadable or holds other keys.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataFormatError(f"{path}: cannot read template args: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("template_args"), dict):
        data = data["template_args"]
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a template_args mapping")
    try:
        return TemplateArgs.from_mapping(data)
    except (TypeError, ValueError) as err:
        raise DataFormatError(f"{path}: {err}") from None


@dataclass
class OpenUnlearningInputs:
    """What `evaluate_open_unlearning` reads besides the model, loaded and checked
    (`from_files`): the five row sets, the retain logs (or None) and the protocol."""

    forget: list
    retain_perturbed: list
    real_authors: list
    world_facts: list
    holdout: list | None
    retain_logs: dict | None
    protocol: OpenUnlearningProtocol

    @classmethod
    def from_files(
        cls,
        *,
        forget: str,
        retain_perturbed: str,
        real_authors: str,
        world_facts: str,
        holdout: str | None = None,
        retain_logs: str | None = None,
        template_args: str | None = None,
    ) -> OpenUnlearningInputs:
        """Load TOFU-format rows (`sau.lab.data.load_qa`), check the fields each set needs,
        read the retain logs (`read_eval_logs`; their forget truth ratios must be there)
        and the template args (`load_template_args`; None: `TemplateArgs()`).

        Raises:
            DataFormatError: one line naming the file and what is wrong with it.
        """
        rows = {}
        for name, path, need in (
            ("forget", forget, _PARA_PERT),
            ("retain_perturbed", retain_perturbed, _PARA_PERT),
            ("real_authors", real_authors, ("perturbed_answer",)),
            ("world_facts", world_facts, ("perturbed_answer",)),
        ):
            rows[name] = require_fields(load_qa(path), need, str(path))
        logs = None if retain_logs is None else read_eval_logs(retain_logs)
        if logs is not None:
            retain_truth_ratios(logs)  # refuse logs without them before any work
        template = TemplateArgs() if template_args is None else load_template_args(template_args)
        return cls(
            **rows,
            holdout=None if holdout is None else load_qa(holdout),
            retain_logs=logs,
            protocol=OpenUnlearningProtocol(template=template),
        )

    def evaluate(self, model, tok) -> dict:
        """`evaluate_open_unlearning` of `model` on these inputs: the eval logs."""
        return evaluate_open_unlearning(
            model,
            tok,
            forget=self.forget,
            retain_perturbed=self.retain_perturbed,
            real_authors=self.real_authors,
            world_facts=self.world_facts,
            holdout=self.holdout,
            retain_logs=self.retain_logs,
            protocol=self.protocol,
        )
