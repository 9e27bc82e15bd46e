"""Running one sweep cell: the shared starting models, unlearning, evaluation, durability.

`CellRunner` keeps what consecutive cells share in memory: the loaded corpus and models
of one seed and dtype, the pruned model and its forget-set saliency per (prune, sparsity), one plan
per (k, alpha) on it, and the dense-unlearned weights that unlearn-then-prune prunes
(also written to the sweep's `shared/<key>-<fp>.safetensors` with the fingerprint in
their metadata, so a resumed sweep does not unlearn them again and a sweep with other
inputs or settings never prunes them). Every
cell starts from `torch.manual_seed(seed)` and a fixed data order, so its numbers do not
depend on which cells ran before it in the process: a killed and resumed sweep gives
the numbers of an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from sau.errors import RunFailedError, SAUError
from sau.lab.durable import durability_stats, durable_step_
from sau.lab.eval import NonFiniteScoresError, forget_quality, sparsity_integrity
from sau.lab.quantize import quantize_model_
from sau.lab.steps import (
    activation_checkpointing,
    evaluate,
    forget_saliency,
    freeze_all_but,
    prune_on_inputs,
    trainable_names,
)
from sau.lab.sweep.grid import Cell, alias_of, dense_of, parse_prune
from sau.lab.sweep.settings import METRICS, Settings
from sau.lab.sweep.stop import StopAtRetain
from sau.lab.variants import VARIANTS, build_optimizer, plan_for
from sau.optim import optimizer_state_bytes
from sau.prune import pruned_masks, target_linear_names
from sau.unlearn.loop import UnlearnConfig, unlearn

__all__ = ["CellRunner", "Settings", "shared_file"]


def shared_file(cell: Cell, fp: str) -> str | None:
    """The relative path where `cell`'s dense-unlearned weights are kept for
    unlearn-then-prune (cells that unlearn the dense target), else None."""
    if cell.is_reference or alias_of(cell) is not None:
        return None
    v = VARIANTS[cell.variant]
    if v.start != "dense" or v.prune_after:
        return None
    return f"shared/{cell.key()}-{fp}.safetensors"


@dataclass
class _Seeded:
    """The loaded inputs of one (seed, dtype) (sau.lab.inputs.Inputs) and the names
    unlearning trains."""

    key: tuple
    inputs: object
    names: list


@dataclass
class _Pruned:
    """The target pruned at one (seed, dtype, prune, sparsity), shared by the cells on it: its
    masks, forget saliency, plans per settings and, for the contrastive score, the
    saliency with the retain Fisher per lambda."""

    key: tuple
    model: object
    masks: dict
    saliency: object
    plans: dict
    with_retain: dict


def _retain_cell(cell: Cell) -> Cell:
    """The retain model's reference cell of `cell`'s seed and dtype."""
    return Cell(seed=cell.seed, variant="retain", dtype=cell.dtype)


def _before_prune(dense_row: dict) -> dict:
    """An unlearn-then-prune row's `*_before_prune` columns: the dense run's metrics."""
    metrics = ("forget_rouge", "forget_quality", "model_utility")
    return {f"{m}_before_prune": dense_row.get(m) for m in metrics}


class CellRunner:
    """Runs cells in the order `sau.lab.sweep.grid.expand` gives them (see module docstring).

    Args:
        load_inputs: (seed, dtype) -> sau.lab.inputs.Inputs (target and retain models in
            that dtype, rows).
        settings: Settings.
        store: the sweep's directory (sau.lab.outdir.SweepDir), where dense-unlearned
            weights are kept for unlearn-then-prune (`shared_file`).
        lookup: cell -> its finished result dict or None (the retain row gives the
            reference truth ratios and ROUGE level; the dense row unlearn-then-prune's
            before-pruning numbers).
        fp: the sweep's fingerprint, in the names and metadata of the kept weights.
    """

    def __init__(self, load_inputs, settings: Settings, store, lookup, fp: str = "") -> None:
        self.load_inputs, self.settings = load_inputs, settings
        self.store, self.lookup, self.fp = store, lookup, fp
        self._seeded: _Seeded | None = None
        self._pruned: _Pruned | None = None
        # (seed, dtype) -> the retain model's forget truth ratios
        self._reference_tr: dict = {}

    # ---- shared state -------------------------------------------------------------
    def seeded(self, cell: Cell) -> _Seeded:
        """The loaded inputs and trainable names of the cell's seed and dtype (loaded once
        per seed and dtype in a row)."""
        key = (cell.seed, cell.dtype)
        if self._seeded is None or self._seeded.key != key:
            self._seeded = self._pruned = None
            inputs = self.load_inputs(cell.seed, cell.dtype)
            names = trainable_names(inputs)
            freeze_all_but(inputs.model, names)
            self._seeded = _Seeded(key, inputs, names)
        return self._seeded

    def _prune(self, model, prune: str, sparsity: float, inputs) -> None:
        method, nm = parse_prune(prune)
        if method != "none":
            prune_on_inputs(model, method, sparsity, nm, inputs, progress=False)

    def _pruned_start(self, cell: Cell) -> _Pruned:
        """The target pruned at the cell's setting (made once per setting in a row)."""
        key = (cell.seed, cell.dtype, cell.prune, cell.sparsity)
        if self._pruned is None or self._pruned.key != key:
            self._pruned = None  # free the previous one first
            sd = self.seeded(cell)
            model = copy.deepcopy(sd.inputs.model)
            self._prune(model, cell.prune, cell.sparsity, sd.inputs)
            sal = forget_saliency(model, sd.inputs, sd.names, self.settings.batch_size)
            self._pruned = _Pruned(key, model, pruned_masks(model, sd.names), sal, {}, {})
        return self._pruned

    def _plan(self, cell: Cell, model):
        """The cell's plan on its pruned model (cached per settings), bound to `model`'s
        params (`SelectionPlan.bound_to` keeps a fused experts tensor's per-expert plans)."""
        pruned = self._pruned_start(cell)
        v = VARIANTS[cell.variant]
        named = {n: pruned.model.get_parameter(n) for n in pruned.saliency}  # scored names
        saliency = pruned.saliency
        if v.contrast is not None:
            saliency = self._with_retain(cell, pruned, v.contrast)
        plan = plan_for(
            cell.variant,
            named,
            saliency,
            k=cell.k,
            alpha=cell.alpha,
            w_max=self.settings.w_max,
            cache=pruned.plans,
        )
        return plan.bound_to({n: model.get_parameter(n) for n in plan})

    def _with_retain(self, cell: Cell, pruned: _Pruned, contrast: float):
        """The forget saliency with the retain rows' Fisher (the contrastive score's),
        computed once per pruned model and lambda."""
        if contrast not in pruned.with_retain:
            sd = self.seeded(cell)
            pruned.with_retain[contrast] = forget_saliency(
                pruned.model, sd.inputs, sd.names, self.settings.batch_size, contrast=contrast
            )
        return pruned.with_retain[contrast]

    # ---- evaluation ---------------------------------------------------------------
    def _evaluate(self, model, cell: Cell) -> dict:
        inputs = self.seeded(cell).inputs
        # forget quality below: against the cached retain-model ratios of this seed, dtype
        res = evaluate(model, inputs, self.settings, None, progress=False)
        ref = self._retain_truth_ratios(cell)
        tr = res.get("forget_truth_ratio")
        res["forget_quality"] = (
            forget_quality(tr, ref) if ref is not None and tr is not None else None
        )
        return res

    def _retain_truth_ratios(self, cell: Cell):
        key = (cell.seed, cell.dtype)
        if key not in self._reference_tr:
            row = self.lookup(_retain_cell(cell))
            if row is None:
                return None
            self._reference_tr[key] = row.get("forget_truth_ratio")
        return self._reference_tr[key]

    def _evaluate_all(self, model, cell: Cell) -> dict:
        """Metrics of `model` (the result of `cell`), then of copies quantized to each of
        settings.bits.

        A "retain" cell's model is the retain model: its own truth ratios become the
        reference for forget quality (its quantized copies are measured against them).
        """
        t0 = time.perf_counter()
        reference = cell.variant == "retain"
        if reference:
            self._reference_tr.pop((cell.seed, cell.dtype), None)
        res = self._evaluate(model, cell)
        if reference and res.get("forget_truth_ratio") is not None:
            self._reference_tr[(cell.seed, cell.dtype)] = res["forget_truth_ratio"]
            res["forget_quality"] = forget_quality(
                res["forget_truth_ratio"], res["forget_truth_ratio"]
            )
        out = {m: res.get(m) for m in METRICS}
        if res.get("forget_truth_ratio") is not None:
            out["forget_truth_ratio"] = [float(x) for x in res["forget_truth_ratio"]]
        # The retain model may be of another architecture: its own layers are quantized.
        names = target_linear_names(model) if reference else self.seeded(cell).names
        for bits in self.settings.bits:
            qm = copy.deepcopy(model)
            quantize_model_(qm, bits, group_size=self.settings.group_size, names=names)
            q = self._evaluate(qm, cell)
            del qm
            out.update({f"q{bits}_{m}": q.get(m) for m in METRICS})
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    # ---- cells --------------------------------------------------------------------
    def run(self, cell: Cell) -> dict:
        """Run one cell and return its result dict (settings + metrics + seconds).

        Raises:
            RunFailedError: the cell's unlearning diverged (a loss NaN or inf at every
                step, or scores that are), one line naming the cell; finished cells stay.
            SAUError: a starting model whose scores are NaN or inf.
        """
        try:
            return self._run(cell)
        except NonFiniteScoresError as err:
            if cell.is_reference:
                raise SAUError(f"{cell.key()}: the starting model's {err}") from None
            raise RunFailedError(
                f"{cell.key()} diverged: after unlearning {err}; lower its lr or leave it "
                "out (the finished cells are kept)"
            ) from None
        except RunFailedError as err:
            raise RunFailedError(f"{cell.key()}: {err}") from None

    def _run(self, cell: Cell) -> dict:
        dense = alias_of(cell)
        if dense is not None:
            return self._alias_row(cell, dense)
        torch.manual_seed(cell.seed)
        sd = self.seeded(cell)
        extra: dict = {}
        crossing = None
        t0 = time.perf_counter()
        if cell.variant == "retain":
            if sd.inputs.retain_model is None:
                raise SAUError("no retain model: forget quality and --stop-at retain need one")
            model = sd.inputs.retain_model
        elif cell.variant == "target":
            model = self._pruned_start(cell).model if cell.sparsity else sd.inputs.model
        elif VARIANTS[cell.variant].prune_after:
            model, extra = self._unlearn_then_prune(cell)
        else:
            model, extra, crossing = self._unlearn(cell)
        seconds = time.perf_counter() - t0
        if cell.variant != "retain" and cell.sparsity:
            masks = self._pruned_start(cell).masks
            extra["sparsity_kept"] = sparsity_integrity(masks, model)
        result = {**cell.to_dict(), "key": cell.key(), "seconds": seconds, **extra}
        result.update(self._evaluate_all(model, cell))
        if crossing is not None:
            row = self._crossing_row(cell, model, *crossing)
            row["eval_seconds"] += result["eval_seconds"]
            result.update(row)
        if cell.variant != "retain":
            result.pop("forget_truth_ratio", None)  # only the reference's is needed later
        return result

    def _crossing_row(self, cell: Cell, model, start, prev: dict | None) -> dict:
        """The `prev_*` columns of a cell stopped at the retain level: metrics, quantized
        metrics and durability columns of the model at the last epoch end above the level
        (`prev`: its trainable weights; None: the starting model, epoch 0). Its evaluation
        time is added to the cell's eval_seconds."""
        names = self.seeded(cell).names
        lower = copy.deepcopy(model)
        with torch.no_grad():
            for n in names:
                value = start.get_parameter(n) if prev is None else prev[n]
                lower.get_parameter(n).copy_(value)
        res = self._evaluate_all(lower, cell)
        res.pop("forget_truth_ratio", None)
        seconds = res.pop("eval_seconds")
        res.update(_moved_stats(start, lower, names))
        if cell.sparsity:
            res["sparsity_kept"] = sparsity_integrity(self._pruned_start(cell).masks, lower)
        out = {f"prev_{k}": v for k, v in res.items()}
        out["eval_seconds"] = seconds  # added to the cell's own below
        return out

    def _alias_row(self, cell: Cell, dense: Cell) -> dict:
        """`cell`'s row from the dense cell it repeats (sau.lab.sweep.grid.alias_of): the
        same numbers under the cell's own settings; no time spent, nothing unlearned."""
        row = self.lookup(dense) or self.run(dense)
        skip = ("fingerprint", "optimizer_state_bytes")  # bytes: torch AdamW's, not ours
        out = {k: v for k, v in row.items() if k not in skip}
        out.update(cell.to_dict(), key=cell.key(), alias_of=dense.key())
        out.update(seconds=0.0, eval_seconds=0.0)
        if VARIANTS[cell.variant].prune_after:  # pruning at 0 changed nothing
            out.update(_before_prune(row))
        return out

    def _unlearn(self, cell: Cell):
        sd, s, v = self.seeded(cell), self.settings, VARIANTS[cell.variant]
        start = sd.inputs.model if v.start == "dense" else self._pruned_start(cell).model
        model = copy.deepcopy(start)
        params = [model.get_parameter(n) for n in sd.names]
        plan = self._plan(cell, model) if v.optimizer == "sau" else None
        opt = build_optimizer(
            cell.variant,
            params,
            plan,
            lr=cell.lr,
            rounding=cell.rounding or "kahan",  # None: no effect (float32 or torch AdamW)
            state_bits=cell.state_bits or 32,
            seed=cell.seed,
            compact_grads=s.compact_grads,
        )
        stop = cell.stop_at == "retain"
        cfg = UnlearnConfig(
            method=cell.method,
            epochs=s.max_epochs if stop else s.epochs,
            lr=cell.lr,
            batch_size=s.batch_size,
            retain_weight=s.retain_weight,
            seed=cell.seed,
            checkpoint_every=0,
        )
        push = None
        if v.durable:  # sau-durable's post-step, applied (and judged) at each check

            def push():
                return durable_step_(model, start, sd.names, plan)

        stopper = self._stopper(cell, model, sd.names, push) if stop else None
        with activation_checkpointing(model, s.gradient_checkpointing):
            out = unlearn(
                model,
                sd.inputs.tok,
                sd.inputs.forget,
                sd.inputs.retain,
                opt,
                cfg,
                should_stop=stopper,
                progress=False,
            )
        if out.interrupted and not (stopper and stopper.reached):
            raise KeyboardInterrupt
        extra = {"final_loss": out.losses[-1] if out.losses else None, "steps": out.steps_done}
        extra["optimizer_state_bytes"] = optimizer_state_bytes(opt)
        if stopper is not None:
            extra.update(stopper.summary(out.steps_done, out.total_steps))
        # The stopping rule already pushed (and judged) sau-durable's reported model.
        pushed = None if stopper is None else stopper.pushed
        extra.update(_durability(v, plan, model, start, sd.names, pushed))
        if v.start == "dense":
            self._save_dense(cell, model, sd.names)
        crossing = (start, stopper.prev) if stopper is not None and stopper.reached else None
        return model, extra, crossing

    def _stopper(self, cell: Cell, model, names, push) -> StopAtRetain:
        """--stop-at retain for `model`: the level is the retain model's forget ROUGE-L;
        it keeps `names` for the crossing and judges the model after `push`."""
        ref = self.lookup(_retain_cell(cell))
        if ref is None:
            raise SAUError("--stop-at retain needs the retain model's row first")
        inputs = self.seeded(cell).inputs
        return StopAtRetain(float(ref["forget_rouge"]), model, inputs, self.settings, names, push)

    def _unlearn_then_prune(self, cell: Cell):
        sd = self.seeded(cell)
        dense_cell = dense_of(cell)
        before = self.lookup(dense_cell)
        rel = shared_file(dense_cell, self.fp)
        if before is None or not self.store.owns(rel):
            raise SAUError(f"{cell.key()}: the dense run it prunes is missing ({rel})")
        model = copy.deepcopy(sd.inputs.model)
        with torch.no_grad():
            for name, value in self._load_dense(rel, dense_cell).items():
                model.get_parameter(name).copy_(value)
        self._prune(model, cell.prune, cell.sparsity, sd.inputs)
        extra = _before_prune(before)
        for key in ("epochs_run", "reached_retain"):
            if key in before:
                extra[key] = before[key]
        # Durability against the target pruned the same way (what the other pruned
        # variants start from): an entry zero in both is pruned, not moved; one that the
        # second pruning drops, or keeps where the first dropped it, moved.
        extra.update(_moved_stats(self._pruned_start(cell).model, model, sd.names))
        return model, extra

    def _load_dense(self, rel: str, cell: Cell) -> dict:
        """The kept dense weights of `cell`, refused unless their metadata names this
        cell and fingerprint and they hold exactly the trainable weights."""
        path = self.store.out / rel
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            meta = _safetensors_metadata(data)
            tensors = load(data)
        except (OSError, ValueError, SafetensorError) as err:
            raise SAUError(f"{path}: unreadable ({err}); delete it and its dense cell") from None
        names = set(self.seeded(cell).names)
        if meta.get("cell") != cell.key() or meta.get("fingerprint") != self.fp:
            raise SAUError(f"{path}: not {cell.key()}'s weights of this sweep; delete it")
        if set(tensors) != names:
            raise SAUError(f"{path}: does not hold the model's trainable weights; delete it")
        return tensors

    def _save_dense(self, cell: Cell, model, names) -> None:
        """Atomically keep the dense-unlearned trainable weights for unlearn-then-prune,
        with the cell's key and the sweep's fingerprint in their metadata."""
        tensors = {n: model.get_parameter(n).detach().contiguous().clone() for n in names}
        meta = {"cell": cell.key(), "fingerprint": self.fp}
        self.store.write(shared_file(cell, self.fp), lambda fh: fh.write(save(tensors, meta)))


def _safetensors_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file's bytes ({} when it has none).

    Raises:
        ValueError: not a safetensors header.
    """
    if len(data) < 8:
        raise ValueError("too short for a safetensors file")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise ValueError("truncated safetensors header")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("bad safetensors header")
    return meta


def _durability(v, plan, model, start, names, pushed: int | None = None) -> dict:
    """The durable variants' post-step (sau.lab.durable.make_durable_ on the plan's
    selected entries; `pushed`: the count of a push already made by the stopping rule,
    which is not repeated), then the durability columns of the unlearned model against
    its start (`durability_stats`: |dw| / bin percentiles and "survives" shares, RTN-4
    and NF4)."""
    extra = {}
    if v.durable:
        extra["durable_pushed"] = (
            pushed if pushed is not None else durable_step_(model, start, names, plan)
        )
    extra.update(_moved_stats(start, model, names))
    return extra


def _moved_stats(start, model, names) -> dict:
    """`durability_stats` of `model`'s weights `names` against the same weights of
    `start` (an entry zero in both is pruned, never moved)."""
    before = {n: start.get_parameter(n).detach() for n in names}
    return durability_stats(before, {n: model.get_parameter(n) for n in names})
