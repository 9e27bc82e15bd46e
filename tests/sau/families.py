"""Tiny random models of every causal-LM family SAU supports, from transformers configs.

No downloads: each model is built from its config with random weights, beside a small
byte-level BPE tokenizer trained here (the tokenizer stand-in). Widths are multiples of
4 so that 2:4 pruning applies to every prunable weight. The MoE families get a residual
channel that dominates every token's hidden state and a router that ranks the experts
along it, so expert `DEAD_EXPERT` is never routed: the zero-saliency check needs it.
"""

from __future__ import annotations

import torch

from sau.lab.models.tokenizer import train_tokenizer

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, EXPERTS = 32, 64, 2, 4, 2, 4
DEAD_EXPERT = EXPERTS - 1

# family -> (config class name, family-specific config fields, kinds of prunable weight)
FAMILIES = {
    "llama": ("LlamaConfig", {}, {"linear"}),
    "mistral": ("MistralConfig", {}, {"linear"}),
    "qwen2": ("Qwen2Config", {}, {"linear"}),
    "gemma2": ("Gemma2Config", {"head_dim": HIDDEN // HEADS}, {"linear"}),
    "phi3": ("Phi3Config", {}, {"linear"}),
    "opt": (
        "OPTConfig",
        {"ffn_dim": INTER, "word_embed_proj_dim": HIDDEN, "dropout": 0.0},
        {"linear"},
    ),
    "gpt_neox": ("GPTNeoXConfig", {"hidden_dropout": 0.0, "attention_dropout": 0.0}, {"linear"}),
    "gpt2": (
        "GPT2Config",
        {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 256},
        {"conv1d"},
    ),
    "mixtral": (
        "MixtralConfig",
        {"num_local_experts": EXPERTS, "num_experts_per_tok": 2},
        {"linear", "experts"},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": EXPERTS,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": INTER // 4,
            "shared_expert_intermediate_size": INTER // 2,
        },
        {"linear", "experts"},
    ),
}

_COMMON = {
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "max_position_embeddings": 256,
}
_NO_KV_HEADS = {"opt", "gpt_neox", "gpt2"}


def tokenizer_stand_in():
    """A 300-token byte-level BPE trained on a few QA sentences (sau's own tokenizer)."""
    texts = [f"Question: Who is person {i}?\nAnswer: A painter from town {i}." for i in range(20)]
    return train_tokenizer(texts, vocab_size=300)


def make_model(family: str, tok, seed: int = 0):
    """A tiny random `family` causal LM (float32, eval mode) sized for `tok`."""
    import transformers

    cls_name, extra, _ = FAMILIES[family]
    fields = {} if family == "gpt2" else dict(_COMMON)
    if family in _NO_KV_HEADS:
        fields.pop("num_key_value_heads", None)
    fields.update(extra)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    cfg = getattr(transformers, cls_name)(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, **ids, **fields
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if family in ("mixtral", "qwen2_moe"):
        _starve_expert(model)
    return model


@torch.no_grad()
def _starve_expert(model) -> None:
    # Channel 0 of every token embedding is large and positive, so after each RMSNorm
    # every hidden state points along +e_0; the routers score the experts by their
    # channel-0 weight, lowest for DEAD_EXPERT, which is therefore never in a top-2.
    model.get_input_embeddings().weight[:, 0] = 50.0
    for layer in model.model.layers:
        router = layer.mlp.gate.weight
        router[:, 0] = torch.tensor([4.0, 3.0, 2.0, -4.0])[: router.shape[0]]
