"""The masked, amplified AdamW step: AdamW on param.view(-1)[index] only.

Optimizer state is compact (one float32 pair per selected entry); entries outside
`index` are never written. Derivation of the bytes moved: benchmarks/bytes.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from sau_kernels._common import (
    check_contiguous,
    check_float,
    check_index_tensor,
    check_index_values,
    check_same_device,
    check_scalar,
    launch_on_tensor_device,
    resolve_backend,
)
from sau_kernels.entry_scale import decode_entry_scale
from sau_kernels.moments8 import BLOCK, code_map, decode, encode, num_blocks
from sau_kernels.rounding import (
    ROUNDINGS,
    STREAM_EXP_AVG,
    STREAM_EXP_AVG_SQ,
    STREAM_PARAM,
    pack_compensation,
    random_bits,
    round_stochastic,
    stream_salt,
    unpack_compensation,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is Linux-only
    triton = None

if triton is not None:
    from sau_kernels.moments8 import decode_tl, encode_tl
    from sau_kernels.rounding import (
        compensation_unit_tl,
        pack_compensation_tl,
        random_bits_tl,
        round_nearest_tl,
        round_stochastic_tl,
    )

    @triton.jit
    def _load_moments(
        exp_avg_ptr, exp_avg_sq_ptr, m_scale_ptr, r_scale_ptr, signed_map_ptr,
        unsigned_map_ptr, offs, rows, live, block_live, STATE8: tl.constexpr,
    ):  # fmt: skip
        """(m, v, sqrt(v)) of a tile: float32 moments, or 8-bit codes decoded with their
        row's (block's) scale."""
        if STATE8:
            m_scale = tl.load(m_scale_ptr + rows, mask=block_live, other=0.0)
            r_scale = tl.load(r_scale_ptr + rows, mask=block_live, other=0.0)
            m_code = tl.load(exp_avg_ptr + offs, mask=live, other=127)
            r_code = tl.load(exp_avg_sq_ptr + offs, mask=live, other=0)
            m = decode_tl(m_code, m_scale, signed_map_ptr)
            r = decode_tl(r_code, r_scale, unsigned_map_ptr)
            v = r * r
        else:
            m = tl.load(exp_avg_ptr + offs, mask=live, other=0.0)
            v = tl.load(exp_avg_sq_ptr + offs, mask=live, other=0.0)
            r = v  # unused without 8-bit codes
        return m, v, r

    @triton.jit
    def _store_moments(
        exp_avg_ptr, exp_avg_sq_ptr, m_scale_ptr, r_scale_ptr, signed_map_ptr,
        unsigned_map_ptr, offs, rows, live, live_update, block_live, m, v, m_old, r_old,
        pos, salt_exp_avg, salt_exp_avg_sq, STATE8: tl.constexpr,
    ):  # fmt: skip
        """Store a tile's new moments; 8-bit: re-code each row (block) with its new scale,
        a skipped entry with the value it had."""
        if STATE8:
            m = tl.where(live_update, m, m_old)
            r = tl.where(live_update, tl.sqrt_rn(v), r_old)
            m_scale = tl.max(tl.where(live, tl.abs(m), 0.0), axis=1)[:, None]
            r_scale = tl.max(tl.where(live, r, 0.0), axis=1)[:, None]
            m_bits = random_bits_tl(pos, salt_exp_avg)
            r_bits = random_bits_tl(pos, salt_exp_avg_sq)
            m_code = encode_tl(m, m_scale, m_bits, signed_map_ptr, 255)
            r_code = encode_tl(r, r_scale, r_bits, unsigned_map_ptr, 256)
            tl.store(exp_avg_ptr + offs, m_code.to(tl.uint8), mask=live)
            tl.store(exp_avg_sq_ptr + offs, r_code.to(tl.uint8), mask=live)
            tl.store(m_scale_ptr + rows, m_scale, mask=block_live)
            tl.store(r_scale_ptr + rows, r_scale, mask=block_live)
        else:
            tl.store(exp_avg_ptr + offs, m, mask=live_update)
            tl.store(exp_avg_sq_ptr + offs, v, mask=live_update)

    @triton.jit
    def _store_param(
        param_ptr, compensation_ptr, idx, offs, live_update, x, pos, salt_param,
        PARAM_KIND: tl.constexpr, ROUNDING: tl.constexpr,
    ):  # fmt: skip
        """Store the float32 result x into the param (and kahan's codes)."""
        if PARAM_KIND == 0:
            p_out = x
        elif ROUNDING == 2:
            p_out = round_stochastic_tl(x, random_bits_tl(pos, salt_param), PARAM_KIND == 1)
        elif ROUNDING == 1:
            p_out, code_out = pack_compensation_tl(x, PARAM_KIND == 1)
            tl.store(compensation_ptr + offs, code_out, mask=live_update)
        else:
            p_out = round_nearest_tl(x, PARAM_KIND == 1)
        tl.store(param_ptr + idx, p_out.to(param_ptr.dtype.element_ty), mask=live_update)

    @triton.jit
    def _adamw_tile(
        param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, index_ptr, n_selected, rows,
        grad_scale, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, decay, step_size,
        nonfinite_ptr, entry_scale_ptr, log2_scale_max, compensation_ptr, exp_avg_scale_ptr,
        exp_avg_sq_scale_ptr, signed_map_ptr, unsigned_map_ptr, offset, salt_param,
        salt_exp_avg, salt_exp_avg_sq,
        BLOCK: tl.constexpr, PARAM_KIND: tl.constexpr, ROUNDING: tl.constexpr,
        STATE8: tl.constexpr, COUNT_NONFINITE: tl.constexpr, ENTRY_SCALE: tl.constexpr,
        COMPACT_GRAD: tl.constexpr,
    ):  # fmt: skip
        """The step of one tile: `rows` ([ROWS, 1] int64, scale-block numbers of one
        tensor's selected entries) x BLOCK entries. Shared by the one-tensor and the
        multi-tensor kernels, so both compute the same bits."""
        offs = rows * BLOCK + tl.arange(0, BLOCK)[None, :]
        live = offs < n_selected
        block_live = rows < tl.cdiv(n_selected, BLOCK)
        # Flat param/grad offsets in int64 whatever the index dtype.
        idx = tl.load(index_ptr + offs, mask=live, other=0).to(tl.int64)
        pos = offset + idx  # the global position: the random stream's counter
        g_offs = offs if COMPACT_GRAD else idx  # a compact grad: one entry per index entry
        g = tl.load(grad_ptr + g_offs, mask=live, other=0.0).to(tl.float32) * grad_scale
        p = tl.load(param_ptr + idx, mask=live, other=0.0).to(tl.float32)
        m_old, v_old, r_old = _load_moments(
            exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr, exp_avg_sq_scale_ptr,
            signed_map_ptr, unsigned_map_ptr, offs, rows, live, block_live, STATE8,
        )  # fmt: skip
        # An entry with a NaN/inf gradient is skipped (nothing of it is written), so a
        # NaN never enters the moments; the skips are counted, not hidden.
        finite = tl.abs(g) < float("inf")  # False for NaN too
        live_update = live & finite
        if COUNT_NONFINITE:
            n_bad = tl.sum(tl.sum((live & ~finite).to(tl.int64), axis=1), axis=0)
            if n_bad > 0:  # integer atomics only where needed: exact, rarely contended
                tl.atomic_add(nonfinite_ptr, n_bad)
        # torch.optim.AdamW's order of operations, so results agree to rounding.
        m = m_old + one_minus_beta1 * (g - m_old)
        v = v_old * beta2 + one_minus_beta2 * (g * g)
        # IEEE sqrt/div (not the fast approximations) to track the PyTorch path.
        denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps
        x = p
        if PARAM_KIND != 0:
            if ROUNDING == 1:  # kahan: start from the value p and its code stand for
                code = tl.load(compensation_ptr + offs, mask=live, other=0).to(tl.float32)
                x = p + code * compensation_unit_tl(p, PARAM_KIND == 1)
        if ENTRY_SCALE:  # amplify="saliency": c_i from its uint8 code (entry_scale.py)
            code = tl.load(entry_scale_ptr + offs, mask=live, other=127).to(tl.float32)
            c = tl.exp2(log2_scale_max * tl.div_rn(code - 127.0, 127.0))
            x = x * decay - (step_size * c) * tl.div_rn(m, denom)
        else:
            x = x * decay - step_size * tl.div_rn(m, denom)
        _store_param(param_ptr, compensation_ptr, idx, offs, live_update, x, pos, salt_param,
                     PARAM_KIND, ROUNDING)  # fmt: skip
        _store_moments(
            exp_avg_ptr, exp_avg_sq_ptr, exp_avg_scale_ptr, exp_avg_sq_scale_ptr,
            signed_map_ptr, unsigned_map_ptr, offs, rows, live, live_update, block_live,
            m, v, m_old, r_old, pos, salt_exp_avg, salt_exp_avg_sq, STATE8,
        )  # fmt: skip

    # The random stream's offset and salts change with the shard and the step: no value
    # specialization for them (divisibility by 16 or == 1 helps no address), so a new
    # step's salts do not compile a new variant for those hints.
    @triton.jit(do_not_specialize=["offset", "salt_param", "salt_exp_avg", "salt_exp_avg_sq"])
    def _masked_adamw_kernel(
        param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, index_ptr, n_selected,
        grad_scale, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, decay, step_size,
        nonfinite_ptr, entry_scale_ptr, log2_scale_max, compensation_ptr, exp_avg_scale_ptr,
        exp_avg_sq_scale_ptr, signed_map_ptr, unsigned_map_ptr, offset, salt_param,
        salt_exp_avg, salt_exp_avg_sq,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, PARAM_KIND: tl.constexpr,
        ROUNDING: tl.constexpr, STATE8: tl.constexpr, COUNT_NONFINITE: tl.constexpr,
        ENTRY_SCALE: tl.constexpr, COMPACT_GRAD: tl.constexpr,
    ):  # fmt: skip
        """One tile of ROWS x BLOCK selected entries (STATE8: a row is a scale block).
        PARAM_KIND: 0 float32, 1 bfloat16, 2 float16. ROUNDING (16-bit params only):
        0 nearest, 1 kahan (int8 compensation codes), 2 stochastic."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
        _adamw_tile(
            param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, index_ptr, n_selected, rows,
            grad_scale, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, decay,
            step_size, nonfinite_ptr, entry_scale_ptr, log2_scale_max, compensation_ptr,
            exp_avg_scale_ptr, exp_avg_sq_scale_ptr, signed_map_ptr, unsigned_map_ptr,
            offset, salt_param, salt_exp_avg, salt_exp_avg_sq,
            BLOCK, PARAM_KIND, ROUNDING, STATE8, COUNT_NONFINITE, ENTRY_SCALE, COMPACT_GRAD,
        )  # fmt: skip

    @triton.jit
    def _masked_adamw_multi_kernel(
        param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, index_ptr, nonfinite_ptr,
        entry_scale_ptr, compensation_ptr, exp_avg_scale_ptr, exp_avg_sq_scale_ptr,
        signed_map_ptr, unsigned_map_ptr, layout_ptr, scalars_ptr, step_ints_ptr,
        tile_segment_ptr,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, PARAM_KIND: tl.constexpr,
        ROUNDING: tl.constexpr, STATE8: tl.constexpr, COUNT_NONFINITE: tl.constexpr,
        ENTRY_SCALE: tl.constexpr, COMPACT_GRAD: tl.constexpr,
    ):  # fmt: skip
        """One tile of ROWS x BLOCK selected entries of one segment of many.

        Each `*_ptr` of a tensor kind is a base; segment s reads its own tensor at base +
        an element offset (int64, maybe negative) from its row of layout (the tensors
        that live across steps) or of step_ints (the gradient). The segment of this
        program is tile_segment[program]; its rows count from its first tile. Columns:
        layout (int64) as _LAYOUT, scalars (float32) as _SCALARS, step_ints (int64) as
        _STEP_INTS in the launcher."""
        tile = tl.program_id(0).to(tl.int64)
        seg = tl.load(tile_segment_ptr + tile).to(tl.int64)
        lay = layout_ptr + seg * 12
        sc = scalars_ptr + seg * 9
        ints = step_ints_ptr + seg * 4
        rows = (tile - tl.load(lay + 11)) * ROWS + tl.arange(0, ROWS)[:, None]
        _adamw_tile(
            param_ptr + tl.load(lay), grad_ptr + tl.load(ints),
            exp_avg_ptr + tl.load(lay + 1), exp_avg_sq_ptr + tl.load(lay + 2),
            index_ptr + tl.load(lay + 3), tl.load(lay + 9), rows,
            tl.load(sc), tl.load(sc + 1), tl.load(sc + 2), tl.load(sc + 3), tl.load(sc + 4),
            tl.load(sc + 5), tl.load(sc + 6), tl.load(sc + 7),
            nonfinite_ptr + tl.load(lay + 4), entry_scale_ptr + tl.load(lay + 5),
            tl.load(sc + 8), compensation_ptr + tl.load(lay + 6),
            exp_avg_scale_ptr + tl.load(lay + 7), exp_avg_sq_scale_ptr + tl.load(lay + 8),
            signed_map_ptr, unsigned_map_ptr, tl.load(lay + 10),
            tl.load(ints + 1), tl.load(ints + 2), tl.load(ints + 3),
            BLOCK, PARAM_KIND, ROUNDING, STATE8, COUNT_NONFINITE, ENTRY_SCALE, COMPACT_GRAD,
        )  # fmt: skip


def _scalars(
    *, step, lr, beta1, beta2, eps, weight_decay, grad_scale=1.0, update_scale=1.0
) -> dict:
    # Host-side float64 math, as torch.optim.AdamW does for its Python scalars.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return dict(
        grad_scale=grad_scale,
        one_minus_beta1=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        sqrt_bc2=math.sqrt(bias_correction2),
        eps=eps,
        decay=1 - lr * weight_decay,
        step_size=lr * update_scale / bias_correction1,
    )


class Storage(NamedTuple):
    """How one step is stored beyond float32 moments and round-to-nearest parameters.

    rounding: "nearest" | "kahan" | "stochastic", for float16/bfloat16 params (ignored
        for float32). compensation: int8 [n], kahan's codes (sau_kernels.rounding).
    exp_avg_scale, exp_avg_sq_scale: float32 [num_blocks(n)] when the moments are 8-bit
        codes (sau_kernels.moments8), else None.
    seed, offset: the random stream's seed and the flat position of the tensor's first
        entry in the full tensor (an FSDP2 shard's offset), so position = offset + index.
    compact_grad: grad holds one entry per index entry (grad[j] belongs to
        param.view(-1)[index[j]]) instead of param's shape.
    """

    rounding: str = "nearest"
    compensation: torch.Tensor | None = None
    exp_avg_scale: torch.Tensor | None = None
    exp_avg_sq_scale: torch.Tensor | None = None
    seed: int = 0
    offset: int = 0
    compact_grad: bool = False

    @property
    def state8(self) -> bool:
        return self.exp_avg_scale is not None

    def salts(self, step: int) -> dict:
        """The three streams' salts of this step (param, exp_avg, exp_avg_sq)."""
        return dict(
            salt_param=stream_salt(self.seed, step, STREAM_PARAM),
            salt_exp_avg=stream_salt(self.seed, step, STREAM_EXP_AVG),
            salt_exp_avg_sq=stream_salt(self.seed, step, STREAM_EXP_AVG_SQ),
        )


_PARAM_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ROUNDING_CODE = {"nearest": 0, "kahan": 1, "stochastic": 2}


@launch_on_tensor_device
def _masked_adamw_triton(
    param, grad, exp_avg, exp_avg_sq, index, sc: dict, nonfinite, entry, store: Storage, step
) -> None:
    n = index.numel()
    rows = 4  # 4 x 256 = 1024 entries a program; a row is one 8-bit scale block
    grid = (triton.cdiv(n, rows * BLOCK),)
    signed_map, unsigned_map = (code_map(s, param.device) for s in (True, False))
    _masked_adamw_kernel[grid](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        index,
        n,
        **sc,
        nonfinite_ptr=exp_avg if nonfinite is None else nonfinite,  # unused if not counting
        entry_scale_ptr=index if entry is None else entry[0],  # unused without codes
        log2_scale_max=0.0 if entry is None else math.log2(entry[1]),
        # Unused pointers get a tensor of the launch so the signature stays one.
        compensation_ptr=store.compensation if store.compensation is not None else index,
        exp_avg_scale_ptr=store.exp_avg_scale if store.state8 else exp_avg,
        exp_avg_sq_scale_ptr=store.exp_avg_sq_scale if store.state8 else exp_avg_sq,
        signed_map_ptr=signed_map,
        unsigned_map_ptr=unsigned_map,
        offset=store.offset,
        **store.salts(step),
        ROWS=rows,
        BLOCK=BLOCK,
        PARAM_KIND=_PARAM_KIND[param.dtype],
        ROUNDING=_ROUNDING_CODE[store.rounding],
        STATE8=store.state8,
        COUNT_NONFINITE=nonfinite is not None,
        ENTRY_SCALE=entry is not None,
        COMPACT_GRAD=store.compact_grad,
        # No mul+add -> FMA contraction: the PyTorch path rounds each operation, and the
        # stochastic codes and roundings must see the same bits on both paths.
        enable_fp_fusion=False,
        # 8-bit moments: 4 entries a thread, not 8. At 4 warps the codes' searches and
        # hash streams took 164-167 registers and made ptxas spill on sm_120; at 8 they
        # take at most about 100, none spilled. Same tile, elementwise math and exact
        # reductions (max, integer sum): the same bits.
        num_warps=8 if store.state8 else 4,
    )


# The multi-tensor step's tables; the kernel reads their columns by these positions.
# layout: what lives across steps (state, index, param), cached; step ints: the gradient
# (a new tensor every backward) and the random stream's salts, built every step.
_LAYOUT = (
    "param", "exp_avg", "exp_avg_sq", "index", "nonfinite_count", "entry_scale",
    "compensation", "exp_avg_scale", "exp_avg_sq_scale", "n_selected", "offset", "first_tile",
)  # fmt: skip
_STATE_KINDS = _LAYOUT[:9]
_TENSOR_KINDS = ("grad", *_STATE_KINDS)
_STEP_INTS = ("grad", "salt_param", "salt_exp_avg", "salt_exp_avg_sq")
_SCALARS = (
    "grad_scale", "one_minus_beta1", "beta2", "one_minus_beta2", "sqrt_bc2", "eps", "decay",
    "step_size", "log2_scale_max",
)  # fmt: skip
# Rows of 256 entries (a row is one 8-bit scale block) a program, by 8-bit moments or not.
# 8-bit: 2 rows, not the one-tensor kernel's 4: with the table's per-segment values live
# as well, 4 rows at 8 warps took 122-128 registers on sm_80..sm_120 (at the budget); 2
# rows take 64. Rows are independent (a scale is one row's max), so the bits are the same.
_ROWS = {False: 4, True: 2}
# What differs between the segments of one group (the rest of a call is shared by all).
_SEGMENT_KINDS = (
    "exp_avg", "exp_avg_sq", "index", "entry_scale", "compensation", "exp_avg_scale",
    "exp_avg_sq_scale",
)  # fmt: skip
# Layout tables by (combination, every segment's addresses, sizes and offsets): a table
# is a function of its key alone, so a hit is right even after memory was reused.
_LAYOUT_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_LAYOUT_CACHE_SIZE = 32


class SegmentGroup(NamedTuple):
    """Segments of one tensor that share everything but their slices of state and their
    w (one fused experts tensor's experts), gathered once so that a step's host work is
    per group, not per segment (`segment_group`, `masked_adamw_grouped_unchecked_`)."""

    segments: tuple  # the non-empty segments: a dict of _SEGMENT_KINDS and scalars each
    starts: np.ndarray  # int64 [n]: each segment's first entry in the group's compact grad
    grad_scale: np.ndarray  # float64 [n]
    update_scale: np.ndarray  # float64 [n]
    log2_scale_max: np.ndarray  # float64 [n]: 0 without per-entry codes
    key: tuple  # per segment: its tensors' addresses and entry count (the layout's)
    index_dtype: torch.dtype
    state8: bool
    entry_scale: bool


def segment_group(segments: Sequence[Mapping]) -> SegmentGroup:
    """Gather the per-segment arguments of segments of one tensor, once.

    Args:
        segments: mappings with masked_adamw_'s per-segment arguments: exp_avg,
            exp_avg_sq, index (required), compensation, exp_avg_scale, exp_avg_sq_scale,
            entry_scale, entry_scale_max, grad_scale, update_scale (optional); the
            segments' indices in order, so that a compact gradient of the group holds
            their entries one after another. All alike in index dtype, moments' width
            (float32 or 8-bit) and whether entry_scale is given. Zero-size segments are
            dropped (their entries in a compact gradient: none).

    The group holds these tensors (views stay views: the step updates the state in
    place); it stays valid as long as they are the state's. A non-contiguous
    entry_scale is copied once here.
    """
    kept, starts, start = [], [], 0
    for seg in segments:
        n = seg["index"].numel()
        start, first_entry = start + n, start
        if n == 0:
            continue
        t = {k: seg.get(k) for k in _SEGMENT_KINDS}
        t["grad_scale"] = float(seg.get("grad_scale", 1.0))
        t["update_scale"] = float(seg.get("update_scale", 1.0))
        if t["entry_scale"] is not None:
            t["entry_scale"] = t["entry_scale"].contiguous()
            t["entry_scale_max"] = seg.get("entry_scale_max", 10.0)
        kept.append(t)
        starts.append(first_entry)
    first = kept[0] if kept else {}
    return SegmentGroup(
        segments=tuple(kept),
        starts=np.array(starts, dtype=np.int64),
        grad_scale=np.array([t["grad_scale"] for t in kept], dtype=np.float64),
        update_scale=np.array([t["update_scale"] for t in kept], dtype=np.float64),
        log2_scale_max=np.array(
            [math.log2(t["entry_scale_max"]) if "entry_scale_max" in t else 0.0 for t in kept],
            dtype=np.float64,
        ),
        key=tuple(
            (*(0 if t[k] is None else t[k].data_ptr() for k in _SEGMENT_KINDS), t["index"].numel())
            for t in kept
        ),
        index_dtype=first["index"].dtype if kept else torch.int64,
        state8=first.get("exp_avg_scale") is not None,
        entry_scale=first.get("entry_scale") is not None,
    )


class _Combination(NamedTuple):
    """What the groups of one launch share: device, dtypes and the kernel's switches."""

    device: torch.device
    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    index_dtype: torch.dtype
    state8: bool
    rounding: int  # _ROUNDING_CODE; 0 for float32 params, which ignore it
    count_nonfinite: bool
    entry_scale: bool
    compact_grad: bool


def _combination(group: SegmentGroup, shared: Mapping, grad: torch.Tensor) -> _Combination:
    param = shared["param"]
    half = param.dtype != torch.float32
    rounding = _ROUNDING_CODE[shared.get("rounding", "nearest")] if half else 0
    return _Combination(
        param.device, param.dtype, grad.dtype, group.index_dtype, group.state8, rounding,
        shared.get("nonfinite_count") is not None, group.entry_scale,
        bool(shared.get("compact_grad", False)),
    )  # fmt: skip


def _delta(t: torch.Tensor | None, base: torch.Tensor) -> int:
    """t's element offset from base. Every tensor of a kind has one dtype and allocations
    are element-aligned, so the division is exact."""
    return 0 if t is None else (t.data_ptr() - base.data_ptr()) // t.element_size()


def _bases(items: list) -> dict:
    """Per tensor kind the launch's base tensor: the first one given (a kind no segment
    has gets the first index, never read: its switch is off). items: (group, shared,
    grad) of one combination."""
    group, shared, grad = items[0]
    out = {"grad": grad, "param": shared["param"]}
    out["nonfinite_count"] = shared.get("nonfinite_count")
    for kind in _SEGMENT_KINDS:
        have = (t[kind] for g, _, _ in items for t in g.segments if t[kind] is not None)
        out[kind] = next(have, None)
    return {k: group.segments[0]["index"] if v is None else v for k, v in out.items()}


def _layout(items: list, bases: dict, combo: _Combination) -> tuple[torch.Tensor, torch.Tensor]:
    """(layout int64 [segments, len(_LAYOUT)], tile -> segment int32 [tiles]), cached by
    every address and size they are made of (O(groups) to key: each group's part of it
    was gathered by segment_group)."""
    key = (combo, tuple((g.key, _address(s, "param"), _address(s, "nonfinite_count"),
                         s.get("offset", 0)) for g, s, _ in items))  # fmt: skip
    cached = _LAYOUT_CACHE.get(key)
    if cached is not None:
        return cached
    rows, tiles, first, per_tile = [], [], 0, _ROWS[combo.state8] * BLOCK
    for group, shared, _ in items:
        fixed = {k: _delta(shared.get(k), bases[k]) for k in ("param", "nonfinite_count")}
        for t in group.segments:
            n = t["index"].numel()
            count = -(-n // per_tile)
            row = [fixed[k] if k in fixed else _delta(t[k], bases[k]) for k in _STATE_KINDS]
            rows.append(row + [n, shared.get("offset", 0), first])
            tiles.append(torch.full((count,), len(rows) - 1, dtype=torch.int32))
            first += count
    device = bases["param"].device
    table = (
        _to_device(torch.tensor(rows, dtype=torch.int64), device),
        _to_device(torch.cat(tiles), device),
    )
    if len(_LAYOUT_CACHE) >= _LAYOUT_CACHE_SIZE:
        _LAYOUT_CACHE.pop(next(iter(_LAYOUT_CACHE)))  # the oldest
    _LAYOUT_CACHE[key] = table
    return table


def _address(shared: Mapping, kind: str) -> int:
    t = shared.get(kind)
    return 0 if t is None else t.data_ptr()


def _group_scalars(group: SegmentGroup, shared: Mapping) -> np.ndarray:
    """float64 [segments, len(_SCALARS)]: `_scalars` of each segment, vectorized over
    the segments' w (numpy's float64 operations are Python's, in the same order: the
    same values to the bit)."""
    step, lr = int(shared["step"]), shared["lr"]
    sc = _scalars(
        step=step, lr=lr, beta1=shared["beta1"], beta2=shared["beta2"], eps=shared["eps"],
        weight_decay=shared["weight_decay"],
    )  # fmt: skip
    bias_correction1 = 1 - shared["beta1"] ** step
    out = np.empty((len(group.segments), len(_SCALARS)), dtype=np.float64)
    for j, name in enumerate(_SCALARS[1:7], start=1):
        out[:, j] = sc[name]
    out[:, 0] = group.grad_scale
    out[:, 7] = lr * group.update_scale / bias_correction1
    out[:, 8] = group.log2_scale_max
    return out


def _group_ints(group: SegmentGroup, shared: Mapping, grad, grad_base) -> np.ndarray:
    """int64 [segments, len(_STEP_INTS)]: each segment's grad offset (a compact grad:
    the group's offset plus the segment's start in it) and this step's salts."""
    step = int(shared["step"])
    store = Storage(seed=shared.get("seed", 0))
    salts = store.salts(step)
    out = np.empty((len(group.segments), len(_STEP_INTS)), dtype=np.int64)
    out[:, 0] = _delta(grad, grad_base)
    if shared.get("compact_grad", False):
        out[:, 0] += group.starts
    for j, name in enumerate(_STEP_INTS[1:], start=1):
        out[:, j] = salts[name]
    return out


def _step_tables(items: list, grad_base, device) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's per-segment scalars (float32, rounded from the float64 host values as
    a kernel argument is) and ints (grad offset and salts, int64)."""
    scalars = np.concatenate([_group_scalars(g, s) for g, s, _ in items]).astype(np.float32)
    ints = np.concatenate([_group_ints(g, s, grad, grad_base) for g, s, grad in items])
    return _to_device(torch.from_numpy(scalars), device), _to_device(torch.from_numpy(ints), device)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table on `device` without a sync: a GPU gets an asynchronous copy from
    pinned memory (torch keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


@launch_on_tensor_device
def _masked_adamw_multi_triton(first_param, items: list, combo: _Combination) -> None:
    """One launch for the (group, shared, grad) items of one combination."""
    bases = _bases(items)
    layout, tile_segment = _layout(items, bases, combo)
    scalars, step_ints = _step_tables(items, bases["grad"], first_param.device)
    signed_map, unsigned_map = (code_map(s, first_param.device) for s in (True, False))
    _masked_adamw_multi_kernel[(tile_segment.numel(),)](
        **{f"{kind}_ptr": bases[kind] for kind in _TENSOR_KINDS if kind != "nonfinite_count"},
        nonfinite_ptr=bases["nonfinite_count"],
        signed_map_ptr=signed_map,
        unsigned_map_ptr=unsigned_map,
        layout_ptr=layout,
        scalars_ptr=scalars,
        step_ints_ptr=step_ints,
        tile_segment_ptr=tile_segment,
        ROWS=_ROWS[combo.state8],
        BLOCK=BLOCK,
        PARAM_KIND=_PARAM_KIND[first_param.dtype],
        ROUNDING=combo.rounding,
        STATE8=combo.state8,
        COUNT_NONFINITE=combo.count_nonfinite,
        ENTRY_SCALE=combo.entry_scale,
        COMPACT_GRAD=combo.compact_grad,
        enable_fp_fusion=False,  # as the one-tensor kernel: the same bits
        num_warps=8 if combo.state8 else 4,  # as the one-tensor kernel (register budget)
    )


def _sqrt_rn(v: torch.Tensor) -> torch.Tensor:
    """float32 sqrt correctly rounded, as the kernel's sqrt_rn. torch's CPU float32 sqrt
    (SLEEF, within 0.5001 ulp) is off by one ulp now and then; a float64 sqrt rounded
    once to float32 is exact (53 >= 2 * 24 + 2 bits: the double rounding is innocuous)."""
    return torch.sqrt(v.double()).float()


def _adamw_torch_stored(
    param, grad, exp_avg, exp_avg_sq, index, sc: dict, nonfinite, scale, store: Storage, step
) -> None:
    """The PyTorch path for kahan/stochastic rounding and 8-bit moments: the Triton
    kernel's operations in its order, so both give the same bits.

    index None: every entry of param (the dense form). Works on gathered compact copies
    and scatters the results back.
    """
    dtype = param.dtype
    flat_p, flat_g = param.view(-1), grad.view(-1)
    idx = None if index is None else index.long()
    gather = idx is not None and not store.compact_grad
    g = (flat_g.index_select(0, idx) if gather else flat_g).float() * sc["grad_scale"]
    p = (flat_p if idx is None else flat_p.index_select(0, idx)).float()
    positions = None  # the random stream's counters, needed by stochastic codes only
    if store.state8 or (dtype != torch.float32 and store.rounding == "stochastic"):
        positions = idx if idx is not None else torch.arange(p.numel(), device=p.device)
        positions = positions + store.offset
    finite = torch.isfinite(g)
    if nonfinite is not None:
        nonfinite += (~finite).sum()  # a device tensor: no sync
    m_old, v_old, r_old = _load_moments_torch(exp_avg, exp_avg_sq, store)
    m = m_old + sc["one_minus_beta1"] * (g - m_old)
    v = v_old * sc["beta2"] + sc["one_minus_beta2"] * (g * g)
    denom = _sqrt_rn(v) / sc["sqrt_bc2"] + sc["eps"]
    kahan = dtype != torch.float32 and store.rounding == "kahan"
    x = unpack_compensation(p, store.compensation, dtype) if kahan else p
    step_size = sc["step_size"] if scale is None else sc["step_size"] * scale
    x = x * sc["decay"] - step_size * (m / denom)
    salts = store.salts(step)
    p_new = _stored_param(x, p, finite, positions, salts["salt_param"], store, dtype)
    if idx is None:
        flat_p.copy_(p_new)
    else:
        flat_p.index_copy_(0, idx, p_new)
    m = torch.where(finite, m, m_old)
    v = torch.where(finite, v, v_old)
    if not store.state8:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        return
    r = torch.where(finite, _sqrt_rn(v), r_old)
    for codes, scales, values, signed, salt in (
        (exp_avg, store.exp_avg_scale, m, True, salts["salt_exp_avg"]),
        (exp_avg_sq, store.exp_avg_sq_scale, r, False, salts["salt_exp_avg_sq"]),
    ):
        new_codes, new_scales = encode(values, random_bits(positions, salt), signed=signed)
        codes.copy_(new_codes)
        scales.copy_(new_scales)


def _load_moments_torch(exp_avg, exp_avg_sq, store: Storage):
    """(m, v, sqrt(v)) in float32: the moments, or their 8-bit codes decoded."""
    if not store.state8:
        return exp_avg, exp_avg_sq, None
    m = decode(exp_avg, store.exp_avg_scale, signed=True)
    r = decode(exp_avg_sq, store.exp_avg_sq_scale, signed=False)
    return m, r * r, r


def _stored_param(x, p, finite, positions, salt: int, store: Storage, dtype) -> torch.Tensor:
    """x stored in dtype by the rounding (kahan: its codes updated in place); a skipped
    entry keeps p."""
    if dtype == torch.float32 or store.rounding == "nearest":
        p_new = x.to(dtype)
    elif store.rounding == "stochastic":
        p_new = round_stochastic(x, random_bits(positions, salt), dtype).to(dtype)
    else:
        p_new, code = pack_compensation(x, dtype)
        store.compensation.copy_(torch.where(finite, code, store.compensation))
        p_new = p_new.to(dtype)
    return torch.where(finite, p_new, p.to(dtype))


def _masked_adamw_torch(
    param, grad, exp_avg, exp_avg_sq, index, sc: dict, nonfinite, scale=None, compact=False
) -> None:
    """The PyTorch path: gather, update the compact moments, scatter.

    On a CPU the gathers and the scatter dominate (a 64-byte line holds 16 fp32 entries, so
    at 15% density nearly every line of grad and param is touched); the elementwise work on
    the compact arrays is cheap. Hence: one gather of grad, and for float32 params without
    weight decay a single index_add_ of the update instead of gather + index_copy_ (p + (-u)
    is bitwise p - u).
    """
    idx = index.long()  # index_copy_/index_add_ need int64; cheap next to the gathers
    flat_p = param.view(-1)
    # A compact grad is copied: g is scaled and reused in place below.
    g = grad.view(-1).clone() if compact else grad.view(-1).index_select(0, idx)
    if g.dtype != torch.float32:
        g = g.float()
    if sc["grad_scale"] != 1.0:
        g.mul_(sc["grad_scale"])
    # One reduction detects NaN/inf (a finite sum proves every entry finite); only then pay
    # for the exact mask. An overflowing sum of finite values takes the exact path too.
    if not math.isfinite(float(g.sum())):
        finite = torch.isfinite(g)
        n_bad = int(finite.numel() - finite.sum())
        if n_bad:
            # Rare: step the finite entries alone (same path, on the sub-index), keep the rest.
            m, v = exp_avg[finite], exp_avg_sq[finite]
            sub_scale = None if scale is None else scale[finite]
            sub_grad = grad.view(-1)[finite] if compact else grad
            _masked_adamw_torch(param, sub_grad, m, v, idx[finite], sc, None, sub_scale, compact)
            exp_avg[finite], exp_avg_sq[finite] = m, v
            if nonfinite is not None:
                nonfinite += n_bad
            return
    exp_avg.lerp_(g, sc["one_minus_beta1"])
    exp_avg_sq.mul_(sc["beta2"]).addcmul_(g, g, value=sc["one_minus_beta2"])
    denom = torch.sqrt(exp_avg_sq, out=g).div_(sc["sqrt_bc2"]).add_(sc["eps"])  # reuses g
    m = exp_avg if scale is None else exp_avg * scale  # amplify="saliency": c_i * m
    if param.dtype == torch.float32 and sc["decay"] == 1.0:
        # addcdiv's order, (value * m) / denom, so both branches round alike
        update = torch.mul(m, -sc["step_size"]).div_(denom)
        flat_p.index_add_(0, idx, update)
        return
    p = flat_p.index_select(0, idx)
    p = p.float() if p.dtype != torch.float32 else p
    p.mul_(sc["decay"]).addcdiv_(m, denom, value=-sc["step_size"])
    flat_p.index_copy_(0, idx, p if param.dtype == torch.float32 else p.to(param.dtype))


def _check_tensors(param, grad, exp_avg, exp_avg_sq, index, nonfinite_count, compact) -> None:
    check_float("param", param)
    check_float("grad", grad)
    check_index_tensor(index)  # first: the checks below read index.numel()
    if compact:
        if grad.numel() != index.numel():
            raise ValueError(
                f"a compact grad must have one entry per index entry ({index.numel()}), "
                f"got {grad.numel()}"
            )
    elif grad.shape != param.shape:
        raise ValueError(
            f"grad must have param's shape {tuple(param.shape)}, got {tuple(grad.shape)}"
        )
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8):  # 8-bit: check_storage
            check_float(name, t, (torch.float32,))
        check_contiguous(name, t)
        if t.numel() != index.numel():
            raise ValueError(
                f"{name} must have one entry per index entry ({index.numel()}), got {t.numel()}"
            )
    check_same_device(param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, index=index)
    check_contiguous("param", param)
    if nonfinite_count is not None:
        if (
            not isinstance(nonfinite_count, torch.Tensor)
            or nonfinite_count.dtype != torch.int64
            or nonfinite_count.dim() != 0
        ):
            raise TypeError("nonfinite_count must be a 0-d int64 tensor or None")
        check_same_device(param=param, nonfinite_count=nonfinite_count)


def check_hyperparameters(
    *, step, lr, beta1, beta2, eps, weight_decay, grad_scale=1.0, update_scale=1.0
) -> dict:
    """Validate one step's scalars; returns them as floats (step as int).

    Raises ValueError naming the first bad value: step must be an integer >= 1; lr, eps,
    weight_decay, grad_scale, update_scale finite and >= 0; beta1, beta2 in [0, 1).
    """
    if (
        isinstance(step, bool)
        or not isinstance(step, (int, float))
        or step < 1
        or step != int(step)
    ):
        raise ValueError(f"Invalid step: {step!r} (expected an integer >= 1)")
    out = dict(step=int(step), lr=check_scalar("lr", lr), eps=check_scalar("eps", eps))
    out["weight_decay"] = check_scalar("weight_decay", weight_decay)
    out["beta1"] = check_scalar("beta1", beta1, high=1.0, high_open=True)
    out["beta2"] = check_scalar("beta2", beta2, high=1.0, high_open=True)
    out["grad_scale"] = check_scalar("grad_scale", grad_scale)
    out["update_scale"] = check_scalar("update_scale", update_scale)
    return out


@torch.no_grad()  # updates param and the moments in place; never part of a graph
def masked_adamw_unchecked_(
    param, grad, exp_avg, exp_avg_sq, index, *, backend=None, nonfinite_count=None,
    entry_scale=None, entry_scale_max=10.0, rounding="nearest", compensation=None,
    exp_avg_scale=None, exp_avg_sq_scale=None, seed=0, offset=0, compact_grad=False,
    **hyperparameters,
) -> None:  # fmt: skip
    """`masked_adamw_` without any argument check: the per-step core of SAUAdamW.

    Same arguments as `masked_adamw_` less `check_index`; the hyperparameters are passed
    by keyword as there: step, lr, beta1, beta2, eps, weight_decay and optionally
    grad_scale, update_scale (default 1.0). The caller guarantees what `masked_adamw_`
    checks (dtypes, shapes, devices, a contiguous param and moments, an index inside
    param without duplicates, scalars in range), as torch.optim's functional cores trust
    their optimizer: SAUAdamW validates its hyper-parameters and its plan once, at
    construction. grad may be non-contiguous.

    index None steps every entry of param (SAUAdamW's dense parameters with kahan or
    stochastic rounding or 8-bit moments; PyTorch only): moments, codes and
    compensation are then shaped [param.numel()].
    """
    if index is not None and index.numel() == 0:
        return
    store = Storage(
        rounding, compensation, exp_avg_scale, exp_avg_sq_scale, seed, offset, compact_grad
    )
    step = hyperparameters["step"]
    sc = _scalars(**hyperparameters)
    grad = grad.contiguous()
    half = param.dtype != torch.float32
    if index is not None and resolve_backend(backend, param, grad, exp_avg, index) == "triton":
        entry = None if entry_scale is None else (entry_scale.contiguous(), entry_scale_max)
        _masked_adamw_triton(
            param, grad, exp_avg, exp_avg_sq, index, sc, nonfinite_count, entry, store, step
        )
    else:
        scale = None
        if entry_scale is not None:
            scale = decode_entry_scale(entry_scale.view(-1), entry_scale_max)
        if index is None or store.state8 or (half and rounding != "nearest"):
            _adamw_torch_stored(
                param, grad, exp_avg, exp_avg_sq, index, sc, nonfinite_count, scale, store, step
            )
        else:
            _masked_adamw_torch(
                param, grad, exp_avg, exp_avg_sq, index, sc, nonfinite_count, scale, compact_grad
            )


@torch.no_grad()  # updates param and the moments in place; never part of a graph
def masked_adamw_(
    param, grad, exp_avg, exp_avg_sq, index, *, step, lr, beta1, beta2, eps, weight_decay,
    grad_scale=1.0, update_scale=1.0, backend=None, check_index=True, nonfinite_count=None,
    entry_scale=None, entry_scale_max=10.0, rounding="nearest", compensation=None,
    exp_avg_scale=None, exp_avg_sq_scale=None, seed=0, offset=0, compact_grad=False,
) -> None:  # fmt: skip
    """One AdamW step on the entries param.view(-1)[index] only (docs/kernels.md).

    Math in float32, exactly torch.optim.AdamW's (decoupled weight decay, bias correction):
        g = grad[i] * grad_scale;  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
        x = p (1 - lr wd) - lr update_scale / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
    and x is stored into p (16-bit params: by `rounding`). Entries not in `index` are
    bitwise unchanged.

    Args:
        param: float32 | float16 | bfloat16, contiguous; updated in place.
        grad: same shape as param, float32 | float16 | bfloat16.
        exp_avg, exp_avg_sq: float32, contiguous, index.numel() entries, in place; uint8
            codes with exp_avg_scale / exp_avg_sq_scale (8-bit, sau_kernels.moments8).
        index: 1-D int32 | int64 flat indices into param.view(-1) (sorted is fastest).
        step: step number after incrementing, >= 1.
        lr, eps, weight_decay: >= 0. beta1, beta2: in [0, 1).
        grad_scale, update_scale: the amplification (c_g, c_u) of docs/method.md.
        backend: "triton" | "torch" | None.
        check_index: verify 0 <= index < param.numel() and no duplicates (one read of
            index and a device sync); callers that validated the index once pass False.
        nonfinite_count: optional 0-d int64 tensor on param's device; the number of
            entries skipped for a NaN/inf gradient is added to it (no device sync).
        entry_scale: optional uint8 codes, one per index entry: c_i = entry_scale_max **
            ((code - 127) / 127) multiplies update_scale (amplify="saliency").
        entry_scale_max: the w_max the codes were made with, finite and >= 1.
        rounding: "nearest" | "kahan" (needs compensation: int8, index.numel() entries,
            in place) | "stochastic", for 16-bit params (sau_kernels.rounding).
        exp_avg_scale, exp_avg_sq_scale: float32, num_blocks(index.numel()) entries
            each, both or neither; in place.
        seed, offset: ints >= 0: the random stream (stochastic rounding, 8-bit codes)
            draws at (seed, step, offset + index); offset is param's first entry's flat
            position in the full tensor (an FSDP2 shard's), so sharding does not matter.
        compact_grad: grad holds index.numel() entries, grad[j] for index[j].

    An entry whose gradient (times grad_scale) is NaN or inf is skipped: its param,
    compensation and moment values are kept (8-bit: re-coded with its block); the other
    entries step. `masked_adamw_unchecked_` is the same step without these checks.
    """
    checked = _checked_call(
        param, grad, exp_avg, exp_avg_sq, index, step=step, lr=lr, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, grad_scale=grad_scale, update_scale=update_scale,
        check_index=check_index, nonfinite_count=nonfinite_count, entry_scale=entry_scale,
        entry_scale_max=entry_scale_max, rounding=rounding, compensation=compensation,
        exp_avg_scale=exp_avg_scale, exp_avg_sq_scale=exp_avg_sq_scale, seed=seed,
        offset=offset, compact_grad=compact_grad,
    )  # fmt: skip
    masked_adamw_unchecked_(**checked, backend=backend)


def _checked_call(
    param, grad, exp_avg, exp_avg_sq, index, *, check_index=True, nonfinite_count=None,
    entry_scale=None, entry_scale_max=10.0, rounding="nearest", compensation=None,
    exp_avg_scale=None, exp_avg_sq_scale=None, seed=0, offset=0, compact_grad=False,
    **hyperparameters,
) -> dict:  # fmt: skip
    """masked_adamw_'s checks of one call; returns masked_adamw_unchecked_'s keyword
    arguments (scalars as floats, seed and offset as ints)."""
    _check_tensors(param, grad, exp_avg, exp_avg_sq, index, nonfinite_count, compact_grad)
    hp = check_hyperparameters(**hyperparameters)
    entry_scale_max = _check_entries(param, index, check_index, entry_scale, entry_scale_max)
    store = check_storage(
        param, exp_avg, exp_avg_sq, index.numel(),
        Storage(rounding, compensation, exp_avg_scale, exp_avg_sq_scale, seed, offset,
                bool(compact_grad)),
    )  # fmt: skip
    return dict(
        param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, index=index, **hp,
        **store._asdict(), nonfinite_count=nonfinite_count, entry_scale=entry_scale,
        entry_scale_max=entry_scale_max,
    )  # fmt: skip


@torch.no_grad()  # updates params and moments in place; never part of a graph
def masked_adamw_multi_unchecked_(segments: Sequence[Mapping], *, backend=None) -> None:
    """`masked_adamw_multi_` without any argument check. The caller guarantees what
    `masked_adamw_multi_` checks. Each segment is a group of its own here; callers that
    step the same segments every step keep their groups (`masked_adamw_grouped_unchecked_`)."""
    groups = [(segment_group([call]), call) for call in segments if call["index"].numel()]
    masked_adamw_grouped_unchecked_(groups, backend=backend)


@torch.no_grad()  # updates params and moments in place; never part of a graph
def masked_adamw_grouped_unchecked_(
    groups: Sequence[tuple[SegmentGroup, Mapping]], *, backend=None
) -> None:
    """`masked_adamw_multi_unchecked_` on segments given by groups: the per-step core of
    SAUAdamW.step, whose host work grows with the groups (tensors), not the segments.

    Each group is (SegmentGroup, shared): shared maps masked_adamw_'s other arguments
    (param, grad, step, lr, beta1, beta2, eps, weight_decay, nonfinite_count, rounding,
    seed, offset, compact_grad) for all of the group's segments; with compact_grad, grad
    holds the segments' entries one after another (segment j's at starts[j]). The result
    is bitwise masked_adamw_multi_unchecked_'s on the segments {**segment, **shared}
    (a compact grad sliced per segment). Unchecked: as masked_adamw_multi_unchecked_.
    """
    by_combination: dict[_Combination, list] = {}
    for group, shared in groups:
        if not group.segments:
            continue
        first, grad = group.segments[0], shared["grad"]
        tensors = (shared["param"], grad, first["exp_avg"], first["index"])
        if resolve_backend(backend, *tensors) != "triton":
            _grouped_torch(group, shared)
            continue
        grad = grad.contiguous()
        combo = _combination(group, shared, grad)
        by_combination.setdefault(combo, []).append((group, shared, grad))
    for combo, items in by_combination.items():
        _masked_adamw_multi_triton(items[0][1]["param"], items, combo)


def _grouped_torch(group: SegmentGroup, shared: Mapping) -> None:
    """The PyTorch backend: a group's segments one by one (masked_adamw_unchecked_)."""
    grad, compact = shared["grad"], bool(shared.get("compact_grad", False))
    for seg, start in zip(group.segments, group.starts.tolist()):
        call = {**shared, **seg}
        if compact:
            call["grad"] = grad[start : start + seg["index"].numel()]
        masked_adamw_unchecked_(**call, backend="torch")


@torch.no_grad()  # updates params and moments in place; never part of a graph
def masked_adamw_multi_(segments: Sequence[Mapping], *, backend=None, check_index=True) -> None:
    """`masked_adamw_` on many segments at once: the multi-tensor form of the step.

    Each segment is a mapping of masked_adamw_'s arguments by name (param, grad,
    exp_avg, exp_avg_sq, index, step, lr, beta1, beta2, eps, weight_decay, and any of
    its optional ones but backend and check_index); a segment may be a slice of a larger
    tensor's state (one expert of a fused experts tensor: index, moments, codes and
    scales sliced, param and grad whole) and every segment has its own step and
    scalars. The result is bitwise that of calling masked_adamw_ on each segment in
    turn. On the Triton backend all segments that share a device, the param, grad and
    index dtypes, the moments' width (float32 or 8-bit), the rounding of 16-bit params,
    and whether nonfinite_count, entry_scale and compact_grad are given, are stepped by
    one launch (docs/kernels.md, "Multi-tensor step"); the PyTorch backend steps them
    one by one.

    Args:
        segments: sequence of mappings as above. Two segments must not select the same
            entry of one tensor (checked per param tensor when check_index).
        backend: "triton" | "torch" | None, for every segment.
        check_index: as masked_adamw_, plus the no-shared-entry check.

    Raises:
        What masked_adamw_ raises, for the first bad segment, before any update.
    """
    checked = [_checked_call(**seg, check_index=check_index) for seg in segments]
    if check_index:
        _check_disjoint(checked)
    masked_adamw_multi_unchecked_(checked, backend=backend)


def _check_disjoint(calls: list[dict]) -> None:
    """No entry of one param tensor in two segments (they would race in one launch)."""
    by_param: dict[int, list[dict]] = {}
    for call in calls:
        by_param.setdefault(call["param"].data_ptr(), []).append(call)
    for group in by_param.values():
        if len(group) > 1:
            merged = torch.cat([c["index"].long() for c in group])
            check_index_values(merged, group[0]["param"].numel(), name="segments' index")


def check_storage(param, exp_avg, exp_avg_sq, n: int, store: Storage) -> Storage:
    """Validate a Storage for n entries of `param`; returns it (seed, offset as ints).

    Raises ValueError for an unknown rounding, kahan on a 16-bit param without its
    compensation, a compensation or scales of the wrong length, one scale without the
    other, a bad seed or offset; TypeError for wrong dtypes.
    """
    if store.rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {store.rounding!r}")
    for name, value, high in (("seed", store.seed, 2**63), ("offset", store.offset, 2**62)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < high:
            raise ValueError(f"{name} must be an integer in [0, {high}), got {value!r}")
    comp = store.compensation
    if comp is not None or (store.rounding == "kahan" and param.dtype != torch.float32):
        if comp is None:
            raise ValueError('rounding="kahan" on a 16-bit param needs compensation')
        _check_state("compensation", comp, torch.int8, n, param)
    if (store.exp_avg_scale is None) != (store.exp_avg_sq_scale is None):
        raise ValueError("exp_avg_scale and exp_avg_sq_scale go together (8-bit moments)")
    if not store.state8 and torch.uint8 in (exp_avg.dtype, exp_avg_sq.dtype):
        raise ValueError("uint8 (8-bit) moments need exp_avg_scale and exp_avg_sq_scale")
    if store.state8:
        _check_state("exp_avg", exp_avg, torch.uint8, n, param)
        _check_state("exp_avg_sq", exp_avg_sq, torch.uint8, n, param)
        for name in ("exp_avg_scale", "exp_avg_sq_scale"):
            _check_state(name, getattr(store, name), torch.float32, num_blocks(n), param)
    return store


def _check_state(name: str, t, dtype, n: int, param) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a {dtype} tensor, got {got}")
    if t.numel() != n:
        raise ValueError(f"{name} must have {n} entries, got {t.numel()}")
    check_contiguous(name, t)
    check_same_device(param=param, **{name: t})


def _check_entries(param, index, check_index, entry_scale, entry_scale_max) -> float:
    """The per-entry inputs: entry_scale's codes (uint8, one per index entry, on param's
    device) and their bound (>= 1), then, when check_index, the index values
    (`check_index_values`). Returns entry_scale_max, checked when codes are given."""
    if entry_scale is not None:
        if not isinstance(entry_scale, torch.Tensor) or entry_scale.dtype != torch.uint8:
            got = entry_scale.dtype if isinstance(entry_scale, torch.Tensor) else type(entry_scale)
            raise TypeError(f"entry_scale must be a uint8 tensor of codes or None, got {got}")
        if entry_scale.numel() != index.numel():
            raise ValueError(
                f"entry_scale must have one code per index entry ({index.numel()}), "
                f"got {entry_scale.numel()}"
            )
        check_same_device(param=param, entry_scale=entry_scale)
        entry_scale_max = check_scalar("entry_scale_max", entry_scale_max, low=1.0)
    if check_index and index.numel():
        check_index_values(index, param.numel())
    return entry_scale_max
