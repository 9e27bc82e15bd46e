"""load_model refuses a config.json that does not describe the weight files."""

from __future__ import annotations

import json
import shutil

import pytest

from sau.errors import ModelLoadError
from sau.lab.models import load_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory, make_tiny_lm):
    path = tmp_path_factory.mktemp("models-io") / "model"
    model, tok = make_tiny_lm(seed=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def with_config(saved, tmp_path, **change):
    path = tmp_path / "m"
    shutil.copytree(saved, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    ("change", "words"),
    [
        # Before: a GPT-2 with every weight random, exit 0.
        (
            {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]},
            "as GPT2LMHeadModel, 28 weights it needs are not in the files",
        ),
        # Before: a third decoder layer, randomly initialized.
        ({"num_hidden_layers": 3}, "9 weights it needs are not in the files (model.layers.2."),
        # Before: the second layer's weights dropped.
        ({"num_hidden_layers": 1}, "the files hold 9 it does not use (model.layers.1."),
    ],
)
def test_a_config_that_does_not_describe_the_weights_is_refused(saved, tmp_path, change, words):
    with pytest.raises(ModelLoadError) as err:
        load_model(with_config(saved, tmp_path, **change), tokenizer=False)
    message = str(err.value)
    assert "config.json does not describe the weight files" in message and words in message
    assert "\n" not in message and "... (9 in all)" in message or "28 in all" in message


def test_a_matching_config_loads_and_a_tied_flag_is_harmless(saved, tmp_path):
    model, tok = load_model(saved)
    assert tok is not None and not model.training
    load_model(with_config(saved, tmp_path, tie_word_embeddings=True), tokenizer=False)
