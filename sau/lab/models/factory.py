"""The small Llama of the embedded default, built from a transformers config."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sau.lab.models.presets import ModelConfig

__all__ = ["make_model"]


def make_model(config: ModelConfig, tokenizer, *, seed: int = 0):
    """A freshly initialized `transformers.LlamaForCausalLM` (float32, CPU).

    Args:
        config: ModelConfig; vocab_size is taken from `tokenizer` (len), not config.
        tokenizer: the PreTrainedTokenizerFast whose bos/eos/pad ids the model uses.
        seed: int; initialization seed. The global torch RNG is saved and restored.
    """
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # halves embedding params at a ~1k vocab, no cost in recall
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model
