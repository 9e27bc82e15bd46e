"""Tests for sau.prune and `sau prune`: exact counts, N:M patterns, Wanda vs magnitude."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sau.cli import main
from sau.prune import prune_model, pruned_masks, target_linear_names


def tiny_llama(seed: int = 0, dtype=torch.float32, hidden: int = 32, inter: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def calib(n_batches: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 7), generator=g) for _ in range(n_batches)]


def test_targets_are_decoder_linears_only():
    model = tiny_llama()
    names = target_linear_names(model)
    assert len(names) == 2 * 7  # q k v o gate up down per block
    assert all(n.startswith("model.layers.") and n.endswith(".weight") for n in names)
    assert "lm_head.weight" not in names


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_magnitude_exact_count_per_layer(sparsity):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prune_model(model, "magnitude", sparsity, progress=False)
    for row in report.layers:
        w = model.get_parameter(row.name)
        assert row.n_zero == int((w == 0).sum()) == round(sparsity * w.numel())
        # the zeroed entries are the smallest |W| of the original weight
        orig = before[row.name].abs()
        if row.n_zero:
            assert orig[w == 0].max() <= orig[w != 0].min()
    # embeddings, norms and lm_head are untouched
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(model.get_parameter(name), before[name])
    assert json.loads(report.to_json())["layers"][0]["numel"] == report.layers[0].numel
    assert "total" in report.to_text()


def test_magnitude_ties_are_deterministic():
    lin = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    prune_model(lin, "magnitude", 0.25, progress=False)
    # 4 of 16 equal scores: the lowest flat indices go first
    assert (lin.weight.view(-1)[:4] == 0).all() and (lin.weight.view(-1)[4:] == 1).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_every_group(method, nm):
    n, m = nm
    model = tiny_llama()
    prune_model(model, method, nm=nm, calib_batches=calib(), progress=False)
    for name in target_linear_names(model):
        w = model.get_parameter(name)
        groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
        assert (groups == n).all(), name


def test_wanda_each_row_loses_same_count():
    model = tiny_llama()
    report = prune_model(model, "wanda", 0.5, calib_batches=calib(), progress=False)
    for row in report.layers:
        w = model.get_parameter(row.name)
        assert ((w == 0).sum(1) == round(0.5 * w.shape[1])).all()


def test_wanda_and_magnitude_choose_differently():
    # Row [1.0, 2.0, 3.0, 4.0]; input channel norms [10, 1, 1, 1]:
    # magnitude drops columns 0, 1; Wanda's |W| * ||X|| = [10, 2, 3, 4] drops 1, 2.
    def make():
        lin = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        return lin

    x = torch.tensor([[10.0, 1.0, 1.0, 1.0]])  # ||X_j||_2 over one token
    mag, wanda = make(), make()
    prune_model(mag, "magnitude", 0.5, progress=False)
    prune_model(wanda, "wanda", 0.5, calib_batches=[x], progress=False)
    assert mag.weight.tolist() == [[0.0, 0.0, 3.0, 4.0]]
    assert wanda.weight.tolist() == [[1.0, 0.0, 0.0, 4.0]]


def test_wanda_ignores_padding_positions():
    model_a, model_b = tiny_llama(), tiny_llama()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long()
    prune_model(model_a, "wanda", 0.5, calib_batches=[ids], progress=False)
    prune_model(model_b, "wanda", 0.5, calib_batches=[(padded, mask)], progress=False)
    for name in target_linear_names(model_a):
        assert torch.equal(model_a.get_parameter(name) == 0, model_b.get_parameter(name) == 0)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range_refused(bad):
    with pytest.raises(ValueError, match=r"sparsity must be a fraction in \[0, 1\)"):
        prune_model(tiny_llama(), "magnitude", bad, progress=False)


def test_other_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="calib_batches"):
        prune_model(model, "wanda", 0.5, progress=False)
    with pytest.raises(ValueError, match="divisible by 5"):
        prune_model(model, "magnitude", nm=(2, 5), progress=False)
    with pytest.raises(ValueError, match="method"):
        prune_model(model, "sparsegpt", 0.5, progress=False)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_bf16_weights(method):
    model = tiny_llama(dtype=torch.bfloat16)
    report = prune_model(model, method, 0.5, calib_batches=calib(), progress=False)
    for row in report.layers:
        w = model.get_parameter(row.name)
        assert w.dtype == torch.bfloat16
        if method == "magnitude":
            assert row.n_zero == round(0.5 * w.numel())
        else:
            assert ((w == 0).sum(1) == w.shape[1] // 2).all()
    masks = pruned_masks(model)
    assert set(masks) == set(target_linear_names(model))
    assert all(m.dtype == torch.bool for m in masks.values())


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = "question answer what is the capital of france paris blue sky : ?".split()
    tok.train_from_iterator(
        [" ".join(words)],
        trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_cli_round_trip(tmp_path, method, capsys):
    from transformers import AutoModelForCausalLM

    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_llama().save_pretrained(src)
    _tiny_tokenizer().save_pretrained(src)
    calib_file = tmp_path / "calib.jsonl"
    rows = [{"question": "What is the capital of France?", "answer": "Paris"}] * 3
    calib_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "prune",
        "--model",
        str(src),
        "--method",
        method,
        "--nm",
        "2:4",
        "--out",
        str(dst),
        "--no-progress",
    ]
    if method == "wanda":
        argv += ["--calib", str(calib_file)]
    assert main(argv) == 0
    assert "total" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(dst)
    for name in target_linear_names(model):
        w = model.get_parameter(name)
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    assert json.loads((dst / "prune_report.json").read_text())["sparsity"] == 0.5


def test_cli_errors(tmp_path, capsys):
    assert main(["prune", "--model", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert main(["prune", "--model", str(tmp_path), "--sparsity", "1.0"]) == 2
    assert "[0, 1)" in capsys.readouterr().err


def test_cli_magnitude_needs_no_tokenizer_and_keeps_its_files(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_llama().save_pretrained(src)  # no tokenizer at all
    (src / "tokenizer.json").write_text("not a tokenizer transformers can read")
    argv = ["prune", "--model", str(src), "--out", str(dst), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("found 14 Linear weights: 14 layers")
    assert "linear: 14 weights, 14 layers, sparsity 0.5000" in out
    assert (dst / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    # Wanda does need one, and says so on one line.
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    argv = ["prune", "--model", str(src), "--method", "wanda", "--calib", str(calib)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load model" in err


def test_cli_refuses_a_model_with_nothing_to_prune(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=0, n_head=2))
    model.save_pretrained(tmp_path / "m")
    assert main(["prune", "--model", str(tmp_path / "m"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to prune" in err
    with pytest.raises(ValueError, match="no prunable weight"):
        prune_model(model, "magnitude", 0.5, progress=False)
