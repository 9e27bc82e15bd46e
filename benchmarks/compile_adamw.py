"""Compile every specialization of the masked AdamW kernel for NVIDIA GPUs, without one.

    python benchmarks/compile_adamw.py [--arch 80 90] [--out F.json]

Triton's bundled ptxas compiles for any CUDA target on a machine without a GPU. Each
specialization (param dtype x rounding x 8-bit moments x per-entry scales, with the
non-finite counter) is compiled to a cubin for each architecture; a kernel that only
fails on real hardware (a wrong result, not a compile error) is not caught here.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.env_info import environment  # noqa: E402

PARAM = {0: "*fp32", 1: "*bf16", 2: "*fp16"}
SCALAR_INTS = {"n_selected", "offset", "salt_param", "salt_exp_avg", "salt_exp_avg_sq"}
POINTERS = {"nonfinite_ptr": "*i64", "entry_scale_ptr": "*u8", "compensation_ptr": "*i8"}


def signature(kernel, param_kind: int, state8: bool) -> dict:
    """Triton type strings of the kernel's arguments for one specialization."""
    out = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name.isupper():
            out[name] = "constexpr"
        elif name in SCALAR_INTS:
            out[name] = "i64"
        elif name.endswith("_ptr"):
            out[name] = POINTERS.get(name, "*fp32")
        else:
            out[name] = "fp32"
    out["param_ptr"] = out["grad_ptr"] = PARAM[param_kind]
    out["index_ptr"] = "*i32"
    if state8:
        out["exp_avg_ptr"] = out["exp_avg_sq_ptr"] = "*u8"
    return out


def specializations():
    """(PARAM_KIND, ROUNDING, STATE8, ENTRY_SCALE): rounding only for 16-bit params."""
    for kind, rounding, state8, entry in itertools.product((0, 1, 2), (0, 1, 2), (0, 1), (0, 1)):
        if kind == 0 and rounding:
            continue
        yield kind, rounding, bool(state8), bool(entry)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--out", help="write a JSON summary here")
    args = ap.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sau_kernels.adamw import _masked_adamw_kernel as kernel

    done, t0 = [], time.time()
    for arch in args.arch:
        for kind, rounding, state8, entry in specializations():
            constants = dict(
                ROWS=4, BLOCK=256, PARAM_KIND=kind, ROUNDING=rounding, STATE8=state8,
                COUNT_NONFINITE=True, ENTRY_SCALE=entry,
            )  # fmt: skip
            source = ASTSource(
                fn=kernel, signature=signature(kernel, kind, state8), constexprs=constants
            )
            compiled = triton.compile(
                source, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False}
            )
            assert compiled.asm.get("cubin"), (arch, constants)
            done.append(dict(arch=f"sm_{arch}", **constants))
    seconds = round(time.time() - t0, 1)
    print(f"compiled {len(done)} specializations for {args.arch} in {seconds} s")
    if args.out:
        out = dict(environment=environment(), seconds=seconds, compiled=done)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
