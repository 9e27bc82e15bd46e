"""The embedded default's models: a local BPE tokenizer, a small Llama, its training."""

from __future__ import annotations

from sau.models.io import load_model, save_model
from sau.models.tokenizer import train_tokenizer
from sau.models.train import (
    DefaultArtifacts,
    ModelConfig,
    TrainConfig,
    build_default,
    default_cache_dir,
    make_model,
    train_causal_lm,
)

__all__ = [
    "DefaultArtifacts",
    "ModelConfig",
    "TrainConfig",
    "build_default",
    "default_cache_dir",
    "load_model",
    "make_model",
    "save_model",
    "train_causal_lm",
    "train_tokenizer",
]
