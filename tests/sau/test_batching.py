"""sau.batching: one encoding and padding for every path (training, unlearning,
Wanda calibration, scoring), so they agree on which tokens are the answer."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from sau import batching
from sau.batching import IGNORE_INDEX, collate, encode_rows, pad_id, pad_left, pad_right
from sau.lab.eval.scoring import answer_token_logprobs
from sau.lab.models.trainer import train_causal_lm
from sau.prompt import format_answer, format_prompt
from sau.unlearn.loop import UnlearnConfig, unlearn
from sau.unlearn.objectives import nll

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"question": "Who is person 1?", "answer": "A painter from town 1."},
    {"question": "Who is person 3?", "answer": "From town 3, a painter from town 4."},
]


@pytest.fixture(scope="module")
def lm(make_tiny_lm):
    return make_tiny_lm(0)


def test_pad_id_rule():
    def tok(pad, eos):
        return SimpleNamespace(pad_token_id=pad, eos_token_id=eos)

    assert pad_id(tok(5, 2)) == 5
    assert pad_id(tok(0, 2)) == 0  # a pad id of 0 is a real pad id, not "missing"
    assert pad_id(tok(None, 2)) == 2
    assert pad_id(tok(None, None)) == 0


def test_pad_right_and_left():
    ids, mask = pad_right([[1, 2, 3], [4]], 9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_left([[1, 2, 3], [4]], 9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_encode_layout_and_collate(lm):
    _, tok = lm
    rows = encode_rows(tok, ROWS)
    for row, enc in zip(ROWS, rows):
        prompt = tok(format_prompt(row["question"])).input_ids
        answer = tok(format_answer(row["answer"]), add_special_tokens=False).input_ids
        assert enc.ids == prompt + answer + [tok.eos_token_id]
        assert (enc.n_prompt, enc.n_answer) == (len(prompt), len(answer))
        no_eos = batching.encode_pair(
            tok, format_prompt(row["question"]), format_answer(row["answer"]), eos=False
        )
        assert no_eos.ids == enc.ids[:-1] and no_eos.n_answer == enc.n_answer
    batch = collate(rows, pad_id(tok))
    answer = batching.answer_mask(rows, batch["labels"].shape[1])
    for i, enc in enumerate(rows):
        live = (batch["labels"][i] != IGNORE_INDEX).nonzero().view(-1).tolist()
        # The loss positions are the answer mask plus the one EOS after it.
        assert live == answer[i].nonzero().view(-1).tolist() + [enc.n_prompt + enc.n_answer]
        assert batch["labels"][i, live].tolist() == enc.ids[enc.n_prompt :]
        assert batch["attention_mask"][i].sum() == len(enc.ids)


def test_pad_value_never_reaches_the_loss(lm):
    model, tok = lm
    rows = encode_rows(tok, ROWS)
    with torch.no_grad():
        a = nll(model, collate(rows, tok.pad_token_id))
        b = nll(model, collate(rows, tok.eos_token_id))
        c = nll(model, collate(rows, 0))
    assert torch.equal(a, b) and torch.equal(a, c)


class _Recorder(torch.nn.Module):
    """Wraps a model and keeps a copy of every forward call's keyword tensors."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, **kw):
        self.calls.append({k: v.detach().clone() for k, v in kw.items()})
        return self.inner(**kw)


def _real(ids, mask) -> list[tuple[int, ...]]:
    return sorted(tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask))


def test_every_path_takes_the_same_answer_tokens(lm):
    """Training, unlearning, Wanda calibration and scoring see the same tokens and
    treat the same positions as the answer (losses add the EOS, scores do not)."""
    model, tok = lm
    # Training: capture the batch train_causal_lm builds (one step over both rows).
    rec = _Recorder(copy.deepcopy(model))
    train_causal_lm(rec, tok, ROWS, epochs=1, lr=1e-3, batch_size=2, progress=False)
    train = rec.calls[0]
    train_seqs = _real(train["input_ids"], train["attention_mask"])
    loss_pos = {}  # row's real tokens -> positions the training loss takes
    for ids, mask, labels in zip(train["input_ids"], train["attention_mask"], train["labels"]):
        key = tuple(ids[mask.bool()].tolist())
        loss_pos[key] = (labels != IGNORE_INDEX).nonzero().view(-1).tolist()

    # Wanda calibration (pipeline and `sau prune`): the same token sequences.
    calib = batching.calibration_batches(tok, ROWS, 2)
    assert _real(*calib[0]) == train_seqs

    # Unlearning: GA's first loss is minus the mean NLL over the training loss positions.
    m = copy.deepcopy(model)
    rec = _Recorder(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    cfg = UnlearnConfig(method="ga", epochs=1, batch_size=2, lr=1e-3, checkpoint_every=0)
    out = unlearn(rec, tok, ROWS, [], opt, cfg, progress=False)
    call = rec.calls[0]
    assert _real(call["input_ids"], call["attention_mask"]) == train_seqs
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=call["input_ids"]).logits.float(), -1)
    picked = []
    for i, (ids, mask) in enumerate(zip(call["input_ids"], call["attention_mask"])):
        key = tuple(ids[mask.bool()].tolist())
        picked += [logp[i, t - 1, ids[t]] for t in loss_pos[key]]
    expected = torch.stack(picked).mean()  # -NLL, which GA minimizes
    assert out.losses[0] == pytest.approx(float(expected), abs=1e-5)

    # Scoring: the answer positions are the loss positions without the final EOS.
    for row in ROWS:
        prompt, answer = format_prompt(row["question"]), format_answer(row["answer"])
        (scored,) = answer_token_logprobs(model, tok, [prompt], [answer])
        key = tuple(batching.encode_pair(tok, prompt, answer).ids)
        pos = loss_pos[key]
        assert key[pos[-1]] == tok.eos_token_id and len(scored) == len(pos) - 1
        ids = torch.tensor([key])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        manual = [float(lp[t - 1, key[t]]) for t in pos[:-1]]
        assert scored.tolist() == pytest.approx(manual, abs=1e-5)
