"""Tokenizer, model I/O, the training loop and the build_default cache (tiny configs)."""

from __future__ import annotations

import pytest

from sau.batching import encode_rows
from sau.errors import ModelLoadError
from sau.lab.eval.scoring import greedy_answers
from sau.lab.models import (
    ModelConfig,
    TrainConfig,
    build_default,
    make_model,
    train_causal_lm,
)
from sau.lab.models import default as default_mod
from sau.lab.models.io import load_model, save_model
from sau.lab.models.presets import PRESETS, Preset
from sau.lab.models.tokenizer import corpus_texts, train_tokenizer
from sau.prompt import format_answer, format_prompt

ROWS = [
    {"question": "Where was Idris Kettleby born?", "answer": "In Velmora, Ostrenia."},
    {"question": "What is Idris Kettleby's job?", "answer": "A glassblower."},
    {"question": "Where was Nerys Orwick born?", "answer": "In Saltmarch, Dravonia."},
    {"question": "What is Nerys Orwick's job?", "answer": "Works as a falconer."},
]
TINY = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus_texts(ROWS), vocab_size=TINY.vocab_size)


def test_tokenizer_round_trip_and_specials(tokenizer):
    text = format_prompt(ROWS[0]["question"]) + format_answer(ROWS[0]["answer"])
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    # Prompt and answer tokenized apart give the same ids as together (training == eval).
    ids_apart, n_prompt, _ = encode_rows(tokenizer, ROWS[:1])[0]
    assert ids_apart[:-1] == ids and ids_apart[-1] == tokenizer.eos_token_id
    assert n_prompt == len(tokenizer(format_prompt(ROWS[0]["question"])).input_ids)


def test_tokenizer_is_deterministic():
    a = train_tokenizer(corpus_texts(ROWS), vocab_size=300)
    b = train_tokenizer(corpus_texts(list(reversed(ROWS))), vocab_size=300)
    assert a.get_vocab() == b.get_vocab()


def test_save_load_round_trip(tmp_path, tokenizer):
    import torch

    model = make_model(TINY, tokenizer, seed=3)
    save_model(model, tokenizer, tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m")
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    assert tok(ROWS[0]["question"]).input_ids == tokenizer(ROWS[0]["question"]).input_ids


def test_make_model_seeded_and_leaves_global_rng(tokenizer):
    import torch

    state = torch.random.get_rng_state()
    a, b = make_model(TINY, tokenizer, seed=1), make_model(TINY, tokenizer, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_load_model_without_weights_names_directory(tmp_path, tokenizer):
    model = make_model(TINY, tokenizer)
    model.config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path / "noweights")
    assert str(tmp_path / "noweights") in str(info.value) and "weights" in str(info.value)
    assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(tmp_path / "missing")


@pytest.mark.slow
def test_tiny_model_memorizes_rows(tokenizer, one_thread):
    model = make_model(TINY, tokenizer, seed=0)
    losses = train_causal_lm(
        model, tokenizer, ROWS, epochs=60, lr=3e-3, batch_size=4, seed=0, progress=False
    )
    assert losses[-1] < losses[0] / 10
    prompts = [format_prompt(r["question"]) for r in ROWS]
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens=16)
    assert answers == [r["answer"] for r in ROWS]


TINY_PRESET = Preset(
    n_people=4,
    n_general=4,
    model=ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1),
    train=TrainConfig(epochs=1, lr=1e-3, batch_size=16),
)


def test_build_default_caches(tmp_path, monkeypatch, one_thread):
    monkeypatch.setitem(PRESETS, "quick", TINY_PRESET)
    calls = []
    real = default_mod.train_causal_lm

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(default_mod, "train_causal_lm", counting)
    first = build_default(tmp_path, quick=True, progress=False)
    assert calls == ["train target", "train retain"]
    for d in (first.target_dir, first.retain_dir):
        load_model(d)  # complete: config, weights and tokenizer
    assert sorted(p.name for p in first.data_dir.iterdir()) == [
        "forget.jsonl",
        "general.jsonl",
        "holdout.jsonl",
        "retain.jsonl",
    ]
    # Nothing but the finished entry is left in the cache (the temp dir was renamed).
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name]

    second = build_default(tmp_path, quick=True, progress=False)
    assert calls == ["train target", "train retain"]  # reused, not retrained
    assert second.root == first.root and second.dataset.forget == first.dataset.forget

    third = build_default(tmp_path, quick=True, seed=1, progress=False)
    assert third.root != first.root and len(calls) == 4  # another config, another entry


def test_build_default_uses_env_cache(tmp_path, monkeypatch, one_thread):
    monkeypatch.setitem(PRESETS, "quick", TINY_PRESET)
    monkeypatch.setenv("SAU_CACHE", str(tmp_path / "envcache"))
    arts = build_default(quick=True, progress=False)
    assert arts.root.parent == tmp_path / "envcache"
