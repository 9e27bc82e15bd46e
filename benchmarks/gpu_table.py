"""The README's GPU table, built from the GPU runner's JSON (never typed by hand).

    python benchmarks/gpu_table.py benchmarks/results/gpu-h200-run3/gpu-results.json
    python benchmarks/gpu_table.py RESULTS.json --readme README.md

Prints a Markdown table (kernel and shape, SAU, baseline, ratio) with one row per
measurement in the file (for docs/benchmarks.md); rows where SAU loses stay in.
--readme replaces the lines between the README's ``<!-- gpu-table PATH -->`` and
``<!-- /gpu-table -->`` markers with the headline rows (largest select shape; fused
AdamW and the bytes floor for Llama layers; one launch per expert for MoE). The marker
records the JSON it was built from (a test rebuilds the table from it and compares).
Reads both the current runner layout and the first runs' (one select shape,
``time_step_fp32`` / ``time_step_bf16``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

START, END = "<!-- gpu-table", "<!-- /gpu-table -->"


def _ms(value: float) -> str:
    return f"{value:.3g} ms" if value >= 0.01 else f"{value * 1e3:.3g} µs"


def _ratio(ours: float, base: float) -> str:
    """'1.8x faster' / '**3.0x slower**' (the losing rows in bold)."""
    if ours <= base:
        return f"{base / ours:.2f}x faster"
    return f"**{ours / base:.2f}x slower**"


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def accumulate_rows(section) -> list[tuple]:
    return [
        (
            f"saliency accumulation, {r['grad_dtype']} grad, {_millions(r['n'])} entries",
            _ms(r["sau_ms"]),
            f"`addcmul_` {_ms(r['addcmul_ms'])}",
            _ratio(r["sau_ms"], r["addcmul_ms"]),
        )
        for r in section
    ]


def select_rows(section, full: bool) -> list[tuple]:
    rows = []
    shapes = section if isinstance(section, list) else [section]
    for r in shapes if full else shapes[-1:]:
        what = f"`select_topk`, {r['shape'][0]}×{r['shape'][1]}, 50% sparse, k = 0.3"
        ours = r["sau_ms"]
        bases = [("`torch.topk` on survivor values only", r["torch_topk_values_only_ms"])]
        if r.get("torch_sort_values_only_ms"):
            bases.append(("`torch.sort` (CUB) on survivor values", r["torch_sort_values_only_ms"]))
        if full:
            bases.append(("mask + `topk` + index (what a user writes)", r["torch_topk_full_ms"]))
        for i, (name, base) in enumerate(bases):
            rows.append((what if i == 0 else "same", _ms(ours), f"{name} {_ms(base)}",
                         _ratio(ours, base)))  # fmt: skip
    return rows


def _step_label(key: str, tiny: bool) -> tuple[str, str, str]:
    parts = key.split("_")[2:]  # time_step[_llama|_moe]_{fp32,bf16,float32,bfloat16}
    family = parts[0] if len(parts) == 2 else "llama"
    label = {"llama": "2 Llama-3.1-8B layers", "moe": "a Qwen2-MoE layer (60 experts)"}[family]
    return family, ("tiny " + family if tiny else label), parts[-1]


def step_rows(key: str, r: dict, full: bool, tiny: bool) -> list[tuple]:
    """Rows of one step section: against fused AdamW and the step's own bytes floor (dense
    Llama layers), against one launch per layer and expert (MoE); all of them if full."""
    family, label, dtype = _step_label(key, tiny)
    ours = r["sau_optimizer_ms"]
    bases = []
    if r.get("torch_fused_ms") and (full or family == "llama"):
        bases.append(("`AdamW(fused=True)`", r["torch_fused_ms"]))
    if r.get("sau_per_segment_ms") and (full or family == "moe"):
        bases.append(("one launch per layer and expert", r["sau_per_segment_ms"]))
    if r.get("own_floor_ms") and (full or family == "llama"):
        bases.append(("its own bytes at copy bandwidth", r["own_floor_ms"]))
    elif r.get("floor_ms") and (full or family == "llama"):
        bases.append(("dense floor (read grad, r+w param)", r["floor_ms"]))
    what = f"`SAUAdamW` step, {label}, {_millions(r['n_params'])} params, {dtype}"
    return [
        (what if i == 0 else "same", _ms(ours), f"{name} {_ms(base)}", _ratio(ours, base))
        for i, (name, base) in enumerate(bases)
    ]


def state_row(sections: dict) -> list[tuple]:
    r = sections.get("time_step_llama_float32") or sections.get("time_step_fp32") or {}
    if "sau_state_bytes_per_param" not in r:
        return []
    ours = r["sau_state_bytes_per_param"]
    return [(
        "optimizer state, 50% sparse, k = 0.3", f"{ours:.2f} B/param",
        "`AdamW` 8 B/param (fp32)", f"{ours / 8:.2f}x",
    )]  # fmt: skip


def table(result: dict, full: bool = False) -> str:
    """The Markdown table (with its one-line header naming the machine) of a runner JSON:
    the README's rows, or every measurement with full=True."""
    env, sections = result["environment"], result["sections"]
    rows = accumulate_rows(sections.get("time_accumulate", []))
    rows += select_rows(sections.get("time_select", []), full)
    for key, section in sections.items():
        if key.startswith("time_step") and "error" not in section:
            rows += step_rows(key, section, full, bool(result.get("tiny")))
    rows += state_row(sections)
    when = f", measured {env['date']}" if env.get("date") else ""
    head = (
        f"Kernels on one **{env['device']}** (torch {env['torch']}, Triton {env['triton']}, "
        f"commit {env['commit'][:7]}{when}), medians:\n\n"
        "| kernel (shape) | SAU | baseline | ratio |\n|---|---|---|---|\n"
    )
    return head + "".join(f"| {' | '.join(row)} |\n" for row in rows)


def source_of(text: str) -> str:
    """The results path recorded in a file's start marker."""
    if text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"expected one '{START} PATH -->' and one '{END}' marker")
    return text.split(START)[1].split("-->")[0].strip()


def block_of(text: str) -> str:
    """The table between the markers (without them)."""
    source_of(text)
    return text.split(START)[1].split("-->", 1)[1].split(END)[0].lstrip("\n")


def replace_table(text: str, new: str, source: str) -> str:
    """text with the block between the markers replaced by `new`, built from `source`."""
    source_of(text)
    before, rest = text.split(START)
    _, after = rest.split(END)
    return f"{before}{START} {source} -->\n{new}{END}{after}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="the GPU runner's JSON")
    ap.add_argument("--readme", type=Path, help="rewrite this README's table in place")
    args = ap.parse_args(argv)
    result = json.loads(args.results.read_text())
    if args.readme:
        text = args.readme.read_text()
        args.readme.write_text(replace_table(text, table(result), str(args.results)))
    else:
        sys.stdout.write(table(result, full=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
