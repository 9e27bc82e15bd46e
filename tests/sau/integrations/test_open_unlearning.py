"""The open-unlearning plug-in on a stand-in of open-unlearning's trainer registry (its
classes reduced to what the plug-in meets: compute_loss(model, inputs, return_outputs),
nested forget/retain batches, NPO's deep-copied reference model), on a tiny pruned Llama;
and, where open-unlearning's source is given (OPEN_UNLEARNING_SRC=<its src/>), on its own
classes and registry."""

from __future__ import annotations

import copy
import inspect
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import Trainer, TrainingArguments

from sau.integrations import open_unlearning
from sau.integrations.open_unlearning import CONFIG_DIR, VARIANTS, register
from sau.integrations.trainer import SAUTrainerMixin
from tests.helpers import llama_planned_names, pruned_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[3]
ROWS = 8


# --- a stand-in of open-unlearning's src/trainer (the parts the plug-in meets) ---------


def compute_batch_nll(model, inputs):
    outputs = model(**inputs)
    labels = inputs["labels"][..., 1:].contiguous()
    logits = outputs.logits[..., :-1, :].contiguous()
    loss = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return loss(logits.transpose(-1, -2), labels).sum(dim=-1), outputs


def compute_dpo_loss(model, ref_model, lose_inputs, beta=1.0):
    """open-unlearning's compute_dpo_loss with win_inputs=None."""
    lose_loss, lose_outputs = compute_batch_nll(model, lose_inputs)
    with torch.no_grad():
        lose_ref_loss, _ = compute_batch_nll(ref_model, lose_inputs)
    lose_log_ratio = -(lose_loss - lose_ref_loss)
    loss = -2 / beta * F.logsigmoid(beta * (0.0 - lose_log_ratio)).mean()
    return loss, (None, lose_outputs)


def _three(part: dict) -> dict:
    return {k: part[k] for k in ("input_ids", "attention_mask", "labels")}


class UnlearnTrainer(Trainer):
    def __init__(self, evaluators=None, template_args=None, *args, **kwargs):
        self.evaluators, self.template_args = evaluators, template_args
        super().__init__(*args, **kwargs)


class GradAscent(UnlearnTrainer):
    def compute_loss(self, model, inputs, return_outputs=False):
        outputs = model(**_three(inputs["forget"]))
        return (-outputs.loss, outputs) if return_outputs else -outputs.loss


class GradDiff(UnlearnTrainer):
    def __init__(self, gamma=1.0, alpha=1.0, retain_loss_type="NLL", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma, self.alpha, self.retain_loss_type = gamma, alpha, retain_loss_type
        self.ref_model = None
        if retain_loss_type == "KL":
            self.ref_model = self._prepare_ref_model(self.model)

    def _prepare_ref_model(self, model):
        ref_model = copy.deepcopy(model).to(self.accelerator.device)
        ref_model.eval()
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def compute_retain_loss(self, model, retain_inputs):
        return model(**retain_inputs).loss  # retain_loss_type="NLL"

    def compute_loss(self, model, inputs, return_outputs=False):
        forget_outputs = model(**_three(inputs["forget"]))
        retain_loss = self.compute_retain_loss(model, _three(inputs["retain"]))
        loss = self.gamma * -forget_outputs.loss + self.alpha * retain_loss
        return (loss, forget_outputs) if return_outputs else loss


class NPO(GradDiff):
    def __init__(self, beta=1.0, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        if self.ref_model is None:
            self.ref_model = self._prepare_ref_model(self.model)

    def compute_loss(self, model, inputs, return_outputs=False):
        forget_loss, forget_outputs = compute_dpo_loss(
            model, self.ref_model, inputs["forget"], beta=self.beta
        )
        retain_loss = self.compute_retain_loss(model, _three(inputs["retain"]))
        loss = self.gamma * forget_loss + self.alpha * retain_loss
        return (loss, forget_outputs) if return_outputs else loss


class SimNPO(GradDiff):
    def __init__(self, delta=0.0, beta=1.0, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.delta, self.beta = delta, beta

    def compute_loss(self, model, inputs, return_outputs=False):
        forget = inputs["forget"]
        forget_loss, forget_outputs = compute_batch_nll(model, forget)
        forget_loss = forget_loss / (forget["labels"] != -100).sum(-1) - self.delta
        forget_loss = -F.logsigmoid(self.beta * forget_loss).mean() * 2 / self.beta
        retain_loss = self.compute_retain_loss(model, _three(inputs["retain"]))
        loss = self.gamma * forget_loss + self.alpha * retain_loss
        return (loss, forget_outputs) if return_outputs else loss


def stand_in_registry() -> types.ModuleType:
    """A fresh module with TRAINER_REGISTRY and _register_trainer, as src/trainer/."""
    module = types.ModuleType("stand_in_trainer")
    module.TRAINER_REGISTRY = {}
    module._register_trainer = lambda cls: module.TRAINER_REGISTRY.__setitem__(cls.__name__, cls)
    for cls in (Trainer, GradAscent, GradDiff, NPO, SimNPO):
        module._register_trainer(cls)
    return module


class ForgetRetainDataset(torch.utils.data.Dataset):
    """open-unlearning's (anchor="forget"): the retain row drawn from the global RNG."""

    def __init__(self, forget, retain):
        self.forget, self.retain = forget, retain

    def __len__(self):
        return len(self.forget)

    def __getitem__(self, idx):
        j = torch.randint(0, len(self.retain), (1,)).item()
        return {"forget": self.forget[idx], "retain": self.retain[j]}


def collate(instances):
    """open-unlearning's DataCollatorForSupervisedDataset: nested parts recursively, rows
    right-padded (pad id 0, labels -100), attention_mask = input_ids != pad."""
    if "input_ids" not in instances[0]:
        return {key: collate([row[key] for row in instances]) for key in instances[0]}
    pad = torch.nn.utils.rnn.pad_sequence
    ids = pad([row["input_ids"] for row in instances], batch_first=True, padding_value=0)
    labels = pad([row["labels"] for row in instances], batch_first=True, padding_value=-100)
    return {"input_ids": ids, "attention_mask": ids.ne(0), "labels": labels}


def _rows(seed: int) -> list[dict]:
    """ROWS unpadded rows of 6 to 10 tokens (ids 1..63), no loss on the first 3."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(ROWS):
        ids = torch.randint(1, 64, (int(torch.randint(6, 11, (1,), generator=g)),), generator=g)
        labels = ids.clone()
        labels[:3] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


# --- helpers --------------------------------------------------------------------------------


def _model():
    model = pruned_tiny_llama(seed=0)
    model.model.norm.weight.requires_grad_(False)  # trained: the planned weights only
    return model


def _args(tmp_path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
    )


def _trainer(cls, tmp_path, model, **kwargs):
    """As open-unlearning's load_trainer builds one (evaluators, template_args included)."""
    dataset = ForgetRetainDataset(_rows(1), _rows(2))
    return cls(
        model=model,
        args=_args(tmp_path),
        train_dataset=dataset,
        data_collator=collate,
        evaluators=None,
        template_args=None,
        **kwargs,
    )


def _batches(size: int = 3) -> list[dict]:
    """Nested batches of `size` rows: another padding than the reference pass's 2."""
    torch.manual_seed(5)
    dataset = ForgetRetainDataset(_rows(1), _rows(2))
    return [collate([dataset[i] for i in range(s, min(s + size, ROWS))]) for s in (0, 3, 5)]


# --- register ---------------------------------------------------------------------------------


def test_register_adds_the_four_variants_once():
    registry = stand_in_registry()
    assert register(registry) == list(VARIANTS)
    table = registry.TRAINER_REGISTRY
    first = {name: table[name] for name in VARIANTS}
    for name, base in VARIANTS.items():
        cls = table[name]
        assert cls.__name__ == name and cls.__mro__[1:3] == (SAUTrainerMixin, table[base])
    assert register(registry) == list(VARIANTS)  # idempotent: the same classes stay
    assert all(table[name] is first[name] for name in VARIANTS)
    assert register(registry.TRAINER_REGISTRY) == list(VARIANTS)  # the dict itself


def test_register_without_open_unlearning_is_one_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "trainer", None)  # `import trainer` fails
    with pytest.raises(ImportError) as info:
        register()
    assert "\n" not in str(info.value) and "registry=" in str(info.value)


def test_register_refuses_a_registry_without_the_bases():
    registry = stand_in_registry()
    del registry.TRAINER_REGISTRY["SimNPO"]
    with pytest.raises(ValueError, match="no SimNPO"):
        register(registry)


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["SAUGradDiff", "SAUNPO"])
def test_two_steps_move_only_the_planned_entries(tmp_path, name):
    registry = stand_in_registry()
    register(registry)
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(registry.TRAINER_REGISTRY[name], tmp_path, model, alpha=0.5, sau_k=0.3)
    trainer.train()
    assert trainer.state.global_step == 2
    plan = trainer.sau_plan
    assert sorted(plan) == sorted(llama_planned_names(model))
    for n, p in model.named_parameters():
        if n not in plan:
            assert torch.equal(p, before[n]), n
            continue
        selected = torch.zeros(p.numel(), dtype=torch.bool)
        selected[plan[n].selection.index.long()] = True
        assert torch.equal((p.detach() != before[n]).reshape(-1), selected), n
        assert (p.detach()[before[n] == 0] == 0).all(), n  # pruned stay zero
    if name == "SAUNPO":
        assert trainer.ref_model is None and len(trainer.sau_ref_nll) == ROWS


@pytest.mark.parametrize("name", ["SAUGradAscent", "SAUGradDiff", "SAUSimNPO"])
def test_the_loss_is_the_base_trainers(tmp_path, name):
    """The variant's compute_loss (as transformers >= 4.46 calls it) is the base's."""
    registry = stand_in_registry()
    register(registry)
    model = _model()
    variant = _trainer(registry.TRAINER_REGISTRY[name], tmp_path, model)
    base = _trainer(registry.TRAINER_REGISTRY[VARIANTS[name]], tmp_path, model)
    for batch in _batches():
        got = variant.compute_loss(model, batch, num_items_in_batch=None)
        assert torch.equal(got, base.compute_loss(model, batch))


def test_npo_loss_equals_the_deep_copied_reference_models(tmp_path):
    """SAUNPO's loss (reference NLLs from the table) against open-unlearning's NPO with its
    deep copy, on batches of 3 rows (the table was made from batches of 2, so other
    padding), at step 0 and after two SAU steps (the table stays the model before them).
    Tolerance: float32 assert_close defaults (rtol 1.3e-6, atol 1e-5); the only
    difference is the reference NLL of a row computed in a batch of another shape."""
    registry = stand_in_registry()
    register(registry)
    model = _model()
    npo = _trainer(NPO, tmp_path, model, beta=0.5, alpha=0.5)  # deep-copies the model now
    sau = _trainer(registry.TRAINER_REGISTRY["SAUNPO"], tmp_path, model, beta=0.5, alpha=0.5)
    assert npo.ref_model is not None and sau.ref_model is None
    sau.create_optimizer()
    step0 = []
    for batch in _batches():
        step0.append(sau.compute_loss(model, batch))
        torch.testing.assert_close(step0[-1], npo.compute_loss(model, batch))
    table = sau.sau_ref_nll
    sau.train()
    assert sau.sau_ref_nll is table and sau.state.global_step == 2
    for batch, before in zip(_batches(), step0):
        got = sau.compute_loss(model, batch)
        torch.testing.assert_close(got, npo.compute_loss(model, batch))
        assert abs(got.item() - before.item()) > 1e-4  # the model moved off the reference


def test_npo_refuses_a_row_it_has_no_reference_for(tmp_path):
    registry = stand_in_registry()
    register(registry)
    model = _model()
    trainer = _trainer(registry.TRAINER_REGISTRY["SAUNPO"], tmp_path, model)
    batch = _batches()[0]
    batch["forget"]["input_ids"] = batch["forget"]["input_ids"].flip(-1)
    with pytest.raises(ValueError) as info:
        trainer.compute_loss(model, batch)
    assert "\n" not in str(info.value) and "no reference NLL" in str(info.value)


# --- the YAMLs --------------------------------------------------------------------------------


def test_the_yamls_name_the_variants_and_the_mixins_settings():
    defaults = {
        name: p.default
        for name, p in inspect.signature(SAUTrainerMixin.__init__).parameters.items()
        if name.startswith("sau_") and name not in ("sau_forget_batches", "sau_forget_loss")
    }
    files = sorted((CONFIG_DIR / "trainer").glob("*.yaml"))
    assert [f.stem for f in files] == sorted(VARIANTS)
    for path in files:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert config["handler"] == path.stem
        assert config["defaults"] == [VARIANTS[path.stem]]  # open-unlearning's own YAML
        assert config["method_args"] == defaults, path.name


def test_the_yamls_are_package_data():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11 and later")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    shipped = set()
    for package, patterns in setuptools["setuptools"]["package-data"].items():
        folder = ROOT.joinpath(*package.split("."))
        shipped |= {p for pattern in patterns for p in folder.glob(pattern)}
    assert set(CONFIG_DIR.rglob("*.yaml")) <= shipped
    assert (CONFIG_DIR / "__init__.py").is_file()  # a package: pkg://sau.integrations.configs


# --- open-unlearning's own source ---------------------------------------------------------


@pytest.fixture
def real_trainer_module(tmp_path, monkeypatch):
    """open-unlearning's src/trainer, imported from OPEN_UNLEARNING_SRC; omegaconf (a type
    hint in trainer/__init__.py) and deepspeed (imported by rmu.py, never called here) get
    empty stand-ins when not installed. sys.modules is restored afterwards."""
    src = os.environ.get("OPEN_UNLEARNING_SRC")
    if not src or not (Path(src) / "trainer" / "__init__.py").is_file():
        pytest.skip("set OPEN_UNLEARNING_SRC to open-unlearning's src/ to test its own classes")
    stubs = tmp_path / "stubs"
    for name, text in (("omegaconf", "DictConfig = dict\n"), ("deepspeed", "")):
        try:
            __import__(name)
        except ImportError:
            (stubs / name).mkdir(parents=True)
            (stubs / name / "__init__.py").write_text(text, encoding="utf-8")
    monkeypatch.syspath_prepend(str(stubs))
    monkeypatch.syspath_prepend(src)
    saved = dict(sys.modules)
    try:
        import trainer
    except Exception as err:  # a dependency this environment lacks
        pytest.skip(f"open-unlearning's trainer does not import here: {err!r}")
    yield trainer
    for name in set(sys.modules) - set(saved):
        if name.partition(".")[0] in ("trainer", "omegaconf", "deepspeed"):
            del sys.modules[name]


def test_register_into_open_unlearnings_own_registry(real_trainer_module, tmp_path):
    """The real registry gets the four variants; SAUNPO over the real NPO equals the real NPO
    with its deep copy (tolerance as above) and trains two steps; the other variants' losses
    are the real bases'; the YAMLs' bases exist in its configs/."""
    assert register() == list(VARIANTS)
    table = real_trainer_module.TRAINER_REGISTRY
    assert all(table[name]._sau_base is table[base] for name, base in VARIANTS.items())
    model = _model()
    npo = _trainer(table["NPO"], tmp_path, model, beta=0.5)
    sau = _trainer(table["SAUNPO"], tmp_path, model, beta=0.5, sau_k=0.3)
    assert sau.ref_model is None and open_unlearning.__name__ == type(sau).__module__
    sau.create_optimizer()
    for batch in _batches():
        torch.testing.assert_close(sau.compute_loss(model, batch), npo.compute_loss(model, batch))
    for name in ("SAUGradAscent", "SAUGradDiff", "SAUSimNPO"):
        variant = _trainer(table[name], tmp_path, model)
        base = _trainer(table[VARIANTS[name]], tmp_path, model)
        for batch in _batches():
            assert torch.equal(variant.compute_loss(model, batch), base.compute_loss(model, batch))
    before = [p.detach().clone() for p in model.parameters()]
    sau.train()  # transformers passes num_items_in_batch, which NPO's compute_loss lacks
    assert sau.state.global_step == 2
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for batch in _batches():
        torch.testing.assert_close(sau.compute_loss(model, batch), npo.compute_loss(model, batch))
    configs = Path(os.environ["OPEN_UNLEARNING_SRC"]).parent / "configs" / "trainer"
    if configs.is_dir():
        assert all((configs / f"{base}.yaml").is_file() for base in VARIANTS.values())
