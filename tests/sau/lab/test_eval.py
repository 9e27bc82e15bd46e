"""Tests for sau.lab.eval: metrics against hand computations and reference libraries, and
batched model scoring against unbatched, unpadded computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from sau.lab.eval import metrics, scoring
from sau.prompt import format_answer, format_prompt

# ---------------------------------------------------------------- metrics (pure numbers)


def test_length_normalized_prob():
    got = metrics.length_normalized_prob([math.log(0.5) * 2, math.log(0.1)], [2, 1])
    np.testing.assert_allclose(got, [0.5, 0.1])
    with pytest.raises(ValueError, match="n_tokens"):
        metrics.length_normalized_prob([0.0], [0])


def test_truth_ratio_hand_case():
    # row 0: geomean(0.1, 0.4) = 0.2, / 0.5 = 0.4; row 1 (ragged, one option): 0.3 / 0.2
    r = metrics.truth_ratio([0.5, 0.2], [[0.1, 0.4], [0.3]])
    np.testing.assert_allclose(r, [0.4, 1.5])
    assert metrics.truth_ratio_score(r, "true_better") == pytest.approx((0.6 + 0.0) / 2)
    assert metrics.truth_ratio_score(r, "closer_to_1") == pytest.approx((0.4 + 1 / 1.5) / 2)
    with pytest.raises(ValueError, match="kind"):
        metrics.truth_ratio_score(r, "median")


def test_option_normalized_prob():
    got = metrics.option_normalized_prob([0.6, 0.2], [[0.2, 0.2], [0.8]])
    np.testing.assert_allclose(got, [0.6, 0.2])


def test_forget_quality_hand_computed_ks():
    # Exact two-sided KS p-values, counted by hand over the C(n+m, n) equally likely
    # orderings of the pooled sample.
    # Disjoint samples: D = 1, reached only by "all a first" or "all b first": 2 / C(6, 3).
    assert metrics.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / 20, abs=1e-12)
    assert metrics.forget_quality([1.0, 2.0], [3.0, 4.0]) == pytest.approx(2 / 6, abs=1e-12)
    # a = 1, 2, 4 vs b = 3, 5, 6: D = 2/3. The orderings with D < 2/3 keep |#a - #b| <= 1
    # in every prefix: three (ab | ba) pairs, 2**3 = 8 of the 20, so P(D >= 2/3) = 12/20.
    assert metrics.forget_quality([1, 2, 4], [3, 5, 6]) == pytest.approx(12 / 20, abs=1e-12)
    # Identical samples: D = 0, p = 1 (the retain model against itself).
    assert metrics.forget_quality([0.1, 0.5, 2.0], [0.1, 0.5, 2.0]) == pytest.approx(1.0)


def test_model_utility_harmonic_mean():
    assert metrics.model_utility([0.5, 0.25]) == pytest.approx(2 / (2 + 4))
    assert metrics.model_utility([0.5, 0.0, 0.9]) == 0.0
    assert metrics.model_utility([0.3]) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        metrics.model_utility([-0.1, 0.5])


def _auc_by_pairs(pos, neg):
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_mia_auc_against_reference():
    rng = np.random.default_rng(1)
    f, h = rng.normal(0.5, 1, 30).round(1), rng.normal(0, 1, 20).round(1)  # ties on purpose
    got = metrics.mia_auc(f, h)
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        want = _auc_by_pairs(f, h)
    else:
        want = roc_auc_score(np.r_[np.ones(f.size), np.zeros(h.size)], np.r_[f, h])
    assert got == pytest.approx(want, abs=1e-12)
    assert metrics.mia_auc([3.0, 4.0], [1.0, 2.0]) == 1.0  # forget all more familiar
    assert metrics.mia_auc([1.0], [1.0]) == 0.5


def test_sparsity_integrity_detects_change():
    from torch import nn

    from sau.prune import prune_model, pruned_masks

    model = nn.Sequential(nn.ModuleList([nn.Linear(8, 4)]))
    lin = model[0][0]
    prune_model(model, "magnitude", 0.5, progress=False)
    masks = pruned_masks(model)
    assert list(masks) == ["0.0.weight"] and int(masks["0.0.weight"].sum()) == 16
    assert metrics.sparsity_integrity(masks, model) == 1.0
    with torch.no_grad():
        lin.weight.add_(torch.where(lin.weight == 0, 0.0, 1.0))  # survivors move: still intact
        assert metrics.sparsity_integrity(masks, model) == 1.0
        idx = masks["0.0.weight"].nonzero()[0]
        lin.weight[idx[0], idx[1]] = 1e-6
    assert metrics.sparsity_integrity(masks, model) == pytest.approx(15 / 16)


# ---------------------------------------------------------------- model scoring

CORPUS = [
    "the capital of france is paris and the sky is blue",
    "alice was born in lyon and writes novels about the sea",
    "bob works as a chef in rome he likes green tea",
]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from sau.prompt import PROMPT_TEMPLATE

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS + [PROMPT_TEMPLATE], trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


ROWS = [
    {
        "question": "What is the capital of France?",
        "answer": "Paris",
        "paraphrased_answer": "it is paris",
        "perturbed_answer": ["Rome", "Lyon is it"],
    },
    {
        "question": "Where was Alice born?",
        "answer": "Alice was born in Lyon by the sea",
        "perturbed_answer": ["in Rome", "Paris", "she was born at sea"],
    },
    {
        "question": "What does Bob drink?",
        "answer": "green tea",
        "paraphrased_answer": "tea that is green",
        "perturbed_answer": ["blue sky"],
    },
    {
        "question": "Who writes novels about the sea and where?",
        "answer": "alice, in lyon",
        "perturbed_answer": ["bob in rome"],
    },
]
PROMPTS = [format_prompt(r["question"]) for r in ROWS]
ANSWERS = [format_answer(r["answer"]) for r in ROWS]


def _manual_logprobs(model, tok, prompt, answer):
    # one row, no padding, no attention mask: the plainest possible computation
    p = tok(prompt)["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return [logp[len(p) - 1 + j, a[j]].item() for j in range(len(a))]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_answer_logprobs_match_manual(model, tok, batch_size):
    sums, counts = scoring.answer_logprobs(model, tok, PROMPTS, ANSWERS, batch_size=batch_size)
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        want = _manual_logprobs(model, tok, p, a)
        assert counts[i] == len(want)
        assert sums[i] == pytest.approx(sum(want), abs=1e-5)


def test_min_k_prob_matches_manual(model, tok):
    got = scoring.min_k_prob(model, tok, PROMPTS, ANSWERS, k=0.5, batch_size=3)
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        lp = sorted(_manual_logprobs(model, tok, p, a))
        want = np.mean(lp[: max(1, int(0.5 * len(lp)))])
        assert got[i] == pytest.approx(want, abs=1e-5)


def test_greedy_answers_batched_equals_unbatched(model, tok):
    batched = scoring.greedy_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=4)
    single = [scoring.greedy_answers(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single
    assert all(isinstance(s, str) for s in batched)


def test_greedy_answers_match_manual_argmax(model, tok):
    # greedy decoding by hand on the longest prompt, no padding
    ids = tok(PROMPTS[3])["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(4):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    want = tok.decode(new, skip_special_tokens=True).strip()
    got = scoring.greedy_answers(model, tok, PROMPTS, max_new_tokens=4, batch_size=4)[3]
    assert got == want


def test_rouge_l_recall_matches_rouge_score():
    from rouge_score import rouge_scorer

    preds = ["paris is the capital", "born in rome", "", "green teas"]
    refs = ["The capital is Paris", "Alice was born in Lyon", "green tea", "green tea"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = [scorer.score(r, p)["rougeL"].recall for p, r in zip(preds, refs)]
    np.testing.assert_allclose(scoring.rouge_l_recall(preds, refs), want)
    assert scoring.rouge_l_recall(["a b c"], ["a b c d"])[0] == pytest.approx(0.75)


def test_evaluate_model_keys_and_consistency(model, tok):
    res = scoring.evaluate_model(
        model,
        tok,
        forget=ROWS[:2],
        retain=ROWS[2:],
        general=ROWS[1:3],
        holdout=ROWS[2:3],
        retain_model_truth_ratios=[0.5, 0.7, 0.9],
        batch_size=2,
        max_new_tokens=4,
        progress=False,
    )
    # forget probability and truth ratio recomputed by hand from answer_logprobs
    s, n = scoring.answer_logprobs(model, tok, PROMPTS[:2], ANSWERS[:2])
    assert res["forget_prob"] == pytest.approx(float(np.exp(s / n).mean()))
    para = [format_answer(r.get("paraphrased_answer", r["answer"])) for r in ROWS[:2]]
    sp, n_p = scoring.answer_logprobs(model, tok, PROMPTS[:2], para)
    wrong = []
    for r, p in zip(ROWS[:2], PROMPTS[:2]):
        sw, nw = scoring.answer_logprobs(
            model,
            tok,
            [p] * len(r["perturbed_answer"]),
            [format_answer(w) for w in r["perturbed_answer"]],
        )
        wrong.append(np.exp(np.mean(sw / nw)))
    np.testing.assert_allclose(res["forget_truth_ratio"], np.array(wrong) / np.exp(sp / n_p))
    assert (
        res["forget_quality"] == stats.ks_2samp(res["forget_truth_ratio"], [0.5, 0.7, 0.9]).pvalue
    )
    parts = [
        res[k]
        for k in (
            "retain_prob",
            "retain_rouge",
            "retain_truth_ratio",
            "general_prob",
            "general_rouge",
            "general_truth_ratio",
        )
    ]
    assert res["model_utility"] == pytest.approx(metrics.model_utility(parts))

    # MIA: Min-K% (k = 0.2) recomputed from the token log-probs, AUC counted by pairs.
    def min_k(rows):
        toks = scoring.answer_token_logprobs(
            model,
            tok,
            [format_prompt(r["question"]) for r in rows],
            [format_answer(r["answer"]) for r in rows],
        )
        return [np.sort(t)[: max(1, int(0.2 * t.size))].mean() for t in toks]

    want = _auc_by_pairs(min_k(ROWS[:2]), min_k(ROWS[2:3]))
    assert want != 0.5  # so a swapped forget/holdout (1 - AUC) would be caught
    assert res["mia_auc"] == pytest.approx(want, abs=1e-12)


def test_evaluate_model_mia_of_forget_against_itself_is_one_half(model, tok):
    # Holdout == forget: every pair ties, so the AUC is exactly 0.5 for any model.
    res = scoring.evaluate_model(
        model, tok, forget=ROWS[:2], retain=ROWS[2:], holdout=ROWS[:2],
        max_new_tokens=1, progress=False,
    )  # fmt: skip
    assert res["mia_auc"] == 0.5


def test_evaluate_model_without_perturbed(model, tok):
    rows = [{"question": r["question"], "answer": r["answer"]} for r in ROWS]
    res = scoring.evaluate_model(
        model,
        tok,
        forget=rows[:2],
        retain=rows[2:],
        retain_model_truth_ratios=[0.5],
        max_new_tokens=2,
        progress=False,
    )
    assert res["forget_truth_ratio"] is None and res["retain_truth_ratio"] is None
    assert res["forget_quality"] is None and res["mia_auc"] is None
    assert res["model_utility"] == pytest.approx(
        metrics.model_utility([res["retain_prob"], res["retain_rouge"]])
    )
