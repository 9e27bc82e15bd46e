"""The embedded default's models: a local BPE tokenizer (`tokenizer`), the presets
(`presets`), the small Llama (`factory`), its training (`trainer`), saving and loading
(`io`) and the cached build of the whole default (`default`)."""

from __future__ import annotations

from sau.models.default import DefaultArtifacts, build_default, default_cache_dir
from sau.models.factory import make_model
from sau.models.io import load_model, save_model
from sau.models.presets import ModelConfig, TrainConfig
from sau.models.tokenizer import train_tokenizer
from sau.models.trainer import train_causal_lm

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
