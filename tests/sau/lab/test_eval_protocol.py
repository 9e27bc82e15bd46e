"""Tests for sau.lab.eval.open_unlearning (the open-unlearning evaluation protocol) and the
chat-format encoding in sau.prompt: EOS scoring, the 9-value utility, Min-K% with k = 0.4,
chat template versus template args, and open-unlearning's eval JSON in and out."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from scipy import stats

from sau.errors import DataFormatError
from sau.lab.data import generate
from sau.lab.eval.open_unlearning import (
    MODEL_UTILITY_KEYS,
    SUMMARY_KEYS,
    OpenUnlearningProtocol,
    chat_token_logprobs,
    evaluate_open_unlearning,
    load_template_args,
    model_utility_of,
    read_eval_logs,
    retain_truth_ratios,
    summarize,
    write_eval_logs,
)
from sau.prompt import TemplateArgs, chat_prompt_ids, encode_chat

pytestmark = pytest.mark.usefixtures("one_thread")

# A minimal retain-model log in open-unlearning's TOFU_EVAL.json layout, written by hand.
RETAIN_LOGS = {
    "forget_truth_ratio": {
        "agg_value": 0.7,
        "value_by_index": {"0": {"score": 0.5}, "1": {"score": 1.25}, "2": {"score": 0.9}},
    },
    "mia_min_k": {"agg_value": 0.4},
}
# Jinja chat template: role-tagged turns, an assistant header for generation.
CHAT = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def rows():
    splits = generate(seed=0, n_people=5, n_general=4).splits()
    return {
        "forget": splits["forget"][:6],
        "retain_perturbed": splits["retain"][:6],
        "real_authors": splits["general"],
        "world_facts": splits["retain"][6:10],
        "holdout": splits["holdout"][:6],
    }


@pytest.fixture(scope="module")
def lm(make_tiny_lm):
    return make_tiny_lm(seed=4)


@pytest.fixture(scope="module")
def logs(lm, rows, tmp_path_factory):
    path = tmp_path_factory.mktemp("ou") / "retain_TOFU_EVAL.json"
    path.write_text(json.dumps(RETAIN_LOGS))
    protocol = OpenUnlearningProtocol(max_new_tokens=4, batch_size=4)
    return evaluate_open_unlearning(
        *lm, **rows, retain_logs=read_eval_logs(path), protocol=protocol
    )


def test_eos_is_scored_and_differs_by_its_log_prob(lm, rows):
    model, tok = lm
    q = [r["question"] for r in rows["forget"]]
    a = [r["answer"] for r in rows["forget"]]
    with_eos = chat_token_logprobs(model, tok, q, a, TemplateArgs(), batch_size=4)
    without = chat_token_logprobs(model, tok, q, a, TemplateArgs(), eos=False, batch_size=3)
    for i, (w, wo) in enumerate(zip(with_eos, without)):
        assert w.size == wo.size + 1
        np.testing.assert_allclose(w[:-1], wo, rtol=0, atol=1e-5)
        # The last scored token is the EOS; its log-prob from one unpadded forward pass.
        ids, _ = encode_chat(tok, q[i], a[i], TemplateArgs())
        assert ids[-1] == tok.eos_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0, -1].float()
        eos_lp = torch.log_softmax(logits, -1)[tok.eos_token_id].item()
        assert w.sum() - wo.sum() == pytest.approx(eos_lp, abs=1e-4)
        assert w[-1] == pytest.approx(eos_lp, abs=1e-5)


def test_model_utility_is_the_harmonic_mean_of_nine_values(logs):
    assert MODEL_UTILITY_KEYS == (
        "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
        "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
        "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio",
    )  # fmt: skip
    assert logs["model_utility"]["agg_value"] == model_utility_of(logs)
    # Nine distinct values beside entries that must not count (forget, PERT, unnormalised).
    fake = {k: {"agg_value": 0.1 * (i + 1)} for i, k in enumerate(MODEL_UTILITY_KEYS)}
    decoys = ("forget_Q_A_Prob", "ra_Q_A_Prob", "wf_Q_A_Prob", "retain_Q_A_PERT_Prob")
    fake.update({k: {"agg_value": 0.99} for k in decoys})
    nine = [0.1 * (i + 1) for i in range(9)]
    assert model_utility_of(fake) == pytest.approx(stats.hmean(nine), rel=1e-12)
    for k in MODEL_UTILITY_KEYS:  # each of the nine moves it
        moved = {**fake, k: {"agg_value": fake[k]["agg_value"] * 2}}
        assert model_utility_of(moved) != pytest.approx(stats.hmean(nine), rel=1e-9)
    fake[MODEL_UTILITY_KEYS[4]] = {"agg_value": 0.0}
    assert model_utility_of(fake) == 0.0  # one collapsed value zeroes it, as scipy's hmean


def test_real_authors_truth_ratio_uses_answer_not_paraphrase(logs):
    assert "ra_Q_A_PARA_Prob" not in logs and "retain_Q_A_PARA_Prob" in logs
    correct = logs["ra_Q_A_Prob"]["value_by_index"]["0"]["prob"]
    wrong = np.exp(np.mean(np.log(logs["ra_Q_A_PERT_Prob"]["value_by_index"]["0"]["prob"])))
    got = logs["ra_Truth_Ratio"]["value_by_index"]["0"]["score"]
    assert got == pytest.approx(wrong / (correct + 1e-10), rel=1e-9)  # its 1e-10 guard


def test_mia_min_k_uses_k_04_without_the_eos(lm, rows, logs):
    model, tok = lm
    held = rows["holdout"]
    lps = chat_token_logprobs(
        model, tok, [r["question"] for r in held], [r["answer"] for r in held], TemplateArgs(),
        eos=False,
    )  # fmt: skip
    for i, lp in enumerate(lps):
        n = max(1, int(0.4 * lp.size))
        expect = -np.sort(lp)[:n].mean()
        got = logs["mia_min_k"]["holdout"]["value_by_index"][str(i)]["score"]
        assert got == pytest.approx(expect, abs=1e-9)
    assert any(int(0.4 * lp.size) != int(0.2 * lp.size) for lp in lps)  # k matters here
    f = [v["score"] for v in logs["mia_min_k"]["forget"]["value_by_index"].values()]
    h = [v["score"] for v in logs["mia_min_k"]["holdout"]["value_by_index"].values()]
    pairs = [(b > a) + 0.5 * (b == a) for a in f for b in h]  # holdout scored as class 1
    assert logs["mia_min_k"]["agg_value"] == pytest.approx(np.mean(pairs), abs=1e-12)


def test_forget_quality_and_privleak_read_the_retain_logs(logs):
    mine = [v["score"] for v in logs["forget_truth_ratio"]["value_by_index"].values()]
    expect = stats.ks_2samp(mine, [0.5, 1.25, 0.9]).pvalue
    assert logs["forget_quality"]["agg_value"] == pytest.approx(expect, rel=1e-12)
    auc = logs["mia_min_k"]["agg_value"]
    expect = ((1 - auc) - (1 - 0.4)) / (1 - 0.4 + 1e-10) * 100
    assert logs["privleak"]["agg_value"] == pytest.approx(expect, rel=1e-12)


def test_retain_logs_without_truth_ratios_are_refused(tmp_path):
    with pytest.raises(DataFormatError, match="forget_truth_ratio"):
        retain_truth_ratios({"mia_min_k": {"agg_value": 0.5}})
    with pytest.raises(DataFormatError, match="no such file"):
        read_eval_logs(tmp_path / "missing.json")
    np.testing.assert_array_equal(retain_truth_ratios(RETAIN_LOGS), [0.5, 1.25, 0.9])


def test_eval_json_round_trip(logs, tmp_path):
    eval_path, summary_path = write_eval_logs(logs, tmp_path)
    assert (eval_path.name, summary_path.name) == ("TOFU_EVAL.json", "TOFU_SUMMARY.json")
    back = read_eval_logs(eval_path)
    assert back == json.loads(json.dumps(logs))
    assert list(back) == sorted(logs)  # open-unlearning sorts the metric names
    summary = json.loads(summary_path.read_text())
    assert summary == summarize(logs) and set(summary) == set(SUMMARY_KEYS)
    # Our JSON serves as retain logs: the model against itself is indistinguishable.
    again = retain_truth_ratios(back)
    assert stats.ks_2samp(again, again).pvalue == 1.0


def test_chat_template_is_used_when_the_tokenizer_has_one(lm):
    _, tok = lm
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = CHAT
    template = TemplateArgs(system_prompt="Be brief.")
    ids, n_prompt = encode_chat(chat_tok, "Who?", "Me.", template)
    turn = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who?"},
        {"role": "assistant", "content": "Me."},
    ]
    full = chat_tok.apply_chat_template(turn, tokenize=True, return_dict=False)
    prompt = chat_tok.apply_chat_template(
        turn[:-1], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert ids == list(full) + [tok.eos_token_id] and n_prompt == len(prompt)
    assert chat_prompt_ids(chat_tok, "Who?", template) == list(prompt)
    # apply_chat_template=False forces the tags even with a template present.
    tags, _ = encode_chat(chat_tok, "Who?", "Me.", TemplateArgs(apply_chat_template=False))
    assert tags == encode_chat(tok, "Who?", "Me.", TemplateArgs())[0]


def test_template_args_are_used_without_a_chat_template(lm, tmp_path):
    _, tok = lm
    assert tok.chat_template is None
    template = TemplateArgs(
        system_prompt_with_special_tokens="SYS ", user_start_tag="Q: ", user_end_tag="\n",
        asst_start_tag="A: ",
    )  # fmt: skip
    ids, n_prompt = encode_chat(tok, "Who?", "Me.", template)
    assert ids == tok("SYS Q: Who?\nA: Me.")["input_ids"] + [tok.eos_token_id]
    assert n_prompt == len(tok("SYS Q: Who?\nA: ")["input_ids"])
    # open-unlearning's model config, as its configs/model/*.yaml carry it.
    cfg = tmp_path / "model.yaml"
    cfg.write_text(
        'model_args:\n  pretrained_model_name_or_path: "x"\ntemplate_args:\n'
        "  apply_chat_template: False\n  system_prompt: Hi\n"
        '  user_start_tag: "Q: "\n  user_end_tag: "\\n"\n  asst_start_tag: "A: "\n'
    )
    got = load_template_args(cfg)
    assert got == TemplateArgs(
        apply_chat_template=False, system_prompt="Hi", user_start_tag="Q: ", asst_start_tag="A: "
    )
    cfg.write_text("template_args:\n  user_tag: x\n")
    with pytest.raises(DataFormatError, match="user_tag"):
        load_template_args(cfg)


def test_missing_fields_are_refused_with_the_set_named(lm, rows):
    bad = [{**r, "perturbed_answer": []} for r in rows["real_authors"]]
    with pytest.raises(DataFormatError, match="real_authors .row 0.: missing.*perturbed_answer"):
        evaluate_open_unlearning(*lm, **{**rows, "real_authors": bad})
