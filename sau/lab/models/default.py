"""The embedded default, built once and cached: corpus, tokenizer, target and retain model.

Entries live under `default_cache_dir()` keyed by a hash of the data, model and training
configs (`sau.lab.models.presets`), so a second `build_default` only returns paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from sau.lab.data import QADataset, generate, write_splits
from sau.lab.models.factory import make_model
from sau.lab.models.io import save_model
from sau.lab.models.presets import PRESETS, ModelConfig, Preset, TrainConfig
from sau.lab.models.tokenizer import corpus_texts, train_tokenizer
from sau.lab.models.trainer import train_causal_lm

__all__ = ["SCHEMA", "DefaultArtifacts", "build_default", "default_cache_dir"]

SCHEMA = 1  # bump when the recipe changes in a way the preset configs do not capture


@dataclass
class DefaultArtifacts:
    """What `build_default` returns: the corpus and where the trained models live."""

    dataset: QADataset
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
    chosen = _named_preset(preset, quick)
    dataset = generate(
        seed=seed, n_people=chosen.n_people, n_general=chosen.n_general, n_facts=chosen.n_facts
    )
    train_cfg = TrainConfig(**{**asdict(chosen.train), "seed": seed})
    config = {
        "schema": SCHEMA,
        "data": dataset.config_dict(),
        "model": asdict(chosen.model),
        "train": asdict(train_cfg),
    }
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / f"default-{key}"
    if not (root / "config.json").is_file():
        _build_entry(root, key, dataset, chosen.model, train_cfg, config, progress)
    return DefaultArtifacts(
        dataset=dataset,
        root=root,
        data_dir=root / "data",
        target_dir=root / "target",
        retain_dir=root / "retain",
        config=config,
    )


def _named_preset(preset: str | None, quick: bool) -> Preset:
    """The Preset `preset` names, else "quick" or "default" by `quick`; ValueError when
    the name is not in PRESETS."""
    name = preset if preset is not None else ("quick" if quick else "default")
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def _build_entry(
    root: Path,
    key: str,
    dataset: QADataset,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    config: dict,
    progress: bool,
) -> None:
    """Train the cache entry `root` in a temporary sibling directory, then rename it into
    place. When another process completed `root` first, theirs is kept (it is complete
    too); the temporary directory is always removed."""
    cache = root.parent
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-default-{key}-", dir=cache))
    try:
        _train_entry(tmp, dataset, model_cfg, train_cfg, config, progress)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train_entry(out: Path, dataset, model_cfg, train_cfg, config, progress) -> None:
    """Write data/, target/, retain/ and (last, as the completeness marker) config.json."""
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
