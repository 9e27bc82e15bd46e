"""SAUTrainerMixin on a stand-in open-unlearning trainer (nested forget/retain batches,
GradDiff in compute_loss) under transformers.Trainer, on a tiny pruned Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from sau.integrations.trainer import SAUTrainerMixin, _mean_over_ranks
from tests.helpers import llama_planned_names, pruned_tiny_llama
from tests.multiproc import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, LENGTH = 8, 10


class StandInGradDiff(Trainer):
    """open-unlearning's GradDiff, reduced: each batch is {"forget": ..., "retain": ...}
    and the loss is -gamma NLL(forget) + alpha NLL(retain)."""

    def __init__(self, *args, gamma: float = 1.0, alpha: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma, self.alpha = gamma, alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = model(**inputs["forget"])
        retain = model(**inputs["retain"])
        loss = -self.gamma * forget.loss + self.alpha * retain.loss
        return (loss, forget) if return_outputs else loss


class SAUGradDiff(SAUTrainerMixin, StandInGradDiff):
    pass


def _rows(seed: int) -> list[dict]:
    tokens = torch.randint(0, 64, (ROWS, LENGTH), generator=torch.Generator().manual_seed(seed))
    labels = tokens.clone()
    labels[:, :3] = -100  # the prompt: no loss on it
    return [
        {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": y}
        for t, y in zip(tokens, labels)
    ]


def _dataset() -> list[dict]:
    return [{"forget": f, "retain": r} for f, r in zip(_rows(1), _rows(2))]


def _collate(rows: list[dict]) -> dict:
    """Nested rows -> nested batches, as open-unlearning's collator does."""
    return {
        part: {key: torch.stack([row[part][key] for row in rows]) for key in rows[0][part]}
        for part in ("forget", "retain")
    }


def _trainer(tmp_path, model, accumulation=2, max_grad_norm=1.0, **sau) -> SAUGradDiff:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=max_grad_norm,
        max_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # keep "forget" and "retain", as open-unlearning does
        seed=0,
    )
    return SAUGradDiff(
        model=model,
        args=args,
        train_dataset=_dataset(),
        data_collator=_collate,
        gamma=10.0,  # a gradient norm above max_grad_norm=1.0, so the clip acts
        alpha=0.5,  # the trainer's own alpha (retain weight): sau's are prefixed
        sau_k=0.3,
        **sau,
    )


def _model():
    model = pruned_tiny_llama(seed=0)
    model.model.norm.weight.requires_grad_(False)  # trained: the planned weights only
    return model


def _train(tmp_path, **settings):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, model, **settings)
    trainer.train()
    return model, before, trainer


@pytest.mark.parametrize("compact_grads", [False, True])
def test_only_the_planned_entries_move(tmp_path, compact_grads):
    model, before, trainer = _train(tmp_path, sau_compact_grads=compact_grads)
    plan, params = trainer.sau_plan, dict(model.named_parameters())
    assert sorted(plan) == sorted(llama_planned_names(model))
    for name, p in params.items():
        if name not in plan:
            assert torch.equal(p, before[name]), name  # not planned: unchanged
            continue
        selected = torch.zeros(p.numel(), dtype=torch.bool)
        selected[plan[name].selection.index.long()] = True
        moved = (p.detach() != before[name]).reshape(-1)
        assert torch.equal(moved, selected), name  # exactly G moved
        assert (p.detach()[before[name] == 0] == 0).all(), name  # pruned stay zero
    assert trainer.state.global_step == 2
    norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    assert len(norms) == 2 and max(norms) > 1.0  # the clip at 1.0 acted


def test_compact_grads_gives_the_plain_result_with_accumulation_and_clipping(tmp_path):
    plain, _, _ = _train(tmp_path / "plain")
    compact, _, _ = _train(tmp_path / "compact", sau_compact_grads=True)
    for (name, a), b in zip(plain.named_parameters(), compact.parameters()):
        assert torch.equal(a, b), name


def test_in_backward_gives_the_plain_result(tmp_path):
    plain, _, _ = _train(tmp_path / "plain", accumulation=1, max_grad_norm=0.0)
    hooked, _, trainer = _train(
        tmp_path / "hooked", accumulation=1, max_grad_norm=0.0, sau_in_backward=True
    )
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters()):
        assert torch.equal(a, b), name
    assert not any("grad_norm" in log for log in trainer.state.log_history)


@pytest.mark.parametrize(
    "accumulation, max_grad_norm, setting",
    [(2, 0.0, "gradient_accumulation_steps=1"), (1, 1.0, "max_grad_norm=0")],
)
def test_in_backward_refuses_accumulation_and_clipping(
    tmp_path, accumulation, max_grad_norm, setting
):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(tmp_path, model, accumulation, max_grad_norm, sau_in_backward=True)
    with pytest.raises(ValueError) as info:
        trainer.train()
    assert "\n" not in str(info.value) and setting in str(info.value)
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_forget_batches_passed_are_the_ones_scored(tmp_path):
    seen = []

    def forget_loss(model, batch):
        seen.append(batch["input_ids"].shape[0])
        return model(**batch).loss

    batches = [_collate(_dataset()[:3])["forget"]] * 2
    trainer = _trainer(tmp_path, _model(), sau_forget_batches=batches, sau_forget_loss=forget_loss)
    trainer.create_optimizer()
    assert seen == [3, 3] and trainer.sau_plan is not None


def test_batches_without_a_forget_part_are_refused(tmp_path):
    trainer = _trainer(tmp_path, _model())
    trainer.train_dataset = [row["forget"] for row in _dataset()]
    trainer.data_collator = None
    with pytest.raises(ValueError, match="sau_forget_batches"):
        trainer.create_optimizer()


def test_the_trainers_own_fsdp_is_refused(tmp_path):
    trainer = _trainer(tmp_path, _model())
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="FSDP2 through `sau unlearn`"):
        trainer.create_optimizer()


def _rank_saliency(rank: int, world: int) -> list:
    saliency = {"w": torch.full((2, 3), float(rank + 1)), "v": torch.arange(4.0) * rank}
    return [t.tolist() for t in _mean_over_ranks(saliency).values()]


def test_ddp_ranks_plan_from_the_same_mean_saliency():
    results = run_ranks(_rank_saliency, 2)
    assert results[0] == results[1] == [[[1.5] * 3] * 2, [0.0, 0.5, 1.0, 1.5]]


def test_compact_clipping_is_refused_where_the_trainer_has_no_clip_hook(tmp_path, monkeypatch):
    # A Trainer without _clip_grad_norm (an older or future transformers) would clip
    # model.parameters() and miss the compact gradients: refused, not silently unclipped.
    monkeypatch.delattr(Trainer, "_clip_grad_norm")
    trainer = _trainer(tmp_path, _model(), sau_compact_grads=True)
    with pytest.raises(ValueError, match="max_grad_norm=0") as info:
        trainer.create_optimizer()
    assert "\n" not in str(info.value)
    _trainer(tmp_path, _model(), max_grad_norm=0.0, sau_compact_grads=True).create_optimizer()
