"""The unlearning variants the lab compares, and how each one's plan and optimizer are built.

One registry, read by `sau demo`, `sau unlearn` (the pipeline) and `sau sweep`: a variant
is a starting model (the unpruned target, or the target pruned), an optimizer (torch
AdamW over every trainable weight, or SAUAdamW with a plan from the forget-set saliency)
and the plan's settings it fixes. Settings a variant leaves as None come from the run
(its k, alpha and amplify).

How a run stores its weights and moments (`DTYPES`, sau.names.ROUNDINGS and STATE_BITS)
is the run's too; `precision_settings` says which of those settings a variant's optimizer
actually uses, as its result row records them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from sau.optim import SAUAdamW
from sau.plan import SelectionPlan, plan_selection

__all__ = [
    "ALIASES",
    "DEFAULT_VARIANTS",
    "DTYPES",
    "VARIANTS",
    "Variant",
    "build_optimizer",
    "plan_for",
    "precision_settings",
    "register_variant",
]

# The dtypes a lab run loads its models in (torch.float32, torch.bfloat16); the first is
# the default. Names, not torch dtypes: they come from the command line and JSON files.
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Variant:
    """How one unlearning variant is run.

    Attributes:
        start: "dense" (the unpruned target) or "pruned" (the target pruned as the run says).
        optimizer: "adamw" (torch AdamW over every trainable weight) or "sau" (SAUAdamW with
            a plan from the forget-set saliency).
        k, alpha: the plan's k and alpha; None takes the run's value.
        amplify: SAUAdamW's "grad", "update" or "saliency"; None takes the run's.
        prune_after: prune the unlearned model afterwards as the run says (unlearn-then-
            prune); only with start="dense".
        plan: extra `plan_selection` keyword arguments (score, scope, k="mass:m").
        contrast: lambda of the contrastive score (score="contrast"): the saliency then
            also holds the retain set's Fisher.
        dense_when_unpruned: with nothing pruned the variant computes exactly what `dense`
            does (plain AdamW on every weight).
        sharded: runs under torchrun (FSDP2).
        durable: after unlearning, push each selected entry whose NF4 level did not change
            to the next NF4 level in its update's direction (sau.lab.durable).
        help: one line for --help and the reports.
    """

    start: str
    optimizer: str
    k: float | None = None
    alpha: float | None = None
    amplify: str | None = "update"
    prune_after: bool = False
    plan: dict = field(default_factory=dict)
    contrast: float | None = None
    dense_when_unpruned: bool = False
    sharded: bool = False
    durable: bool = False
    help: str = ""

    @property
    def uses_plan_axes(self) -> tuple[bool, bool]:
        """Whether the run's k and alpha matter for this variant."""
        sau = self.optimizer == "sau"
        return sau and self.k is None, sau and self.alpha is None


VARIANTS: dict[str, Variant] = {}
# Names that stand for another variant in a grid: the ablation's "sau" is the update form.
ALIASES = {"sau": "sau-update"}
# What `sau demo` and a sweep without --variant compare.
DEFAULT_VARIANTS = ("dense", "masked", "sau-grad", "sau-update", "unlearn-then-prune")


def register_variant(name: str, variant: Variant) -> None:
    """Add (or replace) a variant: it becomes a valid --variant value and report row.

    Raises:
        TypeError: `variant` is not a Variant.
        ValueError: an unknown start or optimizer, or prune_after without start="dense".
    """
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a sau.lab.variants.Variant, got {type(variant).__name__}")
    if variant.start not in ("dense", "pruned") or variant.optimizer not in ("adamw", "sau"):
        raise ValueError(f"variant {name!r}: start must be dense|pruned, optimizer adamw|sau")
    if variant.prune_after and variant.start != "dense":
        raise ValueError(f"variant {name!r}: prune_after needs start='dense'")
    VARIANTS[name] = variant


for _name, _variant in {
    "dense": Variant("dense", "adamw", help="AdamW on the unpruned model"),
    "masked": Variant(  # k = 1, alpha = 0: every survivor, w = 1 (plain AdamW on them)
        "pruned",
        "sau",
        k=1.0,
        alpha=0.0,
        amplify="grad",
        dense_when_unpruned=True,
        sharded=True,
        help="AdamW on all survivors",
    ),
    "sau": Variant(
        "pruned", "sau", amplify=None, sharded=True, help="SAU with the run's k, alpha, amplify"
    ),
    "sau-grad": Variant(
        "pruned", "sau", amplify="grad", sharded=True, help="SAU, w on the gradient"
    ),
    "sau-update": Variant(
        "pruned", "sau", amplify="update", sharded=True, help="SAU, w on the update"
    ),
    "unlearn-then-prune": Variant(
        "dense", "adamw", prune_after=True, help="dense unlearning, then pruning"
    ),
    "mask-only": Variant(
        "pruned", "sau", k=0.3, alpha=0.0, help="ablation: top-30% survivors, no amplification"
    ),
    "redistribute-only": Variant(
        "pruned", "sau", k=1.0, alpha=0.1, help="ablation: all survivors, amplified (update)"
    ),
    # Selection options (docs/method.md): sau-update with one thing changed.
    "sau-contrast": Variant(
        "pruned",
        "sau",
        plan=dict(score="contrast"),
        contrast=1.0,
        help="SAU selecting by F_forget / (F_retain + mean F_retain)",
    ),
    "sau-saliency-amp": Variant(
        "pruned", "sau", amplify="saliency", help="SAU, per-entry update scales s_i / mean_G s"
    ),
    "sau-durable": Variant(
        "pruned",
        "sau",
        amplify="update",
        durable=True,
        help="sau-update, then each selected entry pushed to its next NF4 level",
    ),
    "sau-global": Variant(
        "pruned", "sau", plan=dict(scope="global"), help="SAU, one threshold over all layers"
    ),
    "sau-mass": Variant(  # k shows the share in a sweep cell's key
        "pruned",
        "sau",
        k=0.8,
        plan=dict(k="mass:0.8"),
        help="SAU, per layer the fewest survivors holding 80% of the saliency",
    ),
}.items():
    register_variant(_name, _variant)


def plan_for(
    name: str,
    named: Mapping[str, torch.nn.Parameter],
    saliency,
    *,
    k: float,
    alpha: float,
    w_max: float,
    cache: dict | None = None,
) -> SelectionPlan:
    """The plan of SAUAdamW variant `name` over the weights `named` (name -> parameter).

    Args:
        saliency: `sau.compute_saliency`'s result for `named` (with the retain Fisher
            when the variant's score is "contrast").
        k, alpha: the run's values, used where the variant fixes none.
        w_max: the amplification cap.
        cache: a dict shared by the variants of one run on the same weights and saliency,
            or None. Variants with the same plan settings (sau-grad and sau-update) then
            plan once, and the others rebind that plan to their own copy of the model.
    """
    v = VARIANTS[name]
    options = {
        "k": k if v.k is None else v.k,
        "alpha": alpha if v.alpha is None else v.alpha,
        **v.plan,
    }
    key = tuple(sorted(options.items()))
    if cache is not None and key in cache:
        return cache[key].bound_to(named)
    plan = plan_selection(list(named.items()), saliency, w_max=w_max, **options)
    if cache is not None:
        cache[key] = plan
    return plan


def build_optimizer(
    name: str,
    params: list[torch.nn.Parameter],
    plan: SelectionPlan | None,
    *,
    lr: float,
    amplify: str = "update",
    in_backward: bool = False,
    rounding: str = "kahan",
    state_bits: int = 32,
    seed: int = 0,
    compact_grads: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer of variant `name` over the trainable `params`.

    An "adamw" variant gets torch.optim.AdamW (no weight decay), which ignores
    `in_backward`, `compact_grads`, `rounding`, `state_bits` and `seed`: its moments have
    the parameters' dtype and a 16-bit parameter is rounded to nearest. A "sau" variant
    gets SAUAdamW with `plan` (`plan_for`), the variant's amplify (the run's `amplify`
    where it fixes none) and the run's other settings.

    Args:
        rounding: SAUAdamW's store into float16/bfloat16 params, one of
            sau.names.ROUNDINGS (ignored for float32 params).
        state_bits: SAUAdamW's moments, 32 (float32) or 8 (block-scaled codes).
        seed: the stochastic rounding stream's seed, an int >= 0 (the run's seed).

    Raises:
        ValueError: from SAUAdamW, a rounding, state_bits or seed it does not take.
    """
    v = VARIANTS[name]
    if v.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return SAUAdamW(
        params,
        plan=plan,
        lr=lr,
        amplify=v.amplify or amplify,
        in_backward=in_backward,
        compact_grads=compact_grads,
        rounding=rounding,
        state_bits=state_bits,
        seed=seed,
    )


def precision_settings(
    name: str | None, dtype: str, rounding: str | None, state_bits: int | None
) -> dict:
    """The dtype, rounding and state_bits a run of variant `name` really uses, as a result
    row records them: rounding None where it has no effect (float32 weights, or an
    "adamw" variant), state_bits None for an "adamw" variant (torch AdamW's moments).

    Args:
        name: a registered variant, or None for a starting model (evaluated only: both
            None).
        dtype: one of DTYPES; rounding, state_bits: the run's settings.
    """
    v = VARIANTS.get(name) if name is not None else None
    sau = v is not None and v.optimizer == "sau"
    return {
        "dtype": dtype,
        "rounding": rounding if sau and dtype != DTYPES[0] else None,
        "state_bits": state_bits if sau else None,
    }
