"""One-GPU check of the distributed selection: a 1-rank NCCL group, compiled Triton.

    python benchmarks/gpu_dist_check.py --out DIR      # on a CUDA machine (< 1 minute)

Runs `SAU_TEST_DIST=nccl pytest tests/kernels/test_distributed.py`: the tests' single
rank joins an NCCL group on cuda:0, its tensors live on the GPU, so the histogram and
emit passes are the compiled Triton kernels and every collective goes through NCCL.
Writes DIR/gpu-dist.json (GPU name, versions, commit, test counts) and the pytest log.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.env_info import environment  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_dist_check: needs a CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    junit = args.out / "gpu-dist-junit.xml"
    env = dict(os.environ, SAU_TEST_DIST="nccl")
    env.pop("SAU_BACKEND", None)  # CUDA tensors: Triton by default
    cmd = [sys.executable, "-m", "pytest", "tests/kernels/test_distributed.py", "-q"]
    cmd += ["-p", "no:cacheprovider", f"--junitxml={junit}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (args.out / "gpu-dist-pytest.log").write_text(proc.stdout + proc.stderr)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    result = {
        "environment": environment(),
        "gpu": torch.cuda.get_device_name(0),
        "command": "SAU_TEST_DIST=nccl pytest tests/kernels/test_distributed.py",
        "returncode": proc.returncode,
        **counts,
        "tail": (proc.stdout + proc.stderr)[-2000:],
    }
    (args.out / "gpu-dist.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("gpu", "returncode", *counts)}))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
