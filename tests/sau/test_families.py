"""The architecture matrix: every family SAU supports, pruned, planned, stepped, unlearned.

For each family of tests/sau/families.py (tiny random configs, no downloads, saved with a
tokenizer stand-in): `sau prune` with magnitude 50%, 2:4 and Wanda 50%; then on the 2:4
model compute_saliency, plan_selection and 3 SAUAdamW steps with weight decay; then
`sau unlearn` on the saved directory. MoE families also prove the zero-saliency rule: an
expert the router never picks keeps its weights bitwise through unlearning.
"""

from __future__ import annotations

import json

import pytest
import torch

from sau import SAUAdamW, compute_saliency, plan_selection
from sau.batching import collate, encode_rows
from sau.cli import main
from sau.lab.data import generate, load_qa, write_jsonl
from sau.lab.models import load_model
from sau.prune import prunable_weights, target_linear_names
from sau.unlearn.objectives import nll
from tests.sau.families import DEAD_EXPERT, FAMILIES, make_model, tokenizer_stand_in

METHODS = {
    "magnitude": ["--method", "magnitude", "--sparsity", "0.5"],
    "2:4": ["--method", "magnitude", "--nm", "2:4"],
    "wanda": ["--method", "wanda", "--sparsity", "0.5"],
}
TINY = {"eval_retain_rows": 4, "max_new_tokens": 2, "batch_size": 4, "epochs": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Data files (TOFU format) shared by every family."""
    root = tmp_path_factory.mktemp("families")
    ds = generate(seed=0, n_people=5, n_general=4)
    for split, rows in ds.splits().items():
        write_jsonl(rows, root / f"{split}.jsonl")
    (root / "tiny.json").write_text(json.dumps(TINY))
    return root


@pytest.fixture(scope="module")
def tok():
    return tokenizer_stand_in()


@pytest.fixture(scope="module")
def saved(root, tok):
    """family -> directory of its saved random model (built on first use)."""
    cache = {}

    def get(family):
        if family not in cache:
            path = root / family
            make_model(family, tok).save_pretrained(path)
            tok.save_pretrained(path)
            cache[family] = path
        return cache[family]

    return get


def prune_cli(root, src, method, capsys):
    out = root / f"{src.name}-{method.replace(':', 'of')}"
    if not out.exists():
        argv = ["prune", "--model", str(src), *METHODS[method], "--out", str(out)]
        argv += ["--calib", str(root / "retain.jsonl"), "--no-progress"]
        assert main(argv) == 0, capsys.readouterr().err
        capsys.readouterr()
    return out


def not_pruned_params(model) -> dict[str, torch.Tensor]:
    targets = set(target_linear_names(model))
    return {n: p.detach().clone() for n, p in model.named_parameters() if n not in targets}


def assert_nm(weight_views, n=2, m=4):
    for matrix in weight_views:  # [out, in]: groups of m along the input dimension
        groups = (matrix != 0).reshape(matrix.shape[0], -1, m).sum(-1)
        assert bool((groups <= n).all())


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prune_every_family(family, method, root, saved, capsys):
    src = saved(family)
    out = prune_cli(root, src, method, capsys)
    report = json.loads((out / "prune_report.json").read_text())
    kinds = FAMILIES[family][2]
    assert set(report["by_kind"]) == kinds
    for kind, row in report["by_kind"].items():
        assert row["sparsity"] == 0.5, (kind, row)  # every width is even: exact halves
    before, _ = load_model(src, tokenizer=False)
    after, _ = load_model(out, tokenizer=False)
    untouched = not_pruned_params(before)
    for name, p in not_pruned_params(after).items():
        assert torch.equal(p, untouched[name]), f"{name} changed"
    for w in prunable_weights(after):
        for matrix in w.matrices():
            if method == "wanda":  # per output row of each layer (each expert)
                assert bool(((matrix == 0).sum(1) == matrix.shape[1] // 2).all())
            elif method == "2:4":
                assert_nm([matrix])
            else:
                assert int((matrix == 0).sum()) == matrix.numel() // 2


def forget_batch(tok, root):
    rows = load_qa(root / "forget.jsonl")[:4]
    return collate(encode_rows(tok, rows), tok.pad_token_id)


def routed_experts(model, batch) -> set[int]:
    seen: set[int] = set()
    hooks = [
        w.module.register_forward_pre_hook(lambda _m, a: seen.update(a[1].unique().tolist()))
        for w in prunable_weights(model)
        if w.kind == "experts" and w.name.endswith("gate_up_proj")
    ]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_step_and_unlearn_every_family(family, root, saved, tok, capsys):
    pruned_dir = prune_cli(root, saved(family), "2:4", capsys)
    model, _ = load_model(pruned_dir, tokenizer=False)
    batch = forget_batch(tok, root)
    saliency = compute_saliency(model, [batch], nll, progress=False)
    assert set(saliency) >= set(target_linear_names(model))
    plan = plan_selection(model.named_parameters(), saliency, k=0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SAUAdamW([plan[n].param for n in plan], plan=plan, lr=1e-2, weight_decay=0.1)
    for _ in range(3):  # gradient ascent on the forget batch, as GA does
        (-nll(model, batch)).backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        p = p.detach()
        if name not in plan:
            assert torch.equal(p, before[name]), f"{name} is not planned but changed"
            continue
        chosen = torch.zeros(p.numel(), dtype=torch.bool)
        chosen[plan[name].selection.index.long()] = True
        moved = (p != before[name]).view(-1)
        assert torch.equal(moved, chosen), f"{name}: moved entries differ from G"
        assert bool((p.view(-1)[before[name].view(-1) == 0] == 0).all())
    assert_nm([m for w in prunable_weights(model) for m in w.matrices()])

    if "experts" in FAMILIES[family][2]:
        assert DEAD_EXPERT not in routed_experts(model, batch)
        for w in prunable_weights(model):
            if w.kind == "experts":
                assert float(saliency[w.name][DEAD_EXPERT].abs().sum()) == 0.0
                assert plan[w.name].experts[DEAD_EXPERT].selection.n_selected == 0
                assert torch.equal(w.param[DEAD_EXPERT], before[w.name][DEAD_EXPERT])

    out = root / f"{family}-unlearned"
    argv = ["unlearn", "--model", str(pruned_dir), "--out", str(out), "--no-progress"]
    for split in ("forget", "retain"):
        argv += [f"--{split}", str(root / f"{split}.jsonl")]
    assert main([*argv, "--config", str(root / "tiny.json")]) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["rows"][0]["sparsity_kept"] == 1.0
    start, _ = load_model(pruned_dir, tokenizer=False)
    done, _ = load_model(out, tokenizer=False)
    assert_nm([m for w in prunable_weights(done) for m in w.matrices()])
    moved = [
        n
        for n in target_linear_names(done)
        if not torch.equal(done.get_parameter(n), start.get_parameter(n))
    ]
    assert moved, "sau unlearn changed nothing"
    for w in prunable_weights(done):
        if w.kind == "experts":  # never routed on the forget set: zero saliency, frozen
            old = start.get_parameter(w.name)[DEAD_EXPERT]
            assert torch.equal(w.param[DEAD_EXPERT], old)
