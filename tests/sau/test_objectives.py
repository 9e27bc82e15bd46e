"""Unlearning objectives: each loss equals its formula on hand-made and tiny-model cases."""

from __future__ import annotations

import math

import pytest
import torch

from sau.batching import IGNORE_INDEX, collate, encode_rows, pad_id
from sau.names import METHODS
from sau.unlearn import objectives as obj

pytestmark = pytest.mark.usefixtures("one_thread")


ROWS = [
    {"question": "Who is person 1?", "answer": "A painter from town 1."},
    {"question": "Who is person 22?", "answer": "A painter."},
    {"question": "Who is person 3?", "answer": "From town 3, a painter from town 4."},
]


@pytest.fixture(scope="module")
def lm(make_tiny_lm):
    return make_tiny_lm()


@pytest.fixture(scope="module")
def batch(lm):
    _, tok = lm
    return collate(encode_rows(tok, ROWS), pad_id(tok))


def test_collate_masks_prompt_and_padding(lm, batch):
    _, tok = lm
    enc = encode_rows(tok, ROWS)
    for i, (ids, n_prompt, _) in enumerate(enc):
        labels = batch["labels"][i]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()  # prompt never scored
        assert labels[n_prompt : len(ids)].tolist() == ids[n_prompt:]
        assert (labels[len(ids) :] == IGNORE_INDEX).all()  # padding never scored
        assert ids[-1] == tok.eos_token_id
        assert batch["attention_mask"][i].sum() == len(ids)


def test_sequence_logprobs_match_manual_sum(lm, batch):
    model, tok = lm
    logp, n = obj.sequence_logprobs(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, (ids, n_prompt, _) in enumerate(encode_rows(tok, ROWS)):
        lsm = torch.log_softmax(logits[i].float(), -1)
        manual = sum(lsm[t - 1, ids[t]] for t in range(n_prompt, len(ids)))
        assert torch.allclose(logp[i], manual, atol=1e-5)
        assert n[i] == len(ids) - n_prompt


def test_nll_equals_transformers_loss_and_ga_is_its_negative(lm, batch):
    model, _ = lm
    hf = model(**batch).loss  # mean CE over the non-ignored shifted labels
    assert torch.allclose(obj.nll(model, batch), hf, atol=1e-6)
    assert torch.allclose(obj.ga_loss(model, batch), -hf, atol=1e-6)


def test_graddiff_is_forget_ascent_plus_retain_descent(lm, batch):
    model, tok = lm
    retain = collate(encode_rows(tok, ROWS[:2]), pad_id(tok))
    got = obj.graddiff_loss(model, batch, retain, retain_weight=0.5)
    want = -obj.nll(model, batch) + 0.5 * obj.nll(model, retain)
    assert torch.allclose(got, want, atol=1e-6)
    # KL to an identical reference is zero, so the KL form adds nothing at the start.
    with_kl = obj.graddiff_loss(
        model, batch, retain, retain_weight=0.5, kl_weight=1.0, ref_model=model
    )
    assert torch.allclose(with_kl, want, atol=1e-5)
    with pytest.raises(ValueError, match="ref_model"):
        obj.graddiff_loss(model, batch, retain, kl_weight=1.0)


def test_npo_term_equals_formula_on_hand_values():
    logp = torch.tensor([-3.0, -10.0, -0.5])
    ref = torch.tensor([-2.0, -12.0, -0.5])
    beta = 0.1
    # (2 / beta) * mean log(1 + (pi / pi_ref)^beta), by hand per row.
    want = (
        (2 / beta)
        * sum(
            math.log(1 + math.exp(beta * (a - b)))
            for a, b in zip([-3.0, -10.0, -0.5], [-2.0, -12.0, -0.5])
        )
        / 3
    )
    assert math.isclose(float(obj.npo_term(logp, ref, beta)), want, rel_tol=1e-6)
    # At the reference the loss is (2/beta) log 2 whatever the log-probs.
    assert math.isclose(float(obj.npo_term(ref, ref, beta)), 20 * math.log(2), rel_tol=1e-6)


def test_npo_gradient_tends_to_ga_for_small_beta():
    logp = torch.tensor([-1.0, -4.0], requires_grad=True)
    obj.npo_term(logp, logp.detach(), beta=1e-4).backward()
    # d/dlogp of (2/beta) log(1 + e^{beta x}) at x=0 is 2 * sigmoid(0) = 1, over a mean.
    assert torch.allclose(logp.grad, torch.tensor([0.5, 0.5]), atol=1e-4)


def test_npo_loss_on_model_at_reference(lm, batch):
    model, tok = lm
    ref, _ = obj.sequence_logprobs(model, batch)
    got = obj.npo_loss(model, batch, ref.detach(), None, beta=0.1)
    assert math.isclose(float(got.detach()), 20 * math.log(2), rel_tol=1e-5)
    retain = collate(encode_rows(tok, ROWS[:1]), pad_id(tok))
    both = obj.npo_loss(model, batch, ref.detach(), retain, beta=0.1, retain_weight=2.0)
    assert torch.allclose(both, got + 2.0 * obj.nll(model, retain), atol=1e-5)


def test_simnpo_term_equals_formula_on_hand_values():
    logp = torch.tensor([-6.0, -1.0])
    n = torch.tensor([3.0, 2.0])
    beta, gamma = 2.5, 0.5
    want = (
        -(2 / beta)
        * sum(
            math.log(1 / (1 + math.exp(-(-(beta / k) * lp - gamma))))
            for lp, k in zip([-6.0, -1.0], [3.0, 2.0])
        )
        / 2
    )
    assert math.isclose(float(obj.simnpo_term(logp, n, beta, gamma)), want, rel_tol=1e-6)


def test_simnpo_loss_uses_length_normalised_logprob(lm, batch):
    model, _ = lm
    logp, n = obj.sequence_logprobs(model, batch)
    got = obj.simnpo_loss(model, batch, None, beta=2.5, gamma=0.1)
    assert torch.allclose(got, obj.simnpo_term(logp, n, 2.5, 0.1), atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_every_objective_backpropagates_with_any_optimizer(lm, batch, method):
    model, tok = lm
    model = __import__("copy").deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    retain = collate(encode_rows(tok, ROWS[:2]), pad_id(tok))
    before, _ = obj.sequence_logprobs(model, batch)
    ref = before.detach()
    for _ in range(3):
        loss = {
            "ga": lambda: obj.ga_loss(model, batch),
            "graddiff": lambda: obj.graddiff_loss(model, batch, retain, retain_weight=0.0),
            "npo": lambda: obj.npo_loss(model, batch, ref, None),
            "simnpo": lambda: obj.simnpo_loss(model, batch, None),
        }[method]()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = obj.sequence_logprobs(model, batch)
    assert after.sum() < before.sum()  # every objective pushes the forget answers down


def test_the_table_has_one_entry_per_method_in_order():
    assert tuple(obj.TERMS) == METHODS


@pytest.mark.parametrize(
    "method, kwargs, match",
    [
        ("dpo", {}, "method must be one of"),
        ("graddiff", {}, "retain batch"),
        ("graddiff", {"retain": "R", "kl_weight": 1.0}, "ref_model"),
        ("npo", {"ref_logp": "REF"}, "beta"),
        ("npo", {"beta": 0.1}, "ref_logp"),
        ("simnpo", {}, "beta"),
    ],
)
def test_objective_loss_refuses_missing_inputs_before_any_forward(lm, batch, method, kwargs, match):
    model, _ = lm
    kwargs = {k: {"R": batch, "REF": torch.zeros(3)}.get(v, v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        obj.objective_loss(method, model, batch, **kwargs)
