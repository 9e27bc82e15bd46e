"""compute_saliency: the mean of squared gradients, with no full set of gradients alive."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from sau import compute_saliency
from sau.distributed import local
from sau.saliency import default_saliency_params
from tests.helpers import DeepProbeNet, llama_planned_names, pruned_tiny_llama, shard_llama
from tests.multiproc import dist_backend, run_ranks


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


# Bounded accumulators: max_accumulator_bytes scores the weights in groups, one pass each.


def _accumulator_sizes(model, dtype=torch.float32) -> list[int]:
    params = dict(model.named_parameters())
    return [params[n].numel() * dtype.itemsize for n in default_saliency_params(model)]


def _limits(model, dtype) -> dict[str, int]:
    """max_accumulator_bytes giving one pass, two passes and one pass per weight-ish."""
    sizes = _accumulator_sizes(model, dtype)
    return {"one": sum(sizes), "two": sum(sizes) - 1, "many": max(sizes)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("limit", ["one", "two", "many"])
def test_grouped_passes_are_bitwise_the_one_pass_result(dtype, limit):
    model = tiny_llama()
    n = _limits(model, dtype)[limit]
    opts = dict(retain_batches=BATCHES[:2], contrast=0.5, progress=False, dtype=dtype)
    ref = compute_saliency(model, BATCHES, lm_loss, **opts)
    sal = compute_saliency(model, BATCHES, lm_loss, max_accumulator_bytes=n, **opts)
    assert ref.passes == 1
    assert sal.passes == {"one": 1, "two": 2, "many": 11}[limit]
    assert list(sal) == list(ref) == list(sal.retain) and sal.contrast == 0.5
    for name in ref:
        for got, want in ((sal[name], ref[name]), (sal.retain[name], ref.retain[name])):
            assert got.device.type == "cpu" and got.dtype == dtype
            assert torch.equal(got, want), name


def _track_live_accumulators(monkeypatch) -> dict:
    """Patch the accumulate call: at every call, sum the bytes of every accumulator it has
    ever written that is still alive (weak references: the tracking keeps none alive)."""
    import weakref

    import sau.saliency as saliency_module

    real = saliency_module.accumulate_sq_grad_
    seen: dict[int, weakref.ref] = {}
    stats = {"peak": 0}

    def tracked(acc, grad, **kw):
        seen.setdefault(id(acc), weakref.ref(acc))
        live = [t for t in (r() for r in seen.values()) if t is not None]
        stats["peak"] = max(stats["peak"], sum(t.nbytes for t in live))
        del live
        return real(acc, grad, **kw)

    monkeypatch.setattr(saliency_module, "accumulate_sq_grad_", tracked)
    return stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_live_accumulator_bytes_stay_within_the_limit(monkeypatch, dtype):
    model = tiny_llama()
    sizes = _accumulator_sizes(model, dtype)
    stats = _track_live_accumulators(monkeypatch)
    opts = dict(retain_batches=BATCHES[:1], progress=False, dtype=dtype)
    # Control: one pass keeps every accumulator alive, and the tracking sees them all
    # (the forget ones are still alive, as the result, during the retain pass).
    compute_saliency(model, BATCHES, lm_loss, **opts)
    assert stats["peak"] == 2 * sum(sizes)
    for n in (sum(sizes) // 2, 3 * max(sizes), max(sizes) + 1, max(sizes)):
        stats["peak"] = 0
        sal = compute_saliency(model, BATCHES, lm_loss, max_accumulator_bytes=n, **opts)
        assert 0 < stats["peak"] <= n, (n, stats["peak"])
        assert sal.passes > 1


def test_a_weight_larger_than_the_limit_is_named():
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj.weight.numel() * 4
    largest = model.model.layers[0].mlp.gate_proj.weight.numel() * 4  # the first largest
    # Named: the largest weight, whose bytes are the smallest limit that works.
    for limit in (q - 1, largest - 1):
        with pytest.raises(
            ValueError, match=rf"'model.layers.0.mlp.gate_proj.weight' \({largest} bytes"
        ):
            compute_saliency(model, BATCHES, lm_loss, max_accumulator_bytes=limit, progress=False)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, 1e9, "1GiB", torch.tensor(1000)])
def test_bad_max_accumulator_bytes(bad):
    with pytest.raises(ValueError, match="max_accumulator_bytes"):
        compute_saliency(tiny_llama(), BATCHES, lm_loss, max_accumulator_bytes=bad, progress=False)


def test_a_generator_is_refused_only_when_it_needs_more_than_one_pass():
    model = tiny_llama()
    total = sum(_accumulator_sizes(model))
    with pytest.raises(TypeError, match="batches is an iterator.*2 passes.*pass a list"):
        compute_saliency(
            model, (b for b in BATCHES), lm_loss, max_accumulator_bytes=total - 1, progress=False
        )
    with pytest.raises(TypeError, match="retain_batches is an iterator"):
        compute_saliency(
            model,
            BATCHES,
            lm_loss,
            retain_batches=iter(BATCHES),
            max_accumulator_bytes=total - 1,
            progress=False,
        )
    # One pass suffices: a generator works as without the limit.
    ref = compute_saliency(model, BATCHES, lm_loss, progress=False)
    one = compute_saliency(
        model, (b for b in BATCHES), lm_loss, max_accumulator_bytes=total, progress=False
    )
    assert one.passes == 1
    for n in ref:
        torch.testing.assert_close(one[n], ref[n], rtol=1e-5, atol=0)


class _Shrinking:
    """A re-iterable that gives one batch fewer after every full pass (a data source that
    moved)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __iter__(self):
        yield from self.batches
        self.batches = self.batches[:-1]


def test_other_batches_on_a_later_pass_are_refused():
    model = tiny_llama()
    total = sum(_accumulator_sizes(model))
    with pytest.raises(ValueError, match="3 batches on the first pass and 2 on pass 2"):
        compute_saliency(
            model, _Shrinking(BATCHES), lm_loss, max_accumulator_bytes=total - 1, progress=False
        )


def test_grouped_pass_restores_the_model_when_loss_fn_raises():
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    kept = model.model.layers[0].mlp.up_proj.weight
    old_grad = torch.full_like(kept, 3.0)
    kept.grad = old_grad
    calls = {"n": 0}

    def loss_failing_on_the_second_pass(m, b):
        calls["n"] += 1
        if calls["n"] > len(BATCHES):
            raise RuntimeError("boom")
        return lm_loss(m, b)

    total = sum(_accumulator_sizes(model))
    with pytest.raises(RuntimeError, match="boom"):
        compute_saliency(
            model,
            BATCHES,
            loss_failing_on_the_second_pass,
            max_accumulator_bytes=total // 3,
            progress=False,
        )
    assert model.training
    assert not model.lm_head.weight.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not model.lm_head.weight)
    assert kept.grad is old_grad
    for p in model.parameters():
        assert p is kept or p.grad is None
        assert not getattr(p, "_post_accumulate_grad_hooks", None)


def _sharded_grouped_and_one_pass(rank: int, world: int) -> dict:
    """FSDP2 on `world` ranks: one-pass and grouped saliency (with retain) of this rank's
    rows; the local shards of both, and the number of passes."""
    model = pruned_tiny_llama(layers=2)
    names = llama_planned_names(model)
    shard_llama(model)
    gen = torch.Generator().manual_seed(5)
    rows = slice(rank * 2, rank * 2 + 2)
    batches = [torch.randint(0, 64, (2 * world, 8), generator=gen)[rows] for _ in range(3)]
    opts = dict(params=names, retain_batches=batches[:2], progress=False)
    one = compute_saliency(model, batches, lm_loss, **opts)
    # Largest scored weight: 48 x 32 float32, sharded on dim 0 over `world` ranks.
    grouped = compute_saliency(
        model, batches, lm_loss, max_accumulator_bytes=2 * 24 * 32 * 4, **opts
    )
    out = {"passes": grouped.passes, "placements": [], "one": {}, "grouped": {}}
    for n in names:
        out["placements"].append(str(grouped[n].placements) == str(one[n].placements))
        for key, sal in (("one", one), ("grouped", grouped)):
            out[key][n] = local(sal[n]).clone()
            out[key]["retain " + n] = local(sal.retain[n]).clone()
    return out


@pytest.mark.skipif(dist_backend() != "gloo", reason="the CPU (gloo) lane")
def test_grouped_passes_under_fsdp2_are_bitwise_the_one_pass_result():
    ranks = run_ranks(_sharded_grouped_and_one_pass, 2)
    for r in ranks:
        assert r["passes"] == ranks[0]["passes"] > 2  # every rank ran the same passes
        assert all(r["placements"])
        assert r["one"].keys() == r["grouped"].keys()
        for n, t in r["one"].items():
            assert torch.equal(r["grouped"][n], t), n
