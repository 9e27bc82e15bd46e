"""compute_saliency: the mean of squared gradients, with no full set of gradients alive."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from sau import compute_saliency
from sau.saliency import default_saliency_params
from tests.helpers import DeepProbeNet


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


BATCHES = [
    torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)
]


def manual_saliency(model, batches, names):
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    model.eval()
    for b in batches:
        model.zero_grad(set_to_none=True)
        lm_loss(model, b).backward()
        for n in names:
            acc[n] += params[n].grad.float() ** 2
    model.zero_grad(set_to_none=True)
    return {n: a / len(batches) for n, a in acc.items()}


def test_equals_manual_mean_of_squared_grads(backend):
    model = tiny_llama()
    sal = compute_saliency(model, BATCHES, lm_loss, backend=backend, progress=False)
    names = default_saliency_params(model)
    assert list(sal) == names
    ref = manual_saliency(model, BATCHES, names)
    for n in names:
        assert sal[n].dtype == torch.float32 and sal[n].shape == ref[n].shape
        torch.testing.assert_close(sal[n], ref[n], rtol=1e-5, atol=0)


def test_default_params_are_every_linear_weight_lm_head_included():
    model = tiny_llama()
    names = default_saliency_params(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(names) == len(linears) == 2 * 7 + 1
    assert "lm_head.weight" in names
    assert all(n.endswith(".weight") for n in names)


def test_tied_head_is_the_embedding_and_stays_out():
    model = tiny_llama(tie=True)
    names = default_saliency_params(model)
    assert len(names) == len(set(names)) == 2 * 7
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    sal = compute_saliency(model, BATCHES[:1], lm_loss, progress=False)
    assert set(sal) == set(names)


def test_norms_and_embeddings_only_when_asked_for():
    model = tiny_llama()
    for name in ("model.norm.weight", "model.embed_tokens.weight"):
        with pytest.raises(ValueError, match="allow_norms_and_embeddings"):
            compute_saliency(model, BATCHES[:1], lm_loss, params=[name], progress=False)
        sal = compute_saliency(
            model,
            BATCHES[:1],
            lm_loss,
            params=[name],
            progress=False,
            allow_norms_and_embeddings=True,
        )
        assert list(sal) == [name] and float(sal[name].sum()) > 0


def test_no_plannable_weight_is_refused():
    model = nn.Sequential(nn.Embedding(8, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="no plannable weight"):
        compute_saliency(model, BATCHES[:1], lambda m, b: m(b).sum(), progress=False)


def test_unsized_iterable_gives_the_same_mean():
    model = tiny_llama()
    a = compute_saliency(model, BATCHES, lm_loss, progress=False)
    b = compute_saliency(model, (x for x in BATCHES), lm_loss, progress=False)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=0)


def test_params_subset_and_model_state_restored():
    model = tiny_llama()
    model.train()
    frozen = model.model.embed_tokens.weight
    frozen.requires_grad_(False)
    kept = model.model.layers[0].mlp.up_proj.weight
    old_grad = torch.full_like(kept, 3.0)
    kept.grad = old_grad
    names = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    sal = compute_saliency(model, BATCHES, lm_loss, params=names, progress=False)
    assert list(sal) == names
    assert model.training
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not frozen)
    assert kept.grad is old_grad
    assert all(p.grad is None for p in model.parameters() if p is not kept)
    # The parked grad did not leak into the saliency.
    kept.grad = None
    ref = manual_saliency(model, BATCHES, names)
    torch.testing.assert_close(sal[names[0]], ref[names[0]], rtol=1e-5, atol=0)


def test_restored_when_loss_fn_raises():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)

    def bad_loss(m, b):
        if b is BATCHES[1]:
            raise RuntimeError("boom")
        return lm_loss(m, b)

    with pytest.raises(RuntimeError, match="boom"):
        compute_saliency(model, BATCHES, bad_loss, progress=False)
    assert model.training
    assert not model.lm_head.weight.requires_grad
    for p in model.parameters():
        assert p.grad is None
        assert not getattr(p, "_post_accumulate_grad_hooks", None)


def test_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="empty"):
        compute_saliency(model, [], lm_loss, progress=False)
    with pytest.raises(ValueError, match="empty"):
        compute_saliency(model, iter([]), lm_loss, progress=False)
    with pytest.raises(ValueError, match="not found"):
        compute_saliency(model, BATCHES, lm_loss, params=["nope.weight"], progress=False)
    with pytest.raises(ValueError, match="scalar"):
        compute_saliency(model, BATCHES, lambda m, b: m(input_ids=b).logits, progress=False)


def test_peak_live_gradient_bytes_during_backward():
    torch.manual_seed(0)
    model = DeepProbeNet()
    batches = [torch.randn(4, 64) for _ in range(2)]
    one_weight = 64 * 64 * 4

    # Control: a plain backward keeps every finished gradient alive, and the probes see it.
    model(batches[0]).backward()
    plain_peak = model.peak
    assert plain_peak >= 6 * one_weight
    model.zero_grad(set_to_none=True)

    model.peak = 0
    sal = compute_saliency(model, batches, lambda m, b: m(b), progress=False)
    assert len(sal) == 8
    # Each gradient is squared into the accumulator and freed as soon as it is finished;
    # biases (not scored) get no gradient at all.
    assert model.peak <= one_weight
    assert model.peak < plain_peak / 6


def test_bf16_accumulator_halves_the_bytes_within_its_rounding():
    model = tiny_llama()
    exact = compute_saliency(model, BATCHES, lm_loss, progress=False)
    lean = compute_saliency(model, BATCHES, lm_loss, progress=False, dtype=torch.bfloat16)
    assert list(lean) == list(exact)
    for n in exact:
        assert lean[n].dtype == torch.bfloat16
        assert lean[n].nbytes * 2 == exact[n].nbytes
        # One nearest rounding per batch, each at most 2**-8 of the running sum (<= the
        # final mean): 3 batches give at most 3 * 2**-8 relative, plus float32 noise.
        torch.testing.assert_close(lean[n].float(), exact[n], atol=0, rtol=3 * 2**-8 + 1e-6)
    # Not a plain cast of the float32 result: the rounding happened batch by batch.
    assert any(not torch.equal(lean[n], exact[n].bfloat16()) for n in exact)


def test_bad_accumulator_dtype():
    with pytest.raises(TypeError, match="dtype"):
        compute_saliency(tiny_llama(), BATCHES, lm_loss, progress=False, dtype=torch.float16)
