"""Backend choice and argument checks shared by the kernel launchers.

Layering: `sau_kernels` imports torch, numpy (host-side radix bookkeeping), triton when it
is installed (the kernel modules define their kernels only then; this module imports it
only inside `triton_available`) and torch.distributed (`distributed.py`); never `sau`,
`transformers` or `torch.nn`.
"""

from __future__ import annotations

import functools
import math
import os
from fractions import Fraction

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("triton", "torch")


def triton_available() -> bool:
    """True when `import triton` works (it may still need a GPU or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Pick "triton" or "torch" for one call.

    Order: the explicit `backend` argument, then the SAU_BACKEND environment variable, then
    Triton for CUDA tensors and the PyTorch path otherwise. Asking for Triton on CPU tensors
    is refused unless TRITON_INTERPRET=1 (the interpreter runs them on the CPU).
    """
    choice = backend if backend is not None else os.environ.get("SAU_BACKEND") or None
    if choice is None:
        on_cuda = any(t.is_cuda for t in tensors)
        return "triton" if on_cuda and triton_available() else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {choice!r}")
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was asked for but triton is not installed")
        if not interpreting() and not all(t.is_cuda for t in tensors if t.numel() > 0):
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 (set before "
                "importing triton) to run the kernels on the CPU"
            )
    return choice


def launch_on_tensor_device(launcher):
    """Decorator for a Triton launcher: run it with its first tensor's CUDA device current.

    Triton launches on the current CUDA device, not on the device of the pointers it is
    given; with a model spread over GPUs (``device_map="auto"``) the current device is
    often another one. Liger-Kernel wraps launches in ``torch.cuda.device(x.device)`` and
    flash-linear-attention's ``input_guard`` does the same. CPU tensors (the interpreter)
    launch unchanged.
    """

    @functools.wraps(launcher)
    def launch(first: torch.Tensor, *args, **kwargs):
        if first.is_cuda:
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)

    return launch


def check_float(name: str, t: torch.Tensor, allowed=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")


def check_same_numel(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.numel() != b.numel():
        raise ValueError(
            f"{name_a} and {name_b} must have the same number of elements, "
            f"got {a.numel()} and {b.numel()}"
        )


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    # Updating a silent copy would lose the update; refuse instead.
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (it is updated in place); call .contiguous() on "
            "the tensor you own and pass that"
        )


def check_scalar(
    name: str, value: float, *, low: float = 0.0, high: float | None = None, high_open: bool = False
) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    bad = not math.isfinite(value) or value < low
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        bound = "" if high is None else (f", {high})" if high_open else f", {high}]")
        rng = f"[{low}{bound}" if high is not None else f">= {low}"
        raise ValueError(f"Invalid {name}: {value} (expected {rng})")
    return value


def check_fraction(name: str, value) -> float:
    """`value` as a float in (0, 1]; ValueError for anything else (a bool, a string...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


def num_selected(k: float, n_survivors: int) -> int:
    """r = ceil(k * |S|), computed exactly for the double `k`.

    Plain float math gets this wrong: 0.3 * 10 == 3.0000000000000004, whose ceil is 4.
    Fraction(k) is the exact value of the double, so the product and the ceil are exact.
    """
    if n_survivors == 0:
        return 0
    return min(n_survivors, math.ceil(Fraction(k) * n_survivors))


def index_dtype(numel: int) -> torch.dtype:
    """int32 while every flat index fits, else int64 (docs/method.md)."""
    return torch.int32 if numel < 2**31 else torch.int64


def check_index_tensor(index, *, name: str = "index") -> None:
    """Refuse anything but a 1-D int32/int64 tensor (a list or float tensor: TypeError)."""
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int32, torch.int64):
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {got}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")


def check_index_values(index: torch.Tensor, numel: int, *, name: str = "index") -> bool:
    """Check 0 <= index < numel and no entry twice; returns True when strictly increasing.

    One read of `index` and a device sync (a sort as well when it is not increasing), so
    callers check once where the index enters, not per step. A duplicate would update
    its entry twice on the PyTorch path and once (racily) on Triton: refused.
    """
    if index.numel() == 0:
        return True
    lo, hi = (int(v) for v in torch.aminmax(index))
    if lo < 0 or hi >= numel:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name} holds {bad}, out of range for a tensor of {numel} elements")
    increasing = index.numel() == 1 or bool((index[1:] > index[:-1]).all())
    if not increasing:
        ordered = torch.sort(index).values
        dup = ordered[1:][ordered[1:] == ordered[:-1]]
        if dup.numel():
            raise ValueError(f"{name} holds {int(dup[0])} more than once (duplicates)")
    return increasing


def check_layer(scores, weight, *, scan_scores: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """select_topk's argument checks for one layer; returns contiguous (scores, weight).

    scan_scores=False leaves out the read of the scores (finite, >= 0) for callers whose
    first selection pass checks them (`sau_kernels.radix`)."""
    check_float("scores", scores, (torch.float32,))
    check_float("weight", weight)
    check_same_numel("scores", scores, "weight", weight)
    check_same_device(scores=scores, weight=weight)
    scores, weight = scores.contiguous(), weight.contiguous()
    if scan_scores and scores.numel():
        lo, hi = torch.aminmax(scores.view(-1))  # NaN propagates into both
        if not bool(torch.isfinite(hi)) or not bool(torch.isfinite(lo)):
            raise ValueError("scores must be finite (got NaN or inf)")
        if float(lo) < 0:
            raise ValueError(f"scores must be >= 0 (saliency), got a minimum of {float(lo)}")
    return scores, weight
