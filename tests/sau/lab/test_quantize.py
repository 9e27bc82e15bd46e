"""Weight-only RTN quantization: zeros stay zero, error bound, idempotence, bad input."""

from __future__ import annotations

import pytest
import torch

from sau.lab.quantize import (
    NF4_CODE,
    nf4_codes,
    nf4_quantize_dequantize,
    quantize_dequantize,
    quantize_model_,
)

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


# ---- NF4 ---------------------------------------------------------------------------
# bitsandbytes' published NF4 values (functional.get_4bit_type("nf4")), as printed there.
_BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_code_is_the_published_one():
    assert torch.equal(torch.tensor(NF4_CODE), torch.tensor(_BNB_NF4))
    assert NF4_CODE.count(0.0) == 1 and sorted(NF4_CODE) == list(NF4_CODE)


def test_nf4_block_absmax_scaling_maps_codes_times_absmax_to_themselves():
    # Block 0 (absmax 2) holds every code value times 2; block 1 is the same times 0.5.
    code = torch.tensor(NF4_CODE)
    w = torch.cat([code.repeat(4) * 2.0, code.repeat(4) * 0.5]).view(2, 64)
    assert torch.equal(nf4_quantize_dequantize(w), w)
    idx, absmax = nf4_codes(w)
    assert torch.equal(absmax.view(-1), torch.tensor([2.0, 0.5]))
    assert torch.equal(idx[0], torch.arange(16).repeat(4))


def test_nf4_rounds_to_the_nearest_code_per_block():
    w = torch.zeros(1, 128)
    w[0, 0], w[0, 1], w[0, 2] = 4.0, 1.2, -0.1  # block 0: absmax 4 -> 0.3, -0.025
    w[0, 64], w[0, 65], w[0, 66] = -1.0, 0.5, 0.52  # block 1: absmax 1
    q = nf4_quantize_dequantize(w)
    assert q[0, 0] == 4.0 and q[0, 64] == -1.0
    assert q[0, 1] == torch.tensor(NF4_CODE[11]) * 4  # 0.3 -> 0.3379
    assert q[0, 2] == 0.0  # -0.025 is nearer 0 than -0.091
    assert q[0, 65] == torch.tensor(NF4_CODE[12])  # 0.5 < midpoint 0.5017 -> 0.4407
    assert q[0, 66] == torch.tensor(NF4_CODE[13])  # 0.52 -> 0.5626


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_zeros_stay_zero_and_idempotent(shape):
    w = _pruned_weight(shape, seed=3)
    q = nf4_quantize_dequantize(w)
    assert q.shape == w.shape and q.dtype == w.dtype
    assert torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))
    assert torch.equal(nf4_quantize_dequantize(q), q)


def test_nf4_all_zero_weight_stays_zero_and_model_path_uses_it():
    assert torch.equal(nf4_quantize_dequantize(torch.zeros(3, 70)), torch.zeros(3, 70))
    lin = torch.nn.Linear(128, 4, bias=False)
    want = nf4_quantize_dequantize(lin.weight.detach())
    quantize_model_(lin, "nf4", names=["weight"])
    assert torch.equal(lin.weight.detach(), want)
