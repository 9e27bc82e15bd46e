"""Machine, versions and commit recorded beside every benchmark result."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone

import torch


def git_commit() -> str:
    if os.environ.get("SAU_COMMIT"):
        return os.environ["SAU_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(__file__),
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["sms"] = props.multi_processor_count
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["device"] = f"CPU ({info['cpu']}, {info['cpu_count']} cores)"
    return info
