"""Turn pytest-benchmark's JSON into ratios against the baselines of the same run.

Usage: python benchmarks/summarize_cpu.py RAW.json OUT.json
Prints a markdown table; writes OUT.json with the environment, medians and ratios.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.env_info import environment  # noqa: E402


def summarize(raw: dict) -> list[dict]:
    groups = defaultdict(dict)
    for bench in raw["benchmarks"]:
        impl = bench["params"]["impl"]
        groups[bench["group"]][impl] = bench
    rows = []
    for group, impls in groups.items():
        sau = impls.get("sau")
        if sau is None:
            continue
        pair = sau.get("extra_info", {}).get("interleaved")
        if pair:  # two modes timed alternately inside one benchmark (in_backward)
            rows.append(
                {
                    "group": group,
                    "baseline": "normal mode, interleaved",
                    "sau_median_s": pair["in_backward_median_s"],
                    "baseline_median_s": pair["normal_median_s"],
                    "ratio": pair["ratio"],
                }
            )
        for name, base in impls.items():
            if name == "sau":
                continue
            row = {
                "group": group,
                "baseline": name.removeprefix("baseline-"),
                "sau_median_s": sau["stats"]["median"],
                "baseline_median_s": base["stats"]["median"],
                "ratio": sau["stats"]["median"] / base["stats"]["median"],
            }
            for key in ("state_bytes_per_param",):
                if key in sau.get("extra_info", {}):
                    row[f"sau_{key}"] = sau["extra_info"][key]
                    row[f"baseline_{key}"] = base["extra_info"].get(key)
            rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    raw = json.loads(Path(argv[1]).read_text())
    rows = summarize(raw)
    out = {"environment": environment(), "rows": rows}
    Path(argv[2]).write_text(json.dumps(out, indent=2) + "\n")
    print(f"machine: {out['environment']['device']}, torch {out['environment']['torch']}")
    print("| benchmark | baseline | SAU median (ms) | baseline median (ms) | SAU / baseline |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['group']} | {r['baseline']} | {r['sau_median_s'] * 1e3:.1f} | "
            f"{r['baseline_median_s'] * 1e3:.1f} | {r['ratio']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
