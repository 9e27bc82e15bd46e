"""The embedded default's models: a local BPE tokenizer (`tokenizer`), the presets
(`presets`), the small Llama (`factory`), its training (`trainer`), saving and loading
(`io`) and the cached build of the whole default (`default`)."""

from __future__ import annotations

from sau.lab.models.default import DefaultArtifacts, build_default, default_cache_dir
from sau.lab.models.factory import make_model
from sau.lab.models.io import load_model, save_model
from sau.lab.models.presets import ModelConfig, TrainConfig
from sau.lab.models.tokenizer import train_tokenizer
from sau.lab.models.trainer import train_causal_lm

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
