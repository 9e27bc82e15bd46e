"""How much a bfloat16 saliency accumulator changes the selected set G (Jaccard vs float32).

    python benchmarks/saliency_jaccard.py [--out benchmarks/results/saliency-bf16.json]

Two cases, both pruned 50% by magnitude and planned at k = 0.3 (the library defaults):
1. the embedded default (the trained target model from `build_default`, its forget set,
   batch 16, the forget NLL as in the pipeline);
2. a random-weight Llama-architecture model (hidden 1024, 4 layers, vocab 32000) on
   random tokens, 16 batches of 1 x 256.
Reported: Jaccard |G32 ∩ G16| / |G32 ∪ G16| over all layers together and the worst layer,
|G| of each, and the largest relative change of the amplification w.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.env_info import environment  # noqa: E402


def compare(model, names, batches, loss_fn) -> dict:
    """Saliency in float32 and bfloat16 on the same batches; overlap of the two plans."""
    from sau import compute_saliency, plan_selection

    plans = {}
    for dtype in (torch.float32, torch.bfloat16):
        sal = compute_saliency(model, batches, loss_fn, params=names, progress=False, dtype=dtype)
        plans[dtype] = plan_selection(model.named_parameters(), sal, k=0.3, alpha=0.1)
    a, b = plans[torch.float32], plans[torch.bfloat16]
    inter = union = 0
    worst, w_change = 1.0, 0.0
    for name in a:
        ia = set(a[name].selection.index.tolist())
        ib = set(b[name].selection.index.tolist())
        i, u = len(ia & ib), len(ia | ib)
        inter, union = inter + i, union + u
        worst = min(worst, i / u if u else 1.0)
        wa, wb = a[name].amplification, b[name].amplification
        w_change = max(w_change, abs(wb - wa) / wa)
    return {
        "jaccard": inter / union,
        "worst_layer_jaccard": worst,
        "n_selected_fp32": sum(p.selection.n_selected for p in a.values()),
        "n_selected_bf16": sum(p.selection.n_selected for p in b.values()),
        "max_rel_change_w": w_change,
        "layers": len(a),
    }


def embedded_case() -> dict:
    from sau.batching import encode_rows, loss_batches, pad_id
    from sau.lab.models import build_default, load_model
    from sau.prune import prune_model, target_linear_names
    from sau.unlearn.objectives import nll

    art = build_default(seed=0, progress=False)
    model, tok = load_model(art.target_dir)
    prune_model(model, "magnitude", 0.5, progress=False)
    names = target_linear_names(model)
    forget = art.dataset.splits()["forget"]
    batches = loss_batches(encode_rows(tok, forget), pad_id(tok), 16)
    out = compare(model, names, batches, nll)
    out["case"] = f"embedded default target, {len(forget)} forget rows, batch 16"
    return out


def random_llama_case() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sau.prune import prune_model, target_linear_names

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(cfg)
    prune_model(model, "magnitude", 0.5, progress=False)
    names = target_linear_names(model)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32000, (1, 256), generator=gen) for _ in range(16)]

    def loss_fn(m, batch):
        return m(input_ids=batch, labels=batch).loss

    out = compare(model, names, batches, loss_fn)
    out["case"] = "random Llama (hidden 1024, 4 layers), random tokens, 16 x (1 x 256)"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/saliency-bf16.json"))
    args = ap.parse_args(argv)
    rows = [embedded_case(), random_llama_case()]
    for r in rows:
        print(
            f"{r['case']}: Jaccard {r['jaccard']:.4f} (worst layer {r['worst_layer_jaccard']:.4f}),"
            f" |G| {r['n_selected_fp32']} vs {r['n_selected_bf16']},"
            f" max |dw|/w {r['max_rel_change_w']:.2e}"
        )
    Path(args.out).write_text(json.dumps({"environment": environment(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
