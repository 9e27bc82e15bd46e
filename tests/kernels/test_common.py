"""Index checks shared by the launchers: a list is a TypeError, duplicates are refused."""

from __future__ import annotations

import pytest
import torch

import sau_kernels as K
from sau_kernels import reference as R
from sau_kernels._common import check_index_values

HP = dict(step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


def problem(index, device="cpu"):
    n = len(index) if isinstance(index, list) else index.numel()
    g = torch.Generator().manual_seed(0)
    tensors = torch.randn(10, generator=g), torch.ones(10), torch.zeros(n), torch.zeros(n)
    return [t.to(device) for t in tensors]


def test_index_as_a_list_is_a_type_error(backend, device):
    # Before: AttributeError ('list' object has no attribute 'numel').
    p, g, m, v = problem([1, 2], device)
    with pytest.raises(TypeError, match="index must be an int32 or int64 tensor, got list"):
        K.masked_adamw_(p, g, m, v, [1, 2], backend=backend, **HP)


def test_duplicate_index_entries_are_refused_before_any_write(backend, device):
    # Before: the PyTorch path stepped entry 3 three times, Triton once.
    index = torch.tensor([3, 1, 3, 3], dtype=torch.int32, device=device)
    p, g, m, v = problem(index, device)
    before = p.clone()
    with pytest.raises(ValueError, match="holds 3 more than once"):
        K.masked_adamw_(p, g, m, v, index, backend=backend, **HP)
    assert torch.equal(p, before) and not m.any()


def test_unsorted_unique_index_still_accepted(backend, device):
    index = torch.tensor([7, 1, 4], dtype=torch.int64, device=device)
    p, g, m, v = problem(index, device)
    ref = p.clone(), m.clone(), v.clone()
    R.masked_adamw_(*ref[:1], g, *ref[1:], index, **HP)
    K.masked_adamw_(p, g, m, v, index, backend=backend, **HP)
    torch.testing.assert_close(p, ref[0], atol=1e-7, rtol=2e-6)


@pytest.mark.parametrize(
    ("index", "exc", "match"),
    [
        (torch.tensor([0, 10]), IndexError, "holds 10"),
        (torch.tensor([-1, 2]), IndexError, "holds -1"),
        (torch.tensor([2, 2]), ValueError, "more than once"),
    ],
)
def test_check_index_values(index, exc, match):
    with pytest.raises(exc, match=match):
        check_index_values(index, 10)


def test_check_index_values_reports_order():
    assert check_index_values(torch.tensor([1, 5, 9]), 10) is True
    assert check_index_values(torch.tensor([5, 1]), 10) is False
    assert check_index_values(torch.tensor([], dtype=torch.int32), 0) is True
