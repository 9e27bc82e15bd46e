"""Fine-tuning a causal LM on QA rows: how the embedded default memorizes its corpus.

Recipe (target and retain model alike): byte-level BPE tokenizer trained on the whole
corpus; `LlamaForCausalLM` with tied embeddings; loss on answer tokens + EOS only (the
prompt is always given at test time, and sau.prompt scores answers the same way); AdamW
(betas 0.9/0.98, no weight decay), 5% linear warmup, cosine decay to 10% of lr, grad-norm
clip 1; batch 32, shuffled by a private torch.Generator(seed).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from sau.batching import collate, encode_rows, pad_id

__all__ = ["train_causal_lm"]


def train_causal_lm(
    model,
    tokenizer,
    rows: list[dict],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """Fine-tune `model` in place on QA rows; the loss is over answer tokens + EOS only.

    AdamW (betas 0.9/0.98, no weight decay: decay fights memorization), linear warmup
    over the first 5% of steps, cosine decay to 10% of `lr`, gradient norm clipped to 1.

    Args:
        model: a causal LM (e.g. LlamaForCausalLM), float32, on the CPU.
        tokenizer: its tokenizer; rows are rendered with sau.prompt's format.
        rows: list of dicts with str `question` and `answer`.
        epochs, lr, batch_size: int, float, int; the recipe.
        seed: int; shuffling order (a private torch.Generator; global RNG untouched).
        progress: bool; show a tqdm bar over steps.

    Returns:
        list[float], the mean training loss of each epoch.
    """
    data = encode_rows(tokenizer, rows)
    pad = pad_id(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(total))
    model.train()
    losses = []
    with tqdm(total=total, desc=desc, disable=not progress, unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=gen).tolist()
            epoch_loss = 0.0
            for start in range(0, len(order), batch_size):
                batch = [data[i] for i in order[start : start + batch_size]]
                epoch_loss += _train_step(model, opt, sched, collate(batch, pad), bar)
            losses.append(epoch_loss / steps_per_epoch)
    model.eval()
    return losses


def _warmup_cosine(total: int):
    """The lr multiplier per step: linear warmup over the first 5% of `total` steps (at
    least one), then cosine decay from 1 to 0.1 at step `total`."""
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

    return schedule


def _train_step(model, opt, sched, batch: dict, bar) -> float:
    """One optimizer step on a collated batch (loss on answer + EOS only, sau.batching:
    the prompt is given at test time), grad norm clipped to 1; returns the loss."""
    loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    value = loss.item()
    bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    bar.update(1)
    return value
