"""Training the embedded default: a small Llama that memorizes the synthetic corpus.

Recipe (target and retain model alike): byte-level BPE tokenizer trained on the whole
corpus; `LlamaForCausalLM` with tied embeddings; loss on answer tokens + EOS only (the
prompt is always given at test time, and sau.prompt scores answers the same way); AdamW
(betas 0.9/0.98, no weight decay), 5% linear warmup, cosine decay to 10% of lr, grad-norm
clip 1; batch 32, shuffled by a private torch.Generator(seed).

Chosen presets (why: the smallest/shortest that still memorizes every forget fact with
margin, since the whole `sau demo` must fit in 10 minutes on a 2-core CPU):

- default: 100 people x 8 facts (forget 10 people = 80 rows), 40 general rows; vocab 1024,
  hidden 128, 4 layers, 4 heads, intermediate 512 (1.18M params); 25 epochs, lr 4e-3.
- quick: 20 people (forget 2 = 16 rows), 10 general; vocab 512, hidden 128, 2 layers,
  intermediate 384 (0.49M params); 40 epochs, lr 3e-3.

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

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA = 1  # bump when the recipe changes in a way the configs below do not capture


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
class _Preset:
    n_people: int
    n_general: int
    model: ModelConfig
    train: TrainConfig
    n_facts: int = 8  # rows per person (sau.data.generate)


PRESETS = {
    "default": _Preset(100, 40, ModelConfig(), TrainConfig()),
    "quick": _Preset(
        20,
        10,
        ModelConfig(vocab_size=512, intermediate_size=384, num_hidden_layers=2),
        TrainConfig(epochs=40, lr=3e-3),
    ),
    # Toward TOFU's scale (sau sweep --corpus tofu): TOFU's 20 facts per person, 100 people
    # (forget 10% = 200 rows). 200 people (TOFU's 4000 rows) measured 1.0-1.3 s per step
    # on this project's loaded 2-core VM: ~40-50 min for the target alone, over the
    # 15-minute budget for both models; 100 people is half the steps (README).
    "tofu": _Preset(100, 40, ModelConfig(), TrainConfig(epochs=20, lr=4e-3), n_facts=20),
}


def make_model(config: ModelConfig, tokenizer, *, seed: int = 0):
    """A freshly initialized `transformers.LlamaForCausalLM` (float32, CPU).

    Args:
        config: ModelConfig; vocab_size is taken from `tokenizer` (len), not config.
        tokenizer: the PreTrainedTokenizerFast whose bos/eos/pad ids the model uses.
        seed: int; initialization seed. The global torch RNG is saved and restored.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # halves embedding params at a ~1k vocab, no cost in recall
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


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
    import torch
    from tqdm.auto import tqdm

    from sau.batching import collate, encode_rows, pad_id

    data = encode_rows(tokenizer, rows)
    pad = pad_id(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = max(1, epochs * steps_per_epoch)
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    with tqdm(total=total, desc=desc, disable=not progress, unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=gen).tolist()
            epoch_loss = 0.0
            for start in range(0, len(order), batch_size):
                batch = [data[i] for i in order[start : start + batch_size]]
                # Loss on answer + EOS only (sau.batching): the prompt is given at test time.
                loss = model(**collate(batch, pad)).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                epoch_loss += loss.item()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update(1)
            losses.append(epoch_loss / steps_per_epoch)
    model.eval()
    return losses


@dataclass
class DefaultArtifacts:
    """What `build_default` returns: the corpus and where the trained models live."""

    dataset: object  # sau.data.QADataset
    root: Path  # the cache entry: data/, target/, retain/, config.json
    data_dir: Path
    target_dir: Path
    retain_dir: Path
    config: dict  # data, model and train configs (the cache key's input)


def default_cache_dir() -> Path:
    """$SAU_CACHE if set, else ~/.cache/sau."""
    env = os.environ.get("SAU_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sau"


def build_default(
    cache_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    quick: bool = False,
    preset: str | None = None,
    progress: bool = True,
) -> DefaultArtifacts:
    """Generate the corpus and train (or reuse from cache) the target and retain models.

    The target is trained on forget + retain + general, the retain model on retain +
    general only, with the same tokenizer, initialization and recipe. Both are cached
    under `cache_dir/default-<hash>` where the hash covers the data, model and training
    configs; the entry is trained in a temporary directory and renamed into place, so a
    present entry is always complete and a second call loads nothing but paths.

    Args:
        cache_dir: where entries live; default `default_cache_dir()`.
        seed: int; data generation, initialization and shuffling seed.
        quick: bool; the smaller preset (fewer people, smaller model) for tests.
        preset: a name in PRESETS ("default", "quick", ...); overrides `quick`.
        progress: bool; tqdm bars while training.

    Returns:
        DefaultArtifacts with `target_dir` / `retain_dir` loadable by `load_model`.
    """
    from sau.data import generate

    name = preset if preset is not None else ("quick" if quick else "default")
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    dataset = generate(
        seed=seed, n_people=preset.n_people, n_general=preset.n_general, n_facts=preset.n_facts
    )
    train_cfg = TrainConfig(**{**asdict(preset.train), "seed": seed})
    config = {
        "schema": SCHEMA,
        "data": dataset.config_dict(),
        "model": asdict(preset.model),
        "train": asdict(train_cfg),
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / f"default-{key}"
    if not (root / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-default-{key}-", dir=cache))
        try:
            _train_entry(tmp, dataset, preset.model, train_cfg, config, progress)
            try:
                os.rename(tmp, root)
            except OSError:
                # Another process finished the same entry first; theirs is complete too.
                if not (root / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return DefaultArtifacts(
        dataset=dataset,
        root=root,
        data_dir=root / "data",
        target_dir=root / "target",
        retain_dir=root / "retain",
        config=config,
    )


def _train_entry(out: Path, dataset, model_cfg, train_cfg, config, progress) -> None:
    """Write data/, target/, retain/ and (last, as the completeness marker) config.json."""
    from sau.data import write_splits
    from sau.models.io import save_model
    from sau.models.tokenizer import corpus_texts, train_tokenizer

    write_splits(dataset, out / "data")
    # The tokenizer sees every split (holdout too) so forget and holdout names are
    # tokenized alike: a membership-inference gap must come from training, not from
    # holdout names falling apart into more pieces.
    all_rows = [r for rows in dataset.splits().values() for r in rows]
    tokenizer = train_tokenizer(corpus_texts(all_rows), vocab_size=model_cfg.vocab_size)
    recipe = dict(
        epochs=train_cfg.epochs,
        lr=train_cfg.lr,
        batch_size=train_cfg.batch_size,
        seed=train_cfg.seed,
        progress=progress,
    )
    for name, rows in (
        ("target", dataset.forget + dataset.retain + dataset.general),
        ("retain", dataset.retain + dataset.general),
    ):
        model = make_model(model_cfg, tokenizer, seed=train_cfg.seed)
        train_causal_lm(model, tokenizer, rows, desc=f"train {name}", **recipe)
        save_model(model, tokenizer, out / name)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
