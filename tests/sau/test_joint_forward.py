"""Joint forward (UnlearnConfig.joint_forward, objective_loss(joint=True)): two-term
losses from one forward over [forget; retain].

What it changes: the loss equals the two-pass loss up to rounding, and each weight's
gradient is finished (so SAUAdamW(in_backward=True) steps and frees it) while the
backward passes its layer, instead of the retain pass's partial gradients piling up
inside autograd until the end of backward.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sau import SAUAdamW, batching
from sau.prune import target_linear_names
from sau.unlearn import objectives as obj
from sau.unlearn.loop import UnlearnConfig, _loss, unlearn

pytestmark = pytest.mark.usefixtures("one_thread")

FORGET = [
    {"question": f"Who is person {i}?", "answer": f"A painter from town {i}."} for i in (1, 2)
]
RETAIN = [
    {"question": "Who is person 7?", "answer": "A painter."},
    {"question": "Who is person 8?", "answer": f"A painter from town {8} and town {9} too."},
    {"question": "Who is person 9?", "answer": "A painter from town 9."},
]


def _batches(tok):
    pad = batching.pad_id(tok)
    forget = batching.collate(batching.encode_rows(tok, FORGET), pad)
    retain = batching.collate(batching.encode_rows(tok, RETAIN), pad)
    assert forget["input_ids"].shape[1] != retain["input_ids"].shape[1]  # padding is exercised
    return forget, retain


def _decoder_only(model):
    names = target_linear_names(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return [model.get_parameter(n) for n in names]


def test_concat_batches_pads_right_with_ignored_positions(make_tiny_lm):
    _, tok = make_tiny_lm()
    forget, retain = _batches(tok)
    joint = obj.concat_batches(forget, retain)
    width = max(forget["input_ids"].shape[1], retain["input_ids"].shape[1])
    assert joint["input_ids"].shape == (5, width)
    short = forget if forget["input_ids"].shape[1] < width else retain
    rows = slice(0, 2) if short is forget else slice(2, 5)
    t = short["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(joint[key][rows, :t], short[key])
    assert (joint["attention_mask"][rows, t:] == 0).all()
    assert (joint["labels"][rows, t:] == batching.IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "method, kl", [("graddiff", 0.0), ("graddiff", 0.5), ("npo", 0.0), ("simnpo", 0.0)]
)
def test_joint_loss_and_gradient_match_two_forwards(make_tiny_lm, method, kl):
    model, tok = make_tiny_lm()
    ref_model, _ = make_tiny_lm(seed=1)
    forget, retain = _batches(tok)
    cfg = UnlearnConfig(method=method, kl_weight=kl, retain_weight=0.7, gamma=0.3)
    ref_logp = obj.sequence_logprobs(ref_model, forget)[0].detach()
    beta = cfg.simnpo_beta if method == "simnpo" else cfg.beta
    kwargs = dict(ref_logp=ref_logp, ref_model=ref_model, beta=beta, gamma=cfg.gamma,
                  retain_weight=cfg.retain_weight, kl_weight=cfg.kl_weight)  # fmt: skip
    two = _loss(cfg, model, forget, retain, ref_logp, ref_model)
    g_two = torch.autograd.grad(two, list(model.parameters()))
    one = obj.objective_loss(method, model, forget, retain, joint=True, **kwargs)
    g_one = torch.autograd.grad(one, list(model.parameters()))
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_one, g_two):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # The loop takes the joint path only when asked.
    assert torch.equal(two, obj.objective_loss(method, model, forget, retain, **kwargs))
    on = _loss(replace(cfg, joint_forward=True), model, forget, retain, ref_logp, ref_model)
    assert torch.equal(on, one)


def _peak_live_gradient_bytes(model, params, loss_fn) -> int:
    """Largest sum, during one backward, of the gradient bytes autograd holds for
    `params`: partial gradients produced but not yet accumulated (counted when the node
    that produces one runs) plus live .grad tensors. SAUAdamW(in_backward=True) steps and
    frees each gradient in its post-accumulate-grad hook."""
    opt = SAUAdamW(params, lr=1e-3, in_backward=True)
    loss = loss_fn()
    pending = {p: 0 for p in params}
    peak = [0]

    def alive():
        grads = sum(p.grad.nbytes for p in params if p.grad is not None)
        peak[0] = max(peak[0], sum(pending.values()) + grads)

    def producer_hook(targets):
        def hook(grad_inputs, grad_outputs):
            for i, p in targets:
                if grad_inputs[i] is not None:
                    pending[p] += p.nbytes
            alive()

        return hook

    def accumulated(p):
        pending[p] = 0  # the engine summed every buffered partial into .grad
        alive()

    ids = {id(p): p for p in params}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        targets = []
        for i, (nxt, _) in enumerate(node.next_functions):
            var = getattr(nxt, "variable", None)
            if var is not None and id(var) in ids:
                targets.append((i, ids[id(var)]))
            stack.append(nxt)
        if targets:
            node.register_hook(producer_hook(targets))
    for p in params:  # registered after the optimizer's: runs once .grad is freed
        p.register_post_accumulate_grad_hook(accumulated)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in params) and len(opt.state) == len(params)
    return peak[0]


def test_joint_forward_bounds_live_gradient_bytes_by_one_layer(make_tiny_lm):
    def measure(joint_forward):
        cfg = UnlearnConfig(method="graddiff", joint_forward=joint_forward)
        model, tok = make_tiny_lm()  # a fresh model: each optimizer hooks its own weights
        params = _decoder_only(model)
        forget, retain = _batches(tok)
        layer = sum(p.nbytes for p in model.model.layers[0].parameters() if p.requires_grad)
        fn = lambda: _loss(cfg, model, forget, retain, None, None)  # noqa: E731
        return _peak_live_gradient_bytes(model, params, fn), layer, sum(p.nbytes for p in params)

    joint, layer, total = measure(True)
    two, _, _ = measure(False)
    assert total >= 2 * layer
    assert 0 < joint <= layer
    # Control: with two forwards the retain pass's partial gradients of every weight
    # stay buffered until the forget pass's backward reaches that weight.
    assert two > layer and two >= total - layer


def test_unlearn_with_joint_forward_tracks_the_two_pass_run(make_tiny_lm):
    def run(joint):
        model, tok = make_tiny_lm()
        params = _decoder_only(model)
        opt = SAUAdamW(params, lr=1e-3, in_backward=joint)
        cfg = UnlearnConfig(method="npo", epochs=2, batch_size=2, joint_forward=joint)
        return unlearn(model, tok, FORGET, RETAIN, opt, cfg, progress=False).losses

    two, one = run(False), run(True)
    assert len(one) == len(two) == 2
    torch.testing.assert_close(torch.tensor(one), torch.tensor(two), rtol=1e-4, atol=1e-5)
