"""SAUAdamW as the optimizer of transformers.Trainer on a tiny pruned Llama."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from sau import SAUAdamW, compute_saliency, plan_selection

VOCAB = 64


def prune_linear_weights_(model: nn.Module, sparsity: float = 0.5) -> None:
    """Unstructured magnitude pruning, inline: zero the smallest |W| of each linear weight."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                n_pruned = int(sparsity * w.numel())
                cut = w.abs().view(-1).kthvalue(n_pruned).values
                w[w.abs() <= cut] = 0


def test_trainer_keeps_pruned_weights_zero_and_moves_selected(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg)
    prune_linear_weights_(model)

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (16, 12), generator=g)
    forget = [tokens[i : i + 4] for i in range(0, 16, 4)]
    sal = compute_saliency(
        model, forget, lambda m, b: m(input_ids=b, labels=b).loss, progress=False
    )
    plan = plan_selection(model.named_parameters(), sal, k=0.3, alpha=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SAUAdamW(model.parameters(), plan=plan, lr=1e-2, amplify="update")

    # Gradient ascent would be the unlearning loss; any loss exercises the optimizer.
    data = [{"input_ids": row, "labels": row} for row in tokens]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()

    params = dict(model.named_parameters())
    for name, layer in plan.items():
        p = params[name].detach()
        pruned = before[name] == 0
        assert pruned.any()
        assert (p[pruned] == 0).all(), name  # exact zeros, still
        selected = torch.zeros(p.numel(), dtype=torch.bool)
        selected[layer.selection.index.long()] = True
        selected = selected.view(p.shape)
        assert not torch.equal(p[selected], before[name][selected]), name
        assert torch.equal(p[~selected], before[name][~selected]), name
    # Embeddings and norms are outside the plan: plain dense AdamW moved them.
    assert not torch.equal(params["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert opt.state[params["lm_head.weight"]]["step"].item() == 4
