"""Weight-only RTN quantization: zeros stay zero, error bound, idempotence, bad input."""

from __future__ import annotations

import pytest
import torch

from sau.lab.quantize import quantize_dequantize, quantize_model_

# Shapes: one group, several groups, a ragged last group, a single row/column.
SHAPES = [(4, 128), (7, 384), (5, 300), (1, 1), (63, 129)]


def _pruned_weight(shape, seed=0, sparsity=0.5):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    w[torch.rand(shape, generator=gen) < sparsity] = 0.0
    return w


def _groups(w, group_size=128):
    pad = (-w.shape[1]) % group_size
    return torch.nn.functional.pad(w, (0, pad)).view(w.shape[0], -1, group_size)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_zeros_stay_zero_and_nothing_else_becomes_nan(shape, bits):
    w = _pruned_weight(shape)
    q = quantize_dequantize(w, bits)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))
    assert torch.isfinite(q).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_8bit_error_below_one_percent_of_each_group_max(shape):
    w = _pruned_weight(shape, seed=1, sparsity=0.3)
    err = _groups((quantize_dequantize(w, 8) - w).abs())
    gmax = _groups(w.abs()).amax(dim=-1, keepdim=True)
    assert (err <= 0.01 * gmax).all()
    assert w.numel() < 16 or (err > 0).any()  # it really rounded something


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantizing_twice_changes_nothing(shape, bits):
    once = quantize_dequantize(_pruned_weight(shape, seed=2), bits)
    assert torch.equal(quantize_dequantize(once, bits), once)


def test_4bit_levels_per_group_and_all_zero_groups():
    w = _pruned_weight((3, 256), seed=3, sparsity=0.0)
    w[1] = 0.0  # an all-zero row: two all-zero groups
    q = quantize_dequantize(w, 4)
    assert torch.equal(q[1], torch.zeros(256))
    for g in _groups(q)[0]:
        assert g.unique().numel() <= 15  # -7..7 times one scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_keep_dtype_and_zeros(dtype):
    w = _pruned_weight((4, 200), seed=4).to(dtype)
    q = quantize_dequantize(w, 8)
    assert q.dtype == dtype and torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))
    ref = quantize_dequantize(w.float(), 8)
    assert torch.allclose(q.float(), ref, rtol=1e-2, atol=0)


def test_model_twice_unchanged_and_only_decoder_linears_touched(make_tiny_lm):
    model, _ = make_tiny_lm(seed=0)
    emb = model.get_input_embeddings().weight.clone()
    names = quantize_model_(model, 4)
    assert names and all(".layers." in n for n in names)
    after = {n: model.get_parameter(n).clone() for n in names}
    quantize_model_(model, 4)
    assert all(torch.equal(model.get_parameter(n), after[n]) for n in names)
    assert torch.equal(model.get_input_embeddings().weight, emb)


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(bits=1), ValueError),
        (dict(bits=8.0), ValueError),
        (dict(bits=8, group_size=0), ValueError),
    ],
)
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        quantize_dequantize(torch.ones(2, 4), **kwargs)


def test_bad_tensors():
    with pytest.raises(ValueError, match="2-D"):
        quantize_dequantize(torch.ones(8), 8)
    with pytest.raises(TypeError, match="float"):
        quantize_dequantize(torch.ones(2, 4, dtype=torch.int32), 8)
    assert quantize_dequantize(torch.ones(0, 4), 8).shape == (0, 4)
