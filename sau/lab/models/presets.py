"""The embedded default's presets: corpus size, model shape and training recipe.

Chosen presets (why: the smallest/shortest that still memorizes every forget fact with
margin, since the whole `sau demo` must fit in 10 minutes on a 2-core CPU):

- default: 100 people x 8 facts (forget 10 people = 80 rows), 40 general rows; vocab 1024,
  hidden 128, 4 layers, 4 heads, intermediate 512 (1.18M params); 25 epochs, lr 4e-3.
- quick: 20 people (forget 2 = 16 rows), 10 general; vocab 512, hidden 128, 2 layers,
  intermediate 384 (0.49M params); 40 epochs, lr 3e-3.
- tofu: 160 people x 20 facts (forget 16 people = 320 rows), the default model shape;
  20 epochs, lr 4e-3 (measured beside PRESETS: 648 s for both models on the 2-core VM;
  `sau sweep --corpus tofu`).

Measured (train_causal_lm only, no tokenizer/saving; each job pinned with taskset to 2
cores of a 16-core Intel Xeon on the lent device machine, CPU only, 7 jobs side by side;
ROUGE-L = rouge_score rougeL recall of greedy answers, <= 32 new tokens):

| config | target s | retain s | target on forget | retain model on forget | target on holdout |
|---|---|---|---|---|---|
| default (100 p, h128 L4, 25 ep, lr 4e-3) | 44.7 | 36.0 | 1.000 | 0.374 | 0.378 |
| quick (20 p, h128 L2, 40 ep, lr 3e-3) | 9.4 | 9.0 | 1.000 | 0.231 | 0.335 |
| 100 p, h128 L4, 30 ep, lr 3e-3 | 52.7 | 40.5 | 1.000 | 0.332 | 0.331 |
| 120 p, h192 L4 i512, 20 ep, lr 3e-3 | 54.5 | 46.9 | 0.990 | 0.344 | 0.352 |
| 120 p, h256 L2 i1024, 20 ep, lr 3e-3 | 54.9 | 46.2 | 0.928 | 0.346 | 0.364 |
| 120 p, h256 L4 i768, 20 ep, lr 2e-3 | 84.8 | 72.0 | 0.992 | 0.352 | 0.358 |

The retain model's ~0.3 on forget is what template words and guessing a plausible value
earn; the same score on holdout shows the target's 1.0 is memorization, not the format.

On this project's own 2-core x86 VM, end to end `build_default` (tokenizer, both
models, saving; torch 2.13 CPU) was measured only while other jobs loaded the machine
(load average 1.5-8), so these are upper bounds, not the budget check:
default 736 s (load ~6-8) and, with OMP_WAIT_POLICY=PASSIVE, 182 s (load 5.5 falling to
1.5); quick 321 s / 81 s the same way, 105 s (default policy, load 1.4-2.8). ROUGE-L
there: default target on forget 1.000, retain model on forget 0.359, target on holdout
0.318; quick 1.000 / 0.231 / 0.335. Why PASSIVE matters: with libgomp's default active
wait, 2 threads on 2 busy cores ran a tiny training step in 0.92 s against 0.012 s on
1 thread and 0.021 s on 2 threads with PASSIVE.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRESETS", "ModelConfig", "Preset", "TrainConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the small Llama (and the tokenizer's vocabulary size)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 128


@dataclass(frozen=True)
class TrainConfig:
    """Recipe shared by the target and the retain model."""

    epochs: int = 25
    lr: float = 4e-3
    batch_size: int = 32
    seed: int = 0


@dataclass(frozen=True)
class Preset:
    """One named configuration of the embedded default (see the module docstring)."""

    n_people: int
    n_general: int
    model: ModelConfig
    train: TrainConfig
    n_facts: int = 8  # rows per person (sau.lab.data.generate)


PRESETS = {
    "default": Preset(100, 40, ModelConfig(), TrainConfig()),
    "quick": Preset(
        20,
        10,
        ModelConfig(vocab_size=512, intermediate_size=384, num_hidden_layers=2),
        TrainConfig(epochs=40, lr=3e-3),
    ),
    # Toward TOFU's scale (sau sweep --corpus tofu): TOFU's 20 facts per person and as
    # many people as train (target + retain model) within 15 minutes on this project's
    # 2-core VM, one thread. Measured there 2026-11-28: 0.228 s/step before choosing (load
    # average ~4.7), so TOFU's 200 people (4320 steps) ~16.4 min, 160 people (3480 steps)
    # ~13.2 min. The 160-person build then took 648 s (target 333 s, retain 307 s, 0.18
    # s/step at load ~3.5-4.5; at that rate 200 people would be ~13 min: the limit moves
    # with the load). Target on forget ROUGE-L 0.990, on holdout 0.322; retain model on
    # forget 0.334 (docs/results.md).
    "tofu": Preset(160, 40, ModelConfig(), TrainConfig(epochs=20, lr=4e-3), n_facts=20),
}
