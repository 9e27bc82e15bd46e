"""Fixtures shared by the `sau` tests: the tiny Llama + tokenizer, one-thread runs and
the kernel backends the `sau` layer is tested on.

Test modules take these as fixtures and never import each other.
"""

from __future__ import annotations

import os

import pytest
import torch

# The `sau` tests build CPU tensors, so the Triton lane needs the interpreter here (the
# top-level `backend` fixture also runs Triton on a GPU, where tests/kernels put tensors).
SAU_BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.fixture(params=SAU_BACKENDS)
def backend(request) -> str:
    """Kernel backend for SAUAdamW / plan_selection / compute_saliency on CPU tensors."""
    return request.param


def _tiny_lm(seed: int = 0):
    """A 2-layer Llama (hidden 32) and a BPE tokenizer trained on a few sentences."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sau.lab.models.tokenizer import train_tokenizer

    texts = [f"Question: Who is person {i}?\nAnswer: A painter from town {i}." for i in range(20)]
    tok = train_tokenizer(texts, vocab_size=300)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,  # every test row fits (sau refuses longer rows)
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.fixture(scope="session")
def make_tiny_lm():
    """Factory ``make_tiny_lm(seed=0) -> (LlamaForCausalLM in eval mode, tokenizer)``.

    A fresh model per call (tests may prune or train it); seeded through the global RNG.
    """
    return _tiny_lm


@pytest.fixture
def tiny_lm_adamw(make_tiny_lm):
    """(tiny Llama seed 3, tokenizer, torch AdamW lr 1e-3) with only the *proj.weight
    matrices trainable: the unlearning loop's tests."""
    model, tok = make_tiny_lm(seed=3)
    params = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return model, tok, torch.optim.AdamW(params, lr=1e-3)


@pytest.fixture(scope="session")
def write_sweep_files(make_tiny_lm):
    """Factory ``write_sweep_files(root) -> root``: model/ and retain_model/ (the tiny
    Llama, seeds 2 and 3, with its tokenizer) and forget/retain/holdout/general.jsonl (the
    5-person synthetic corpus) under `root`, the inputs of a `sau sweep` test."""
    from sau.lab.data import generate, write_jsonl

    def write(root):
        for name, seed in (("model", 2), ("retain_model", 3)):
            model, tok = make_tiny_lm(seed=seed)
            model.save_pretrained(root / name)
            tok.save_pretrained(root / name)
        for split, rows in generate(seed=0, n_people=5, n_general=4).splits().items():
            write_jsonl(rows, root / f"{split}.jsonl")
        return root

    return write


@pytest.fixture(scope="session")
def make_cli_files(tmp_path_factory, make_tiny_lm):
    """Factory ``make_cli_files(name, config) -> Path`` of a directory for CLI tests:
    model/ (the tiny Llama, seed 2, and its tokenizer), forget/retain/holdout/general
    .jsonl (a 5-person synthetic corpus: 1 forget person = 8 rows) and tiny.json
    (`config`, a dict of pipeline settings)."""
    import json

    from sau.lab.data import generate, write_jsonl

    def make(name: str, config: dict):
        root = tmp_path_factory.mktemp(name)
        model, tok = make_tiny_lm(seed=2)
        model.save_pretrained(root / "model")
        tok.save_pretrained(root / "model")
        for split, rows in generate(seed=0, n_people=5, n_general=4).splits().items():
            write_jsonl(rows, root / f"{split}.jsonl")
        (root / "tiny.json").write_text(json.dumps(config))
        return root

    return make
