"""The unlearning loop: interrupt (flag, SIGTERM) and resume give bitwise the same weights."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch

from sau.batching import encode_rows, loss_batches, pad_id
from sau.errors import SAUError
from sau.optim import SAUAdamW
from sau.plan import plan_selection
from sau.prune import prune_model, target_linear_names
from sau.saliency import compute_saliency
from sau.unlearn import objectives as obj
from sau.unlearn.loop import CHECKPOINT_NAME, UnlearnConfig, unlearn

pytestmark = pytest.mark.usefixtures("one_thread")


def qa_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {"question": f"Who is person {i}?", "answer": f"A painter from town {i * 7 % 13}."}
        for i in range(offset, offset + n)
    ]


FORGET, RETAIN = qa_rows(6), qa_rows(10, offset=50)


@pytest.fixture(scope="module")
def start(make_tiny_lm):
    """A pruned tiny Llama with dropout on (so RNG restore matters) and its plan inputs."""
    model, tok = make_tiny_lm(seed=1)
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    prune_model(model, "magnitude", 0.5, progress=False)
    names = target_linear_names(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    batches = loss_batches(encode_rows(tok, FORGET), pad_id(tok), 3)
    saliency = compute_saliency(model, batches, obj.nll, params=names, progress=False)
    return model, tok, names, saliency


def fresh(start, kind: str):
    model, tok, names, saliency = start
    m = copy.deepcopy(model)
    params = [m.get_parameter(n) for n in names]
    if kind == "adamw":
        return m, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    plan = plan_selection([(n, m.get_parameter(n)) for n in names], saliency, k=0.3, alpha=0.1)
    in_backward = kind == "sau-in-backward"
    return m, SAUAdamW(params, plan=plan, lr=1e-3, amplify="update", in_backward=in_backward)


def run(start, kind, method="graddiff", **kw):
    m, opt = fresh(start, kind)
    torch.manual_seed(123)
    cfg = UnlearnConfig(method=method, epochs=3, batch_size=4, seed=7, checkpoint_every=2)
    res = unlearn(m, start[1], FORGET, RETAIN, opt, cfg, progress=False, **kw)
    return m, res


_FULL: dict = {}


def full_run(start, kind, method="graddiff"):
    """The uninterrupted reference run, computed once per (kind, method) per session."""
    if (kind, method) not in _FULL:
        _FULL[kind, method] = run(start, kind, method)
    return _FULL[kind, method]


def weights(model, names):
    return {n: model.get_parameter(n).detach().clone() for n in names}


def assert_bitwise(a, b):
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(("kind", "method"), [("sau", "graddiff"), ("adamw", "npo")])
def test_interrupt_and_resume_is_bitwise_identical(start, tmp_path, kind, method):
    names = start[2]
    full, res_full = full_run(start, kind, method)
    assert res_full.total_steps == 6 and res_full.steps_done == 6 and not res_full.interrupted

    _, res1 = run(start, kind, method, checkpoint_dir=tmp_path, should_stop=lambda s: s == 3)
    assert res1.interrupted and res1.steps_done == 3
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temp files left
    torch.manual_seed(999)  # the resumed run must restore the RNG, not rely on luck
    resumed, res2 = run(start, kind, method, checkpoint_dir=tmp_path, resume=True)
    assert res2.steps_done == 6 and not res2.interrupted
    assert_bitwise(weights(full, names), weights(resumed, names))
    assert res2.losses == res_full.losses  # the loss log continues where it stopped
    changed = any(not torch.equal(full.get_parameter(n), start[0].get_parameter(n)) for n in names)
    assert changed


def test_in_backward_run_and_its_resume_are_bitwise_the_normal_run(start, tmp_path):
    names = start[2]
    full, res_full = full_run(start, "sau")
    inside, res = run(start, "sau-in-backward")
    assert_bitwise(weights(full, names), weights(inside, names))
    assert res.losses == res_full.losses
    # A normal-mode checkpoint resumes in the in-backward mode (same state layout).
    run(start, "sau", checkpoint_dir=tmp_path, should_stop=lambda s: s == 3)
    resumed, _ = run(start, "sau-in-backward", checkpoint_dir=tmp_path, resume=True)
    assert_bitwise(weights(full, names), weights(resumed, names))


def test_sigterm_checkpoints_at_the_next_step_and_resumes(start, tmp_path):
    names = start[2]
    full, _ = full_run(start, "sau")

    def send(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: sets the flag only
        return False

    _, res = run(start, "sau", checkpoint_dir=tmp_path, should_stop=send)
    assert res.interrupted and res.steps_done == 3  # step 3 finished, then stopped
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again
    resumed, _ = run(start, "sau", checkpoint_dir=tmp_path, resume=True)
    assert_bitwise(weights(full, names), weights(resumed, names))


def test_keyboard_interrupt_leaves_last_periodic_checkpoint_resumable(start, tmp_path):
    names = start[2]
    full, _ = full_run(start, "sau")

    def boom(step):
        if step == 5:
            raise KeyboardInterrupt  # a hard stop between periodic checkpoints
        return False

    with pytest.raises(KeyboardInterrupt):
        run(start, "sau", checkpoint_dir=tmp_path, should_stop=boom)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 4  # checkpoint_every=2: the last complete one
    resumed, res = run(start, "sau", checkpoint_dir=tmp_path, resume=True)
    assert res.steps_done == 6
    assert_bitwise(weights(full, names), weights(resumed, names))


def test_sau_run_keeps_pruned_and_unselected_entries(start):
    model, _, names, _ = start
    out, _ = full_run(start, "sau")
    for n in names:
        before, after = model.get_parameter(n), out.get_parameter(n)
        assert torch.equal(after[before == 0], before[before == 0])  # pruned stay zero
        moved = (after != before).float().mean()
        assert 0 < moved <= 0.5 * 0.3 + 0.02  # only G (k=0.3 of the survivors) moves


def test_resume_with_other_settings_is_refused(start, tmp_path):
    run(start, "sau", checkpoint_dir=tmp_path, should_stop=lambda s: s == 1)
    m, opt = fresh(start, "sau")
    cfg = UnlearnConfig(method="graddiff", epochs=4, batch_size=4, seed=7)
    with pytest.raises(SAUError, match="epochs"):
        unlearn(
            m,
            start[1],
            FORGET,
            RETAIN,
            opt,
            cfg,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )


def test_bad_settings_are_user_errors(start):
    m, opt = fresh(start, "adamw")
    with pytest.raises(SAUError, match="method"):
        unlearn(m, start[1], FORGET, RETAIN, opt, UnlearnConfig(method="dpo"), progress=False)
    with pytest.raises(SAUError, match="forget set is empty"):
        unlearn(m, start[1], [], RETAIN, opt, UnlearnConfig(), progress=False)
