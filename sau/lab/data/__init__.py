"""The embedded default's data: a synthetic TOFU-like corpus and QA file I/O."""

from __future__ import annotations

from sau.lab.data.io import load_qa, write_jsonl, write_splits
from sau.lab.data.synthetic import FORGET_FRACTIONS, DataConfig, QADataset, generate

__all__ = [
    "FORGET_FRACTIONS",
    "DataConfig",
    "QADataset",
    "generate",
    "load_qa",
    "write_jsonl",
    "write_splits",
]
